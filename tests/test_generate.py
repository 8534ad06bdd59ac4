"""tools/generate.py: the tiny model end to end in a subprocess, and every usage error in-process."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import generate
import pytest
from helpers import one_and_two_ranks

ROOT = Path(__file__).resolve().parents[1]

def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])  # IHDR width, height


def test_tiny_end_to_end(tmp_path):
    out, report = tmp_path / "fox.png", tmp_path / "report.json"
    cmd = [sys.executable, str(ROOT / "tools" / "generate.py"), "--model", "tiny", "--prompt", "a red fox",
           "--height", "64", "--width", "48", "--steps", "3", "--output", str(out), "--report", str(report)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert png_size(out) == (48, 64)
    stages = json.loads(report.read_text())["stages"]
    assert len(stages["steps_s"]) == 3
    assert all(stages[k] > 0 for k in ("load_s", "text_encoding_s", "denoise_s", "vae_decode_s", "total_s"))
    assert "3/3" in result.stderr and "wrote" in result.stdout


def test_png_matches_pillow(tmp_path):
    import numpy as np
    import torch
    from PIL import Image

    image = torch.rand(3, 5, 7)
    generate.write_png(str(tmp_path / "x.png"), image)
    expected = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "x.png")), expected)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--height", "100"], "--height 100 is not a multiple of 16: the nearest valid sizes are 96 and 112"),
        (["--width", "8"], "--width 8 is not a multiple of 16: the nearest valid sizes are 16 and 16"),
        (["--steps", "0"], "--steps must be at least 1, got 0"),
        (["--height", "0"], "--height 0"),  # 0 is a bad size, not a request for the default
        (["--max-sequence-length", "0"], "--max-sequence-length must be at least 1, got 0"),
        (["--device", "cuda:7"], "device cuda:7 does not exist"),
        (["--device", "warp-drive"], "is not a device"),
        (["--output", "/no/such/folder/x.png"], "the folder /no/such/folder does not exist"),
        (["--vae-chunk", "0"], "--vae-stripes must be at least 1"),  # --vae-chunk: the old spelling
        (["--transformer", "x.safetensors"], "--transformer cannot be used with --model tiny"),
        (["--cfg-degree", "2"], "--cfg-degree 2 runs the negative and the positive branch on two halves"),
        (["--use_cfg_parallel", "--negative-prompt", "x"], "it needs --negative-prompt and --true-cfg-scale > 1"),
        (["--cfg-degree", "3"], "--cfg-degree must be 1 or 2"),
        (["--data-parallel-degree", "3", "--prompt", "a", "--prompt", "b"],
         "--data-parallel-degree 3 is more than the 2 image(s) asked for"),
        (["--num-images-per-prompt", "0"], "--num-images-per-prompt must be at least 1, got 0"),
        (["--ulysses-chunks", "0"], "--ulysses-chunks must be at least 1 (1: no overlap), got 0"),
    ],
)
def test_usage_errors_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--model", "tiny", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_degrees_that_do_not_fit_the_world(capsys):
    assert generate.main(["--model", "tiny", "--ulysses-degree", "2"]) == 2
    assert "world size is 1" in capsys.readouterr().err


def test_missing_model_exits_1(tmp_path, capsys):
    assert generate.main(["--model", str(tmp_path / "nothing")]) == 1
    assert "no such file or folder" in capsys.readouterr().err


def test_pickle_transformer_exits_1(tmp_path, capsys):
    bad = tmp_path / "flux1-dev.ckpt"
    bad.write_bytes(b"not unpickled")
    assert generate.main(["--model", str(tmp_path), "--transformer", str(bad)]) == 1
    assert "pickle checkpoints are never loaded" in capsys.readouterr().err


def test_torchrun_two_ranks_write_the_same_image(tmp_path):
    """`torchrun --nproc_per_node 2 tools/generate.py --ulysses-degree 2 --use-parallel-vae` == one process
    (the heads in 3 chunks whose all-to-alls overlap: the tiny model's messages get 1 by the automatic rule)."""
    report = tmp_path / "report.json"
    common = ["--model", "tiny", "--height", "48", "--width", "64", "--steps", "2", "--prompt", "a red fox"]
    one, two = one_and_two_ranks(tmp_path, common, ["--ulysses_degree", "2", "--ulysses-chunks", "3",
                                                    "--use-parallel-vae", "--report", str(report)])
    # the float images agree to ~1e-6; 8-bit rounding can move a value sitting on a .5 boundary by one
    assert abs(one - two).max() <= 1
    assert json.loads(report.read_text())["comm_bytes_per_step"]["all_to_all"] > 0


@pytest.mark.parametrize("layout", [["--ulysses-degree", "2"], ["--ring-degree", "2"]], ids=["ulysses2", "ring2"])
def test_torchrun_edits_with_the_tiny_kontext_as_one_process(tmp_path, layout):
    """`torchrun ... tools/generate.py --model tiny-kontext --image SRC` on 2 ranks == one process: the
    reference's 16 tokens and the output's 16 are sharded together."""
    import numpy as np
    from PIL import Image

    source = tmp_path / "source.png"
    assert generate.main(["--model", "tiny", "--prompt", "a red circle on a blue background",
                          "--output", str(source)]) == 0
    common = ["--model", "tiny-kontext", "--image", str(source), "--prompt", "make the circle green", "--steps", "2"]
    one, two = one_and_two_ranks(tmp_path, common, layout)
    assert abs(one - two).max() <= 1  # fp32 images ~1e-6 apart; 8-bit rounding moves a .5 by one
    assert abs(one - np.asarray(Image.open(source)).astype(int)).max() > 32  # the edit changed the image


@pytest.mark.parametrize("flags", [["--strength", "0.7"], ["--mask", "mask"], ["--variant", "fill", "--mask", "mask"],
                                   ["--variant", "canny", "--control-image", "image"]],
                         ids=["img2img", "inpaint", "fill", "canny"])
def test_torchrun_image_modes_on_two_ranks_write_the_one_process_image(tmp_path, flags):
    """Each image mode through `torchrun tools/generate.py --ulysses-degree 2` equals one process (a 48x48 px
    image: 9 tokens, uneven shards)."""
    image = write_image(tmp_path / "image.png", 48, 48)
    mask = write_image(tmp_path / "mask.png", 48, 48, mode="L")
    flags = [str(mask) if f == "mask" else str(image) if f == "image" else f for f in flags]
    image_flag = [] if "--control-image" in flags else ["--image", str(image)]
    common = ["--model", "tiny-random", *image_flag, *flags, "--steps", "2", "--prompt", "a red fox"]
    one, two = one_and_two_ranks(tmp_path, common, ["--ulysses-degree", "2"])
    assert abs(one - two).max() <= 1  # fp32 images ~1e-6 apart; 8-bit rounding moves a .5 by one


def test_several_prompts_write_numbered_images_in_order(tmp_path):
    report = tmp_path / "report.json"
    code = generate.main(
        [
            "--model",
            "tiny",
            "--prompt",
            "a red fox",
            "--prompt",
            "snow",
            "--num-images-per-prompt",
            "2",
            "--negative-prompt",
            "blurry",
            "--true-cfg-scale",
            "2",
            "--height",
            "32",
            "--width",
            "32",
            "--steps",
            "1",
            "--output",
            str(tmp_path / "pet.png"),
            "--report",
            str(report),
        ]
    )
    assert code == 0
    names = [str(tmp_path / f"pet-{i}.png") for i in range(4)]
    data = json.loads(report.read_text())
    assert data["images"] == names and all(png_size(Path(n)) == (32, 32) for n in names)
    assert data["prompts"] == ["a red fox", "snow"] and data["true_cfg_scale"] == 2.0
    assert data["cfg_degree"] == 1 and data["data_degree"] == 1 and "comm_bytes_per_step_by_axis" in data


# ---- image flags: --image, --mask, --control-image, --strength, --variant, --no-auto-resize ----


def write_image(path: Path, height: int, width: int, mode: str = "RGB") -> Path:
    from PIL import Image

    Image.new(mode, (width, height), color=128 if mode == "L" else (200, 30, 90, 255)[: len(mode)]).save(path)
    return path


@pytest.mark.parametrize("variant, flags, size", [
    (None, ["--strength", "0.5"], (48, 32)),  # img2img: the output takes the image's size
    (None, ["--mask", "mask"], (48, 32)),  # inpainting
    ("kontext", ["--no-auto-resize"], (48, 32)),
    ("fill", ["--mask", "mask"], (48, 32)),
])
def test_image_flags_write_an_image_of_the_image_size(tmp_path, variant, flags, size):
    image = write_image(tmp_path / "in.png", 32, 48, mode="RGBA")  # RGBA is converted to RGB
    mask = write_image(tmp_path / "mask.png", 32, 48, mode="L")
    flags = [str(mask) if f == "mask" else f for f in flags]
    report = tmp_path / "report.json"
    argv = ["--model", "tiny-random", "--image", str(image), *flags, "--steps", "2", "--output",
            str(tmp_path / "out.png"), "--report", str(report)]
    assert generate.main(argv + (["--variant", variant] if variant else [])) == 0
    assert png_size(tmp_path / "out.png") == size
    data = json.loads(report.read_text())
    assert data["mode"] == (variant or ("inpaint" if "--mask" in flags else "img2img"))
    # Kontext's 32x48 px reference adds its 2 x 3 tokens to the sequence; the other modes add none
    assert data["reference_tokens"] == (6 if variant == "kontext" else 0)


@pytest.mark.parametrize("argv, message", [
    (["--variant", "kontext"], "--image is needed: FLUX.1 Kontext edits a reference image"),
    (["--variant", "fill", "--image", "in"], "--mask is needed: FLUX.1 Fill repaints where it is white"),
    (["--variant", "canny", "--image", "in"], "--control-image is needed"),
    (["--variant", "kontext", "--image", "in", "--strength", "0.5"], "--strength is for img2img and inpainting"),
    (["--mask", "in"], "--mask needs an image too"),
    (["--image", "notes"], "--image {notes} is not an image file Pillow can read"),
    (["--image", "in", "--mask", "small"], "--mask is 16x16 px and the image 48x32 px"),
])
def test_image_errors_name_the_flag(tmp_path, capsys, argv, message):
    files = {"in": write_image(tmp_path / "in.png", 32, 48), "small": write_image(tmp_path / "s.png", 16, 16, "L"),
             "notes": tmp_path / "notes.png"}
    files["notes"].write_text("not a PNG")
    argv = [str(files[a]) if a in files else a for a in argv]
    assert generate.main(["--model", "tiny-random", "--steps", "1", "--output", str(tmp_path / "o.png"), *argv]) == 2
    assert message.format(notes=files["notes"]) in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--image", "/no/such.png"], "--image /no/such.png: no such file"),
    (["--control-image", "/no/such.png"], "--control-image /no/such.png: no such file"),
    (["--strength", "0"], "--strength must be in (0, 1]"),
    (["--variant", "redux"], "--variant: invalid choice"),
])
def test_image_usage_errors_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--model", "tiny", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err

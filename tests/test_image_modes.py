"""Image-conditioned FLUX.1 (img2img, inpaint, Kontext, Fill, Canny/Depth) against diffusers' pipelines.

One small random dev pipeline (test_pipeline's builder) is saved once per module as each diffusers pipeline
class, with a Fill (384 in) or Control (128 in) transformer where the class needs one; ours loads the
folder, so the variant detection from model_index.json is exercised too.

Ours encodes every image at the posterior mean; diffusers' img2img, inpaint, Fill and Control pipelines
sample it with the generator. The autouse fixture makes diffusers' DiagonalGaussianDistribution.sample return
its mean (what retrieve_latents' "argmax" mode returns), so that the two encode identically and no draw
precedes the noise's: img2img and inpaint draw the noise from the generator (they read `latents=` as the
start, not the noise), and torch.randn on the same seeded CPU generator gives ours the same noise.
"""

import dataclasses
import json

import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxControlPipeline,
    FluxFillPipeline,
    FluxImg2ImgPipeline,
    FluxInpaintPipeline,
    FluxKontextPipeline,
)
from diffusers import FluxPipeline as DiffusersFluxPipeline
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from helpers import diffusers_model, rel_err
from test_pipeline import SCHEDULERS, save_reference_pipeline

from flux_parallel import flux
from flux_parallel.flux.image_inputs import (
    PREFERRED_KONTEXT_RESOLUTIONS,
    ImageArgumentError,
    binarised,
    kontext_size,
    load_images,
    pack_fill_mask,
    resized,
)
from flux_parallel.flux.image_modes import img2img_timesteps
from flux_parallel.flux.pipeline import FluxPipeline
from flux_parallel.flux.sampling import Schedule, get_schedule, pack, unpack
from flux_parallel.weights import CheckpointError

HEIGHT, WIDTH = 32, 48  # 2x3 tokens: not square, so a row/column mix-up shows
PROMPT = "a red fox in the snow"
SEED = 7
CALL = dict(num_inference_steps=4, guidance_scale=4.0, max_sequence_length=16, output_type="pt")
COMPONENTS = ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer")


@pytest.fixture(autouse=True)
def posterior_mean(monkeypatch):
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """diffusers' dev FluxPipeline on small random weights: its parts build every other pipeline class."""
    return save_reference_pipeline(tmp_path_factory.mktemp("dev"), "dev")


def saved_as(base, cls, root, in_channels: int = 64):
    """`cls` on base's parts (a fresh transformer taking `in_channels`), saved to root: (diffusers', ours)."""
    parts = {name: base.components[name] for name in COMPONENTS}
    if in_channels != 64:
        torch.manual_seed(5)
        parts["transformer"] = diffusers_model(dataclasses.replace(flux.CONFIGS["tiny-dev"], in_channels=in_channels))
    theirs = cls(**parts)
    theirs.save_pretrained(root)
    return theirs, FluxPipeline.from_pretrained(root, dtype=torch.float32)


def noise_for(height=HEIGHT, width=WIDTH, batch=1) -> torch.Tensor:
    """What diffusers' randn_tensor draws first from a CPU generator seeded SEED."""
    return torch.randn(batch, 16, height // 8, width // 8, generator=torch.Generator().manual_seed(SEED))


def random_image(seed: int, height=HEIGHT, width=WIDTH, channels=3) -> torch.Tensor:
    return torch.rand(1, channels, height, width, generator=torch.Generator().manual_seed(seed))


def ours_call(**kwargs) -> dict:
    return dict(prompt=PROMPT, num_steps=4, guidance=4.0, max_sequence_length=16, output_type="pt", **kwargs)


# fp32 end to end; 1e-4 relative on the [0, 1] image leaves room for two implementations' reordered sums
# over a few steps and a VAE encode (test_pipeline sees about 1e-6 for text to image)
TOLERANCE = 1e-4


@pytest.mark.parametrize("strength", [0.3, 0.6])
def test_img2img_equals_diffusers(base, tmp_path, strength):
    theirs, ours = saved_as(base, FluxImg2ImgPipeline, tmp_path)
    image = random_image(1)
    with torch.no_grad():
        expected = theirs(prompt=PROMPT, image=image, strength=strength, height=HEIGHT, width=WIDTH,
                          generator=torch.Generator().manual_seed(SEED), **CALL).images
    result = ours(**ours_call(image=image, strength=strength, latents=noise_for()))
    assert ours.last_run["mode"] == "img2img"
    assert rel_err(result, expected) <= TOLERANCE
    text_to_image = ours(**ours_call(latents=noise_for(), height=HEIGHT, width=WIDTH))
    assert rel_err(result, text_to_image) > 1e-3  # the image mattered


def test_img2img_strengths_run_the_schedule_tail_as_diffusers():
    """t_start in Python floats, as diffusers: 10 * 0.7 is 7.000000000000001, so t_start is 2 (8 steps run), not 3."""
    scheduler, schedule = FlowMatchEulerDiscreteScheduler(**SCHEDULERS["dev"]), Schedule(**SCHEDULERS["dev"])
    for steps, strength in [(10, 0.7), (4, 0.3), (4, 0.6), (28, 0.6), (3, 1.0), (1, 0.2), (7, 0.01)]:
        scheduler.set_timesteps(sigmas=[1 - i / steps for i in range(steps)], mu=schedule.mu(1000))
        timesteps, remaining = FluxImg2ImgPipeline.get_timesteps(
            type("Pipe", (), {"scheduler": scheduler})(), steps, strength, "cpu")
        ours = img2img_timesteps(get_schedule(steps, 1000, schedule), strength)
        assert len(ours) - 1 == remaining == len(timesteps) >= 1
        assert ours[0] == pytest.approx(timesteps[0].item() / 1000, abs=1e-6)


def test_inpaint_equals_diffusers(base, tmp_path):
    theirs, ours = saved_as(base, FluxInpaintPipeline, tmp_path)
    image, mask = random_image(1), random_image(2, channels=1)  # the mask is binarised at 0.5 by both
    with torch.no_grad():
        expected = theirs(prompt=PROMPT, image=image, mask_image=mask, strength=0.8, height=HEIGHT, width=WIDTH,
                          generator=torch.Generator().manual_seed(SEED), **CALL).images
    result = ours(**ours_call(image=image, mask_image=mask, strength=0.8, latents=noise_for()))
    assert ours.last_run["mode"] == "inpaint"
    assert rel_err(result, expected) <= TOLERANCE
    img2img = ours(**ours_call(image=image, strength=0.8, latents=noise_for()))
    assert rel_err(result, img2img) > 1e-3  # the mask mattered


def test_inpaint_keeps_the_unmasked_latents_exactly():
    pipe = FluxPipeline.tiny_random()
    image = random_image(3)
    mask = torch.zeros(1, 1, HEIGHT, WIDTH)
    mask[..., :16, 16:] = 1  # repaint the top right 16 x 32 px: latent rows 0-1, columns 2-5
    latents = pipe("a fox", image=image, mask_image=mask, num_steps=3, output_type="latent")
    clean = pipe._vae_encode(image * 2 - 1)
    kept = torch.ones_like(clean, dtype=torch.bool)
    kept[..., :2, 2:] = False
    assert torch.equal(latents[kept], clean[kept])
    assert (latents[~kept] - clean[~kept]).abs().max() > 1e-2


@pytest.mark.parametrize("reference_size", [(HEIGHT, WIDTH), (48, 32)], ids=["same size", "other size"])
def test_kontext_equals_diffusers(base, tmp_path, reference_size):
    theirs, ours = saved_as(base, FluxKontextPipeline, tmp_path)
    assert ours.kind == "kontext"  # from model_index.json: the transformer is dev's shape
    reference = random_image(4, *reference_size)
    packed = pack(noise_for())
    with torch.no_grad():
        expected = theirs(prompt=PROMPT, image=reference, height=HEIGHT, width=WIDTH, max_area=HEIGHT * WIDTH,
                          _auto_resize=False, latents=packed, **CALL).images
    result = ours(**ours_call(image=reference, height=HEIGHT, width=WIDTH, auto_resize=False, latents=noise_for()))
    assert rel_err(result, expected) <= TOLERANCE
    other = ours(**ours_call(image=1 - reference, height=HEIGHT, width=WIDTH, auto_resize=False, latents=noise_for()))
    assert rel_err(result, other) > 1e-3  # the reference mattered


def test_kontext_true_cfg_equals_diffusers(base, tmp_path):
    """Both CFG branches carry the reference tokens (one batched forward here, two passes in diffusers)."""
    theirs, ours = saved_as(base, FluxKontextPipeline, tmp_path)
    reference, cfg = random_image(4, 48, 32), dict(negative_prompt="blurry", true_cfg_scale=2.0)
    with torch.no_grad():
        expected = theirs(prompt=PROMPT, image=reference, height=HEIGHT, width=WIDTH, max_area=HEIGHT * WIDTH,
                          _auto_resize=False, latents=pack(noise_for()), **cfg, **CALL).images
    result = ours(**ours_call(image=reference, auto_resize=False, height=HEIGHT, width=WIDTH, latents=noise_for(),
                              **cfg))
    assert rel_err(result, expected) <= TOLERANCE


def test_kontext_output_defaults_to_the_reference_size():
    pipe = FluxPipeline.tiny_random(variant="kontext")
    image = pipe("a fox", image=random_image(5, 40, 56), num_steps=1, auto_resize=False, output_type="pt")
    assert image.shape == (1, 3, 32, 48)  # 40 x 56 px floored to 16 px
    assert pipe.last_run["mode"] == "kontext"


@pytest.mark.parametrize("height, width", [(32, 48), (48, 32), (100, 100), (20, 90), (1024, 1024), (90, 20)])
def test_kontext_auto_resize_picks_diffusers_resolution(height, width):
    ratio = width / height  # diffusers' FluxKontextPipeline.__call__ (and BFL's prepare_kontext), by hand
    _, ref_w, ref_h = min((abs(ratio - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    assert kontext_size(height, width, auto_resize=True) == (ref_h // 16 * 16, ref_w // 16 * 16)
    assert kontext_size(height, width, auto_resize=False) == (height // 16 * 16, width // 16 * 16)


def test_fill_equals_diffusers(base, tmp_path):
    theirs, ours = saved_as(base, FluxFillPipeline, tmp_path, in_channels=384)
    assert ours.kind == "fill"
    image, mask = random_image(1), random_image(2, channels=1)
    with torch.no_grad():
        expected = theirs(prompt=PROMPT, image=image, mask_image=mask, height=HEIGHT, width=WIDTH,
                          latents=pack(noise_for()), **CALL).images
    result = ours(**ours_call(image=image, mask_image=mask, latents=noise_for()))
    assert rel_err(result, expected) <= TOLERANCE
    other = ours(**ours_call(image=image, mask_image=1 - mask, latents=noise_for()))
    assert rel_err(result, other) > 1e-3  # the mask mattered


def test_fill_mask_packing_matches_diffusers():
    mask = (random_image(6, channels=1) > 0.5).float()
    b, h, w = 1, HEIGHT // 8, WIDTH // 8  # diffusers' FluxFillPipeline.prepare_mask_latents, step 5 and 6
    theirs = mask[:, 0].view(b, h, 8, w, 8).permute(0, 2, 4, 1, 3).reshape(b, 64, h, w)
    expected = DiffusersFluxPipeline._pack_latents(theirs, b, 64, h, w)
    assert torch.equal(pack_fill_mask(mask), expected)
    assert torch.equal(unpack(pack_fill_mask(mask), HEIGHT, WIDTH)[0, 8 * 3 + 5, 1, 2], mask[0, 0, 8 + 3, 16 + 5])


def test_control_equals_diffusers(base, tmp_path):
    theirs, ours = saved_as(base, FluxControlPipeline, tmp_path, in_channels=128)
    assert ours.kind == "control"
    control = random_image(8)
    with torch.no_grad():  # diffusers takes a tensor control image as it is: give it in [-1, 1]
        expected = theirs(prompt=PROMPT, control_image=control * 2 - 1, height=HEIGHT, width=WIDTH,
                          latents=pack(noise_for()), **CALL).images
    result = ours(**ours_call(control_image=control, latents=noise_for()))
    assert rel_err(result, expected) <= TOLERANCE
    other = ours(**ours_call(control_image=1 - control, latents=noise_for()))
    assert rel_err(result, other) > 1e-3  # the control image mattered


def test_pil_images_and_files_load_as_rgb_tensors(tmp_path):
    from PIL import Image

    rgba = (random_image(9, channels=4) * 255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()
    expected = torch.from_numpy(rgba[..., :3].copy()).permute(2, 0, 1)[None].float() / 255  # alpha dropped
    Image.fromarray(rgba, "RGBA").save(tmp_path / "in.png")
    for source in (Image.fromarray(rgba, "RGBA"), tmp_path / "in.png", str(tmp_path / "in.png")):
        assert torch.equal(resized(load_images(source, "image"), HEIGHT, WIDTH), expected)
    gray = Image.fromarray(rgba[..., 0])  # mode L: the same value in R, G and B
    assert torch.equal(resized(load_images(gray, "image"), HEIGHT, WIDTH), expected[:, :1].expand(-1, 3, -1, -1))


def test_masks_are_binarised_at_one_half():
    from PIL import Image

    levels = torch.tensor([[0, 127, 128, 255]], dtype=torch.uint8).repeat(16, 4)  # 16 x 16 px, 8-bit grayscale
    mask = binarised(resized(load_images(Image.fromarray(levels.numpy()), "mask_image", channels=1), 16, 16))
    assert torch.equal(mask[0, 0], (levels >= 128).float())


# ---- refusals: one sentence naming the argument, before the text encoders run ----


def not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not a PNG")
    return path


REFUSALS = [
    ("kontext", dict(), "image is needed: FLUX.1 Kontext edits a reference image"),
    ("kontext", dict(image="img", strength=0.5), "strength is for img2img and inpainting, not FLUX.1 Kontext"),
    ("kontext", dict(image="img", mask_image="mask"), "mask_image is not used by FLUX.1 Kontext"),
    ("fill", dict(image="img"), "mask_image is needed: FLUX.1 Fill repaints where it is white"),
    ("fill", dict(mask_image="mask"), "image is needed: FLUX.1 Fill repaints part of an image"),
    ("canny", dict(image="img"), "control_image is needed"),
    ("schnell", dict(control_image="img"), r"control_image is not used by FLUX.1 text to image"),
    ("schnell", dict(mask_image="mask"), "mask_image needs an image too"),
    ("schnell", dict(strength=0.5), "strength needs an image"),
    ("schnell", dict(image="img", strength=0), r"strength must be in \(0, 1\] .*, got 0$"),
    ("schnell", dict(image="img", strength=1.5), r"strength must be in \(0, 1\]"),
    ("schnell", dict(image="img", mask_image="small mask"), "mask_image is 16x16 px and the image 48x32 px"),
    ("schnell", dict(image="tiny"), "image is 8x8 px: at least 16x16 px"),
    ("schnell", dict(image="file"), "image .*notes.png is not an image file Pillow can read"),
    ("schnell", dict(image="bad range"), r"image as a tensor must hold values in \[0, 1\]"),
]
VALUES = {"img": random_image(1), "mask": random_image(2, channels=1), "small mask": random_image(2, 16, 16, 1),
          "tiny": random_image(1, 8, 8), "bad range": random_image(1) * 2}


@pytest.mark.parametrize("variant, call, message", REFUSALS)
def test_bad_image_arguments_are_refused(tmp_path, variant, call, message):
    pipe = FluxPipeline.tiny_random(variant=variant)
    call = {k: (not_an_image(tmp_path) if v == "file" else VALUES.get(v, v)) for k, v in call.items()}
    with pytest.raises(ImageArgumentError, match=f"^{message}") as err:
        pipe("a fox", num_steps=1, **call)
    assert "\n" not in str(err.value) and str(err.value).startswith(err.value.argument)
    assert "text_encoding_s" not in pipe.last_run


def test_one_image_per_prompt():
    pipe = FluxPipeline.tiny_random()
    images, noise = torch.rand(3, 3, HEIGHT, WIDTH), torch.randn(4, 16, HEIGHT // 8, WIDTH // 8)
    with pytest.raises(ImageArgumentError, match="^image holds 3 images for 2 prompts: give one, or one per prompt"):
        pipe(["a", "b"], image=images, num_steps=1)
    assert "text_encoding_s" not in pipe.last_run
    both = pipe(["a fox", "a cat"], image=images[:2], num_steps=2, output_type="latent", latents=noise,
                num_images_per_prompt=2)
    second = pipe(["a cat"], image=images[1:2], num_steps=2, output_type="latent", latents=noise[3:])
    # the batch's rows are computed independently: only the order of a few sums may differ
    torch.testing.assert_close(both[3:], second, rtol=1e-5, atol=1e-5)


def test_variant_must_fit_the_transformer():
    with pytest.raises(CheckpointError, match="variant fill needs a transformer with 384 input channels"):
        tiny = FluxPipeline.tiny_random()
        FluxPipeline(flux.Flux(flux.CONFIGS["tiny"]), tiny.vae, tiny.text, tiny.schedule, variant="fill")
    with pytest.raises(ValueError, match="variant must be one of schnell, dev, kontext, fill, canny, depth"):
        FluxPipeline.tiny_random(variant="redux")


def test_bfl_file_named_kontext_is_kontext(tmp_path):
    from helpers import write_source

    params = flux.CONFIGS["tiny"]
    path = write_source("bfl", diffusers_model(params), params, tmp_path)
    kontext = path.rename(tmp_path / "flux1-kontext-tiny.safetensors")
    from flux_parallel.flux.pipeline_folder import pipeline_kind

    assert pipeline_kind(tmp_path, kontext) == "kontext"
    assert pipeline_kind(tmp_path, kontext, variant="dev") == "text"  # an explicit variant wins
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPriorReduxPipeline"}))
    with pytest.raises(CheckpointError, match="describes a FluxPriorReduxPipeline"):
        pipeline_kind(tmp_path, kontext)

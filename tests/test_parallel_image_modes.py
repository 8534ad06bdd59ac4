"""Image-conditioned modes on several gloo ranks give the single-process image.

Kontext's reference tokens are sharded with the output tokens: 6 output + 9 reference tokens make 15,
which no sp degree here divides, so the shards are uneven and the reference straddles two ranks.
"""

import pytest
import torch
from helpers import rel_err
from safetensors.torch import load_file, save_file

from flux_parallel.flux.cache_config import CacheConfig
from flux_parallel.flux.pipeline import FluxPipeline
from flux_parallel.parallel import runtime
from flux_parallel.parallel.context import ParallelContext
from flux_parallel.parallel.launch import run_distributed


def pixels(seed: int, height: int, width: int, channels: int = 3) -> torch.Tensor:
    return torch.rand(1, channels, height, width, generator=torch.Generator().manual_seed(seed))


def case(mode: str) -> tuple[str | None, dict]:
    """(variant, call) of one mode: the same on every rank."""
    call = dict(prompt="a red fox", num_steps=2, max_sequence_length=7, output_type="pt")
    if mode == "kontext":  # 32x48 px out (6 tokens), a 48x48 px reference (9 tokens)
        return "kontext", dict(call, image=pixels(1, 48, 48), height=32, width=48, auto_resize=False)
    if mode == "fill":  # 9 tokens: uneven shards of the state and of Fill's channels
        return "fill", dict(call, image=pixels(1, 48, 48), mask_image=pixels(2, 48, 48, 1))
    if mode == "img2img":
        return None, dict(call, image=pixels(1, 48, 48), strength=0.7, num_steps=3)
    if mode == "kontext-3-steps":
        return "kontext", dict(case("kontext")[1], num_steps=3)
    if mode == "control":  # Canny/Depth: the control image's latents after the noise (128 channels)
        return "canny", dict(call, control_image=pixels(4, 48, 48))
    if mode == "kontext-cfg":  # true CFG: one branch per half of the ranks under cfg_degree 2
        return "kontext", dict(case("kontext")[1], negative_prompt="blurry", true_cfg_scale=2.0)
    if mode == "kontext-cached":  # a step cache decides identically on every rank in an image mode too
        return "kontext", dict(case("kontext")[1], num_steps=6, cache=CacheConfig("dbcache", 0.8))
    if mode == "kontext-batch":  # one reference per prompt, two images per prompt: each replica takes its images
        references = torch.cat((pixels(1, 48, 48), pixels(3, 48, 48)))
        return "kontext", dict(call, prompt=["a red fox", "a cat"], image=references, num_images_per_prompt=2,
                               height=32, width=48, auto_resize=False)
    return None, dict(call, image=pixels(1, 48, 48), mask_image=pixels(2, 48, 48, 1), strength=0.7, num_steps=3)


def _check_rank(rank, world, mode, degrees, expected_file, case_id):
    variant, call = case(mode)
    degrees = dict(degrees)
    degrees.pop("one_device", None)
    parallel_vae = degrees.pop("parallel_vae", False)  # the reference encoded (and the image decoded) across ranks
    pipe = FluxPipeline.tiny_random(seed=0, variant=variant, parallel=ParallelContext(**degrees),
                                    parallel_vae=parallel_vae)
    encoded = []  # the parallel VAE's encodes of this call (the reference or source image across the ranks)
    real_encode = runtime.encode_parallel
    runtime.encode_parallel = lambda *args, **kwargs: encoded.append(1) or real_encode(*args, **kwargs)
    try:
        image = pipe(**call)
    finally:
        runtime.encode_parallel = real_encode
    assert len(encoded) == (1 if parallel_vae else 0), case_id
    if rank != 0:
        assert image is None, case_id
        return
    # fp32; the sharded attention sums keys in another order (and merges ring blocks by LSE): rounding only,
    # about 1e-7, inside 1e-5, the project's bound for parallel paths in fp32
    error = rel_err(image, load_file(expected_file)["image"])
    assert error <= 1e-5, f"{case_id}: rel err {error:.2e} against one process"


PIPEFUSION = dict(pipefusion_degree=2, warmup_steps=3)  # warm-up over every step run: exact, as one process
CASES = {  # id: (mode, degrees, world size)
    "kontext-ulysses2": ("kontext", dict(ulysses_degree=2), 2),
    "kontext-ring2": ("kontext", dict(ring_degree=2), 2),
    "fill-ulysses2": ("fill", dict(ulysses_degree=2), 2),
    "inpaint-ulysses2": ("inpaint", dict(ulysses_degree=2), 2),
    "img2img-pipefusion2": ("img2img", PIPEFUSION, 2),
    "inpaint-pipefusion2": ("inpaint", PIPEFUSION, 2),
    "fill-pipefusion2": ("fill", PIPEFUSION, 2),
    "control-pipefusion2": ("control", PIPEFUSION, 2),
    "kontext-pipefusion2": ("kontext", dict(PIPEFUSION, num_pipeline_patch=2), 2),
    # stale patches (one warm-up step of 3): the reference is a patch of its own; the one-device reference is
    # PipeFusion's own schedule run on one process (ParallelContext with patches, no stages)
    "kontext-pipefusion2-stale": ("kontext-3-steps", dict(pipefusion_degree=2, num_pipeline_patch=2, warmup_steps=1,
                                                          one_device=dict(num_pipeline_patch=2, warmup_steps=1)), 2),
    "kontext-batch-data2-ulysses2": ("kontext-batch", dict(data_degree=2, ulysses_degree=2), 4),
    "kontext-ulysses3": ("kontext", dict(ulysses_degree=3), 3),
    "inpaint-ulysses3": ("inpaint", dict(ulysses_degree=3), 3),
    "control-ring3": ("control", dict(ring_degree=3), 3),
    "img2img-ulysses3": ("img2img", dict(ulysses_degree=3), 3),
    "fill-ring3": ("fill", dict(ring_degree=3), 3),
    "inpaint-usp2x2": ("inpaint", dict(ulysses_degree=2, ring_degree=2), 4),
    "control-ulysses2": ("control", dict(ulysses_degree=2), 2),
    "kontext-cfg2": ("kontext-cfg", dict(cfg_degree=2), 2),
    "img2img-tensor2": ("img2img", dict(tensor_degree=2), 2),
    "kontext-cached-ulysses2": ("kontext-cached", dict(ulysses_degree=2), 2),
    "kontext-ulysses2-parallel-vae": ("kontext", dict(ulysses_degree=2, parallel_vae=True), 2),
    "fill-ring3-parallel-vae": ("fill", dict(ring_degree=3, parallel_vae=True), 3),
}


def _check_cases(rank, world, cases, folder):
    """Every case of this world size in turn, on one set of ranks (each builds its own mesh)."""
    for case_id, mode, degrees in cases:
        _check_rank(rank, world, mode, degrees, f"{folder}/{case_id}.safetensors", case_id)


@pytest.mark.parametrize("world", sorted({world for _, _, world in CASES.values()}))
def test_image_modes_on_ranks_equal_one_process(tmp_path, world):
    """Each case of CASES with this world size: its one-process image here, then one spawn of `world` ranks
    runs them all (a spawn per case would cost more than the cases)."""
    cases = [(case_id, mode, degrees) for case_id, (mode, degrees, n) in CASES.items() if n == world]
    for case_id, mode, degrees in cases:
        variant, call = case(mode)
        one_device = degrees.get("one_device")
        pipe = FluxPipeline.tiny_random(seed=0, variant=variant,
                                        parallel=ParallelContext(**one_device) if one_device else None)
        expected = pipe(**call)
        if "cache" in call:  # the cache skipped steps (else this case would test nothing a plain one does not)
            assert pipe.last_run["cache"]["branches"]["positive"]["reused"]
        save_file({"image": expected.contiguous()}, tmp_path / f"{case_id}.safetensors")
    run_distributed(_check_cases, world, cases, str(tmp_path), timeout_s=240.0)

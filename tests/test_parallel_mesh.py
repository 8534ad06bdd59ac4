"""CFG and data parallelism on real gloo ranks give the single-process images.

cfg_degree 2 runs the negative branch on cfg rank 0 and the positive on cfg rank 1 and exchanges
the predictions every step; data_degree N splits the images into contiguous chunks. Each is checked
alone and composed with sequence parallelism and the parallel VAE, against one process's image.
"""

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from flux_parallel.flux.pipeline import FluxPipeline
from flux_parallel.parallel import comm
from flux_parallel.parallel.context import ParallelContext
from flux_parallel.parallel.launch import run_distributed

CFG_CALL = dict(prompt=["a red fox", "snow"], negative_prompt="blurry", true_cfg_scale=2.5, height=48, width=32,
                num_steps=2, max_sequence_length=7, output_type="pt")
DATA_CALL = dict(prompt=["a red fox", "", "a cat"], num_images_per_prompt=2, height=32, width=32, num_steps=2,
                 max_sequence_length=7, output_type="pt")  # 6 images: uneven chunks on 4 replicas


def tiny_pipeline(**options) -> FluxPipeline:
    return FluxPipeline.tiny_random(seed=0, **options)


def _check_rank(rank, world, degrees, parallel_vae, call, expected_file, axes):
    pipe = tiny_pipeline(parallel=ParallelContext(**degrees), parallel_vae=parallel_vae)
    image = pipe(**call)
    if rank != 0:
        assert image is None  # only global rank 0 returns the images
        return
    # fp32: the parallel runs only sum attention keys in another order (and run the CFG branches as
    # two forwards instead of one batched forward): rounding differences, far inside 1e-5
    torch.testing.assert_close(image, load_file(expected_file)["image"], rtol=1e-5, atol=1e-5)
    for axis in axes:
        assert pipe.last_run["comm_bytes_per_step_by_axis"][axis] > 0, axis
    assert (sum(pipe.last_run["vae_comm_bytes"].values()) > 0) == parallel_vae


def _expected(call, tmp_path) -> str:
    image = tiny_pipeline()(**call)
    save_file({"image": image.contiguous()}, tmp_path / "expected.safetensors")
    return str(tmp_path / "expected.safetensors")


@pytest.mark.parametrize("degrees, parallel_vae, axes", [
    (dict(cfg_degree=2), False, ["cfg"]),
    (dict(cfg_degree=2, ulysses_degree=2), True, ["cfg", "ulysses"]),
])
def test_cfg_parallel_equals_single_process(degrees, parallel_vae, axes, tmp_path):
    world = degrees.get("cfg_degree", 1) * degrees.get("ulysses_degree", 1)
    run_distributed(_check_rank, world, degrees, parallel_vae, CFG_CALL, _expected(CFG_CALL, tmp_path), axes)


@pytest.mark.parametrize("degrees, parallel_vae, axes", [
    (dict(data_degree=4), False, []),
    (dict(data_degree=2, ring_degree=2), True, ["ring"]),
])
def test_data_parallel_equals_single_process(degrees, parallel_vae, axes, tmp_path):
    world = degrees.get("data_degree", 1) * degrees.get("ring_degree", 1)
    run_distributed(_check_rank, world, degrees, parallel_vae, DATA_CALL, _expected(DATA_CALL, tmp_path), axes)


def test_data_and_cfg_parallel_compose(tmp_path):
    call = {**CFG_CALL, "prompt": ["a red fox", "snow", "a cat"]}  # 3 images on 2 replicas
    run_distributed(_check_rank, 4, dict(data_degree=2, cfg_degree=2), True, call, _expected(call, tmp_path),
                    ["cfg"])


def _refused(rank, world, degrees, call, message):
    pipe = tiny_pipeline(parallel=ParallelContext(**degrees))
    with comm.count_comm() as stats, pytest.raises(ValueError) as error:
        pipe(**call)
    assert not stats.calls  # refused before the first collective of the call
    messages = comm.all_gather_object(str(error.value), dist.group.WORLD)
    assert messages == [messages[0]] * world and message in messages[0]


@pytest.mark.parametrize("degrees, call, message", [
    (dict(cfg_degree=2), {**CFG_CALL, "negative_prompt": None}, "it needs a negative prompt and true_cfg_scale > 1"),
    (dict(cfg_degree=2), {**CFG_CALL, "true_cfg_scale": 1.0}, "it needs a negative prompt and true_cfg_scale > 1"),
    (dict(data_degree=2), {**DATA_CALL, "prompt": "a fox", "num_images_per_prompt": 1},
     "1 image(s) cannot be split over 2 data-parallel replicas"),
])
def test_impossible_requests_are_refused_identically(degrees, call, message):
    run_distributed(_refused, 2, degrees, call, message)


def test_cfg_degree_must_be_1_or_2():
    with pytest.raises(ValueError, match="cfg_degree must be 1 or 2"):
        ParallelContext(cfg_degree=3)

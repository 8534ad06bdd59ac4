"""Step caches on real gloo ranks make the single-device decisions and the single-device cached image.

Every layout shards the image or the 7 text tokens unevenly (5 and 4 image tokens of a 48x48 image on 2 sp
ranks, 2, 2, 1, 1 of a 48x32 one on 4), where an average of per-rank means (xDiT, ParaAttention) is not the
image's mean. One spawn per world size
runs each of its layouts with every cache.
"""

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from flux_parallel.flux.cache_config import CacheConfig
from flux_parallel.flux.pipeline import FluxPipeline
from flux_parallel.parallel import comm
from flux_parallel.parallel.context import ParallelContext
from flux_parallel.parallel.launch import run_distributed

# true CFG: on cfg_degree 1 both branches run as one batched forward, with their own cache states
CALL = dict(prompt=["a red fox"], negative_prompt="blurry", true_cfg_scale=2.5, height=48, width=32, num_steps=8,
            max_sequence_length=7, output_type="pt")
# each skips some steps (asserted below); DBCache with a TaylorSeer forecast: each rank forecasts its own tokens
CACHES = [CacheConfig("fbcache", 0.8), CacheConfig("teacache", 1.5),
          CacheConfig("dbcache", 0.8, compute_first=2, compute_last=1, taylorseer_order=2)]
MARGIN = 1e-3  # relative distance of every indicator from the threshold: far beyond fp32 rounding (~1e-6)


def tiny_pipeline(**options) -> FluxPipeline:
    return FluxPipeline.tiny_random(seed=0, **options)


def _check_rank(rank, world, layouts, call, expected_file, records):
    if world == 2:  # bundled here to save a spawn
        _refused_before_any_collective(rank, world)
    expected = load_file(expected_file)
    for degrees in layouts:
        pipe = tiny_pipeline(parallel=ParallelContext(**degrees))
        pipe(**call)
        uncached_bytes = pipe.last_run["comm_bytes_per_step"]
        for i, cache in enumerate(CACHES):
            image = pipe(**call, cache=cache)
            # the decision makes no collective of its own: its sums ride on the attention's exchanges
            # (parallel/cache.py), so the denoising loop's other collectives are the uncached loop's
            others = {k: v for k, v in pipe.last_run["comm_bytes_per_step"].items() if k not in ("all_to_all", "p2p")}
            assert others == {k: v for k, v in uncached_bytes.items() if k not in ("all_to_all", "p2p")}, \
                (degrees, cache, others)
            report = pipe.last_run["cache"]
            # the decisions of one device, on every rank (under cfg_degree 2 each half made its branch's)
            branches = {b: {k: r[k] for k in ("computed", "reused")} for b, r in report["branches"].items()}
            assert branches == records[i], (degrees, cache, branches)
            if rank == 0:
                # fp32: only the attention sums run in another order (and the indicator sums in float64
                # over other partitions): rounding differences far inside 1e-5
                torch.testing.assert_close(image, expected[str(i)], rtol=1e-5, atol=1e-5)
            else:
                assert image is None


def _refused_before_any_collective(rank, world):
    pipe = tiny_pipeline(parallel=ParallelContext(ulysses_degree=2))
    with comm.count_comm() as stats, pytest.raises(ValueError) as error:
        pipe(**CALL, cache="fbcache")
    assert not stats.calls
    messages = comm.all_gather_object(str(error.value), dist.group.WORLD)
    assert messages == [messages[0]] * world and "cache must be a CacheConfig" in messages[0]


def _spawn_with_both(world, layouts, call, tmp_path):
    pipe = tiny_pipeline()
    images, records = {}, []
    for i, cache in enumerate(CACHES):
        images[str(i)] = pipe(**call, cache=cache).contiguous()
        branches = pipe.last_run["cache"]["branches"]
        records.append({b: {k: r[k] for k in ("computed", "reused")} for b, r in branches.items()})
        for record in branches.values():
            assert record["computed"] and record["reused"], (cache, record)  # some steps skipped, not all
            for value in record["indicators"]:
                assert value is None or abs(value - cache.threshold) > MARGIN * cache.threshold, (cache, value)
    save_file(images, tmp_path / "expected.safetensors")
    run_distributed(_check_rank, world, layouts, call, str(tmp_path / "expected.safetensors"), records)


@pytest.mark.parametrize("world, layouts, width", [
    (2, [dict(ulysses_degree=2), dict(ring_degree=2), dict(cfg_degree=2)], 48),  # 9 image tokens: 5 and 4
    (3, [dict(ring_degree=3), dict(ulysses_degree=3)], 32),  # 6 image tokens: the payload over 2 ring hops
    (4, [dict(ulysses_degree=2, ring_degree=2), dict(cfg_degree=2, ring_degree=2),  # 2, 2, 1, 1
         dict(ulysses_degree=2, ring_degree=2, ulysses_chunks=3)], 32),  # head chunk 0 and its ring carry the sums
])
def test_cached_decisions_and_image_equal_one_device(world, layouts, width, tmp_path):
    """(On 2 ranks also: a bad cache argument is refused identically before any collective.)"""
    _spawn_with_both(world, layouts, {**CALL, "width": width}, tmp_path)


"""The FLUX transformer sharded by parallelize_flux equals the single-process transformer.

One spawn per world size; inside it, every (ulysses, ring) factorisation of the world size and
every pair of lengths in the table, including lengths the sp degree does not divide.
"""

import copy
import dataclasses
import time

import pytest
import torch
import torch.distributed as dist
from helpers import PARAMS, assert_rel_close, tiny_flux, tiny_flux_inputs

from flux_parallel.flux import Flux
from flux_parallel.parallel import comm
from flux_parallel.parallel.apply import parallelize_flux
from flux_parallel.parallel.context import ParallelContext
from flux_parallel.parallel.launch import run_distributed
from flux_parallel.parallel.sequence import shard_sizes

FACTORISATIONS = {2: [(2, 1), (1, 2)], 3: [(3, 1), (1, 3)], 4: [(4, 1), (2, 2), (1, 4)]}  # (ulysses, ring)
LENGTHS = [(7, (5, 5)), (3, (4, 4))]  # (text tokens, image grid): 7 and 25 divide by none of 2, 3, 4; 3 < 4
def _flux_matches(rank, world):
    base = tiny_flux()
    cases = [(txt_len, grid, tiny_flux_inputs(txt_len, grid)) for txt_len, grid in LENGTHS]
    with torch.no_grad():
        refs = [base(**x) for _, _, x in cases]  # the single-process output, before any sharding
        # 3 Ulysses head chunks (overlapped exchanges, parallel/ulysses.py) beside the automatic count, 1 at this size
        for ulysses, ring, chunks in [(u, r, c) for u, r in FACTORISATIONS[world] for c in (None, 3)[: 1 + (u > 1)]]:
            ctx = ParallelContext(ulysses_degree=ulysses, ring_degree=ring, ulysses_chunks=chunks)
            sp_model = parallelize_flux(copy.deepcopy(base), ctx)
            for (txt_len, grid, x), ref in zip(cases, refs):
                case = (f"ulysses {ulysses} x ring {ring} ({chunks or 'auto'} chunks), {txt_len} text + "
                        f"{grid[0] * grid[1]} image tokens")
                out = sp_model.forward_full(**x)
                assert_rel_close(out, ref, case)
                layout = sp_model.layout(txt_len, grid[0] * grid[1])
                local = sp_model(layout, *sp_model.shard(layout, x["img"], x["img_ids"], x["txt"], x["txt_ids"]),
                                 x["timesteps"], x["y"], x["guidance"])
                rows = ref.split(shard_sizes(ref.shape[1], world), dim=1)[rank]
                assert_rel_close(local, rows, case + " (local rows)")


@pytest.mark.parametrize("world", sorted(FACTORISATIONS))
def test_sharded_flux_equals_single_process(world):
    run_distributed(_flux_matches, world)


def test_single_process_context_is_identity_without_communication():
    base = tiny_flux()
    x = tiny_flux_inputs(7, (5, 5))
    with torch.no_grad():
        ref = base(**x)
        sp_model = parallelize_flux(copy.deepcopy(base), ParallelContext())
        with comm.count_comm() as stats:
            out = sp_model.forward_full(**x)
    assert torch.equal(out, ref)
    assert not stats.bytes


def _config_mismatch(rank, world):
    ctx = ParallelContext(ulysses_degree=world)
    odd = Flux(dataclasses.replace(PARAMS, num_heads=3, axes_dim=(8, 12, 12)))  # 3 heads, Ulysses degree 2
    with pytest.raises(ValueError) as error:
        parallelize_flux(odd, ctx)
    assert ctx._mesh is None  # refused before building the mesh, the first collective
    messages = comm.all_gather_object(str(error.value), dist.group.WORLD)
    assert messages == [messages[0]] * world and "num_heads 3 is not divisible by ulysses_degree 2" in messages[0]
    chunked = ParallelContext(ulysses_degree=world, ulysses_chunks=7)  # tiny: 6 heads per Ulysses rank
    with pytest.raises(ValueError, match="ulysses_chunks 7 exceeds the 6 heads each Ulysses rank receives"):
        parallelize_flux(tiny_flux(), chunked)
    assert chunked._mesh is None


def test_mismatched_config_is_refused_identically_on_every_rank():
    run_distributed(_config_mismatch, 2)


def _one_rank_raises(rank, world):
    if rank == 1:
        raise RuntimeError("rank 1 fails on purpose")
    # rank 0 waits in the first all-to-all for a peer that is gone (grad mode on, as a user who
    # forgets torch.no_grad() runs it)
    sp_model = parallelize_flux(tiny_flux(), ParallelContext(ulysses_degree=world))
    sp_model.forward_full(**tiny_flux_inputs(7, (5, 5)))


def test_failing_rank_ends_the_job():
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="rank 1 failed first") as error:
        run_distributed(_one_rank_raises, 2, timeout_s=20.0)
    assert "rank 1 fails on purpose" in str(error.value)
    assert time.perf_counter() - start < 60.0

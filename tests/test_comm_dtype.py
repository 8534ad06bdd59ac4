"""--comm-dtype: sequence parallelism's exchanges carry bf16 or per-tensor-scaled fp8 instead of the
activations' dtype. Approximate by design: the exchanges are tested to carry exactly the wire's rounding of
what they carry exactly (and fewer bytes), and the image to stay close to the exact one."""

import pytest
import torch
import torch.distributed as dist

from flux_parallel.flux.pipeline import FluxPipeline
from flux_parallel.parallel import comm
from flux_parallel.parallel.context import ParallelContext
from flux_parallel.parallel.launch import run_distributed
from flux_parallel.parallel.ring import ring_attention

CALL = dict(prompt="a red circle on a blue background", height=48, width=48, num_steps=2, max_sequence_length=7,
            output_type="pt")


def rounded(x: torch.Tensor, wire: str) -> torch.Tensor:
    """What one tensor becomes on the wire and back."""
    return comm.from_wire(*comm.to_wire(x, wire), x.dtype)


def test_the_wire_rounding_is_bf16_or_fp8_scaled_to_the_tensor():
    x = torch.randn(4, 33, generator=torch.Generator().manual_seed(0)) * 30
    assert torch.equal(rounded(x, "bf16"), x.to(torch.bfloat16).float())
    payload, scale = comm.to_wire(x, "fp8")
    assert payload.dtype == torch.uint8 and payload.shape == x.shape and scale.item() == x.abs().max() / 448
    back = rounded(x, "fp8")
    assert (back - x).abs().max() <= x.abs().max() * 2**-4  # e4m3: 3 mantissa bits, scaled to the amax
    assert not torch.equal(back, x) and torch.equal(rounded(torch.zeros(3), "fp8"), torch.zeros(3))


def _exchanges(rank, world):
    group = dist.group.WORLD
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(2, 6, 5 + rank, 4, generator=gen)  # uneven shards along dim 2
    lens = [5, 6]
    exact = comm.all_to_all(x, group, scatter_dim=1, gather_dim=2, gather_sizes=lens)
    for wire, ratio in (("bf16", 2), ("fp8", 4)):
        with comm.count_comm() as exact_stats:
            comm.all_to_all(x, group, scatter_dim=1, gather_dim=2, gather_sizes=lens)
        with comm.count_comm() as stats:
            out = comm.all_to_all(x, group, scatter_dim=1, gather_dim=2, gather_sizes=lens, wire=wire)
        # each piece is rounded on its own (fp8: scaled by its own amax), then moved exactly
        pieces = [rounded(p, wire) for p in x.chunk(2, dim=1)]
        expected = comm.all_to_all(torch.cat(pieces, dim=1), group, scatter_dim=1, gather_dim=2, gather_sizes=lens)
        assert torch.equal(out, expected), wire
        assert not torch.equal(out, exact) and out.dtype == x.dtype
        assert stats.bytes["all_to_all"] * ratio == exact_stats.bytes["all_to_all"], wire
    # the ring's K/V hops: the same as exact ring attention over the other ranks' rounded keys and values
    q, k, v = (torch.randn(1, 2, lens[rank], 8, generator=gen) for _ in range(3))
    out, _ = ring_attention(q, k, v, group, lens, wire="bf16")
    k_all = comm.all_gather(k, group, dim=2, sizes=lens)
    v_all = comm.all_gather(v, group, dim=2, sizes=lens)
    start = sum(lens[:rank])
    mine = slice(start, start + lens[rank])
    k_seen, v_seen = k_all.to(torch.bfloat16).float(), v_all.to(torch.bfloat16).float()
    k_seen[:, :, mine], v_seen[:, :, mine] = k, v  # its own shard never travels
    reference = torch.softmax(q @ k_seen.transpose(-1, -2) / 8**0.5, dim=-1) @ v_seen
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


def test_exchanges_carry_the_wire_rounding_and_fewer_bytes():
    run_distributed(_exchanges, 2)


def _pipeline_on_two_ranks(rank, world, degrees, exact_image):
    pipe = FluxPipeline.tiny(parallel=ParallelContext(**degrees, comm_dtype="bf16"))
    image = pipe(**CALL)
    bf16_bytes = pipe.last_run["comm_bytes_per_step"]
    exact_pipe = FluxPipeline.tiny(parallel=ParallelContext(**degrees))
    exact_pipe(**CALL)
    exact_bytes = exact_pipe.last_run["comm_bytes_per_step"]
    kind = "all_to_all" if "ulysses_degree" in degrees else "p2p"
    assert bf16_bytes[kind] * 2 == exact_bytes[kind], (bf16_bytes, exact_bytes)
    if rank == 0:
        error = ((image - exact_image).norm() / exact_image.norm()).item()
        assert 0 < error < 1e-2, error  # bf16 activations: close to, not equal to, the exact image


@pytest.mark.parametrize("degrees", [dict(ulysses_degree=2), dict(ring_degree=2)], ids=["ulysses2", "ring2"])
def test_a_bf16_wire_image_is_close_to_the_exact_one_with_half_the_bytes(degrees):
    exact = FluxPipeline.tiny()(**CALL)
    run_distributed(_pipeline_on_two_ranks, 2, degrees, exact)


def test_an_unknown_comm_dtype_is_refused():
    with pytest.raises(ValueError, match="comm_dtype must be None \\(exact\\), 'bf16' or 'fp8', got 'fp16'"):
        ParallelContext(comm_dtype="fp16")

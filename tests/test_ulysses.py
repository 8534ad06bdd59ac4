"""Ulysses attention on real gloo groups, against attention over the full sequence."""

import torch

from flux_parallel.kernels import attention_reference
from flux_parallel.parallel import comm
from flux_parallel.parallel.launch import run_distributed
from flux_parallel.parallel.ulysses import ulysses_attention

LENGTHS = [5, 2, 4]  # uneven shards: 11 tokens over 3 ranks
HEADS = 6


def _ulysses(rank, world):
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, HEADS, sum(LENGTHS), 8, generator=gen) for _ in range(3))
    local = [x.split(LENGTHS, dim=2)[rank] for x in (q, k, v)]
    with comm.count_comm() as stats:
        out = ulysses_attention(*local, None, LENGTHS)
    # fp32; the all-to-alls move values exactly, only the attention kernel differs from the reference
    torch.testing.assert_close(out, attention_reference(q, k, v).split(LENGTHS, dim=2)[rank], rtol=1e-5, atol=1e-6)
    # q, k, v: the heads of the other ranks, for my rows; output: my heads, for the other ranks' rows
    batch, _, _, dim = q.shape
    heads_here = HEADS // world
    qkv_bytes = 3 * batch * (HEADS - heads_here) * LENGTHS[rank] * dim * 4
    out_bytes = batch * heads_here * (sum(LENGTHS) - LENGTHS[rank]) * dim * 4
    assert stats.bytes["all_to_all"] == qkv_bytes + out_bytes
    assert stats.calls["all_to_all"] == 2


def test_ulysses_attention_uneven_shards():
    run_distributed(_ulysses, len(LENGTHS))


def _ulysses_chunked(rank, world):
    """Heads in chunks whose exchanges overlap the other chunks' attention: the same numbers as one chunk
    (bit for bit: every head meets the same kernel on the same rows), plain and through the bf16 wire;
    one q/k/v and one output all-to-all per chunk; more chunks than heads per rank refused."""
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 2 * HEADS, sum(LENGTHS), 8, generator=gen) for _ in range(3))  # 4 heads per rank
    local = [x.split(LENGTHS, dim=2)[rank] for x in (q, k, v)]
    exact = ulysses_attention(*local, None, LENGTHS, chunks=1)
    for wire in (None, "bf16", "fp8"):
        whole = ulysses_attention(*local, None, LENGTHS, wire=wire, chunks=1)
        with comm.count_comm() as stats:
            chunked = ulysses_attention(*local, None, LENGTHS, wire=wire, chunks=3)  # uneven: 2 + 1 + 1 heads
        assert stats.calls["all_to_all"] == 2 * 3
        arrived = []  # a step cache's payload rides on chunk 0's q/k/v exchange, once, bit for bit
        sums = torch.tensor([rank + 0.1, -rank], dtype=torch.float64)
        ulysses_attention(*local, None, LENGTHS, wire=wire, chunks=3, payload=comm.Payload(sums, arrived.append))
        assert len(arrived) == 1 and torch.equal(arrived[0][:, 0], torch.arange(world, dtype=torch.float64) + 0.1)
        if wire != "fp8":
            assert torch.equal(chunked, whole), wire
        else:  # fp8 scales each piece by its own amax: other pieces, another rounding of the same size
            whole_err, chunked_err = ((x - exact).abs().max().item() for x in (whole, chunked))
            assert 0 < chunked_err < 2 * whole_err, (chunked_err, whole_err)
    try:
        ulysses_attention(*local, None, LENGTHS, chunks=5)
    except ValueError as err:
        assert "ulysses chunks 5 exceeds the 4 heads" in str(err)
    else:
        raise AssertionError("5 chunks of 4 heads per rank were accepted")


def test_ulysses_attention_chunked_overlap_is_exact():
    run_distributed(_ulysses_chunked, len(LENGTHS))

"""Ring attention and its log-sum-exp merge, against attention over the concatenated keys."""

import torch
import torch.distributed as dist

from flux_parallel.kernels import attention_with_lse_reference
from flux_parallel.parallel import comm
from flux_parallel.parallel.launch import run_distributed
from flux_parallel.parallel.ring import merge_attention, ring_attention

LENGTHS = [5, 2, 4]  # uneven shards: 11 tokens over 3 ranks


def _qkv(lengths, heads=4, dim=8, scale=1.0):
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, heads, sum(lengths), dim, generator=gen) for _ in range(3))
    return q * scale, k, v


def test_merge_equals_softmax_over_concatenated_keys():
    # Scale 30 pushes the logits to about 300, where exp() overflows fp32: the merge must not. There
    # an lse carries fp32 rounding of 300 * 2^-24 ~ 2e-5, which becomes the relative error of the
    # block weights, hence the looser tolerance; at scale 1 only the order of the sums differs.
    for scale, atol in ((1.0, 1e-6), (30.0, 1e-5)):
        q, k, v = _qkv(LENGTHS, scale=scale)
        out, lse = None, None
        for k_block, v_block in zip(k.split(LENGTHS, dim=2), v.split(LENGTHS, dim=2)):
            out_block, lse_block = attention_with_lse_reference(q, k_block, v_block)
            out, lse = (out_block, lse_block) if out is None else merge_attention(out, lse, out_block, lse_block)
        out_ref, lse_ref = attention_with_lse_reference(q, k, v)
        if scale > 1:
            assert lse_ref.abs().max() > 100  # the extreme case really is extreme
        torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=atol)
        torch.testing.assert_close(lse, lse_ref, rtol=1e-5, atol=1e-5)


def test_merge_accumulates_in_fp32():
    q, k, v = (x.bfloat16() for x in _qkv([3, 3]))
    first, second = (attention_with_lse_reference(q, k[:, :, s], v[:, :, s]) for s in (slice(0, 3), slice(3, 6)))
    out, lse = merge_attention(*first, *second)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32


def _ring(rank, world):
    q, k, v = _qkv(LENGTHS)
    local = [x.split(LENGTHS, dim=2)[rank] for x in (q, k, v)]
    out_ref, lse_ref = attention_with_lse_reference(q, k, v)
    for overlap in (True, False):
        with comm.count_comm() as stats:
            out, lse = ring_attention(*local, dist.group.WORLD, LENGTHS, overlap=overlap)
        # fp32; the ring changes only the order of the sums (blocks merged by their LSE)
        torch.testing.assert_close(out, out_ref.split(LENGTHS, dim=2)[rank], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lse, lse_ref.split(LENGTHS, dim=2)[rank], rtol=1e-5, atol=1e-5)
        # Every shard but the one arriving last (the next rank's) leaves this rank once, K and V:
        batch, heads, _, dim = q.shape
        sent_rows = sum(LENGTHS) - LENGTHS[(rank + 1) % world]
        assert stats.bytes["p2p"] == 2 * batch * heads * sent_rows * dim * 4
        assert stats.calls["p2p"] == world - 1


def test_ring_attention_uneven_shards():
    run_distributed(_ring, len(LENGTHS))

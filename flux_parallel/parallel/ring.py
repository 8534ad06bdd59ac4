"""Ring attention (Liu et al. 2023, "Ring Attention with Blockwise Transformers", arXiv:2310.01889).

Each rank keeps its queries; the key/value shards travel around the ring, one hop per step, so
after P steps every query has met every key while no rank ever held more than two K/V shards
(the current one and the one arriving). The next shard is posted before attention on the current
one starts, so the transfer overlaps the computation. Partial results are merged exactly with
the log-sum-exp of each block (the online softmax of Milakov & Gimelshein 2018).
"""

import torch
import torch.distributed as dist
from torch import Tensor

from flux_parallel.kernels import attention_with_lse, attention_with_lse_reference
from flux_parallel.parallel import comm


def merge_attention(out: Tensor, lse: Tensor, out_block: Tensor, lse_block: Tensor) -> tuple[Tensor, Tensor]:
    """Combine attention over key sets A (out, lse) and B (out_block, lse_block) into A u B.

    With lse_X = log sum_{j in X} exp(s_j) and out_X = sum_{j in X} exp(s_j - lse_X) v_j:
        lse_AB = log(exp(lse_A) + exp(lse_B)) = lse_A - log(sigmoid(lse_A - lse_B))
        out_AB = w_A out_A + w_B out_B, w_B = exp(lse_B - lse_AB) = sigmoid(lse_B - lse_A) = 1 - w_A
               = out_A - sigmoid(lse_B - lse_A) * (out_A - out_B)
    The sigmoid forms never exponentiate a large positive number. out [B, H, L, D], lse [B, H, L];
    the result is fp32 whatever the inputs, so repeated merges do not round at each step.
    """
    out, lse, out_block, lse_block = out.float(), lse.float(), out_block.float(), lse_block.float()
    weight_block = torch.sigmoid(lse_block - lse)[..., None]  # [B, H, L, 1]
    return out - weight_block * (out - out_block), lse - torch.nn.functional.logsigmoid(lse - lse_block)


def ring_attention(
    q: Tensor,  # [B, H, L_r, D], this rank's queries
    k: Tensor,  # [B, H, L_r, D], this rank's keys and values
    v: Tensor,
    group,
    seq_lens: list[int],  # L_j of every rank j of `group`, in group rank order
    overlap: bool = True,
    backend: str = "auto",  # kernels.attention_with_lse's backend for each block
    wire: str | None = None,  # what the K/V sends carry: comm.WIRE_DTYPES, None for k's own dtype
    payload: comm.Payload | None = None,  # travels the ring with the K/V shards, arrives after the last hop
) -> tuple[Tensor, Tensor]:
    """Attention of this rank's queries over every rank's keys -> (out [B, H, L_r, D] in q's dtype,
    lse [B, H, L_r] fp32). Shards may differ in length: every rank knows them all from seq_lens.

    overlap=False waits for each transfer before computing: the benchmark's unhidden baseline.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if len(seq_lens) != world or not q.shape[2] == k.shape[2] == seq_lens[rank]:
        raise ValueError(f"ring_attention: this rank holds {q.shape[2]} queries and {k.shape[2]} keys, "
                         f"seq_lens {seq_lens} are for {world} ranks")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return _ring_attention_differentiable(q, k, v, group, seq_lens)
    q = q.contiguous()  # attended P times: one copy here, not one per step in the kernel
    kv = torch.stack((k, v))  # [2, B, H, L_j, D]: the shard now here, one message per hop
    out = lse = None
    if payload is not None:
        payload.ring_start(group)
    for step in range(world):
        last = step == world - 1
        if not last:  # post the next hop before computing on the current shard
            kv_next, hop = _post_next(kv, group, seq_lens[(rank - step - 1) % world], wire)
            if payload is not None:
                payload.ring_post(step)
            if not overlap:
                hop.wait()
        out_block, lse_block = attention_with_lse(q, kv[0], kv[1], backend)
        out, lse = (out_block.float(), lse_block) if out is None else merge_attention(out, lse, out_block, lse_block)
        if not last:
            if overlap:
                hop.wait()
            kv = kv_next[0] if wire is None else comm.from_wire(*kv_next, kv.dtype)
            if payload is not None:
                payload.ring_wait()
    if payload is not None:
        payload.ring_arrive()
    return out.to(q.dtype), lse


def _ring_attention_differentiable(
    q: Tensor, k: Tensor, v: Tensor, group, seq_lens: list[int]
) -> tuple[Tensor, Tensor]:
    """The same ring in grad mode: every hop is a differentiable exchange (gradients travel the ring
    backwards) and each block's attention is the math form, whose log-sum-exp carries a gradient
    (the fused kernels return theirs as a constant). Transfers are not overlapped here."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    kv = torch.stack((k, v))
    out = lse = None
    for step in range(world):
        out_block, lse_block = attention_with_lse_reference(q, kv[0], kv[1])
        out, lse = (out_block.float(), lse_block) if out is None else merge_attention(out, lse, out_block, lse_block)
        if step < world - 1:
            next_shape = (*kv.shape[:3], seq_lens[(rank - step - 1) % world], kv.shape[4])
            kv = comm.exchange(kv, group, dst=(rank + 1) % world, src=(rank - 1) % world, recv_shape=next_shape)
    return out.to(q.dtype), lse


def _post_next(kv: Tensor, group, next_len: int, wire: str | None = None) -> tuple[tuple, "comm.P2P"]:
    """Send the shard held now to the next rank, receive the previous rank's (next_len rows): the
    buffers that will hold it (in the wire dtype, and fp8's scale, once the hop is waited for)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    hop = comm.P2P(group)
    shape = (*kv.shape[:3], next_len, kv.shape[4])
    sent = (kv,) if wire is None else tuple(t for t in comm.to_wire(kv, wire) if t is not None)
    arriving = tuple(hop.recv(shape if i == 0 else t.shape, t.dtype, t.device, src=(rank - 1) % world)
                     for i, t in enumerate(sent))
    for t in sent:
        hop.send(t, dst=(rank + 1) % world)
    hop.commit()
    return arriving if wire != "bf16" else (arriving[0], None), hop

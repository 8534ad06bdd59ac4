"""Ulysses sequence parallelism (Jacobs et al. 2023, "DeepSpeed Ulysses", arXiv:2309.14509).

Attention mixes tokens but not heads. So an all-to-all that trades the sequence shard for a head
shard lets every rank run ordinary attention over the whole sequence for H/P of the heads; a
second all-to-all trades back. Per call a rank sends 3 (q, k, v) + 1 (output) times (P-1)/P of
its local activations, whatever P is: the volume per rank falls as the sequence is split further.
"""

from collections.abc import Callable

import torch
from torch import Tensor

from flux_parallel.kernels import attention
from flux_parallel.parallel import comm


def ulysses_attention(
    q: Tensor,  # [B, H, L_r, D], this rank's rows of the sequence, all heads
    k: Tensor,
    v: Tensor,
    group,
    seq_lens: list[int],  # L_j of every rank j of `group`, in group rank order
    attn: Callable[[Tensor, Tensor, Tensor], Tensor] = attention,
    wire: str | None = None,  # what the all-to-alls carry: comm.WIRE_DTYPES, None for q's own dtype
    payload: comm.Payload | None = None,  # rides on the q/k/v exchange
) -> Tensor:
    """Attention of this rank's queries over every rank's keys -> [B, H, L_r, D] (the rows of q).

    `attn` runs on head-sharded [B, H/P, sum(L), D] tensors (rank j's rows at offset
    sum(L[:j])); USP passes ring attention here. Needs H % P == 0: parallelize_flux checks it up front,
    and all_to_all refuses an uneven split with one sentence.
    """
    qkv = torch.stack((q, k, v))  # [3, B, H, L_r, D]: one all-to-all instead of three
    # scatter heads (dim 2), gather the sequence (dim 3): [3, B, H/P, sum(L), D]
    q_heads, k_heads, v_heads = comm.all_to_all(qkv, group, scatter_dim=2, gather_dim=3, gather_sizes=seq_lens,
                                                wire=wire, payload=payload)
    out_heads = attn(q_heads, k_heads, v_heads)  # [B, H/P, sum(L), D]
    # scatter the sequence back to its owners, gather the heads: [B, H, L_r, D]
    return comm.all_to_all(out_heads, group, scatter_dim=2, gather_dim=1, scatter_sizes=seq_lens, wire=wire)


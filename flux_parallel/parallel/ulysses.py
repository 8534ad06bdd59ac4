"""Ulysses sequence parallelism (Jacobs et al. 2023, "DeepSpeed Ulysses", arXiv:2309.14509).

Attention mixes tokens but not heads. So an all-to-all that trades the sequence shard for a head
shard lets every rank run ordinary attention over the whole sequence for H/P of the heads; a
second all-to-all trades back. Per call a rank sends 3 (q, k, v) + 1 (output) times (P-1)/P of
its local activations, whatever P is: the volume per rank falls as the sequence is split further.

Overlap. Heads are independent, so the seam splits them into chunks and pipelines the exchanges:
chunk c+1's q/k/v all-to-all is in flight while chunk c's attention runs, and chunk c's output
all-to-all while chunk c+1's runs; only the first input and the last output exchange stay on the
critical path. Peers (cache-dit's asynchronous Ulysses) overlap these exchanges with the next head
group's projections instead; that needs the projections inside the seam, i.e. an edit of the
model's blocks. Overlapping with the attention of the other head chunks is the equivalent that
stays inside `attention_fn(q, k, v)`. Exact: every head meets the same numbers, only later or earlier.
"""

from collections.abc import Callable

import torch
from torch import Tensor

from flux_parallel.kernels import attention
from flux_parallel.parallel import comm

# The one switch of the default: True, the automatic rule below picks the chunk count; False, one
# chunk (the exchanges wait on the critical path) unless a caller asks for more.
OVERLAP_BY_DEFAULT = True
MAX_CHUNKS = 4  # beyond this each chunk's attention is too short to hide a message behind
# A chunk's q/k/v message under 4 MiB: the per-message cost (on a CPU rank, gloo's thread takes turns with
# the compute on the rank's core) outweighs what it hides. docs/overlap.md has the measurements.
MIN_CHUNK_BYTES = 4 << 20


def auto_chunks(heads_per_rank: int, qkv_bytes: int) -> int:
    """The automatic rule: min(MAX_CHUNKS, heads_per_rank, qkv_bytes // MIN_CHUNK_BYTES), at least 1
    (qkv_bytes: this rank's whole q/k/v message)."""
    return max(1, min(MAX_CHUNKS, heads_per_rank, qkv_bytes // MIN_CHUNK_BYTES))


def ulysses_attention(
    q: Tensor,  # [B, H, L_r, D], this rank's rows of the sequence, all heads
    k: Tensor,
    v: Tensor,
    group,
    seq_lens: list[int],  # L_j of every rank j of `group`, in group rank order
    attn: Callable[[Tensor, Tensor, Tensor], Tensor] = attention,
    wire: str | None = None,  # what the all-to-alls carry: comm.WIRE_DTYPES, None for q's own dtype
    chunks: int | None = None,  # head chunks pipelined (module docstring); None: auto_chunks; 1: no overlap
    payload: comm.Payload | None = None,  # rides on the (first chunk's) q/k/v exchange
) -> Tensor:
    """Attention of this rank's queries over every rank's keys -> [B, H, L_r, D] (the rows of q).

    `attn` runs on head-sharded [B, H/P, sum(L), D] tensors (rank j's rows at offset
    sum(L[:j])); USP passes ring attention here. Needs H % P == 0: parallelize_flux checks it up front,
    and all_to_all refuses an uneven split with one sentence. In grad mode the exchanges are not chunked.
    """
    world = len(seq_lens)
    heads_per_rank = q.shape[1] // world
    if chunks is None:
        chunks = auto_chunks(heads_per_rank, 3 * q.numel() * q.element_size()) if OVERLAP_BY_DEFAULT else 1
    if chunks > heads_per_rank:
        raise ValueError(f"ulysses chunks {chunks} exceeds the {heads_per_rank} heads each Ulysses rank receives")
    if chunks == 1 or (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))):
        return _ulysses_attention_whole(q, k, v, group, seq_lens, attn, wire, payload)
    # chunk c: heads [start, start + n) of every rank's share, i.e. [start * P, (start + n) * P) of all H
    sizes = [heads_per_rank // chunks + (c < heads_per_rank % chunks) for c in range(chunks)]
    starts = [sum(sizes[:c]) * world for c in range(chunks)]
    heads_of = [slice(s, s + n * world) for s, n in zip(starts, sizes)]

    def post_input(c: int) -> "comm.PendingAllToAll":
        qkv = torch.stack((q[:, heads_of[c]], k[:, heads_of[c]], v[:, heads_of[c]]))  # [3, B, n P, L_r, D]
        return comm.all_to_all_start(qkv, group, scatter_dim=2, gather_dim=3, gather_sizes=seq_lens, wire=wire,
                                     payload=payload if c == 0 else None)

    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [B, H, L_r, D]: chunk c writes its heads
    inputs, outputs = post_input(0), []
    for c in range(chunks):
        q_heads, k_heads, v_heads = inputs.wait()  # [B, n, sum(L), D] each; chunk 0's payload may raise here,
        # on every rank alike, before anything else is posted
        if c + 1 < chunks:
            inputs = post_input(c + 1)  # in flight while chunk c's attention runs
        out_heads = attn(q_heads, k_heads, v_heads)
        outputs.append(comm.all_to_all_start(out_heads, group, scatter_dim=2, gather_dim=1, scatter_sizes=seq_lens,
                                             wire=wire, out=out[:, heads_of[c]]))
    for pending in outputs:
        pending.wait()
    return out


def _ulysses_attention_whole(q: Tensor, k: Tensor, v: Tensor, group, seq_lens: list[int],
                             attn: Callable[[Tensor, Tensor, Tensor], Tensor], wire: str | None,
                             payload: comm.Payload | None) -> Tensor:
    """One exchange each way for all heads (differentiable): ulysses_attention with one chunk."""
    qkv = torch.stack((q, k, v))  # [3, B, H, L_r, D]: one all-to-all instead of three
    # scatter heads (dim 2), gather the sequence (dim 3): [3, B, H/P, sum(L), D]
    q_heads, k_heads, v_heads = comm.all_to_all(qkv, group, scatter_dim=2, gather_dim=3, gather_sizes=seq_lens,
                                                wire=wire, payload=payload)
    out_heads = attn(q_heads, k_heads, v_heads)  # [B, H/P, sum(L), D]
    # scatter the sequence back to its owners, gather the heads: [B, H, L_r, D]
    return comm.all_to_all(out_heads, group, scatter_dim=2, gather_dim=1, scatter_sizes=seq_lens, wire=wire)

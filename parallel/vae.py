"""Exact VAE decoding in row stripes: across the ranks of a group, or one stripe after another on one device.

Parallel (`decode_parallel`): every rank decodes its own latent rows from `conv_in` on. The
decoder's modules are swapped for the duration of the call (`vae/` stays single-device code):
3x3 convolutions exchange one halo row with each neighbour (parallel/halo.py), GroupNorms reduce
exact global statistics, and the mid-block attention attends this rank's queries over every
rank's keys and values (all-gathered at the latent's small resolution, or passed round a ring).
Nearest up-sampling is row-local. The image stripes are gathered to rank 0 only.

Sequential (`decode_in_stripes`): a GroupNorm's statistics depend on the whole map, so each
up-sampling segment of the decoder (up-sample, res blocks[, output head]) is streamed several
times over overlapping stripes of its input: pass k stops at the segment's k-th GroupNorm and
adds the stripe's owned rows to that norm's statistics (merged exactly, Chan et al. 1979), the
last pass writes the owned output rows. Stripes overlap by the segment's receptive field, so
the rows next to a cut, which see zeros instead of their neighbours, are never kept. Only
segment boundaries (before each up-sampling) are held whole.
"""

import contextlib
import math

import torch
import torch.distributed as dist
from einops import rearrange
from torch import Tensor, nn

from kernels.attention import attention
from parallel import comm
from parallel.ring import ring_attention
from parallel.halo import DistGroupNorm, HaloConv2d, group_rank_size, group_sums, normalize, split_rows, squared_deviations
from vae.autoencoder import AutoEncoder, Conv3x3, ResnetBlock, SpatialAttention, Upsample


@contextlib.contextmanager
def swapped(root: nn.Module, replace):
    """Replace every submodule m of root for which replace(m) is not None; restore them on exit."""
    undo = []
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if (new := replace(child)) is not None:
                setattr(parent, name, new)
                undo.append((parent, name, child))
    try:
        yield root
    finally:
        for parent, name, child in reversed(undo):
            setattr(parent, name, child)


class GatheredAttention(nn.Module):
    """This rank's queries over all keys/values, all-gathered (uneven stripes of `rows[r]` latent rows)."""

    def __init__(self, group, rows: list[int]):
        super().__init__()
        self.group, self.rows = group, rows

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # [B, C, h_r, W] each
        height = q.shape[2]
        sizes = [r * q.shape[3] for r in self.rows]  # tokens per rank
        # contiguous, so that SDPA takes a fused kernel (see vae.autoencoder.SpatialAttention)
        q_local, k_local, v_local = (rearrange(t, "b c h w -> b 1 (h w) c").contiguous() for t in (q, k, v))
        kv = comm.all_gather(torch.cat([k_local, v_local], dim=-1), self.group, dim=2, sizes=sizes)
        out = attention(q_local, *(t.contiguous() for t in kv.chunk(2, dim=-1)))
        return rearrange(out, "b 1 (h w) c -> b c h w", h=height)


class RingAttention(nn.Module):
    """The same attention with keys/values passed round the ring: step s attends the block of rank
    r - s while block r - s - 1 is in flight; partial results merged by log-sum-exp."""

    def __init__(self, group, rows: list[int]):
        super().__init__()
        self.group, self.rows = group, rows

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # [B, C, h_r, W] each
        height = q.shape[2]
        q_local, k_local, v_local = (rearrange(t, "b c h w -> b 1 (h w) c") for t in (q, k, v))
        out, _ = ring_attention(q_local, k_local, v_local, self.group, [r * q.shape[3] for r in self.rows])
        return rearrange(out, "b 1 (h w) c -> b c h w", h=height)


ATTENTION = {"gather": GatheredAttention, "ring": RingAttention}


def _gather_to_root(x: Tensor, group, rows: list[int]) -> Tensor | None:
    """Rank 0 receives every stripe [B, C, rows[r], W] and concatenates them; the others send theirs."""
    rank, world = group_rank_size(group)
    p2p = comm.P2P(group)
    stripes = [x]
    if rank == 0:
        stripes += [p2p.recv((*x.shape[:2], rows[r], x.shape[3]), x.dtype, x.device, src=r) for r in range(1, world)]
    else:
        p2p.send(x, dst=0)
    p2p.commit()
    p2p.wait()
    return torch.cat(stripes, dim=2) if rank == 0 else None


def _group_of(ctx):
    """The group to decode across: the whole world of a ParallelContext, or a process group as it is."""
    if ctx is None or (hasattr(ctx, "is_distributed") and not ctx.is_distributed):
        return None
    return dist.group.WORLD if hasattr(ctx, "is_distributed") else ctx


def decode_parallel(ae: AutoEncoder, z: Tensor, ctx, attention: str = "gather") -> Tensor | None:
    """Decode z [B, 16, h, w] across every rank of `ctx` (a ParallelContext: its whole world; or a
    process group). Every rank passes the same full z and decodes rows split_rows(h, world)[rank]
    of it; the image [B, 3, 8h, 8w] is returned on rank 0 of the group, None on the others.
    `attention`: "gather" (all-gather K/V at latent resolution) or "ring" (P2P ring, LSE merge)."""
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {sorted(ATTENTION)}, got {attention!r}")
    ae.check_latent(z)
    group = _group_of(ctx)
    if group is None or dist.get_world_size(group) == 1:
        return ae.decode(z)
    rank, world = group_rank_size(group)
    if z.shape[2] < world:  # checked on every rank before the first collective
        raise ValueError(f"a latent of [{z.shape[2]}] rows cannot be split over {world} ranks: each needs at least one latent row")
    rows = split_rows(z.shape[2], world)
    z_local = z[:, :, sum(rows[:rank]) : sum(rows[: rank + 1])]  # [B, 16, rows[rank], w]

    def replace(module: nn.Module) -> nn.Module | None:
        if isinstance(module, Conv3x3):
            return HaloConv2d(module, group)
        if isinstance(module, nn.GroupNorm):
            return DistGroupNorm(module, group)
        return ATTENTION[attention](group, rows) if isinstance(module, SpatialAttention) else None

    with torch.no_grad(), swapped(ae.decoder, replace):
        image_local = ae.decode(z_local)  # [B, 3, 8 rows[rank], 8w]
    return _gather_to_root(image_local, group, [r * ae.params.downsample for r in rows])


class _Stop(Exception):
    """Raised by the GroupNorm whose statistics a streaming pass is collecting: the rest is not needed."""


class StripeGroupNorm(nn.Module):
    """GroupNorm with statistics of the whole map, gathered over earlier streaming passes.

    Until its statistics are known it is the pass's target: it adds the owned rows of the current
    stripe (state.owned, in segment-input rows; this norm's input is state.scale(x) times taller)
    to its running (count, mean, M2) in fp64 and stops the pass."""

    def __init__(self, norm: nn.GroupNorm, state: dict):
        super().__init__()
        self.norm, self.state = norm, state
        self.moments: tuple[float, Tensor, Tensor] | None = None  # (count, mean, M2) so far
        self.stats: tuple[Tensor, Tensor] | None = None  # (mean, biased variance), once complete

    def forward(self, x: Tensor) -> Tensor:
        if self.stats is not None:
            return normalize(x, *self.stats, self.norm)
        scale = x.shape[2] // self.state["in_rows"]
        lo, hi = (scale * r for r in self.state["owned"])
        self.add(x[:, :, lo:hi])
        self.state["collected"].add(self)
        raise _Stop

    def add(self, x: Tensor) -> None:
        g = self.norm.num_groups
        count = x.numel() / (x.shape[0] * g)
        mean = group_sums(x, g) / count
        m2 = squared_deviations(x, mean, g)
        if self.moments is not None:  # Chan's merge: the spread of the two means is part of M2
            n0, mean0, m20 = self.moments
            delta, total = mean - mean0, n0 + count
            mean, m2 = mean0 + delta * count / total, m20 + m2 + delta.square() * n0 * count / total
            count = total
        self.moments = (count, mean, m2)

    def finish(self) -> None:
        count, mean, m2 = self.moments
        self.stats = (mean, m2 / count)


def _receptive_rows(ops: list) -> int:
    """Rows next to a cut that see zeros instead of neighbours, at the segment's output resolution."""
    spoiled = 0
    for op in ops:
        if isinstance(op, Upsample):
            spoiled = 2 * spoiled + 1
        elif isinstance(op, ResnetBlock):
            spoiled += 2
        else:  # decoder.head: one 3x3 conv
            spoiled += 1
    return spoiled


def _run(ops: list[nn.Module], x: Tensor) -> Tensor:
    for op in ops:
        x = op(x)
    return x


def _stream(ops: list[nn.Module], x: Tensor, num_stripes: int, state: dict) -> Tensor:
    """The segment `ops` (starting with a 2x up-sampling) on x [B, C, H, W], stripe by stripe."""
    height = x.shape[2]
    margin = math.ceil(_receptive_rows(ops) / 2)  # in input rows
    rows = split_rows(height, min(num_stripes, height))
    out = None
    while True:
        state["collected"] = set()
        for start, n in zip([sum(rows[:i]) for i in range(len(rows))], rows):
            lo, hi = max(0, start - margin), min(height, start + n + margin)
            state["in_rows"], state["owned"] = hi - lo, (start - lo, start + n - lo)
            try:
                y = _run(ops, x[:, :, lo:hi])  # [B, C', 2 (hi - lo), 2W]
            except _Stop:
                continue
            if out is None:
                out = y.new_empty((*y.shape[:2], 2 * height, y.shape[3]))
            out[:, :, 2 * start : 2 * (start + n)] = y[:, :, 2 * (start - lo) : 2 * (start + n - lo)]
        if not state["collected"]:
            return out
        for norm in state["collected"]:
            norm.finish()


def decode_in_stripes(ae: AutoEncoder, z: Tensor, num_stripes: int) -> Tensor:
    """ae.decode(z) on one device, exactly, holding only stripes of the full-resolution activations:
    conv_in, the mid block and the lowest level run whole (latent resolution); each later level
    (from its up-sampling on) is streamed in `num_stripes` overlapping row stripes."""
    if not isinstance(num_stripes, int) or num_stripes < 1:
        raise ValueError(f"num_stripes must be a positive integer, got {num_stripes!r}")
    decoder, state = ae.decoder, {}
    levels = list(reversed(decoder.up))  # lowest resolution first
    if num_stripes == 1 or len(levels) == 1:  # nothing above the latent's resolution to stream
        return ae.decode(z)
    streamed = {id(m) for level in levels[1:] for m in level.modules()} | {id(decoder.norm_out)}

    def replace(module: nn.Module) -> nn.Module | None:
        return StripeGroupNorm(module, state) if isinstance(module, nn.GroupNorm) and id(module) in streamed else None

    with torch.no_grad(), swapped(decoder, replace):
        h = _run([decoder.conv_in, decoder.mid, *levels[0].block], ae.decoder_input(z))
        for previous, level in zip(levels, levels[1:]):
            ops = [previous.upsample, *level.block] + ([decoder.head] if level is levels[-1] else [])
            h = _stream(ops, h, num_stripes, state)
        return h  # [B, 3, 8h, 8w]

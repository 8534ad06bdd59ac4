"""Exact VAE decoding on one device, one row stripe at a time (the parallel VAE's algorithm, in sequence).

A GroupNorm's statistics depend on the whole map, so each up-sampling segment of the decoder
(up-sample, res blocks[, output head]) is streamed several times over overlapping row stripes of
its input. Pass k runs every stripe up to the segment's k-th GroupNorm, which adds the stripe's
owned rows to its statistics (merged exactly in fp64, Chan et al. 1979) and ends the stripe's
pass there by raising `_StatisticsCollected`; once every stripe has contributed, that norm knows
its statistics and the next pass runs on to the following one. The last pass writes the owned
output rows. Stripes overlap by the segment's receptive field, so the rows next to a cut, which
see zeros instead of their neighbours, are never kept. Only segment boundaries (before each
up-sampling) are held whole.
"""

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from flux_parallel.parallel.halo import group_sums, normalize, split_rows, squared_deviations
from flux_parallel.parallel.swap import module_swaps, swapped
from flux_parallel.vae.autoencoder import AutoEncoder, ResnetBlock, Upsample


@dataclass
class StripePass:
    """What the streaming loop tells the norms about the stripe it is running now."""

    in_rows: int = 0  # rows of the segment's input in this stripe, margins included
    owned: tuple[int, int] = (0, 0)  # the rows this stripe owns, relative to its first row
    collected: set = field(default_factory=set)  # the norms that took statistics during this pass


class _StatisticsCollected(Exception):
    """Raised by the GroupNorm that took the stripe's statistics: the rest of its pass is not needed.
    Only `_stream` catches it; the exception is what lets a pass stop deep inside a res block."""


class StripeGroupNorm(nn.Module):
    """GroupNorm with statistics of the whole map, gathered over earlier streaming passes.

    Until its statistics are known it is the pass's target: it adds the owned rows of the current
    stripe (in segment-input rows; this norm's input is x.shape[2] / in_rows times taller) to its
    running (count, mean, M2) in fp64 and stops the pass."""

    def __init__(self, norm: nn.GroupNorm, stripe: StripePass):
        super().__init__()
        self.norm, self.stripe = norm, stripe
        self.moments: tuple[float, Tensor, Tensor] | None = None  # (count, mean, M2) so far
        self.stats: tuple[Tensor, Tensor] | None = None  # (mean, biased variance), once complete

    def forward(self, x: Tensor) -> Tensor:
        if self.stats is not None:
            return normalize(x, *self.stats, self.norm)
        scale = x.shape[2] // self.stripe.in_rows
        lo, hi = (scale * r for r in self.stripe.owned)
        self.add(x[:, :, lo:hi])
        self.stripe.collected.add(self)
        raise _StatisticsCollected

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


def _stream(ops: list[nn.Module], x: Tensor, stripes: int, stripe: StripePass) -> Tensor:
    """The segment `ops` (starting with a 2x up-sampling) on x [B, C, H, W], stripe by stripe."""
    height = x.shape[2]
    margin = math.ceil(_receptive_rows(ops) / 2)  # in input rows
    rows = split_rows(height, min(stripes, height))
    starts = [sum(rows[:i]) for i in range(len(rows))]
    out = None
    while True:  # one pass per GroupNorm of the segment, then the pass that writes the output
        stripe.collected = set()
        for start, n in zip(starts, rows):
            lo, hi = max(0, start - margin), min(height, start + n + margin)
            stripe.in_rows, stripe.owned = hi - lo, (start - lo, start + n - lo)
            try:
                y = _run(ops, x[:, :, lo:hi])  # [B, C', 2 (hi - lo), 2W]
            except _StatisticsCollected:
                continue
            if out is None:
                out = y.new_empty((*y.shape[:2], 2 * height, y.shape[3]))
            out[:, :, 2 * start : 2 * (start + n)] = y[:, :, 2 * (start - lo) : 2 * (start + n - lo)]
        if not stripe.collected:
            return out
        for norm in stripe.collected:
            norm.finish()


def decode_in_stripes(ae: AutoEncoder, z: Tensor, stripes: int) -> Tensor:
    """ae.decode(z) on one device, exactly, holding only stripes of the full-resolution activations:
    conv_in, the mid block and the lowest level run whole (latent resolution); each later level
    (from its up-sampling on) is streamed in `stripes` overlapping row stripes."""
    if not isinstance(stripes, int) or isinstance(stripes, bool) or stripes < 1:
        raise ValueError(f"stripes must be a positive integer (the number of row stripes), got {stripes!r}")
    decoder, stripe = ae.decoder, StripePass()
    levels = list(reversed(decoder.up))  # lowest resolution first
    if stripes == 1 or len(levels) == 1:  # nothing above the latent's resolution to stream
        return ae.decode(z)
    streamed = {id(m) for level in levels[1:] for m in level.modules()} | {id(decoder.norm_out)}

    def replace(module: nn.Module) -> nn.Module | None:
        return StripeGroupNorm(module, stripe) if isinstance(module, nn.GroupNorm) and id(module) in streamed else None

    with torch.no_grad(), swapped(module_swaps(decoder, replace)):
        h = _run([decoder.conv_in, decoder.mid, *levels[0].block], ae.decoder_input(z))
        for previous, level in zip(levels, levels[1:]):
            ops = [previous.upsample, *level.block] + ([decoder.head] if level is levels[-1] else [])
            h = _stream(ops, h, stripes, stripe)
        return h  # [B, 3, 8h, 8w]

"""Row-sharded feature maps [B, C, rows, W]: halo exchange for 3x3 convolutions, exact GroupNorm
statistics, and the uneven row split they share.

A stripe's 3x3 convolution needs one row from each neighbour. Rather than building a padded copy
of the stripe, the convolution runs on the stripe with its usual zero padding and the two edge
rows then get the neighbours' contribution through the kernel's outer rows: the same sum,
without a second full-size activation, and the rows are in flight while the whole stripe is convolved
(tools/bench/bench_halo.py measures what that hides).

GroupNorm needs the biased variance about the *global* mean. Combining per-stripe variances about
per-stripe means (an older DistVAE) drops the spread of the stripe means, which is large exactly
when the image has vertical structure; here the squared deviations are summed about the global
mean, after a first reduction has produced it (two all-reduces, statistics in fp64).
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from flux_parallel.parallel import comm
from flux_parallel.parallel.sequence import shard_sizes


def split_rows(total: int, parts: int) -> list[int]:
    """Non-empty uneven stripes, as the sequence shards are cut: [10, 4] -> [3, 3, 2, 2]."""
    if parts < 1 or total < parts:
        raise ValueError(f"cannot split {total} rows into {parts} non-empty stripes")
    return shard_sizes(total, parts)


def group_rank_size(group) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


class HaloConv2d(nn.Module):
    """A zero-padded 3x3 stride-1 convolution on this rank's row stripe, exact as the full one's rows."""

    def __init__(self, conv: nn.Conv2d, group):
        super().__init__()
        if conv.kernel_size != (3, 3) or conv.stride != (1, 1) or conv.padding != (1, 1):
            raise ValueError(f"HaloConv2d wraps 3x3 stride-1 padding-1 convolutions, got {conv}")
        self.conv, self.group = conv, group

    def forward(self, x: Tensor) -> Tensor:
        # the halo rows travel while the whole stripe is convolved: only the two edge corrections wait
        p2p, above, below = self.post_halo(x)
        out = self.conv(x)  # the edge rows saw zeros where the neighbours' rows belong
        p2p.wait()
        return self.add_halo(out, above, below)

    def post_halo(self, x: Tensor) -> tuple[comm.P2P, Tensor | None, Tensor | None]:
        """Start sending this stripe's edge rows to the neighbours and receiving theirs, [B, C, 1, W] each
        (None where the stripe is the map's top or bottom); they are filled once the P2P's wait() returns."""
        rank, world = group_rank_size(self.group)
        edge = (x.shape[0], x.shape[1], 1, x.shape[3])  # one row: the halo of a 3x3 kernel
        p2p = comm.P2P(self.group)
        above = p2p.recv(edge, x.dtype, x.device, src=rank - 1) if rank > 0 else None
        below = p2p.recv(edge, x.dtype, x.device, src=rank + 1) if rank < world - 1 else None
        if rank > 0:
            p2p.send(x[:, :, :1], dst=rank - 1)
        if rank < world - 1:
            p2p.send(x[:, :, -1:], dst=rank + 1)
        p2p.commit()
        return p2p, above, below

    def add_halo(self, out: Tensor, above: Tensor | None, below: Tensor | None) -> Tensor:
        """Add the neighbours' rows' contribution to the edge rows of the zero-padded convolution `out`."""
        weight = self.conv.weight  # [O, C, 3, 3]
        if above is not None:  # the row above meets output row 0 through kernel row 0
            out[:, :, :1] += F.conv2d(above, weight[:, :, :1], padding=(0, 1))
        if below is not None:  # the row below meets the last output row through kernel row 2
            out[:, :, -1:] += F.conv2d(below, weight[:, :, 2:], padding=(0, 1))
        return out


def normalize(x: Tensor, mean: Tensor, var: Tensor, norm: nn.GroupNorm) -> Tensor:
    """GroupNorm of x with given per-(batch, group) statistics [B, G], as torch's kernel computes it:
    x * scale + shift with scale = weight / sqrt(var + eps), shift = bias - mean * scale."""
    b, c, g = x.shape[0], x.shape[1], norm.num_groups
    rstd = (var.double() + norm.eps).rsqrt()  # [B, G]
    scale = (norm.weight.double().view(1, g, c // g) * rstd[..., None]).view(b, c)
    shift = norm.bias.double() - mean.double().repeat_interleave(c // g, dim=1) * scale
    return torch.addcmul(shift.to(x.dtype)[..., None, None], x, scale.to(x.dtype)[..., None, None])


def group_sums(x: Tensor, groups: int) -> Tensor:
    """Per-(batch, group) sums [B, G] in fp64 (fp32 accumulation inside a stripe, as torch's GroupNorm)."""
    return x.reshape(x.shape[0], groups, -1).sum(-1, dtype=torch.float32).double()


def squared_deviations(x: Tensor, mean: Tensor, groups: int) -> Tensor:
    """Per-(batch, group) sums of (x - mean)^2 [B, G] about a given mean [B, G]."""
    centred = x.reshape(x.shape[0], groups, -1).float() - mean.float()[..., None]
    return centred.square_().sum(-1).double()


class DistGroupNorm(nn.Module):
    """GroupNorm of a row-sharded map with the statistics of the whole map (two all-reduces)."""

    def __init__(self, norm: nn.GroupNorm, group):
        super().__init__()
        self.norm, self.group = norm, group

    def forward(self, x: Tensor) -> Tensor:
        b, g = x.shape[0], self.norm.num_groups
        count = torch.tensor([x.numel() // (b * g)], dtype=torch.float64, device=x.device)
        sums = comm.all_reduce(torch.cat([group_sums(x, g).flatten(), count]), self.group)
        mean = sums[:-1].view(b, g) / sums[-1]  # [B, G], over the whole map
        deviations = comm.all_reduce(squared_deviations(x, mean, g), self.group)
        return normalize(x, mean, deviations / sums[-1], self.norm)

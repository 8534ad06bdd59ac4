"""Exact VAE decoding (and encoding) across the ranks of a group, each working on its own row stripe.

Parallel (`decode_parallel`): every rank decodes its own latent rows from `conv_in` on. The
decoder's modules are swapped for the duration of the call (`vae/` stays single-device code):
3x3 convolutions exchange one halo row with each neighbour (parallel/halo.py), GroupNorms reduce
exact global statistics, and the mid-block attention attends this rank's queries over every
rank's keys and values (all-gathered at the latent's small resolution, or passed round a ring).
Nearest up-sampling is row-local. The image stripes are gathered to rank 0 only.
The same algorithm run stripe after stripe on one device is parallel/stripes.py.

Encoding (`encode_parallel`, an image-conditioned call's reference or source image) swaps the encoder's
modules the same way; its stride-2 down-samplings take one halo row from the stripe below. Every rank
holds whole latent rows, so every stripe starts at an even row at each resolution; the latents are
all-gathered, since every rank of the replica needs the image's tokens.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from flux_parallel.kernels.attention import attention
from flux_parallel.parallel import comm
from flux_parallel.parallel.halo import DistGroupNorm, HaloConv2d, group_rank_size, split_rows
from flux_parallel.parallel.ring import ring_attention
from flux_parallel.parallel.swap import module_swaps, swapped
from flux_parallel.vae.autoencoder import AutoEncoder, Conv3x3, Downsample, SpatialAttention


def _tokens(x: Tensor) -> Tensor:
    """A stripe's feature map [B, C, h, W] as one head of h*W tokens [B, 1, h*W, C], contiguous so that
    SDPA takes a fused kernel (see vae.autoencoder.SpatialAttention)."""
    return rearrange(x, "b c h w -> b 1 (h w) c").contiguous()


def _feature_map(tokens: Tensor, height: int) -> Tensor:
    return rearrange(tokens, "b 1 (h w) c -> b c h w", h=height)


class GatheredAttention(nn.Module):
    """This rank's queries over all keys/values, all-gathered (uneven stripes of `rows[r]` latent rows)."""

    def __init__(self, group, rows: list[int]):
        super().__init__()
        self.group, self.rows = group, rows

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # [B, C, h_r, W] each
        sizes = [r * q.shape[3] for r in self.rows]  # tokens per rank
        kv = comm.all_gather(torch.cat([_tokens(k), _tokens(v)], dim=-1), self.group, dim=2, sizes=sizes)
        out = attention(_tokens(q), *(t.contiguous() for t in kv.chunk(2, dim=-1)))
        return _feature_map(out, q.shape[2])


class RingAttention(nn.Module):
    """The same attention with keys/values passed round the ring: step s attends the block of rank
    r - s while block r - s - 1 is in flight; partial results merged by log-sum-exp."""

    def __init__(self, group, rows: list[int]):
        super().__init__()
        self.group, self.rows = group, rows

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # [B, C, h_r, W] each
        out, _ = ring_attention(_tokens(q), _tokens(k), _tokens(v), self.group, [r * q.shape[3] for r in self.rows])
        return _feature_map(out, q.shape[2])


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


def decode_parallel(ae: AutoEncoder, z: Tensor, group, attention: str = "gather") -> Tensor | None:
    """Decode z [B, 16, h, w] across every rank of the process `group` (None: this process alone).
    Every rank passes the same full z and decodes rows split_rows(h, world)[rank] of it; the image
    [B, 3, 8h, 8w] is returned on rank 0 of the group, None on the others.
    `attention`: "gather" (all-gather K/V at latent resolution) or "ring" (P2P ring, LSE merge)."""
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {sorted(ATTENTION)}, got {attention!r}")
    ae.check_latent(z)
    if group is None or dist.get_world_size(group) == 1:
        return ae.decode(z)
    rank, world = group_rank_size(group)
    if z.shape[2] < world:  # checked on every rank before the first collective
        raise ValueError(f"a latent of [{z.shape[2]}] rows cannot be split over {world} ranks: "
                         "each needs at least one latent row")
    rows = split_rows(z.shape[2], world)
    z_local = z[:, :, sum(rows[:rank]) : sum(rows[: rank + 1])]  # [B, 16, rows[rank], w]

    with torch.no_grad(), swapped(stripe_swaps(ae.decoder, group, rows, attention)):
        image_local = ae.decode(z_local)  # [B, 3, 8 rows[rank], 8w]
    return _gather_to_root(image_local, group, [r * ae.params.downsample for r in rows])


class HaloDownsample(nn.Module):
    """Downsample's stride-2 3x3 convolution (after one zero row and column at the bottom and right) on an
    even row stripe that starts at an even row: only its last output row reaches below the stripe, into
    the next stripe's first row (or, on the last stripe, the zero row)."""

    def __init__(self, down: Downsample, group):
        super().__init__()
        self.conv, self.group = down.conv, group

    def forward(self, x: Tensor) -> Tensor:
        # the halo row travels while the stripe is convolved over a zero row: only the last row's correction waits
        p2p, below = self.post_halo(x)
        out = self.conv(F.pad(x, (0, 1, 0, 1)))  # [B, C, rows / 2, W / 2], as Downsample pads
        p2p.wait()
        return self.add_halo(out, below)

    def post_halo(self, x: Tensor) -> tuple[comm.P2P, Tensor | None]:
        """Start sending this stripe's first row up and receiving the next stripe's first row [B, C, 1, W]
        (None on the last stripe, whose zero row below is Downsample's own padding)."""
        rank, world = group_rank_size(self.group)
        p2p, below = comm.P2P(self.group), None
        if rank < world - 1:
            below = p2p.recv((x.shape[0], x.shape[1], 1, x.shape[3]), x.dtype, x.device, src=rank + 1)
        if rank > 0:
            p2p.send(x[:, :, :1], dst=rank - 1)
        p2p.commit()
        return p2p, below

    def add_halo(self, out: Tensor, below: Tensor | None) -> Tensor:
        """The row below meets the last output row through kernel row 2 (columns padded as Downsample pads)."""
        if below is not None:
            out[:, :, -1:] += F.conv2d(F.pad(below, (0, 1)), self.conv.weight[:, :, 2:], stride=2)
        return out


def stripe_swaps(root: nn.Module, group, rows: list[int], attention: str) -> list:
    """The swaps that make the encoder or decoder `root` run on this rank's row stripe (`rows`: every rank's
    latent rows): halo 3x3 convolutions and down-samplings, global GroupNorm, the mid block's attention over
    every rank's keys."""

    def replace(module: nn.Module) -> nn.Module | None:
        if isinstance(module, Conv3x3):
            return HaloConv2d(module, group)
        if isinstance(module, Downsample):
            return HaloDownsample(module, group)
        if isinstance(module, nn.GroupNorm):
            return DistGroupNorm(module, group)
        return ATTENTION[attention](group, rows) if isinstance(module, SpatialAttention) else None

    return module_swaps(root, replace)


def encode_parallel(ae: AutoEncoder, x: Tensor, group, attention: str = "gather") -> Tensor:
    """Encode x [B, 3, H, W] (H, W multiples of 8) across every rank of `group`, every rank passing the
    same x: each encodes the image rows of its latent rows split_rows(H/8, world)[rank]. Returns the
    posterior mean's latents [B, 16, H/8, W/8] on every rank, as ae.encode(x) computes them."""
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {sorted(ATTENTION)}, got {attention!r}")
    if group is None or dist.get_world_size(group) == 1:
        return ae.encode(x)
    rank, world = group_rank_size(group)
    f = ae.params.downsample
    if x.ndim != 4 or x.shape[2] % f or x.shape[2] // f < world:  # checked on every rank before a collective
        raise ValueError(f"an image of {list(x.shape)} cannot be encoded over {world} ranks: each needs at least "
                         f"one latent row ({f} image rows), and H must be a multiple of {f}")
    rows = split_rows(x.shape[2] // f, world)
    x_local = x[:, :, f * sum(rows[:rank]) : f * sum(rows[: rank + 1])]  # [B, 3, f rows[rank], W]

    with torch.no_grad(), swapped(stripe_swaps(ae.encoder, group, rows, attention)):
        z_local = ae.encode(x_local)  # [B, 16, rows[rank], W/8]
    return comm.all_gather(z_local.contiguous(), group, dim=2, sizes=rows)

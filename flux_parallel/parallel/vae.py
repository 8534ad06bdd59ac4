"""Exact VAE decoding across the ranks of a group, each decoding its own row stripe.

Parallel (`decode_parallel`): every rank decodes its own latent rows from `conv_in` on. The
decoder's modules are swapped for the duration of the call (`vae/` stays single-device code):
3x3 convolutions exchange one halo row with each neighbour (parallel/halo.py), GroupNorms reduce
exact global statistics, and the mid-block attention attends this rank's queries over every
rank's keys and values (all-gathered at the latent's small resolution, or passed round a ring).
Nearest up-sampling is row-local. The image stripes are gathered to rank 0 only.
The same algorithm run stripe after stripe on one device is parallel/stripes.py.
"""

import torch
import torch.distributed as dist
from einops import rearrange
from torch import Tensor, nn

from flux_parallel.kernels.attention import attention
from flux_parallel.parallel import comm
from flux_parallel.parallel.halo import DistGroupNorm, HaloConv2d, group_rank_size, split_rows
from flux_parallel.parallel.ring import ring_attention
from flux_parallel.parallel.swap import module_swaps, swapped
from flux_parallel.vae.autoencoder import AutoEncoder, Conv3x3, SpatialAttention


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

    def replace(module: nn.Module) -> nn.Module | None:
        if isinstance(module, Conv3x3):
            return HaloConv2d(module, group)
        if isinstance(module, nn.GroupNorm):
            return DistGroupNorm(module, group)
        return ATTENTION[attention](group, rows) if isinstance(module, SpatialAttention) else None

    with torch.no_grad(), swapped(module_swaps(ae.decoder, replace)):
        image_local = ae.decode(z_local)  # [B, 3, 8 rows[rank], 8w]
    return _gather_to_root(image_local, group, [r * ae.params.downsample for r in rows])

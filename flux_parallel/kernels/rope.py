"""Rotary position embedding over N position axes (FLUX: time, row, column).

Each axis i gets axes_dim[i] channels of the head; within them, adjacent channel pairs
(2j, 2j+1) rotate by angle pos * theta^(-2j / axes_dim[i]) (Su et al. 2021, RoFormer).
The table is real-valued (cos, sin) and computed once per forward, not per block.
"""

import torch
from torch import Tensor


def rope_table(ids: Tensor, axes_dim: tuple[int, ...], theta: float) -> tuple[Tensor, Tensor]:
    """ids [B, L, n_axes] -> (rot_even, rot_odd), each [B, 1, L, head_dim // 2, 2] in fp32: where the
    even and odd channel of each pair go, (cos, sin) and (-sin, cos)."""
    angles = []
    for axis, dim in enumerate(axes_dim):
        # float64 for the frequencies and products, as the reference does: positions reach
        # a few hundred and theta^(-x) spans 4 decades, so fp32 loses digits in the angle.
        exponent = torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim
        inv_freq = 1.0 / theta**exponent  # [dim // 2]
        angles.append(ids[..., axis].to(torch.float64)[..., None] * inv_freq)  # [B, L, dim // 2]
    angle = torch.cat(angles, dim=-1)[:, None]  # [B, 1, L, head_dim // 2]
    cos, sin = angle.cos().float(), angle.sin().float()
    return torch.stack((cos, sin), dim=-1), torch.stack((-sin, cos), dim=-1)


def apply_rope(x: Tensor, rot_even: Tensor, rot_odd: Tensor) -> Tensor:
    """Rotate channel pairs of x [B, H, L, D] by the table; computed in fp32, returned in x's dtype.

    Two broadcast multiply-adds write the interleaved result directly (no stack or cat per call).
    """
    pairs = x.float().unflatten(-1, (-1, 2))  # [B, H, L, D/2, 2]
    rotated = torch.addcmul(pairs[..., :1] * rot_even, pairs[..., 1:], rot_odd)  # [B, H, L, D/2, 2]
    return rotated.flatten(-2).to(x.dtype)


def apply_rope_reference(x: Tensor, ids: Tensor, axes_dim: tuple[int, ...], theta: float) -> Tensor:
    """Complex-number form: x viewed as D/2 complex numbers times exp(i * angle)."""
    angles = []
    for axis, dim in enumerate(axes_dim):
        inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles.append(ids[..., axis].double()[..., None] * inv_freq)
    rotation = torch.polar(torch.ones(1, dtype=torch.float64), torch.cat(angles, dim=-1))[:, None]
    x_complex = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(x_complex * rotation).flatten(-2).to(x.dtype)

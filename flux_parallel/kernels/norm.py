"""RMS norm (Zhang & Sennrich 2019), computed in fp32 whatever the input dtype."""

import torch
from torch import Tensor


def rms_norm(x: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    """x * rsqrt(mean(x^2) + eps), in fp32, cast back to x's dtype, then times scale."""
    x_fp32 = x.float()
    normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return normed.to(x.dtype) * scale


def rms_norm_reference(x: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    x64 = x.double()
    return (x64 / (x64.pow(2).mean(dim=-1, keepdim=True) + eps).sqrt()).to(x.dtype) * scale

"""Scaled dot-product attention on [B, heads, L, head_dim], with and without the log-sum-exp.

`attention` is the seam every attention layer calls; `attention_with_lse` also returns the
per-query log-sum-exp of the scores in fp32, which ring attention needs to merge partial
results exactly (Milakov & Gimelshein 2018, "Online normalizer calculation for softmax").
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(D)) v for q [B, H, Lq, D], k/v [B, H, Lk, D] -> [B, H, Lq, D]."""
    return F.scaled_dot_product_attention(q, k, v)


def attention_with_lse(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Like `attention`, plus lse [B, H, Lq] = logsumexp_j(q k_j / sqrt(D)) in fp32.

    Uses the fused kernels that produce the LSE as a by-product (no [Lq, Lk] score matrix):
    flash attention on the CPU and on CUDA for half precision, memory-efficient attention on
    CUDA for fp32. Falls back to the math reference where neither applies.
    """
    # The raw aten ops assume the standard [B, H, L, D] strides (the public SDPA checks this, they
    # do not): a permuted view such as the VAE's "b c h w -> b 1 (h w) c" gives NaNs on the CPU.
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
        return out, lse.float()
    if q.device.type == "cuda":
        if q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[:2]
            return out, lse.float()
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
        return out, lse[..., : q.shape[2]].float()  # the kernel pads the LSE rows to a multiple of 32
    return attention_with_lse_reference(q, k, v)


def attention_reference(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return attention_with_lse_reference(q, k, v)[0]


def attention_with_lse_reference(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Plain math in fp32: materialises the score matrix."""
    scores = q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])  # [B, H, Lq, Lk]
    lse = scores.logsumexp(dim=-1)
    out = torch.exp(scores - lse[..., None]) @ v.float()
    return out.to(q.dtype), lse

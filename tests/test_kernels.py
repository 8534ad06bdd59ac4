"""kernels/ against their plain math references."""

import pytest
import torch

from kernels import (
    apply_rope,
    apply_rope_reference,
    attention,
    attention_reference,
    attention_with_lse,
    attention_with_lse_reference,
    rms_norm,
    rms_norm_reference,
    rope_table,
)


def test_attention_matches_math():
    q, k, v = torch.randn(3, 2, 4, 37, 16).unbind(0)
    # fp32 flash/math kernels differ from the reference only in summation order
    torch.testing.assert_close(attention(q, k, v), attention_reference(q, k, v), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lk", [1, 37, 130])
def test_attention_with_lse_matches_math(lk):
    q = torch.randn(2, 3, 21, 8)
    k, v = torch.randn(2, 2, 3, lk, 8).unbind(0)
    out, lse = attention_with_lse(q, k, v)
    ref_out, ref_lse = attention_with_lse_reference(q, k, v)
    assert lse.dtype == torch.float32 and lse.shape == (2, 3, 21)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


def test_attention_with_lse_on_permuted_views():
    # a [B, C, H, W] feature map viewed as one head over H*W tokens: strides the raw kernels mishandle
    x = torch.randn(1, 16, 5, 6)
    q = x.flatten(2).transpose(1, 2)[:, None]  # [1, 1, 30, 16], not contiguous
    out, lse = attention_with_lse(q, q, q)
    ref_out, ref_lse = attention_with_lse_reference(q, q, q)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


def test_rope_matches_complex_reference():
    axes_dim = (4, 6, 6)
    ids = torch.randint(0, 64, (2, 11, 3)).float()
    x = torch.randn(2, 3, 11, sum(axes_dim))
    table = rope_table(ids, axes_dim, 10_000.0)
    torch.testing.assert_close(apply_rope(x, *table), apply_rope_reference(x, ids, axes_dim, 10_000.0))


def test_rope_bf16_keeps_dtype():
    ids = torch.randint(0, 64, (1, 5, 3)).float()
    x = torch.randn(1, 2, 5, 16, dtype=torch.bfloat16)
    assert apply_rope(x, *rope_table(ids, (4, 6, 6), 10_000.0)).dtype == torch.bfloat16


def test_rms_norm_matches_reference():
    x, scale = torch.randn(3, 5, 16), torch.randn(16)
    torch.testing.assert_close(rms_norm(x, scale), rms_norm_reference(x, scale))

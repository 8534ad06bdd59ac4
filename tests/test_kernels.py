"""kernels/ against their plain math references."""

import importlib.util
import re

import pytest
import torch

from flux_parallel.kernels import (
    BACKENDS,
    apply_rope,
    apply_rope_reference,
    attention,
    attention_reference,
    attention_with_lse,
    attention_with_lse_reference,
    available_backends,
    check_backend,
    default_backend,
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


CPU_BACKENDS = available_backends("cpu", torch.float32)


def test_cpu_offers_math_sdpa_flash_and_defaults_to_flash():
    assert CPU_BACKENDS[:3] == ["math", "sdpa", "flash"] and set(CPU_BACKENDS) <= set(BACKENDS)
    assert default_backend(torch.device("cpu"), torch.float32) == "flash"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_every_available_backend_matches_math(backend):
    q = torch.randn(2, 3, 21, 8)
    k, v = torch.randn(2, 2, 3, 37, 8).unbind(0)
    ref_out, ref_lse = attention_with_lse_reference(q, k, v)
    out, lse = attention_with_lse(q, k, v, backend)
    # fp32 kernels differ from the reference only in summation order
    torch.testing.assert_close(attention(q, k, v, backend), ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    assert lse.dtype == torch.float32


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "math"])
def test_available_backend_in_bf16_is_close_to_fp32_math(backend):
    q, k, v = torch.randn(3, 1, 2, 33, 16).unbind(0)
    out, lse = attention_with_lse(q.bfloat16(), k.bfloat16(), v.bfloat16(), backend)
    ref_out, ref_lse = attention_with_lse_reference(q, k, v)
    assert out.dtype == torch.bfloat16
    # bf16 inputs keep 8 bits of mantissa: relative error of a few 2^-8
    assert (out.float() - ref_out).norm() / ref_out.norm() < 2e-2
    torch.testing.assert_close(lse, ref_lse, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    "name, message",
    [
        ("nope", "attention backend 'nope' is unknown; available on cpu for float32: math, sdpa, flash"),
        ("efficient", "attention backend 'efficient' runs on CUDA only; available on cpu"),
        ("cudnn", "attention backend 'cudnn' runs on CUDA in float16/bfloat16 only; available on cpu"),
    ],
)
def test_unusable_backend_is_refused_naming_the_available_ones(name, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_backend(name, "cpu", torch.float32)


@pytest.mark.parametrize("name, package", [("flash3", "flash_attn_interface"), ("flash_attn", "flash_attn")])
def test_backend_without_its_package_is_refused(name, package):
    if importlib.util.find_spec(package) is not None:
        assert name in available_backends("cuda", torch.bfloat16) or not torch.cuda.is_available()
        return
    with pytest.raises(ValueError, match=f"needs the {package} package, which is not installed; available"):
        check_backend(name, "cpu", torch.bfloat16)


def test_lse_under_autograd_carries_gradients_like_the_reference():
    q, k, v = (torch.randn(1, 2, 9, 8, requires_grad=True) for _ in range(3))
    out, lse = attention_with_lse(q, k, v, "flash")  # grad mode: the fused kernels' lse has no gradient
    (out.sum() + lse.sum()).backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref_out, ref_lse = attention_with_lse_reference(q, k, v)
    (ref_out.sum() + ref_lse.sum()).backward()
    for grad, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(grad, t.grad)

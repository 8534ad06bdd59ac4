"""FP8 linears (emulated by torch._scaled_mm on the CPU) and int8-weight T5 against their exact forms."""

import copy

import pytest
import torch
from helpers import rel_err, tiny_flux_inputs
from torch import nn

from flux_parallel.flux import CONFIGS, Flux
from flux_parallel.flux.quantize import (
    FP8,
    FP8Linear,
    Int8Linear,
    check_fp8,
    quantize_fp8,
    quantize_int8_weights,
    quantize_rows,
)
from flux_parallel.flux.t5 import T5_CONFIGS, T5Encoder
from flux_parallel.weights import seeded_init


def test_quantize_rows_puts_each_row_max_at_the_fp8_limit():
    x = torch.randn(5, 32) * torch.logspace(-3, 3, 5)[:, None]  # rows six decades apart
    x_fp8, scale = quantize_rows(x)
    assert x_fp8.dtype == FP8 and scale.shape == (5, 1)
    torch.testing.assert_close(x_fp8.float().abs().amax(dim=1), torch.full((5,), 448.0))
    # e4m3 keeps 3 mantissa bits: each element within 2^-4 of itself (relative), whatever its row's scale
    assert ((x_fp8.float() * scale - x).abs() <= x.abs() * 2**-4 + 1e-30).all()


def test_fp8_linear_is_the_exact_product_of_its_quantized_operands():
    linear = nn.Linear(64, 48)
    x = torch.randn(3, 7, 64)
    fp8 = FP8Linear(linear)
    x_fp8, x_scale = quantize_rows(x.reshape(-1, 64))
    # the product of the two dequantized operands, in float64: _scaled_mm may differ only in fp32 rounding
    expected = (x_fp8.double() * x_scale.double()) @ (fp8.weight_fp8.double() * fp8.weight_scale.double().t()).t()
    expected = (expected + linear.bias.double()).reshape(3, 7, 48)
    torch.testing.assert_close(fp8(x).double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fp8.forward_rows(x, slice(16, 40)).double(), expected[..., 16:40], rtol=1e-5, atol=1e-5)


def test_fp8_transformer_error_is_small_and_the_unquantized_model_is_untouched():
    model = seeded_init(Flux(CONFIGS["tiny-dev"]), 0).eval()
    x = tiny_flux_inputs(7, (5, 5))
    with torch.no_grad():
        ref = model(**x)
        quantized = quantize_fp8(copy.deepcopy(model))
        err = rel_err(quantized(**x), ref)
        assert torch.equal(model(**x), ref)  # the exact setting: no --fp8, no change
    assert sum(isinstance(m, FP8Linear) for m in quantized.modules()) == 2 * 8 + 2 * 2  # 8 per double, 2 per single
    # 3 mantissa bits per operand: a few percent per GEMM at most; measured 1e-2 here (tools/bench/bench_quantize.py)
    assert 1e-4 < err < 5e-2, err


def test_fp8_is_refused_without_fp8_tensor_cores_and_on_odd_sizes():
    with pytest.raises(ValueError, match=r"--fp8 needs an NVIDIA GPU with FP8 tensor cores .* this run is on cpu"):
        check_fp8(torch.device("cpu"))
    odd = Flux(CONFIGS["tiny"])
    odd.double_blocks[0].img_mlp[0] = nn.Linear(96, 100)
    with pytest.raises(ValueError, match=r"FP8 needs linear sizes divisible by 16; img_mlp.0 is 96 -> 100"):
        quantize_fp8(odd)


def test_int8_linear_rounds_each_weight_to_its_row_step():
    linear = nn.Linear(40, 24, bias=False)
    int8 = Int8Linear(linear)
    step = linear.weight.abs().amax(dim=1, keepdim=True) / 127
    assert int8.weight_int8.dtype == torch.int8
    assert ((int8.weight - linear.weight).abs() <= step / 2 + 1e-7).all()
    x = torch.randn(5, 40)
    torch.testing.assert_close(int8(x), x @ int8.weight.t())


def test_int8_t5_changes_the_prompt_embedding_little_and_stores_a_quarter_of_the_fp32_bytes():
    t5 = seeded_init(T5Encoder(T5_CONFIGS["tiny"]), 0).eval()
    for block in t5.encoder.block:  # T5 initialises q at d_kv^-1/2 of our draw (tools/bench/bench_quantize.py)
        block.layer[0].SelfAttention.q.weight.data.mul_(t5.params.d_kv**-0.5)
    ids = torch.randint(0, 512, (2, 16))
    linear_bytes = sum(m.weight.numel() * 4 for m in t5.modules() if isinstance(m, nn.Linear))
    with torch.no_grad():
        ref = t5(ids)
        quantized = quantize_int8_weights(copy.deepcopy(t5))
        err = rel_err(quantized(ids), ref)
    int8_bytes = sum(b.numel() * b.element_size() for m in quantized.modules() if isinstance(m, Int8Linear)
                     for b in m.buffers())
    assert int8_bytes < 0.3 * linear_bytes  # 1 byte per weight plus one fp32 scale per row
    # 8 bits per weight, one scale per row of Gaussian weights: about 0.7% rms per weight, so some 3%
    # after the 14 GEMMs of 2 layers; measured 2.7e-2 (tools/bench/bench_quantize.py: XXL width too)
    assert 1e-3 < err < 5e-2, err

"""Approximate, memory- or time-saving linear layers: FP8 for the transformer, int8 weights for T5.

FP8 (dynamic, row-wise scaled, as in Micikevicius et al. 2022, "FP8 Formats for Deep Learning"):
every block linear keeps its weight in float8_e4m3fn with one fp32 scale per output row, and
scales each call's activations per token, so `torch._scaled_mm` multiplies FP8 x FP8 on the tensor
cores of Ada/Hopper GPUs and rescales the fp32 accumulator. Hand-written (about 40 lines) rather
than through torchao: one documented PyTorch op, no extra dependency whose float8 API has changed
between releases, and the same code runs on the CPU, where PyTorch emulates `_scaled_mm`, so the
tests check its numerics here. Only the blocks' linears are converted; the modulation linears
(one row per image, nothing to gain, and their shift/scale/gate steer every token) and the
embedders and final layer (run once per step) stay in the model's dtype.

Int8 weight-only (T5): one int8 weight and one scale per output row; the forward dequantizes the
weight to the activations' dtype. It halves T5-XXL's bf16 weights on every rank; the compute is
unchanged. Both errors are reported by tools/bench/bench_quantize.py.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


def fp8_supported(device: torch.device) -> bool:
    """FP8 tensor cores: NVIDIA compute capability 8.9 (Ada) or 9.0+ (Hopper, Blackwell)."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def check_fp8(device: torch.device) -> None:
    if not fp8_supported(device):
        raise ValueError(f"--fp8 needs an NVIDIA GPU with FP8 tensor cores (compute capability 8.9 or later: "
                         f"Ada, Hopper, Blackwell); this run is on {torch.device(device)}")


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [N, K] -> (x_fp8 [N, K], scale [N, 1] fp32) with x ~= x_fp8 * scale, each row's max at FP8_MAX."""
    amax = x.detach().abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class FP8Linear(nn.Module):
    """nn.Linear with an FP8 weight; activations quantized per token on each call."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight_fp8, weight_scale = quantize_rows(linear.weight.detach())
        self.register_buffer("weight_fp8", weight_fp8)  # [out, in]
        self.register_buffer("weight_scale", weight_scale.t().contiguous())  # [1, out]
        self.bias = linear.bias
        self.out_dtype = linear.weight.dtype

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_rows(x, slice(None))

    def forward_rows(self, x: Tensor, rows: slice) -> Tensor:
        """self(x)[..., rows], computed over those weight rows only (flux.layers.linear_rows)."""
        tokens = x.reshape(-1, x.shape[-1])  # [tokens, in]
        x_fp8, x_scale = quantize_rows(tokens)
        # _scaled_mm wants the second operand column-major: the transpose of a row-major [out, in]
        out = torch._scaled_mm(x_fp8, self.weight_fp8[rows].t(), scale_a=x_scale,
                               scale_b=self.weight_scale[:, rows], out_dtype=self.out_dtype)
        out = out if self.bias is None else out + self.bias[rows]
        return out.reshape(*x.shape[:-1], -1)


def quantize_fp8(model: nn.Module) -> nn.Module:
    """Swap the linears of every double and single block (except the modulations) for FP8Linear, in place."""
    if model.img_in.weight.is_cuda and model.img_in.weight.dtype != torch.bfloat16:
        raise ValueError(f"FP8 on CUDA needs a bfloat16 model (row-wise scaled FP8 GEMMs return bfloat16), "
                         f"got {model.img_in.weight.dtype}")
    for block in (*model.double_blocks, *model.single_blocks):
        for name, child in list(block.named_modules()):
            if isinstance(child, nn.Linear) and not name.endswith(("mod.lin", "modulation.lin")):
                _check_fp8_shape(name, child)
                _set_submodule(block, name, FP8Linear(child))
    return model


def _check_fp8_shape(name: str, linear: nn.Linear) -> None:
    # the tensor-core kernels need both matrix dims divisible by 16 (FLUX's all are)
    if linear.in_features % 16 or linear.out_features % 16:
        raise ValueError(f"FP8 needs linear sizes divisible by 16; {name} is {linear.in_features} -> "
                         f"{linear.out_features}")


class Int8Linear(nn.Module):
    """nn.Linear with an int8 weight and one scale per output row; `weight` dequantizes on access."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127  # [out, 1]
        self.register_buffer("weight_int8", torch.round(weight / scale).to(torch.int8))
        self.register_buffer("weight_scale", scale.to(linear.weight.dtype))
        self.bias = linear.bias

    @property
    def weight(self) -> Tensor:
        """The dequantized weight, in the original dtype (T5's feed-forward reads `wo.weight` directly)."""
        return self.weight_int8.to(self.weight_scale.dtype) * self.weight_scale

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def quantize_int8_weights(model: nn.Module) -> nn.Module:
    """Swap every nn.Linear of `model` (T5's projections and feed-forwards) for Int8Linear, in place."""
    for name, child in list(model.named_modules()):
        if isinstance(child, nn.Linear):
            _set_submodule(model, name, Int8Linear(child))
    return model


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)

"""Scaled dot-product attention on [B, heads, L, head_dim], with and without the log-sum-exp.

`attention` is the seam every attention layer calls; `attention_with_lse` also returns the
per-query log-sum-exp of the scores in fp32, which ring attention needs to merge partial
results exactly (Milakov & Gimelshein 2018, "Online normalizer calculation for softmax").

Both take a `backend`, one of BACKENDS. Every backend computes exact attention: they differ only
in the order of the sums (fp32 rounding), in speed, and in the devices and dtypes they serve.
    math        the fp32 reference below: materialises the score matrix; any device and dtype
    sdpa        F.scaled_dot_product_attention, PyTorch picks the kernel (attention_with_lse: as `auto`)
    flash       PyTorch's flash attention: the CPU kernel (any float dtype), or CUDA half precision
    efficient   PyTorch's memory-efficient attention (CUDA, any float dtype)
    cudnn       cuDNN attention (CUDA half precision)
    flash_attn  the flash-attn package's kernel, flash attention 2 (CUDA half precision; optional extra)
    flash3      flash-attention 3's `flash_attn_interface` (Hopper, half precision; optional extra)
`auto` (the default) follows `default_backend(device, dtype)`'s rule. Only `math` gives an lse that
carries gradients, so attention_with_lse uses it whenever autograd records the call.
"""

import importlib.util
import math
from collections.abc import Callable
from functools import partial
from types import FunctionType

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = ("math", "sdpa", "flash", "efficient", "cudnn", "flash_attn", "flash3")
_HALF = (torch.float16, torch.bfloat16)
_SDPA_KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION}
_PACKAGES = {"flash_attn": "flash_attn", "flash3": "flash_attn_interface"}  # backend -> module it imports
# looked up once (find_spec does not import the package): a constant while torch.compile traces `attention`
_INSTALLED = {name: importlib.util.find_spec(module) is not None for name, module in _PACKAGES.items()}


def attention(q: Tensor, k: Tensor, v: Tensor, backend: str = "auto") -> Tensor:
    """softmax(q k^T / sqrt(D)) v for q [B, H, Lq, D], k/v [B, H, Lk, D] -> [B, H, Lq, D]."""
    if backend == "auto":  # PyTorch's dispatcher picks the rule's kernel too, and falls back where that
        # kernel cannot serve the shapes (CUDA flash beyond head_dim 256: the VAE's one 512-wide head)
        backend = "flash3" if default_backend(q.device, q.dtype) == "flash3" else "sdpa"
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if backend in _SDPA_KERNELS:  # the public entry point, restricted to one kernel (it checks strides)
        with sdpa_kernel(_SDPA_KERNELS[backend]):
            return F.scaled_dot_product_attention(q, k, v)
    if backend == "math":
        return attention_reference(q, k, v)
    return attention_with_lse(q, k, v, backend)[0]


def attention_with_lse(q: Tensor, k: Tensor, v: Tensor, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Like `attention`, plus lse [B, H, Lq] = logsumexp_j(q k_j / sqrt(D)) in fp32.

    The fused kernels produce the LSE as a by-product (no [Lq, Lk] score matrix). `sdpa` and `auto`
    take default_backend's choice. Under autograd the math reference runs: the fused kernels' LSE
    outputs are not differentiable, and ring attention's merge needs their gradient.
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return attention_with_lse_reference(q, k, v)
    if backend in ("auto", "sdpa"):
        backend = _lse_default(q)
    # The raw kernels assume the standard [B, H, L, D] strides (the public SDPA checks this, they
    # do not): a permuted view such as the VAE's "b c h w -> b 1 (h w) c" gives NaNs on the CPU.
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return _LSE_KERNELS[backend](q, k, v)


def attention_reference(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return attention_with_lse_reference(q, k, v)[0]


def attention_with_lse_reference(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Plain math in fp32: materialises the score matrix."""
    scores = q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])  # [B, H, Lq, Lk]
    lse = scores.logsumexp(dim=-1)
    out = torch.exp(scores - lse[..., None]) @ v.float()
    return out.to(q.dtype), lse


def _flash(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
        return out, lse.float()
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[:2]
    return out, lse.float()


def _efficient(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
    return out, _lse_rows(lse, q)


def _cudnn(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True)[:2]
    return out, _lse_rows(lse, q)


def _lse_rows(lse: Tensor, q: Tensor) -> Tensor:
    """Some kernels pad the LSE rows (efficient: to a multiple of 32) or add a unit dim (cuDNN):
    -> [B, H, Lq] fp32."""
    return lse.flatten(2)[..., : q.shape[2]].float()


def _flash_attn(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    from flash_attn import flash_attn_func  # [B, L, H, D] layout, lse [B, H, L]

    out, lse, _ = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), return_attn_probs=True)
    return out.transpose(1, 2), lse.float()


def _flash3(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    from flash_attn_interface import flash_attn_func  # [B, L, H, D] layout, lse [B, H, L]

    # Releases of flash-attention 3 return (out, lse) or, with return_attn_probs, a longer tuple.
    result = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), return_attn_probs=True)
    out, lse = result[0], result[1]
    return out.transpose(1, 2), lse.float()


_LSE_KERNELS: dict[str, Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]] = {
    "math": attention_with_lse_reference,
    "flash": _flash,
    "efficient": _efficient,
    "cudnn": _cudnn,
    "flash_attn": _flash_attn,
    "flash3": _flash3,
}


def default_backend(device: torch.device, dtype: torch.dtype) -> str:
    """The fastest backend available for (device, dtype); all of them are exact attention.

    CUDA half precision: flash attention 3 on Hopper where installed (1.5-2x flash attention 2 on
    H100, Shah et al. 2024, arXiv:2407.08608), else PyTorch's flash attention (2); CUDA fp32: the
    memory-efficient kernel (flash has no fp32). cuDNN is offered but never the default: PyTorch's
    own priority order ranks it last (torch._C._get_sdp_priority_order()). CPU: PyTorch's flash
    kernel, the one SDPA picks there. Elsewhere whatever SDPA picks (its LSE: the math reference).
    """
    device = torch.device(device)
    if device.type == "cuda" and dtype in _HALF:
        hopper = _INSTALLED["flash3"] and torch.cuda.get_device_capability(device) >= (9, 0)
        return "flash3" if hopper else "flash"
    if device.type == "cuda":
        return "efficient"
    return "flash" if device.type == "cpu" else "sdpa"


def _lse_default(q: Tensor) -> str:
    """default_backend, where that kernel gives an LSE for q's shape: CUDA flash serves head_dim <= 256."""
    backend = default_backend(q.device, q.dtype)
    if backend == "flash" and q.is_cuda and q.shape[-1] > 256:
        return "efficient"
    return "math" if backend == "sdpa" else backend


def available_backends(device: torch.device, dtype: torch.dtype) -> list[str]:
    return [name for name in BACKENDS if _problem(name, torch.device(device), dtype) is None]


def check_backend(name: str, device: torch.device, dtype: torch.dtype) -> None:
    """Raise ValueError, in one sentence naming what is available, if `name` cannot run here."""
    device = torch.device(device)
    problem = _problem(name, device, dtype)
    if problem is not None:
        available = ", ".join(available_backends(device, dtype))
        raise ValueError(f"attention backend {name!r} {problem}; available on {device.type} for "
                         f"{str(dtype).removeprefix('torch.')}: {available}")


def _problem(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    half_cuda = device.type == "cuda" and dtype in _HALF
    if name not in BACKENDS:
        return "is unknown"
    if name in _PACKAGES and not _INSTALLED[name]:
        return f"needs the {_PACKAGES[name]} package, which is not installed"
    if name == "flash" and not (device.type == "cpu" or half_cuda):
        return "runs on the CPU, or on CUDA in float16/bfloat16 only"
    if name == "efficient" and device.type != "cuda":
        return "runs on CUDA only"
    if name in ("cudnn", "flash_attn", "flash3") and not half_cuda:
        return "runs on CUDA in float16/bfloat16 only"
    if name == "flash3" and torch.cuda.get_device_capability(device) < (9, 0):
        return "needs a Hopper (compute capability 9.0) or later GPU"
    return None


def attention_for(name: str) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """The `attention_fn` a block holds to run `name` (check_backend it first)."""
    return partial(attention, backend=name)


def is_kernel_attention(attention_fn) -> bool:
    """True for this module's attention, which torch.compile traces; False for anything else."""
    # isinstance first: for any other object torch.compile then guards on its type, not its identity
    if isinstance(attention_fn, partial):
        return attention_fn.func is attention
    return isinstance(attention_fn, FunctionType) and attention_fn is attention


def attend(attention_fn: Callable[[Tensor, Tensor, Tensor], Tensor], q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The blocks' attention call: `attention_fn(q, k, v)`. Under torch.compile, this module's kernels
    are traced into the block's graph, and anything else (a sequence-parallel attention running
    collectives and P2P transfers) runs eagerly behind one graph break, so its process groups and
    Python-side bookkeeping never reach the compiler and swapping it never recompiles."""
    if is_kernel_attention(attention_fn) or not torch.compiler.is_compiling():
        return attention_fn(q, k, v)
    # only reached while dynamo traces (so torch._dynamo is already imported, not at import time)
    return torch.compiler.disable(_call)(attention_fn, q, k, v)


def _call(attention_fn, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return attention_fn(q, k, v)

"""Building blocks of the FLUX.1 MMDiT (Esser et al. 2024, "Scaling Rectified Flow Transformers").

Parameter names follow the black-forest-labs checkpoints, so their state dicts load as they are.
Every block applies RoPE to q and k, then calls `self.attention_fn(q, k, v)` on [B, H, L, D]
(through kernels.attend, which keeps a parallel attention out of torch.compile's graphs):
that call is the one seam the sequence-parallel strategies replace.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from flux_parallel.kernels import apply_rope, attend, attention, rms_norm

PE = tuple[Tensor, Tensor]  # RoPE tables from kernels.rope_table, each [B, 1, L, head_dim // 2, 2]


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0, time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of t [B] (in [0, 1], scaled by 1000) -> [B, dim], cos half first."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (time_factor * t.float())[:, None] * freqs[None]
    return torch.cat((torch.cos(args), torch.sin(args)), dim=-1)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim)
        self.out_layer = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.scale)


class QKNorm(nn.Module):
    """Per-head RMS norm of queries and keys (stabilises attention logits at scale)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q), self.key_norm(k)


class SelfAttention(nn.Module):
    """Parameter container (qkv, norm, proj): the double block runs the joint attention itself."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)


@dataclass
class ModulationOut:
    shift: Tensor  # [B, 1, hidden]
    scale: Tensor
    gate: Tensor

    def modulate(self, x_normed: Tensor) -> Tensor:
        return torch.addcmul(self.shift, x_normed, 1 + self.scale)

    def add_gated(self, x: Tensor, update: Tensor) -> Tensor:
        """x + gate * update as one pass over [B, L, hidden] (x + self.gate * update takes two)."""
        return torch.addcmul(x, self.gate, update)


class Modulation(nn.Module):
    """adaLN: shift, scale and gate (twice for a double block) from the conditioning vector."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim)

    def forward(self, vec: Tensor) -> list[ModulationOut]:
        chunks = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        return [ModulationOut(*chunks[i : i + 3]) for i in range(0, self.multiplier, 3)]


def layer_norm(x: Tensor) -> Tensor:
    """LayerNorm without affine parameters (the modulation supplies them)."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def mlp(dim: int, hidden_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden_dim), nn.GELU(approximate="tanh"), nn.Linear(hidden_dim, dim))


class DoubleStreamBlock(nn.Module):
    """Separate weights for image and text tokens, one joint attention over [txt; img]."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.img_mod = Modulation(hidden_size, double=True)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.img_mlp = mlp(hidden_size, mlp_hidden)
        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.txt_mlp = mlp(hidden_size, mlp_hidden)
        self.attention_fn = attention

    def _qkv(self, attn: SelfAttention, x_mod: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = rearrange(attn.qkv(x_mod), "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = attn.norm(q, k)
        return q, k, v

    def modulate_img(self, img: Tensor, vec: Tensor) -> tuple[ModulationOut, ModulationOut, Tensor]:
        """The image stream's two modulations and its modulated attention input [B, L, hidden]. The first
        block's is TeaCache's indicator (flux/cache.py), which hands it back to forward instead of
        having it computed twice."""
        img_mod1, img_mod2 = self.img_mod(vec)
        return img_mod1, img_mod2, img_mod1.modulate(layer_norm(img))

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: PE,
                img_modulated: tuple[ModulationOut, ModulationOut, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """img_modulated: modulate_img(img, vec), where the caller has computed it already."""
        if img_modulated is None:
            img_modulated = self.modulate_img(img, vec)
        img_mod1, img_mod2, img_in = img_modulated
        txt_mod1, txt_mod2 = self.txt_mod(vec)
        img_q, img_k, img_v = self._qkv(self.img_attn, img_in)
        txt_q, txt_k, txt_v = self._qkv(self.txt_attn, txt_mod1.modulate(layer_norm(txt)))

        # joint attention over [txt; img]: [B, H, S + L, D]
        q = apply_rope(torch.cat((txt_q, img_q), dim=2), *pe)
        k = apply_rope(torch.cat((txt_k, img_k), dim=2), *pe)
        v = torch.cat((txt_v, img_v), dim=2)
        out = rearrange(attend(self.attention_fn, q, k, v), "B H L D -> B L (H D)")
        txt_out, img_out = out[:, : txt.shape[1]], out[:, txt.shape[1] :]

        img = img_mod1.add_gated(img, self.img_attn.proj(img_out))
        img = img_mod2.add_gated(img, self.img_mlp(img_mod2.modulate(layer_norm(img))))
        txt = txt_mod1.add_gated(txt, self.txt_attn.proj(txt_out))
        txt = txt_mod2.add_gated(txt, self.txt_mlp(txt_mod2.modulate(layer_norm(txt))))
        return img, txt


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP (Dehghani et al. 2023): one fused linear in, one fused linear out."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim)  # qkv and mlp_in
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)  # attn_out and mlp_out
        self.norm = QKNorm(hidden_size // num_heads)
        self.modulation = Modulation(hidden_size, double=False)
        self.attention_fn = attention

    def forward(self, x: Tensor, vec: Tensor, pe: PE) -> Tensor:
        (mod,) = self.modulation(vec)
        x_mod = mod.modulate(layer_norm(x))
        # linear1 is one parameter (the checkpoint's layout) applied as two GEMMs over contiguous row
        # blocks of its weight: each output is then contiguous (no copy after a split), and on CPUs
        # the two narrower GEMMs run faster than one 5376-wide one (measured: tools/bench/bench_transformer.py)
        hidden = 3 * self.hidden_size
        qkv = linear_rows(self.linear1, x_mod, slice(None, hidden))
        mlp_in = linear_rows(self.linear1, x_mod, slice(hidden, None))
        q, k, v = rearrange(qkv, "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = self.norm(q, k)
        attn = attend(self.attention_fn, apply_rope(q, *pe), apply_rope(k, *pe), v)
        attn = rearrange(attn, "B H L D -> B L (H D)")
        return mod.add_gated(x, linear_of_cat(self.linear2, attn, F.gelu(mlp_in, approximate="tanh")))


def linear_rows(linear: nn.Module, x: Tensor, rows: slice) -> Tensor:
    """linear(x)[..., rows] as one GEMM over those rows of the weight: an nn.Linear, or an FP8Linear
    (flux/quantize.py), which keeps its weight in its own format."""
    if isinstance(linear, nn.Linear):
        return F.linear(x, linear.weight[rows], linear.bias[rows])
    return linear.forward_rows(x, rows)


def linear_of_cat(linear: nn.Module, left: Tensor, right: Tensor) -> Tensor:
    """linear(cat((left, right), -1)) for left [B, L, a], right [B, L, b]. For a plain nn.Linear, as two
    GEMMs over the matching column blocks of its weight, the second added onto the first's output: no
    [B, L, a + b] copy (in a single block, a pass over 5h values per token; the addition reads h).
    Anything else (a row-parallel, LoRA or quantized linear) gets the concatenation and its own forward."""
    if type(linear) is not nn.Linear:
        return linear(torch.cat((left, right), dim=-1))
    width = left.shape[-1]
    # the column blocks are strided views that BLAS reads in place (leading dimension a + b), not copies
    out = F.linear(left, linear.weight[:, :width], linear.bias).flatten(0, -2)  # [B L, out]
    out = torch.addmm(out, right.flatten(0, -2), linear.weight[:, width:].t())  # out + right @ W_right^T
    return out.unflatten(0, left.shape[:-1])


class LastLayer(nn.Module):
    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear(torch.addcmul(shift, layer_norm(x), 1 + scale))

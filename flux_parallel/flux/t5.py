"""The T5 v1.1 encoder (Raffel et al. 2020, "Exploring the Limits of Transfer Learning"), whose
last hidden state is FLUX.1's `txt` sequence.

Module and parameter names equal the keys of transformers' `T5EncoderModel` checkpoints
(`encoder.block.{i}.layer.0.SelfAttention.q`, ...), so their state dicts load as they are.

T5-XXL overflows fp16: its residual stream and feed-forward outputs exceed 65504 (transformers
keeps `wo` in fp32 and clamps for that reason, PR #20287). Here the residual stream, the norms
and the gated-GELU product run in fp32 whatever the weights' dtype, and `wo` too for fp16
weights; the other projections run in the weights' dtype. The attention scores and softmax
accumulate in fp32 inside SDPA.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from flux_parallel.kernels import rms_norm


@dataclass(frozen=True)
class T5Params:
    # Field names are transformers' T5Config names, so a config.json maps onto them directly.
    vocab_size: int = 32128
    d_model: int = 4096
    num_layers: int = 24
    num_heads: int = 64
    d_kv: int = 64
    d_ff: int = 10240
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6

    def __post_init__(self):
        sizes = ("vocab_size", "d_model", "num_layers", "num_heads", "d_kv", "d_ff")
        bad = [f"{name} {getattr(self, name)}" for name in sizes if getattr(self, name) < 1]
        if bad:
            raise ValueError(f"T5 sizes must be positive, got {', '.join(bad)}")
        buckets, distance = self.relative_attention_num_buckets, self.relative_attention_max_distance
        # Half the buckets per direction, half of those exact: the log-spaced rest needs >= 1 exact bucket.
        if buckets < 4 or buckets % 2 or distance <= buckets // 4:
            raise ValueError(
                f"relative_attention_num_buckets {buckets} must be even and >= 4, and "
                f"relative_attention_max_distance {distance} larger than a quarter of it"
            )


T5_CONFIGS: dict[str, T5Params] = {
    "xxl": T5Params(),  # google/t5-v1_1-xxl, FLUX.1's text_encoder_2
    # d_model 64 = the tiny FLUX transformer's context_in_dim; about 115k parameters (460 KB in fp32).
    "tiny": T5Params(vocab_size=512, d_model=64, num_layers=2, num_heads=4, d_kv=16, d_ff=128),
}


def relative_position_bucket(relative: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    """Bidirectional T5 bucket of `relative` = key position - query position (any shape, long).

    Half the buckets for keys after the query, half for keys before; in each half, distances below
    a quarter of num_buckets get a bucket each, larger ones share log-spaced buckets up to
    max_distance, beyond which all fall in the last bucket.
    """
    half = num_buckets // 2
    exact = half // 2
    distance = relative.abs()
    log_ratio = torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (half - exact)).long()).clamp(max=half - 1)
    return (relative > 0).long() * half + torch.where(distance < exact, distance, far)


class T5Attention(nn.Module):
    """Multi-head self-attention without the 1/sqrt(d) scaling (folded into T5's initialisation)."""

    def __init__(self, p: T5Params, has_relative_bias: bool):
        super().__init__()
        inner = p.num_heads * p.d_kv
        self.num_heads = p.num_heads
        self.q = nn.Linear(p.d_model, inner, bias=False)
        self.k = nn.Linear(p.d_model, inner, bias=False)
        self.v = nn.Linear(p.d_model, inner, bias=False)
        self.o = nn.Linear(inner, p.d_model, bias=False)
        if has_relative_bias:
            self.relative_attention_bias = nn.Embedding(p.relative_attention_num_buckets, p.num_heads)
        self.num_buckets, self.max_distance = p.relative_attention_num_buckets, p.relative_attention_max_distance

    def position_bias(self, length: int) -> Tensor:
        """[1, heads, length, length], in the embedding's dtype; computed once by the first layer, shared by all."""
        positions = torch.arange(length, device=self.relative_attention_bias.weight.device)
        buckets = relative_position_bucket(positions[None, :] - positions[:, None], self.num_buckets, self.max_distance)
        return rearrange(self.relative_attention_bias(buckets), "q k h -> 1 h q k")

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        q, k, v = (rearrange(proj(x), "b s (h d) -> b h s d", h=self.num_heads) for proj in (self.q, self.k, self.v))
        # SDPA with an additive float mask (the position bias) and scale 1: T5 does not scale scores.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)  # [B, H, S, d_kv]
        return self.o(rearrange(out, "b h s d -> b s (h d)"))


class T5GatedFeedForward(nn.Module):
    """wo(gelu_tanh(wi_0 x) * wi_1 x): the gated-GELU of T5 v1.1 (Shazeer 2020, "GLU Variants")."""

    def __init__(self, p: T5Params):
        super().__init__()
        self.wi_0 = nn.Linear(p.d_model, p.d_ff, bias=False)
        self.wi_1 = nn.Linear(p.d_model, p.d_ff, bias=False)
        self.wo = nn.Linear(p.d_ff, p.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gated = F.gelu(self.wi_0(x).float(), approximate="tanh") * self.wi_1(x).float()  # [B, S, d_ff] fp32
        # In T5-XXL wo's output overflows fp16: then wo runs in fp32, its weight upcast on the fly (a
        # transient copy of one matrix, not all 24 kept in fp32). bf16 has fp32's range: it keeps its speed.
        weight = self.wo.weight.float() if self.wo.weight.dtype == torch.float16 else self.wo.weight
        return F.linear(gated.to(weight.dtype), weight).float()  # [B, S, d_model] fp32


class T5LayerNorm(nn.Module):
    """RMS norm with a scale and no bias; fp32 in, the weight's dtype out."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x.float(), self.weight.float(), self.eps).to(self.weight.dtype)


class T5LayerSelfAttention(nn.Module):
    def __init__(self, p: T5Params, has_relative_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(p, has_relative_bias)
        self.layer_norm = T5LayerNorm(p.d_model, p.layer_norm_epsilon)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias).float()


class T5LayerFF(nn.Module):
    def __init__(self, p: T5Params):
        super().__init__()
        self.DenseReluDense = T5GatedFeedForward(p)
        self.layer_norm = T5LayerNorm(p.d_model, p.layer_norm_epsilon)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    def __init__(self, p: T5Params, has_relative_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(p, has_relative_bias), T5LayerFF(p)])

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        return self.layer[1](self.layer[0](x, bias))


class T5Stack(nn.Module):
    def __init__(self, p: T5Params):
        super().__init__()
        self.block = nn.ModuleList([T5Block(p, has_relative_bias=i == 0) for i in range(p.num_layers)])
        self.final_layer_norm = T5LayerNorm(p.d_model, p.layer_norm_epsilon)


class T5Encoder(nn.Module):
    """input_ids [B, S] -> last hidden state [B, S, d_model] in the weights' dtype. No attention mask:
    FLUX.1 encodes the padded prompt as it is, padding included."""

    def __init__(self, params: T5Params):
        super().__init__()
        self.params = params
        self.shared = nn.Embedding(params.vocab_size, params.d_model)
        self.encoder = T5Stack(params)

    def forward(self, input_ids: Tensor) -> Tensor:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {list(input_ids.shape)}")
        x = self.shared(input_ids).float()  # [B, S, d_model], the residual stream stays fp32
        bias = self.encoder.block[0].layer[0].SelfAttention.position_bias(input_ids.shape[1])  # [1, H, S, S]
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)

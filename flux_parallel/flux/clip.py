"""The CLIP text transformer (Radford et al. 2021), whose pooled output is FLUX.1's `y` vector.

Module and parameter names equal the keys transformers 5 writes for `CLIPTextModel`
(`encoder.layers.{i}.self_attn.q_proj`, ...); files written by transformers 4, as the released
FLUX.1 `text_encoder/`, add a `text_model.` prefix, which the loader strips.
Position ids are made in `forward`, not held as a buffer: a meta-device build then has nothing
the checkpoint lacks.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # CLIP's sigmoid approximation of GELU
    "gelu": F.gelu,
}
LEGACY_EOS_ID = 2  # configs saved before transformers PR #24773 say 2: the pooled token is then argmax(ids)


@dataclass(frozen=True)
class ClipParams:
    # Field names are transformers' CLIPTextConfig names, so a config.json maps onto them directly.
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported: use one of {', '.join(ACTIVATIONS)}")


CLIP_CONFIGS: dict[str, ClipParams] = {
    # openai/clip-vit-large-patch14, FLUX.1's text_encoder; its config.json says eos_token_id 2.
    "l14": ClipParams(eos_token_id=LEGACY_EOS_ID),
    # hidden 32 = the tiny FLUX transformer's vec_in_dim; vocab and eos id = the built-in tiny tokenizer's.
    "tiny": ClipParams(
        vocab_size=768,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        eos_token_id=767,
    ),
}


class ClipAttention(nn.Module):
    def __init__(self, p: ClipParams):
        super().__init__()
        self.num_heads = p.num_attention_heads
        self.q_proj = nn.Linear(p.hidden_size, p.hidden_size)
        self.k_proj = nn.Linear(p.hidden_size, p.hidden_size)
        self.v_proj = nn.Linear(p.hidden_size, p.hidden_size)
        self.out_proj = nn.Linear(p.hidden_size, p.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (
            rearrange(proj(x), "b s (h d) -> b h s d", h=self.num_heads)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, S, head_dim]
        return self.out_proj(rearrange(out, "b h s d -> b s (h d)"))


class ClipMLP(nn.Module):
    def __init__(self, p: ClipParams):
        super().__init__()
        self.fc1 = nn.Linear(p.hidden_size, p.intermediate_size)
        self.fc2 = nn.Linear(p.intermediate_size, p.hidden_size)
        self.act = ACTIVATIONS[p.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ClipEncoderLayer(nn.Module):
    def __init__(self, p: ClipParams):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(p.hidden_size, eps=p.layer_norm_eps)
        self.self_attn = ClipAttention(p)
        self.layer_norm2 = nn.LayerNorm(p.hidden_size, eps=p.layer_norm_eps)
        self.mlp = ClipMLP(p)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipEmbeddings(nn.Module):
    def __init__(self, p: ClipParams):
        super().__init__()
        self.token_embedding = nn.Embedding(p.vocab_size, p.hidden_size)
        self.position_embedding = nn.Embedding(p.max_position_embeddings, p.hidden_size)

    def forward(self, input_ids: Tensor) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)[None]  # [B, S, hidden]


class ClipEncoder(nn.Module):
    def __init__(self, p: ClipParams):
        super().__init__()
        self.layers = nn.ModuleList([ClipEncoderLayer(p) for _ in range(p.num_hidden_layers)])


def end_of_text_index(input_ids: Tensor, eos_token_id: int) -> Tensor:
    """[B] position of the token whose state is pooled, as the released checkpoints were trained:
    the largest id for legacy configs (the end-of-text token has the largest id in CLIP's vocabulary),
    the first end-of-text token otherwise (so a padding token equal to it is never chosen)."""
    if eos_token_id == LEGACY_EOS_ID:
        return input_ids.argmax(dim=-1)
    return (input_ids == eos_token_id).int().argmax(dim=-1)


class ClipTextModel(nn.Module):
    """input_ids [B, S] -> pooled output [B, hidden] (transformers' `pooler_output`). Causal attention,
    so padding after the end-of-text token never changes the pooled state: no attention mask is needed."""

    def __init__(self, params: ClipParams):
        super().__init__()
        self.params = params
        self.embeddings = ClipEmbeddings(params)
        self.encoder = ClipEncoder(params)
        self.final_layer_norm = nn.LayerNorm(params.hidden_size, eps=params.layer_norm_eps)

    def forward(self, input_ids: Tensor) -> Tensor:
        if input_ids.ndim != 2 or input_ids.shape[1] > self.params.max_position_embeddings:
            raise ValueError(
                f"input_ids must be [batch, length <= {self.params.max_position_embeddings}], "
                f"got shape {list(input_ids.shape)}"
            )
        x = self.embeddings(input_ids)  # [B, S, hidden]
        for layer in self.encoder.layers:
            x = layer(x)
        hidden = self.final_layer_norm(x)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        return hidden[rows, end_of_text_index(input_ids, self.params.eos_token_id)]

"""Hyper-parameters of the FLUX.1 transformer, as a flat dataclass plus named presets."""

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class FluxParams:
    in_channels: int = 64  # 16 latent channels x 2x2 patch
    out_channels: int = 64
    vec_in_dim: int = 768  # CLIP-L pooled output
    context_in_dim: int = 4096  # T5-XXL hidden size
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19  # double-stream blocks
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)  # RoPE channels per position axis (t, h, w)
    theta: float = 10_000.0
    qkv_bias: bool = True
    guidance_embed: bool = False

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(f"axes_dim {self.axes_dim} sums to {sum(self.axes_dim)}, not head_dim {self.head_dim}")
        if any(d % 2 for d in self.axes_dim):
            raise ValueError(f"every RoPE axis needs an even number of channels, got axes_dim {self.axes_dim}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


def flux_rope_axes(head_dim: int) -> tuple[int, int, int]:
    """FLUX's 16:56:56 split of the head channels over (t, h, w), scaled to head_dim."""
    t, hw = head_dim * 16 / 128, head_dim * 56 / 128
    if t != int(t) or hw != int(hw) or int(t) % 2 or int(hw) % 2:
        raise ValueError(
            f"head_dim {head_dim} cannot be split 16:56:56 into even RoPE axes; give axes_dim explicitly"
        )
    return int(t), int(hw), int(hw)


CONFIGS: dict[str, FluxParams] = {
    "schnell": FluxParams(guidance_embed=False),
    "dev": FluxParams(guidance_embed=True),
    # A few MB: every test and the offline demo use it. 12 heads so that Ulysses degrees
    # 2, 3, 4 and 6 all divide the head count.
    "tiny": FluxParams(
        vec_in_dim=32,
        context_in_dim=64,
        hidden_size=96,
        num_heads=12,
        depth=2,
        depth_single_blocks=2,
        axes_dim=(2, 2, 4),
    ),
}
CONFIGS["tiny-dev"] = dataclasses.replace(CONFIGS["tiny"], guidance_embed=True)

"""The FLUX.1 autoencoder (a 16-channel AutoencoderKL without quant convs), in plain PyTorch.

Parameter names are the black-forest-labs ones (`decoder.up.3.block.0.norm1.weight`), so their
`ae.safetensors` loads as it is. The three operations that look beyond a pixel's neighbourhood
are each built in one place, so that `parallel/` can swap them recursively by type without
touching this file: `Conv3x3` (every padded 3x3 convolution), `group_norm` (every GroupNorm) and
`SpatialAttention` (the mid-block attention over all positions).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from flux_parallel.kernels.attention import attention


@dataclass(frozen=True)
class AutoEncoderParams:
    resolution: int = 256  # training resolution; informative only
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2  # per encoder level; the decoder has one more
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159
    norm_groups: int = 32

    def __post_init__(self):
        for width in self.widths:
            if width % self.norm_groups:
                raise ValueError(
                    f"width {width} (ch {self.ch} x ch_mult {self.ch_mult}) is not divisible by "
                    f"norm_groups {self.norm_groups}"
                )
        if not self.ch_mult or self.num_res_blocks < 1:
            raise ValueError(
                f"need at least one level and one res block, got ch_mult {self.ch_mult}, "
                f"num_res_blocks {self.num_res_blocks}"
            )

    @property
    def widths(self) -> list[int]:
        return [self.ch * m for m in self.ch_mult]

    @property
    def downsample(self) -> int:
        """Image side / latent side."""
        return 2 ** (len(self.ch_mult) - 1)


VAE_CONFIGS: dict[str, AutoEncoderParams] = {
    "flux": AutoEncoderParams(),
    # 345k parameters (1.4 MB fp32): every test uses it. 16 latent channels and 8x down-sampling as FLUX; 4 groups of 2+
    # channels so that GroupNorm statistics really mix channels.
    "tiny": AutoEncoderParams(ch=8, norm_groups=4),
    # The trained tiny model's (tools/train_tiny.py): one group. GroupNorm removes each group's mean and scale, and the
    # decoder's last GroupNorm sits between its features and the output colour: with two channels per group a flat
    # colour normalises to +-1 whatever it was; eight channels in one group keep their ratios, so the colour survives.
    "tiny-trained": AutoEncoderParams(resolution=64, ch=8, norm_groups=1),
}


class Conv3x3(nn.Conv2d):
    """Every zero-padded 3x3 stride-1 convolution of the model (the parallel VAE swaps this type)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, kernel_size=3, stride=1, padding=1)


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """Every normalisation of the model (the parallel VAE swaps nn.GroupNorm)."""
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class SpatialAttention(nn.Module):
    """Single-head softmax attention over all positions of [B, C, H, W] maps: the one place the
    mid block mixes distant pixels (the parallel VAE swaps this type)."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        height = q.shape[2]
        # contiguous: on permuted views CUDA's SDPA falls back to the math kernel, which materialises
        # the [HW, HW] score matrix (81 GiB at 3072 px); the fused kernels never do
        q, k, v = (rearrange(t, "b c h w -> b 1 (h w) c").contiguous() for t in (q, k, v))
        return rearrange(attention(q, k, v), "b 1 (h w) c -> b c h w", h=height)


class AttnBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))
        self.attend = SpatialAttention()

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        return x + self.proj_out(self.attend(self.q(h), self.k(h), self.v(h)))


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = Conv3x3(in_channels, out_channels)
        self.norm2 = group_norm(out_channels, groups)
        self.conv2 = Conv3x3(out_channels, out_channels)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as the original LDM code


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv3x3(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution: res blocks, then a resampling (absent at the last encoder / first decoder level)."""

    def __init__(self, widths: list[int], groups: int, resample: type | None):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(a, b, groups) for a, b in zip(widths, widths[1:]))
        if resample is Downsample:
            self.downsample = Downsample(widths[-1])
        elif resample is Upsample:
            self.upsample = Upsample(widths[-1])

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        resample = getattr(self, "downsample", None) or getattr(self, "upsample", None)
        return resample(x) if resample is not None else x


class Encoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        widths, n, g = p.widths, len(p.ch_mult), p.norm_groups
        self.conv_in = Conv3x3(p.in_channels, p.ch)
        ins = [p.ch] + widths[:-1]
        self.down = nn.ModuleList(
            Level([ins[i]] + [widths[i]] * p.num_res_blocks, g, Downsample if i < n - 1 else None) for i in range(n)
        )
        self.mid = MidBlock(widths[-1], g)
        self.norm_out = group_norm(widths[-1], g)
        self.conv_out = Conv3x3(widths[-1], 2 * p.z_channels)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))  # [B, 2 z, H/8, W/8]: mean, log-variance


class Decoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        widths, n, g = p.widths, len(p.ch_mult), p.norm_groups
        self.conv_in = Conv3x3(p.z_channels, widths[-1])
        self.mid = MidBlock(widths[-1], g)
        outs = widths[1:] + [widths[-1]]  # level i takes its input from level i + 1
        self.up = nn.ModuleList(
            Level([outs[i]] + [widths[i]] * (p.num_res_blocks + 1), g, Upsample if i > 0 else None) for i in range(n)
        )
        self.norm_out = group_norm(widths[0], g)
        self.conv_out = Conv3x3(widths[0], p.out_ch)

    def head(self, h: Tensor) -> Tensor:
        return self.conv_out(F.silu(self.norm_out(h)))

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):  # lowest resolution first
            h = level(h)
        return self.head(h)


class AutoEncoder(nn.Module):
    """decode(z) == diffusers AutoencoderKL.decode(z / scale + shift).sample; encode(x) maps the
    posterior's mode (or a sample) into the same latent space: (mode - shift) * scale."""

    def __init__(self, params: AutoEncoderParams):
        super().__init__()
        self.params = params
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)

    def check_latent(self, z: Tensor) -> None:
        if z.ndim != 4 or z.shape[1] != self.params.z_channels:
            raise ValueError(f"the latent must be [B, {self.params.z_channels}, h, w], got {list(z.shape)}")

    def decoder_input(self, z: Tensor) -> Tensor:
        """The transformer's latent mapped back to what the decoder was trained on."""
        self.check_latent(z)
        return z.to(next(self.decoder.parameters()).dtype) / self.params.scale_factor + self.params.shift_factor

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(self.decoder_input(z))  # [B, 16, h, w] -> [B, 3, 8h, 8w]

    def encode(self, x: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        f, c = self.params.downsample, self.params.in_channels
        if x.ndim != 4 or x.shape[1] != c or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"the image must be [B, {c}, H, W] with H and W multiples of {f}, got {list(x.shape)}")
        mean, logvar = self.encoder(x.to(next(self.encoder.parameters()).dtype)).chunk(2, dim=1)
        if sample:  # as diffusers' DiagonalGaussianDistribution.sample, noise drawn on the generator's device
            device = generator.device if generator is not None else mean.device
            noise = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype).to(mean.device)
            mean = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise
        return (mean - self.params.shift_factor) * self.params.scale_factor  # [B, 16, H/8, W/8]

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

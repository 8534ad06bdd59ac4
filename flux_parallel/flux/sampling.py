"""FLUX's rectified-flow sampler as free functions: noise, packing, position ids, schedule, Euler loop.

Flow matching (Lipman et al. 2023; Esser et al. 2024): x_t = (1 - t) x_0 + t noise, the model
predicts the velocity noise - x_0, and the Euler step from t to t' is x + (t' - t) v.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor

from flux_parallel.flux.configs import FluxParams

LATENT_CHANNELS = 16


def check_image_size(name: str, size: int) -> None:
    """Sides must be multiples of 16: 8x VAE down-sampling, then 2x2 packing into tokens."""
    if not isinstance(size, int) or size < 16 or size % 16:
        lower, upper = max(16, size // 16 * 16), (size // 16 + 1) * 16
        raise ValueError(f"{name} {size} is not a multiple of 16: the nearest valid sizes are {lower} and {upper}")


def get_noise(batch: int, height: int, width: int, seed: int, dtype=torch.float32, device="cpu") -> Tensor:
    """[B, 16, H/8, W/8] standard normal, drawn on the CPU so that every device and rank agrees."""
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn(batch, LATENT_CHANNELS, height // 8, width // 8, generator=generator)
    return noise.to(device=device, dtype=dtype)


def pack(latents: Tensor) -> Tensor:
    """[B, C, H/8, W/8] -> [B, (H/16)(W/16), 4C]: each 2x2 patch becomes one token."""
    return rearrange(latents, "B C (h ph) (w pw) -> B (h w) (C ph pw)", ph=2, pw=2)


def unpack(tokens: Tensor, height: int, width: int) -> Tensor:
    """[B, (H/16)(W/16), 4C] -> [B, C, H/8, W/8]."""
    return rearrange(tokens, "B (h w) (C ph pw) -> B C (h ph) (w pw)", h=height // 16, w=width // 16, ph=2, pw=2)


def make_img_ids(batch: int, height: int, width: int, device="cpu") -> Tensor:
    """[B, (H/16)(W/16), 3] position ids (0, row, column) of the packed tokens."""
    rows, cols = torch.meshgrid(torch.arange(height // 16), torch.arange(width // 16), indexing="ij")
    ids = torch.stack((torch.zeros_like(rows), rows, cols), dim=-1).reshape(1, -1, 3).float()
    return ids.expand(batch, -1, -1).to(device)


@dataclass(frozen=True)
class Schedule:
    """How the timesteps are spaced; the numbers of a diffusers `scheduler_config.json`."""

    use_dynamic_shifting: bool = False  # dev: shift by mu, which grows with the image size
    base_shift: float = 0.5  # mu at base_image_seq_len tokens
    max_shift: float = 1.15  # mu at max_image_seq_len tokens
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    shift: float = 1.0  # a fixed shift, used when use_dynamic_shifting is off

    def __post_init__(self):
        if self.max_image_seq_len <= self.base_image_seq_len:
            raise ValueError(
                f"max_image_seq_len {self.max_image_seq_len} must exceed base_image_seq_len {self.base_image_seq_len}"
            )
        if self.shift <= 0:
            raise ValueError(f"shift must be positive, got {self.shift}")

    def mu(self, image_seq_len: int) -> float:
        slope = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len)
        return self.base_shift + slope * (image_seq_len - self.base_image_seq_len)


def get_schedule(num_steps: int, image_seq_len: int, schedule: Schedule) -> list[float]:
    """num_steps + 1 times from 1 down to 0."""
    times = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)[:-1]
    if schedule.use_dynamic_shifting:
        # time_shift: exp(mu) / (exp(mu) + 1/t - 1) spends more steps at high noise for larger images
        times = math.exp(schedule.mu(image_seq_len)) / (math.exp(schedule.mu(image_seq_len)) + 1 / times - 1)
    elif schedule.shift != 1.0:
        times = schedule.shift * times / (1 + (schedule.shift - 1) * times)
    return times.float().tolist() + [0.0]


def denoise(
    velocity: Callable[[Tensor, float], Tensor],
    img: Tensor,  # [B, L, 64] packed noise (or this rank's shard of it)
    timesteps: list[float],
    on_step: Callable[[int], None] | None = None,
    blend: Callable[[int, Tensor], Tensor] | None = None,
) -> Tensor:
    """Euler integration of velocity(img, t) from timesteps[0] to timesteps[-1]; fp32 state.
    `velocity` is the model's prediction at time t (parallel.Generation.velocity in the pipeline).
    blend(step, img) -> img after each step: inpainting puts the kept region back (flux/image_modes.py)."""
    img = img.float()
    for step, (t_curr, t_next) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        img = img + (t_next - t_curr) * velocity(img, t_curr).float()
        if blend is not None:
            img = blend(step, img)
        if on_step is not None:
            on_step(step)
    return img


def flux_inputs(params: FluxParams, grid: tuple[int, int], txt_tokens: int, batch: int = 1,
                seed: int | None = None) -> dict:
    """Random inputs of Flux.forward: a grid[0] x grid[1] grid of image tokens (16 px each),
    txt_tokens text tokens, guidance when the model has the embedding. `seed` fixes the values
    without touching the global generator."""
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    img_ids = make_img_ids(batch, 16 * grid[0], 16 * grid[1])
    return dict(
        img=torch.randn(batch, img_ids.shape[1], params.in_channels, generator=gen),
        img_ids=img_ids,
        txt=torch.randn(batch, txt_tokens, params.context_in_dim, generator=gen),
        txt_ids=torch.zeros(batch, txt_tokens, 3),
        timesteps=torch.rand(batch, generator=gen),
        y=torch.randn(batch, params.vec_in_dim, generator=gen),
        guidance=torch.full((batch,), 3.5) if params.guidance_embed else None,
    )

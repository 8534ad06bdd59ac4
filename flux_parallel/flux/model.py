"""The FLUX.1 transformer: 19 double-stream blocks, then 38 single-stream blocks over [txt; img]."""

import torch
from torch import Tensor, nn

from flux_parallel.flux.configs import FluxParams
from flux_parallel.flux.layers import DoubleStreamBlock, LastLayer, MLPEmbedder, SingleStreamBlock, timestep_embedding
from flux_parallel.kernels import rope_table


class Flux(nn.Module):
    def __init__(self, params: FluxParams):
        super().__init__()
        self.params = params
        p = params
        self.img_in = nn.Linear(p.in_channels, p.hidden_size)
        self.time_in = MLPEmbedder(256, p.hidden_size)
        self.vector_in = MLPEmbedder(p.vec_in_dim, p.hidden_size)
        self.guidance_in = MLPEmbedder(256, p.hidden_size) if p.guidance_embed else None
        self.txt_in = nn.Linear(p.context_in_dim, p.hidden_size)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio, p.qkv_bias) for _ in range(p.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio) for _ in range(p.depth_single_blocks)
        )
        self.final_layer = LastLayer(p.hidden_size, p.out_channels)
        self.run_blocks = run_blocks  # the seam a step cache replaces during a call (flux/cache.py)

    def forward(
        self,
        img: Tensor,  # [B, L, in_channels] packed latents
        img_ids: Tensor,  # [B, L, 3], or [L, 3] for every image as diffusers accepts
        txt: Tensor,  # [B, S, context_in_dim] T5 hidden states
        txt_ids: Tensor,  # [B, S, 3], or [S, 3]
        timesteps: Tensor,  # [B] in [0, 1]
        y: Tensor,  # [B, vec_in_dim] CLIP pooled output
        guidance: Tensor | None = None,  # [B], dev only
    ) -> Tensor:
        check_inputs(self.params, img, img_ids, txt, txt_ids, timesteps, y, guidance)
        if img_ids.ndim == 2:  # diffusers' unbatched ids: the same positions for every image
            img_ids = img_ids.expand(img.shape[0], -1, -1)
        if txt_ids.ndim == 2:
            txt_ids = txt_ids.expand(img.shape[0], -1, -1)
        dtype = self.img_in.weight.dtype
        img = self.img_in(img.to(dtype))
        vec = self.conditioning(timesteps, y, guidance)
        txt = self.txt_in(txt.to(dtype))
        pe = rope_table(torch.cat((txt_ids, img_ids), dim=1), self.params.axes_dim, self.params.theta)

        img, txt = self.run_blocks(self, img, txt, vec, pe)
        return self.final_layer(img, vec)  # [B, L, out_channels]

    def conditioning(self, timesteps: Tensor, y: Tensor, guidance: Tensor | None = None) -> Tensor:
        """The vector every block is modulated by, [B, hidden]: time, guidance (dev) and CLIP's pooled output."""
        dtype = self.img_in.weight.dtype
        vec = self.time_in(timestep_embedding(timesteps, 256).to(dtype))
        if self.guidance_in is not None:
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(dtype))
        return vec + self.vector_in(y.to(dtype))


def run_blocks(model: Flux, img: Tensor, txt: Tensor, vec: Tensor, pe, start: int = 0) -> tuple[Tensor, Tensor]:
    """The block stack from double block `start` on: img [B, L, hidden], txt [B, S, hidden] -> both
    streams after the last single block (which works on [txt; img] and splits them again)."""
    for block in model.double_blocks[start:]:
        img, txt = block(img, txt, vec, pe)
    x = torch.cat((txt, img), dim=1)  # [B, S + L, hidden]
    for block in model.single_blocks:
        x = block(x, vec, pe)
    return x[:, txt.shape[1] :], x[:, : txt.shape[1]]


def check_inputs(p: FluxParams, img, img_ids, txt, txt_ids, timesteps, y, guidance) -> None:
    """One clear sentence for inconsistent input shapes, before any matrix product fails."""
    if img.ndim != 3 or img.shape[-1] != p.in_channels:
        raise ValueError(f"img must be [B, L, {p.in_channels}], got {list(img.shape)}")
    batch, img_len = img.shape[:2]
    txt_len = txt.shape[1] if txt.ndim == 3 else -1
    expected = {
        "img_ids": (img_ids, [batch, img_len, len(p.axes_dim)]),
        "txt_ids": (txt_ids, [batch, txt_len, len(p.axes_dim)]),
        "txt": (txt, [batch, txt_len, p.context_in_dim]),
        "timesteps": (timesteps, [batch]),
        "y": (y, [batch, p.vec_in_dim]),
    }
    for name, (tensor, shape) in expected.items():
        unbatched = name.endswith("_ids")  # position ids may leave out the batch dim, as in diffusers
        if list(tensor.shape) != shape and not (unbatched and list(tensor.shape) == shape[1:]):
            allowed = f"{shape} or {shape[1:]}" if unbatched else f"{shape}"
            raise ValueError(f"{name} must have shape {allowed} (from img {list(img.shape)}), got {list(tensor.shape)}")
    if p.guidance_embed and guidance is None:
        raise ValueError("this model has a guidance embedding (FLUX.1-dev): pass guidance [B]")
    if guidance is not None and list(guidance.shape) != [batch]:
        raise ValueError(f"guidance must have shape [{batch}], got {list(guidance.shape)}")

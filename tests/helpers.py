"""Small helpers shared by the test modules (pytest puts tests/ on the path; tools/ via pyproject.toml)."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from flux_parallel import flux
from flux_parallel.flux import CONFIGS, Flux
from flux_parallel.flux.checkpoint import diffusers_to_bfl
from flux_parallel.flux.sampling import flux_inputs
from flux_parallel.vae import VAE_CONFIGS

PARAMS = CONFIGS["tiny-dev"]  # 12 heads: Ulysses degrees 2, 3 and 4 divide them; guidance embedding on


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """||ours - ref|| / ||ref||, in float64."""
    return ((ours.double() - ref.double()).norm() / ref.double().norm()).item()


def tiny_flux(params=PARAMS) -> Flux:
    """The seeded tiny transformer every rank builds identically."""
    torch.manual_seed(0)
    return Flux(params).eval()


def tiny_flux_inputs(txt_len: int, grid: tuple[int, int], batch: int = 2) -> dict:
    """Inputs for tiny_flux, seeded by their shape (the same on every rank)."""
    return flux_inputs(PARAMS, grid, txt_len, batch=batch, seed=txt_len * 100 + grid[0])


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, case: str) -> None:
    # fp32: sharding changes only the order of the sums inside attention (keys in another order,
    # ring blocks merged by their LSE), so the difference is rounding, about 1e-7 of the output.
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    assert err <= 1e-5, f"{case}: relative error {err:.2e} > 1e-5"


# Small random checkpoints in the real formats, and the texts the tokenizer tests share.

CORPUS = (
    """\
The quick brown fox jumps over the lazy dog near the river bank.
A portrait of a young woman in a blue dress, soft studio light, film grain.
Ein Hund läuft über die Straße; la niña come una manzana; l'été à Marseille.
Space station orbiting a gas giant, concept art, trending, ultra detailed, 8k.
Mountains, lakes and forests under a starry sky with the milky way, long exposure.
東京の夜景 and 서울 at dusk, Ελληνικά γράμματα, ﬁne ligatures, ２０２４ full-width digits.
"""
    * 3
)


PROMPTS = [
    "a photo of a cat",
    "",
    "   Several   spaces,\ttabs\nand new lines   ",
    "UPPER and lower CASE, punctuation!!! (nested [brackets]) it's don't we'll they've",
    "Café crème brûlée — naïve façade, ﬁne ２０２４ ½",
    "東京タワー 🙂 Москва зимой ελληνικά ⛰️ e\u0301",
    "numbers 1234567 and 3.14159, emails a@b.c, #tags & more",
    "special tokens inside: <|endoftext|> </s> <extra_id_0> <pad>",
    " ".join(["a very long prompt about a forest with many trees"] * 30),
]


def write_clip_files(folder, vocab, merges):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return folder


def write_t5_files(folder, spiece, **config):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(spiece)
    if config:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def clip_model(seed, vocab_size, eos_token_id):
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        eos_token_id=eos_token_id,
        projection_dim=8,
    )
    return CLIPTextModel(config).eval()


def diffusers_model(params: flux.FluxParams) -> FluxTransformer2DModel:
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=params.in_channels,
        out_channels=params.out_channels,  # Fill and Canny/Depth take more channels than they return
        num_layers=params.depth,
        num_single_layers=params.depth_single_blocks,
        attention_head_dim=params.head_dim,
        num_attention_heads=params.num_heads,
        joint_attention_dim=params.context_in_dim,
        pooled_projection_dim=params.vec_in_dim,
        guidance_embeds=params.guidance_embed,
        axes_dims_rope=params.axes_dim,
    )
    # default init leaves some paths near zero; random weights of moderate scale exercise every term
    for p in model.parameters():
        p.data.normal_(0.0, 0.08)
    return model.eval()


def write_source(kind: str, ref: FluxTransformer2DModel, params, tmp_path):
    if kind == "component":
        ref.save_pretrained(tmp_path / "transformer")
        return tmp_path / "transformer"
    if kind == "sharded":
        ref.save_pretrained(tmp_path / "transformer", max_shard_size="300KB")
        assert len(list((tmp_path / "transformer").glob("*.safetensors"))) > 1
        return tmp_path / "transformer"
    if kind == "pipeline":
        ref.save_pretrained(tmp_path / "transformer")
        (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
        return tmp_path
    if kind == "bfl":
        # diffusers_to_bfl is itself proven by the diffusers-folder cases; the BFL key names are
        # checked against diffusers' own converter at the real 12B sizes below.
        path = tmp_path / "flux1-tiny.safetensors"
        save_file(diffusers_to_bfl(dict(ref.state_dict()), params), path)
        (tmp_path / "config.json").write_text(json.dumps({"axes_dim": list(params.axes_dim)}))
        return path
    raise AssertionError(kind)


VAE_TINY = VAE_CONFIGS["tiny"]
VAE_SCALE, VAE_SHIFT = 0.3611, 0.1159


def diffusers_config() -> dict:
    levels = len(VAE_TINY.ch_mult)
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=list(VAE_TINY.widths),  # (c, 2c, 4c, 4c) as FLUX's, at c = 8
        layers_per_block=2,
        latent_channels=16,
        norm_num_groups=VAE_TINY.norm_groups,
        sample_size=VAE_TINY.resolution,
        scaling_factor=VAE_SCALE,
        shift_factor=VAE_SHIFT,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def perturb(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Default inits leave norms at (1, 0) and biases at 0; noise everywhere makes every weight matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return module.eval()


GENERATE = str(Path(__file__).resolve().parents[1] / "tools" / "generate.py")


def one_and_two_ranks(tmp_path, common: list[str], parallel: list[str]):
    """tools/generate.py with the flags `common` in one process, then under torchrun on 2 ranks with `parallel`
    added -> the two images' pixels (int arrays [H, W, 3]); each run must succeed."""
    import numpy as np
    from PIL import Image

    runs = {"one": [sys.executable, GENERATE, *common],
            "two": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", GENERATE,
                    *common, *parallel]}
    for name, cmd in runs.items():
        done = subprocess.run([*cmd, "--output", str(tmp_path / f"{name}.png")], capture_output=True, text=True,
                              timeout=180)
        assert done.returncode == 0, done.stderr[-3000:]
    return tuple(np.asarray(Image.open(tmp_path / f"{n}.png")).astype(int) for n in runs)

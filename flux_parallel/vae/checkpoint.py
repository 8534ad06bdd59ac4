"""Loading the FLUX autoencoder from the black-forest-labs `ae.safetensors` or a diffusers `vae/` folder.

Our parameter names are the black-forest-labs ones; diffusers checkpoints go through
`diffusers_to_bfl`: its up blocks are numbered from the lowest resolution (ours from the
highest), and its attention projections are linears where ours are 1x1 convolutions.
"""

import re
from pathlib import Path

import torch
from torch import Tensor

from flux_parallel.vae.autoencoder import AutoEncoder, AutoEncoderParams
from flux_parallel.weights import (
    DIFFUSERS_STEM,
    CheckpointError,
    CheckpointFormat,
    block_count,
    known_fields,
    load_checkpoint,
    resolve,
)

BFL_FILE = "ae.safetensors"
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}


def _mid_pairs(side: str) -> list[tuple[str, str]]:
    pairs = [
        (f"{side}.mid.block_{i + 1}.{b}", f"{side}.mid_block.resnets.{i}.{d}")
        for i in range(2)
        for b, d in _RESNET.items()
    ]
    return pairs + [(f"{side}.mid.attn_1.{b}", f"{side}.mid_block.attentions.0.{d}") for b, d in _ATTN.items()]


def _resnet_pairs(bfl: str, diffusers: str, count: int) -> list[tuple[str, str]]:
    return [(f"{bfl}.{j}.{b}", f"{diffusers}.{j}.{d}") for j in range(count) for b, d in _RESNET.items()]


def _module_pairs(p: AutoEncoderParams) -> list[tuple[str, str]]:
    """(BFL module, diffusers module) for every module that may hold weights."""
    levels = len(p.ch_mult)
    pairs = [(f"{s}.{m}", f"{s}.{m}") for s in ("encoder", "decoder") for m in ("conv_in", "conv_out")]
    pairs += [(f"{s}.norm_out", f"{s}.conv_norm_out") for s in ("encoder", "decoder")]
    pairs += _mid_pairs("encoder") + _mid_pairs("decoder")
    for i in range(levels):
        pairs += _resnet_pairs(f"encoder.down.{i}.block", f"encoder.down_blocks.{i}.resnets", p.num_res_blocks)
        pairs.append((f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv"))
        up = levels - 1 - i  # diffusers' up_blocks[0] is our up[levels - 1]
        pairs += _resnet_pairs(f"decoder.up.{i}.block", f"decoder.up_blocks.{up}.resnets", p.num_res_blocks + 1)
        pairs.append((f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{up}.upsamplers.0.conv"))
    return pairs


def _key_pairs(p: AutoEncoderParams) -> list[tuple[str, str]]:
    return [(f"{b}.{s}", f"{d}.{s}") for b, d in _module_pairs(p) for s in ("weight", "bias")]


def _is_attn_projection(bfl_key: str) -> bool:
    return bool(re.search(r"\.attn_1\.(q|k|v|proj_out)\.weight$", bfl_key))


def diffusers_to_bfl(state: dict[str, Tensor], p: AutoEncoderParams) -> dict[str, Tensor]:
    """Rename a diffusers AutoencoderKL state dict to ours; consumes `state`."""
    out = {}
    for bfl_key, diffusers_key in _key_pairs(p):
        if diffusers_key in state:
            tensor = state.pop(diffusers_key)
            out[bfl_key] = tensor[:, :, None, None] if _is_attn_projection(bfl_key) and tensor.ndim == 2 else tensor
    out.update(state)  # leftovers (quant convs, ...) are reported as unexpected keys by load_strict
    return out


def bfl_to_diffusers(state: dict[str, Tensor], p: AutoEncoderParams) -> dict[str, Tensor]:
    """The inverse of `diffusers_to_bfl` (does not consume `state`)."""
    out = {}
    for bfl_key, diffusers_key in _key_pairs(p):
        if bfl_key in state:
            tensor = state[bfl_key]
            out[diffusers_key] = (tensor[:, :, 0, 0] if _is_attn_projection(bfl_key) else tensor).clone()
    return out


def fields_from_bfl_keys(shapes: dict[str, list[int]], source: str) -> dict:
    """AutoEncoderParams fields for widths and depths, from a BFL state dict's shapes (header only);
    the rest (groups, scale, shift) keep FLUX's defaults."""
    try:
        ch, in_channels = shapes["encoder.conv_in.weight"][:2]
        levels = block_count(shapes, r"encoder\.down\.(\d+)\.")
        widths = [shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in range(levels)]
        fields = dict(
            in_channels=in_channels,
            ch=ch,
            out_ch=shapes["decoder.conv_out.weight"][0],
            ch_mult=tuple(w // ch for w in widths),
            num_res_blocks=block_count(shapes, r"encoder\.down\.0\.block\.(\d+)\."),
            z_channels=shapes["decoder.conv_in.weight"][1],
        )
    except (KeyError, ValueError) as err:
        raise CheckpointError(
            f"{source} does not look like a FLUX autoencoder in the black-forest-labs layout (no {err})"
        ) from None
    if any(w % ch for w in widths):
        raise CheckpointError(f"{source}: level widths {widths} are not multiples of the first conv's {ch} channels")
    return fields


def fields_from_config(config: dict, source: str) -> dict:
    """AutoEncoderParams fields from a diffusers AutoencoderKL `config.json`, or one with our field names."""
    if "block_out_channels" not in config:
        return known_fields(AutoEncoderParams, config)
    if config.get("use_quant_conv", True) or config.get("use_post_quant_conv", True):
        raise CheckpointError(
            f"{source}: quant convs (use_quant_conv / use_post_quant_conv) are not part of the FLUX autoencoder"
        )
    if not config.get("mid_block_add_attention", True) or config.get("act_fn", "silu") != "silu":
        raise CheckpointError(f"{source}: only the FLUX layout (SiLU, mid-block attention) is supported")
    widths = config["block_out_channels"]
    fields = dict(
        in_channels=config.get("in_channels", 3),
        out_ch=config.get("out_channels", 3),
        ch=widths[0],
        ch_mult=tuple(w // widths[0] for w in widths),
        num_res_blocks=config.get("layers_per_block", 2),
        z_channels=config.get("latent_channels", 16),
        norm_groups=config.get("norm_num_groups", 32),
        resolution=config.get("sample_size", 256),
        scale_factor=config.get("scaling_factor", 0.3611),
        shift_factor=config.get("shift_factor") or 0.0,  # SD-style VAEs have none
    )
    if [widths[0] * m for m in fields["ch_mult"]] != list(widths):
        raise CheckpointError(f"{source}: block_out_channels {widths} are not multiples of the first")
    return fields


def find_autoencoder(path: Path) -> tuple[str, Path]:
    """('bfl', file) or ('diffusers', component folder) for any accepted local path."""
    if path.is_file():
        return "bfl", path
    if (path / "model_index.json").is_file() and (path / "vae").is_dir():
        return "diffusers", path / "vae"
    if (path / "config.json").is_file() and any(path.glob(f"{DIFFUSERS_STEM}*")):  # pickles too: weight_files refuses
        return "diffusers", path
    if (path / BFL_FILE).is_file():
        return "bfl", path / BFL_FILE
    raise CheckpointError(f"{path} is neither a diffusers pipeline or vae folder nor a folder with {BFL_FILE}")


def locate_autoencoder(src: str | Path) -> tuple[str, Path]:
    """('bfl', file) or ('diffusers', component folder) for a local path or a hub repo id. From the hub,
    one copy only: the repo's vae/ folder when it has one, else its ae.safetensors."""
    path = Path(src).expanduser()
    if not path.exists():
        path = resolve(src, allow_patterns=["model_index.json", "vae/*"])
        if not (path / "vae").is_dir():
            path = resolve(src, allow_patterns=[BFL_FILE, "config.json"])
    return find_autoencoder(path)


AUTOENCODER = CheckpointFormat(
    name="autoencoder",
    locate=locate_autoencoder,
    fields_from_bfl_keys=fields_from_bfl_keys,
    fields_from_config=fields_from_config,
    make_params=AutoEncoderParams,
    diffusers_to_bfl=diffusers_to_bfl,
    build=AutoEncoder,
    bfl_hint=" (a BFL file implies 32 groups: put a config.json with norm_groups beside it, or pass config=)",
)


def load_autoencoder(
    src: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    config: AutoEncoderParams | dict | None = None,
) -> AutoEncoder:
    """The FLUX autoencoder from a BFL `ae.safetensors` (a `config.json` beside it overrides what the
    shapes imply), a diffusers vae or pipeline folder, a folder holding `ae.safetensors`, or a hub
    repo id. `config` overrides the checkpoint's parameters (an AutoEncoderParams or a dict of fields)."""
    return load_checkpoint(AUTOENCODER, src, dtype, device, config)

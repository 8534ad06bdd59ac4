"""LoRA files in the layouts found in the wild, mapped onto our module names (flux/lora.py applies them).

The layout is recognised from the keys alone (as diffusers' FluxLoraLoaderMixin does, in its order):
- kohya / sd-scripts: `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`, `.lora_up.weight`,
  `.alpha`; `lora_te1_text_model_...` for CLIP. Our (BFL) names with `.` written as `_`.
- ComfyUI: `diffusion_model.<our name>.lora_down.weight` (or lora_A/lora_B) and
  `text_encoders.clip_l.transformer.text_model.<CLIP name>`.
- XLabs (x-flux): `double_blocks.0.processor.qkv_lora1.down.weight`; a single block's `qkv_lora`
  updates only the q/k/v rows (the first 3 * hidden) of `linear1`.
- BFL control LoRAs: `lora_A`/`lora_B` (with `lora_B.bias`) on our names, plus `query_norm.scale` /
  `key_norm.scale` tensors that replace the model's. Their `img_in` factors take 128 channels (noise and
  control-image latents): the base img_in is widened with zero columns while loaded (flux/lora.py), as
  diffusers' `_maybe_expand_transformer_param_shape_or_error_` does.
- diffusers / PEFT: `transformer.<diffusers name>.lora_A.weight`, `text_encoder.text_model.<CLIP name>`;
  diffusers' separate to_q/to_k/to_v are row slices of our fused qkv / linear1, and norm_out's
  halves are (scale, shift) where ours are (shift, scale): lora_B's rows are swapped, never lora_A.

Scale of a module: alpha / rank (rank = rows of the down factor) where the file gives an alpha (a
per-module `.alpha` tensor, or PEFT's `lora_adapter_metadata` header), else 1 (XLabs, BFL).
Names are prefixed by the component they adapt: `transformer.` or `clip.`.
"""

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from flux_parallel.flux.checkpoint import _linear_pairs, _swap_halves
from flux_parallel.flux.configs import FluxParams
from flux_parallel.weights import PICKLE_SUFFIXES, CheckpointError, read_safetensors, resolve

DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes
SUFFIXES = {  # longest first: ".lora_down.weight" must not be read as ".down.weight"
    ".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".lora_B.bias": "bias", ".down.weight": "down", ".up.weight": "up", ".alpha": "alpha",
}
DIFFUSERS_STARTS = ("transformer.", "text_encoder.", "transformer_blocks.", "single_transformer_blocks.", "x_embedder.",
                    "context_embedder.", "time_text_embed.", "norm_out.", "proj_out.")  # the last: unprefixed PEFT
# img_in widths a LoRA may widen a 64-channel img_in to: Canny/Depth control LoRAs take [noise | control latents]
WIDENED_IMG_IN = (128,)
XLABS = {"qkv_lora1": "img_attn.qkv", "proj_lora1": "img_attn.proj", "qkv_lora2": "txt_attn.qkv",
         "proj_lora2": "txt_attn.proj", "proj_lora": "linear2", "qkv_lora": "linear1"}


@dataclass
class LoRAFactor:
    """One low-rank update: module(x)[..., rows] += (x @ down^T @ up^T + bias) * scale * adapter scale."""

    module: str  # our name, with its component: "transformer.double_blocks.0.img_attn.qkv"
    rows: tuple[int, int]  # the output rows it updates, [start, stop)
    down: Tensor  # [rank, in]
    up: Tensor  # [stop - start, rank]
    bias: Tensor | None  # [stop - start], BFL control LoRAs only
    scale: float  # alpha / rank, or 1


@dataclass
class LoRAFile:
    layout: str
    factors: list[LoRAFactor]
    replacements: dict[str, Tensor]  # parameter name -> the value that replaces it (BFL's QK-norm scales)

    @property
    def img_in_features(self) -> int | None:
        """The input channels img_in's factors take (a control LoRA's 128), None where it has none."""
        return next((f.down.shape[1] for f in self.factors if f.module == "transformer.img_in"), None)


@dataclass
class Placement:
    module: str
    rows: tuple[int, int] | None = None  # None: every output row
    swap_halves: bool = False


def read_lora(source: str | Path, weight_name: str | None = None) -> tuple[dict[str, Tensor], dict, str]:
    """(tensors in float32, the header's metadata, the file's name) of a LoRA file, a folder holding
    `weight_name` (default pytorch_lora_weights.safetensors), or a hub repo id with `weight_name`."""
    name = weight_name or DEFAULT_WEIGHT_NAME
    path = resolve(source, allow_patterns=[name])
    if path.is_dir():
        path = path / name
        if not path.is_file():
            raise CheckpointError(f"{source} holds no {name}: pass weight_name= with the LoRA file's name")
    if path.suffix in PICKLE_SUFFIXES or path.suffix != ".safetensors":
        raise CheckpointError(f"{path} is not a .safetensors file; LoRA weights are read from safetensors only "
                              "(pickles are never unpickled here)")
    tensors = read_safetensors([path], dtype=torch.float32, device="cpu")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from None
    return tensors, metadata, str(path)


def guess_layout(keys: list[str]) -> str:
    """The layout of a LoRA state dict, from its key names."""
    if any(k.startswith(("lora_unet_", "lora_te1_")) for k in keys):
        return "kohya"
    if any(k.startswith(("diffusion_model.", "text_encoders.")) for k in keys):
        return "comfyui"
    if any(".processor." in k for k in keys):
        return "xlabs"
    if any(k.startswith(DIFFUSERS_STARTS) for k in keys):
        return "diffusers"
    return "bfl"


def parse_lora(tensors: dict[str, Tensor], metadata: dict, params: FluxParams,
               shapes: dict[str, tuple[int, int]], source: str) -> LoRAFile:
    """A LoRA state dict -> factors on our modules. shapes: our linears' (out, in) by prefixed name
    (`transformer.img_in`, `clip.encoder.layers.0.mlp.fc1`); every key must be placed."""
    if not tensors:
        raise CheckpointError(f"{source} holds no tensors: it is not a LoRA file")
    layout = guess_layout(list(tensors))
    place = _placer(layout, params, shapes)
    grouped: dict[str, dict[str, Tensor]] = {}
    replacements, unplaced = {}, []
    for key, tensor in tensors.items():
        stem, part = _split_suffix(key)
        if part is None and key.endswith(("query_norm.scale", "key_norm.scale")) and layout == "bfl":
            replacements[f"transformer.{_strip_bfl_prefix(key)}"] = tensor
        elif part is None or place(stem) is None:
            unplaced.append(key)
        else:
            grouped.setdefault(stem, {})[part] = tensor
    if unplaced:
        raise CheckpointError(f"{source}: {len(unplaced)} key(s) cannot be placed on this model "
                              f"({', '.join(unplaced[:3])}{', ...' if len(unplaced) > 3 else ''}; "
                              f"layout guessed from the keys: {layout})")
    alphas = _metadata_alphas(metadata)
    factors = [_factor(stem, parts, place(stem), shapes, alphas, source) for stem, parts in grouped.items()]
    return LoRAFile(layout, factors, replacements)


def _split_suffix(key: str) -> tuple[str, str | None]:
    for suffix, part in SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    return key, None


def _strip_bfl_prefix(name: str) -> str:
    return name.removeprefix("base_model.model.")  # fal's Kontext LoRAs: PEFT-wrapped BFL names


def _placer(layout: str, params: FluxParams, shapes: dict[str, tuple[int, int]]):
    """stem (a key without its factor suffix) -> Placement, or None where this layout cannot place it."""
    if layout == "kohya":
        table = {_underscored(name, "transformer.", "lora_unet_"): name for name in shapes}
        table |= {_underscored(name, "clip.", "lora_te1_text_model_"): name for name in shapes}
        return lambda stem: Placement(table[stem]) if stem in table else None
    if layout == "diffusers":
        table = _diffusers_table(params)
        return lambda stem: _diffusers_placement(stem, table, shapes)
    if layout == "xlabs":
        return lambda stem: _xlabs_placement(stem, params, shapes)
    prefixes = {"comfyui": ("diffusion_model.", "text_encoders.clip_l.transformer.text_model."),
                "bfl": ("", None)}[layout]
    return lambda stem: _prefixed_placement(stem, prefixes, shapes)


def _underscored(name: str, component: str, prefix: str) -> str:
    return prefix + name.removeprefix(component).replace(".", "_") if name.startswith(component) else ""


def _prefixed_placement(stem: str, prefixes: tuple[str, str | None], shapes) -> Placement | None:
    transformer_prefix, clip_prefix = prefixes
    stem = _strip_bfl_prefix(stem)
    if clip_prefix and stem.startswith(clip_prefix):
        name = "clip." + stem.removeprefix(clip_prefix)
    elif stem.startswith(transformer_prefix):
        name = "transformer." + stem.removeprefix(transformer_prefix)
    else:
        return None
    return Placement(name) if name in shapes else None


def _diffusers_table(p: FluxParams) -> dict[str, Placement]:
    """diffusers module name -> where it lands in ours (checkpoint._linear_pairs: diffusers' pieces
    are concatenated along the output rows, q, k, v then proj_mlp)."""
    table = {"norm_out.linear": Placement("transformer.final_layer.adaLN_modulation.1", swap_halves=True)}
    for ours, theirs in _linear_pairs(p):
        start = 0
        for index, name in enumerate(theirs):
            size = p.mlp_hidden_dim if ours.endswith("linear1") and index == 3 else p.hidden_size
            rows = (start, start + size) if len(theirs) > 1 else None
            table[name] = Placement(f"transformer.{ours}", rows)
            start += size
    return table


def _diffusers_placement(stem: str, table: dict[str, Placement], shapes) -> Placement | None:
    if stem.startswith("text_encoder."):  # transformers 5 names CLIP's modules without `text_model.`
        name = "clip." + stem.removeprefix("text_encoder.").removeprefix("text_model.")
        return Placement(name) if name in shapes else None
    return table.get(stem.removeprefix("transformer."))


def _xlabs_placement(stem: str, p: FluxParams, shapes) -> Placement | None:
    match = re.fullmatch(r"(double_blocks|single_blocks)\.(\d+)\.processor\.(\w+)", stem)
    if match is None or match[3] not in XLABS:
        return None
    name = f"transformer.{match[1]}.{match[2]}.{XLABS[match[3]]}"
    rows = (0, 3 * p.hidden_size) if match[3] == "qkv_lora" else None  # q, k, v rows of linear1 only
    return Placement(name, rows) if name in shapes else None


def _metadata_alphas(metadata: dict) -> dict:
    """PEFT's LoraConfig from the `lora_adapter_metadata` header, its keys without a component prefix."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError:
        raise CheckpointError("the lora_adapter_metadata header is not valid JSON") from None
    return {k.removeprefix("transformer.").removeprefix("text_encoder."): v for k, v in config.items()}


def _module_alpha(stem: str, parts: dict[str, Tensor], config: dict) -> float | None:
    if "alpha" in parts:
        return float(parts["alpha"])
    name = stem.removeprefix("transformer.").removeprefix("text_encoder.")
    for pattern, alpha in config.get("alpha_pattern", {}).items():  # PEFT's rule: a regex on the name's end
        if re.match(rf"(.*\.)?({pattern})$", name):
            return float(alpha)
    return float(config["lora_alpha"]) if "lora_alpha" in config else None


def _factor(stem: str, parts: dict[str, Tensor], placement: Placement, shapes, config: dict,
            source: str) -> LoRAFactor:
    name = placement.module.split(".", 1)[1]
    name = name if stem.endswith(name) else f"{name} (the file's {stem})"  # both, where the layouts' names differ
    if "down" not in parts or "up" not in parts:
        raise CheckpointError(f"{source}: {name} has only {' and '.join(sorted(parts))}, not both LoRA factors")
    down, up, bias = parts["down"], parts["up"], parts.get("bias")
    out_features, in_features = shapes[placement.module]
    rows = placement.rows or (0, out_features)
    if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
        raise CheckpointError(f"{source}: the LoRA factors of {name} do not match in rank "
                              f"(down {list(down.shape)}, up {list(up.shape)})")
    if placement.module == "transformer.img_in" and down.shape[1] in WIDENED_IMG_IN and in_features < down.shape[1]:
        in_features = down.shape[1]  # a control LoRA: img_in is widened (LoRAAdapters zero-pads the base)
    if down.shape[1] != in_features or up.shape[0] != rows[1] - rows[0] or (
            bias is not None and list(bias.shape) != [up.shape[0]]):
        raise CheckpointError(f"{source}: {name} maps {in_features} features to {rows[1] - rows[0]} here, but the "
                              f"LoRA's factors are down {list(down.shape)}, up {list(up.shape)} (made for another "
                              "model?)")
    if placement.swap_halves:
        up, bias = _swap_halves(up), None if bias is None else _swap_halves(bias)
    alpha, rank = _module_alpha(stem, parts, config), down.shape[0]
    # rank-stabilised LoRA (Kalajdzievski 2023) divides by sqrt(rank); PEFT's header says which
    scale = 1.0 if alpha is None else alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    return LoRAFactor(placement.module, rows, down, up, bias, scale)

"""Loading the FLUX.1 transformer from the black-forest-labs single file or the diffusers layout.

Our parameter names are the black-forest-labs ones, so a BFL file loads as it is; diffusers
checkpoints go through `diffusers_to_bfl` (split q/k/v fused back, norm_out's halves swapped).
"""

import dataclasses
import re
from pathlib import Path

import torch
from torch import Tensor

from flux.configs import FluxParams, flux_rope_axes
from flux.model import Flux
from flux.weights import (
    DIFFUSERS_STEM,
    CheckpointError,
    check_device,
    check_dtype,
    load_strict,
    read_json,
    read_safetensors,
    resolve,
    single_file_fields,
    weight_files,
)



def _linear_pairs(p: FluxParams) -> list[tuple[str, list[str]]]:
    """(BFL module, diffusers modules whose weights are concatenated along dim 0 to form it)."""
    t = "time_text_embed"
    pairs = [
        ("img_in", ["x_embedder"]),
        ("txt_in", ["context_embedder"]),
        ("time_in.in_layer", [f"{t}.timestep_embedder.linear_1"]),
        ("time_in.out_layer", [f"{t}.timestep_embedder.linear_2"]),
        ("vector_in.in_layer", [f"{t}.text_embedder.linear_1"]),
        ("vector_in.out_layer", [f"{t}.text_embedder.linear_2"]),
        ("final_layer.linear", ["proj_out"]),
    ]
    if p.guidance_embed:
        pairs += [
            ("guidance_in.in_layer", [f"{t}.guidance_embedder.linear_1"]),
            ("guidance_in.out_layer", [f"{t}.guidance_embedder.linear_2"]),
        ]
    for i in range(p.depth):
        b, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        pairs += [
            (f"{b}.img_mod.lin", [f"{d}.norm1.linear"]),
            (f"{b}.txt_mod.lin", [f"{d}.norm1_context.linear"]),
            (f"{b}.img_attn.qkv", [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"]),
            (f"{b}.txt_attn.qkv", [f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"]),
            (f"{b}.img_attn.proj", [f"{d}.attn.to_out.0"]),
            (f"{b}.txt_attn.proj", [f"{d}.attn.to_add_out"]),
            (f"{b}.img_mlp.0", [f"{d}.ff.net.0.proj"]),
            (f"{b}.img_mlp.2", [f"{d}.ff.net.2"]),
            (f"{b}.txt_mlp.0", [f"{d}.ff_context.net.0.proj"]),
            (f"{b}.txt_mlp.2", [f"{d}.ff_context.net.2"]),
        ]
    for i in range(p.depth_single_blocks):
        b, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        pairs += [
            (f"{b}.linear1", [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"]),
            (f"{b}.linear2", [f"{d}.proj_out"]),
            (f"{b}.modulation.lin", [f"{d}.norm.linear"]),
        ]
    return pairs


def _key_pairs(p: FluxParams) -> list[tuple[str, list[str]]]:
    """Full tensor names: weights and biases of the linears, the QK-norm scales, the final adaLN."""
    pairs = [(f"{b}.{s}", [f"{d}.{s}" for d in ds]) for b, ds in _linear_pairs(p) for s in ("weight", "bias")]
    for i in range(p.depth):
        b, d = f"double_blocks.{i}", f"transformer_blocks.{i}.attn"
        pairs += [
            (f"{b}.img_attn.norm.query_norm.scale", [f"{d}.norm_q.weight"]),
            (f"{b}.img_attn.norm.key_norm.scale", [f"{d}.norm_k.weight"]),
            (f"{b}.txt_attn.norm.query_norm.scale", [f"{d}.norm_added_q.weight"]),
            (f"{b}.txt_attn.norm.key_norm.scale", [f"{d}.norm_added_k.weight"]),
        ]
    for i in range(p.depth_single_blocks):
        b, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}.attn"
        pairs += [(f"{b}.norm.query_norm.scale", [f"{d}.norm_q.weight"]), (f"{b}.norm.key_norm.scale", [f"{d}.norm_k.weight"])]
    pairs += [(f"final_layer.adaLN_modulation.1.{s}", [f"norm_out.linear.{s}"]) for s in ("weight", "bias")]
    return pairs


def _swap_halves(x: Tensor) -> Tensor:
    # diffusers' AdaLayerNormContinuous emits (scale, shift); BFL's LastLayer emits (shift, scale).
    first, second = x.chunk(2, dim=0)
    return torch.cat((second, first), dim=0)


def diffusers_to_bfl(state: dict[str, Tensor], p: FluxParams) -> dict[str, Tensor]:
    """Rename a diffusers FluxTransformer2DModel state dict to ours; consumes `state`."""
    out = {}
    for bfl_key, diffusers_keys in _key_pairs(p):
        if all(k in state for k in diffusers_keys):
            out[bfl_key] = torch.cat([state.pop(k) for k in diffusers_keys], dim=0)
            if bfl_key.startswith("final_layer.adaLN_modulation"):
                out[bfl_key] = _swap_halves(out[bfl_key])
    out.update(state)  # leftovers are reported as unexpected keys by load_strict
    return out


def bfl_to_diffusers(state: dict[str, Tensor], p: FluxParams) -> dict[str, Tensor]:
    """The inverse of `diffusers_to_bfl` (does not consume `state`)."""
    out = {}
    for bfl_key, diffusers_keys in _key_pairs(p):
        if bfl_key not in state:
            continue
        tensor = state[bfl_key]
        if bfl_key.startswith("final_layer.adaLN_modulation"):
            tensor = _swap_halves(tensor)
        sizes = [p.hidden_size] * len(diffusers_keys)
        if bfl_key.startswith("single_blocks") and ".linear1." in bfl_key:
            sizes[-1] = p.mlp_hidden_dim
        for key, piece in zip(diffusers_keys, tensor.split(sizes, dim=0) if len(sizes) > 1 else [tensor]):
            out[key] = piece.clone()
    return out


def params_from_bfl_keys(shapes: dict[str, list[int]], source: str) -> FluxParams:
    fields = bfl_fields(shapes, source)
    return FluxParams(**fields, axes_dim=_rope_axes(fields, source))


def _rope_axes(fields: dict, source: str) -> tuple[int, ...]:
    try:
        return flux_rope_axes(fields["hidden_size"] // fields["num_heads"])
    except ValueError as err:
        raise CheckpointError(f"{source}: {err} (in a config.json beside the file, or config=)") from None


def bfl_fields(shapes: dict[str, list[int]], source: str) -> dict:
    """FluxParams fields inferred from a BFL state dict's shapes (header only); RoPE axes excepted."""
    try:
        hidden, in_channels = shapes["img_in.weight"]
        head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
        mlp_hidden = shapes["double_blocks.0.img_mlp.0.weight"][0]
        params = dict(
            in_channels=in_channels,
            out_channels=shapes["final_layer.linear.weight"][0],
            vec_in_dim=shapes["vector_in.in_layer.weight"][1],
            context_in_dim=shapes["txt_in.weight"][1],
            hidden_size=hidden,
            mlp_ratio=mlp_hidden / hidden,
            num_heads=hidden // head_dim,
            depth=1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"double_blocks\.(\d+)\.", k))),
            depth_single_blocks=1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"single_blocks\.(\d+)\.", k))),
            qkv_bias="double_blocks.0.img_attn.qkv.bias" in shapes,
            guidance_embed="guidance_in.in_layer.weight" in shapes,
        )
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{source} does not look like a FLUX.1 transformer in the black-forest-labs layout ({err})") from None
    return params


def params_from_config(config: dict, source: str) -> dict:
    """FluxParams fields from a diffusers `config.json`, or from one written with our field names."""
    if "num_layers" not in config:
        fields = {f.name for f in dataclasses.fields(FluxParams)}
        return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in fields}
    if config.get("patch_size", 1) != 1:
        raise CheckpointError(f"{source}: patch_size {config['patch_size']} is not supported (FLUX.1 packs 2x2 outside)")
    try:
        fields = _diffusers_fields(config)
    except KeyError as err:
        raise CheckpointError(f"{source} lacks the transformer setting {err}") from None
    if "axes_dims_rope" in config:
        fields["axes_dim"] = tuple(config["axes_dims_rope"])
    return fields


def _diffusers_fields(config: dict) -> dict:
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    return dict(
        in_channels=config["in_channels"],
        out_channels=config.get("out_channels") or config["in_channels"],
        vec_in_dim=config["pooled_projection_dim"],
        context_in_dim=config["joint_attention_dim"],
        hidden_size=heads * head_dim,
        num_heads=heads,
        depth=config["num_layers"],
        depth_single_blocks=config["num_single_layers"],
        guidance_embed=config.get("guidance_embeds", False),
    )


def find_transformer(path: Path) -> tuple[str, Path]:
    """('bfl', file) or ('diffusers', component folder) for any accepted source path."""
    if path.is_file():
        return "bfl", path
    if (path / "model_index.json").is_file() and (path / "transformer").is_dir():
        return "diffusers", path / "transformer"
    if (path / "config.json").is_file() and any(path.glob(f"{DIFFUSERS_STEM}*")):
        return "diffusers", path
    bfl_files = sorted(path.glob("flux1-*.safetensors"))
    if len(bfl_files) == 1:
        return "bfl", bfl_files[0]
    if len(bfl_files) > 1:
        raise CheckpointError(f"{path} holds several transformers ({', '.join(f.name for f in bfl_files)}): name the file")
    raise CheckpointError(
        f"{path} is neither a diffusers pipeline or transformer folder nor a folder with a flux1-*.safetensors file"
    )


def load_transformer(
    src: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    config: FluxParams | dict | None = None,
) -> Flux:
    """FLUX.1 transformer from a BFL single file, a diffusers component or pipeline folder, or a hub repo id.

    `config` overrides what the checkpoint says or implies (a FluxParams, or a dict of its fields).
    """
    dtype, device = check_dtype(dtype), check_device(device)
    kind, path = find_transformer(resolve(src, allow_patterns=["model_index.json", "transformer/*"]))
    if kind == "bfl":
        fields = single_file_fields(path, bfl_fields, params_from_config)
    else:
        files = weight_files(path, DIFFUSERS_STEM)  # first: a pickle-only folder is refused before anything else
        fields = params_from_config(read_json(path / "config.json"), str(path / "config.json"))
    if config is not None:
        fields.update(dataclasses.asdict(config) if isinstance(config, FluxParams) else config)
    if "axes_dim" not in fields:
        fields["axes_dim"] = _rope_axes(fields, str(path))
    try:
        params = FluxParams(**fields)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: inconsistent transformer config: {err}") from None

    files = [path] if kind == "bfl" else files
    state = read_safetensors(files, dtype, device)
    if kind == "diffusers":
        state = diffusers_to_bfl(state, params)
    return load_strict(lambda: Flux(params), state, str(path))

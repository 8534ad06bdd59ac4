"""Loading the FLUX.1 transformer from the black-forest-labs single file or the diffusers layout.

Our parameter names are the black-forest-labs ones, so a BFL file loads as it is; diffusers
checkpoints go through `diffusers_to_bfl` (split q/k/v fused back, norm_out's halves swapped).
"""

from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from flux_parallel.flux.configs import FluxParams, flux_rope_axes
from flux_parallel.flux.model import Flux
from flux_parallel.parallel.apply import check_heads
from flux_parallel.parallel.context import ParallelContext
from flux_parallel.parallel.tensor import Shard, load_tensor_shards, shard_modules, shard_plan
from flux_parallel.weights import (
    DIFFUSERS_STEM,
    CheckpointError,
    CheckpointFormat,
    block_count,
    build_params,
    known_fields,
    load_checkpoint,
    read_json,
    resolve,
    safetensors_keys,
    weight_files,
)
from flux_parallel.weights.loader import single_file_fields
from flux_parallel.weights.modules import check_device, check_dtype

TRANSFORMER_FILES = ["model_index.json", "transformer/*"]  # what a hub repo id fetches
ROPE_HINT = " (put axes_dim in a config.json beside the file, or pass config=)"  # a BFL file's shapes do not say it


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
        pairs += [
            (f"{b}.norm.query_norm.scale", [f"{d}.norm_q.weight"]),
            (f"{b}.norm.key_norm.scale", [f"{d}.norm_k.weight"]),
        ]
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


def fields_from_bfl_keys(shapes: dict[str, list[int]], source: str) -> dict:
    """FluxParams fields inferred from a BFL state dict's shapes (header only); RoPE axes excepted."""
    try:
        hidden, in_channels = shapes["img_in.weight"]
        head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
        mlp_hidden = shapes["double_blocks.0.img_mlp.0.weight"][0]
        return dict(
            in_channels=in_channels,
            out_channels=shapes["final_layer.linear.weight"][0],
            vec_in_dim=shapes["vector_in.in_layer.weight"][1],
            context_in_dim=shapes["txt_in.weight"][1],
            hidden_size=hidden,
            mlp_ratio=mlp_hidden / hidden,
            num_heads=hidden // head_dim,
            depth=block_count(shapes, r"double_blocks\.(\d+)\."),
            depth_single_blocks=block_count(shapes, r"single_blocks\.(\d+)\."),
            qkv_bias="double_blocks.0.img_attn.qkv.bias" in shapes,
            guidance_embed="guidance_in.in_layer.weight" in shapes,
        )
    except (KeyError, ValueError) as err:
        raise CheckpointError(
            f"{source} does not look like a FLUX.1 transformer in the black-forest-labs layout ({err})"
        ) from None


def params_with_rope_axes(**fields) -> FluxParams:
    """FluxParams; without `axes_dim`, FLUX's 16:56:56 RoPE split scaled to the head size (a BFL file's
    shapes do not say it, nor do diffusers configs older than `axes_dims_rope`)."""
    if "axes_dim" not in fields:
        hidden = fields.get("hidden_size", FluxParams.hidden_size)
        fields["axes_dim"] = flux_rope_axes(hidden // fields.get("num_heads", FluxParams.num_heads))
    return FluxParams(**fields)


def params_from_bfl_keys(shapes: dict[str, list[int]], source: str) -> FluxParams:
    """FluxParams of a BFL state dict's shapes, with FLUX's RoPE split."""
    return build_params(params_with_rope_axes, fields_from_bfl_keys(shapes, source), source, ROPE_HINT)


def fields_from_config(config: dict, source: str) -> dict:
    """FluxParams fields from a diffusers `config.json`, or from one written with our field names."""
    if "num_layers" not in config:
        return known_fields(FluxParams, config)
    if config.get("patch_size", 1) != 1:
        raise CheckpointError(
            f"{source}: patch_size {config['patch_size']} is not supported (FLUX.1 packs 2x2 outside)"
        )
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
    """('bfl', file) or ('diffusers', component folder) for any accepted local path."""
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
        names = ", ".join(f.name for f in bfl_files)
        raise CheckpointError(f"{path} holds several transformers ({names}): name the file")
    raise CheckpointError(
        f"{path} is neither a diffusers pipeline or transformer folder nor a folder with a flux1-*.safetensors file"
    )


def locate_transformer(src: str | Path) -> tuple[str, Path]:
    """('bfl', file) or ('diffusers', component folder) for a local path or a hub repo id."""
    return find_transformer(resolve(src, allow_patterns=TRANSFORMER_FILES))


def transformer_in_channels(src: str | Path) -> tuple[int | None, Path]:
    """The input channels of the transformer at `src` and the file that says so, from a diffusers
    config.json's `in_channels` or a BFL file's `img_in.weight` shape; None where neither says
    (the loader then reports what is wrong)."""
    kind, path = locate_transformer(src)
    if kind == "diffusers":
        config = path / "config.json"
        return read_json(config).get("in_channels"), config
    if path.suffix != ".safetensors":
        return None, path
    shape = safetensors_keys(path).get("img_in.weight")
    return (shape[1] if shape and len(shape) == 2 else None), path


TRANSFORMER = CheckpointFormat(
    name="transformer",
    locate=locate_transformer,
    fields_from_bfl_keys=fields_from_bfl_keys,
    fields_from_config=fields_from_config,
    make_params=params_with_rope_axes,
    diffusers_to_bfl=diffusers_to_bfl,
    build=Flux,
    bfl_hint=ROPE_HINT,
)


def load_transformer(
    src: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    config: FluxParams | dict | None = None,
    keep: Callable[[FluxParams], Callable[[str], bool]] | None = None,
) -> Flux:
    """FLUX.1 transformer from a BFL single file, a diffusers component or pipeline folder, or a hub repo id.

    `config` overrides what the checkpoint says or implies (a FluxParams, or a dict of its fields).
    `keep(params)` -> a test on our parameter names: load only those (a pipeline stage); the tensors of
    other blocks are never read and their parameters stay on the meta device.
    """
    if keep is None:
        return load_checkpoint(TRANSFORMER, src, dtype, device, config)

    def select(params: FluxParams, kind: str):
        ours = keep(params)
        if kind == "bfl":
            return ours, ours
        return (lambda key: (prefix := _bfl_prefix(key)) is None or ours(prefix)), ours

    return load_checkpoint(TRANSFORMER, src, dtype, device, config, select)


def _bfl_prefix(diffusers_key: str) -> str | None:
    """Enough of our name for a diffusers key to decide whether it is read: a block's keys map to that
    block's prefix; None for the few small tensors outside the blocks (read, and filtered after renaming)."""
    for theirs, ours in (("single_transformer_blocks.", "single_blocks."), ("transformer_blocks.", "double_blocks.")):
        if diffusers_key.startswith(theirs):
            index = diffusers_key[len(theirs):].split(".", 1)[0]
            return f"{ours}{index}."
    return None


def load_transformer_tensor_parallel(src: str | Path, ctx: ParallelContext, dtype: torch.dtype = torch.bfloat16,
                                     device: torch.device | str = "cpu") -> Flux:
    """This tensor rank's share of the transformer at `src` (parallel/tensor.py). From a BFL single file
    or a diffusers folder each rank reads only its slices (of q, k, v and the MLP input separately, in
    the diffusers layout), so its peak memory while loading is its share."""
    dtype, device = check_dtype(dtype), check_device(device)
    kind, path = locate_transformer(src)
    if kind == "bfl":
        params = build_params(params_with_rope_axes, single_file_fields(path, TRANSFORMER), str(path), ROPE_HINT)
    else:
        fields = fields_from_config(read_json(path / "config.json"), str(path / "config.json"))
        params = build_params(params_with_rope_axes, fields, str(path / "config.json"))
    check_heads(params.num_heads, ctx)  # before the mesh (a collective) is built
    with torch.device("meta"):
        model = Flux(params)
    rank, degree = ctx.rank("tensor"), ctx.tensor_degree
    shard_modules(model, rank, degree, ctx.group("tensor"))
    if kind == "bfl":
        return load_tensor_shards(model, path, rank, degree, dtype, device)[0]
    state = read_diffusers_shards(path, params, shard_plan(params, rank, degree), dtype, device)
    return load_strict_into(model, state, str(path))


def read_diffusers_shards(folder: Path, p: FluxParams, plan: dict[str, Shard], dtype: torch.dtype,
                          device) -> dict[str, Tensor]:
    """Our state dict of the diffusers transformer in `folder`, the parameters of `plan` as this rank's
    Shard of them, read slice by slice: a fused tensor (qkv, linear1) is the concatenation of its
    diffusers parts along dim 0, so each of this rank's row ranges is read from the parts it covers. The
    files are mapped anew per tensor: the pages a column slice touches (every row's) leave with the mapping."""
    file_of = {}
    for file in weight_files(folder, DIFFUSERS_STEM):
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            file_of |= dict.fromkeys(handle.keys(), file)
    state, read = {}, set()
    for ours, theirs in (*_key_pairs(p), *((key, [key]) for key in file_of)):  # then the unexpected ones
        if not read.isdisjoint(theirs) or not all(key in file_of for key in theirs):
            continue  # read already (an unexpected key is one left over), or missing
        read |= set(theirs)
        with ExitStack() as stack:
            handles = [stack.enter_context(safe_open(str(file_of[k]), framework="pt", device="cpu")) for k in theirs]
            state[ours] = _read_part(ours, plan.get(ours), handles, theirs, dtype, device)
    return state  # a key missing is reported by the strict load, and so is an unexpected one


def _read_part(ours: str, shard: Shard | None, handles: list, theirs: list[str], dtype, device) -> Tensor:
    """Our tensor `ours` (this rank's Shard of it, when given) from its diffusers parts `theirs`."""
    if shard is None:
        tensor = torch.cat([h.get_tensor(k) for h, k in zip(handles, theirs)])
        tensor = _swap_halves(tensor) if ours.startswith("final_layer.adaLN_modulation") else tensor
    else:
        tensor = _slices_of_parts(shard, [h.get_slice(k) for h, k in zip(handles, theirs)])
    return tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)


def _slices_of_parts(shard: Shard, parts: list) -> Tensor:
    """shard.take of the dim-0 concatenation of `parts` (safetensors lazy slices), without concatenating:
    each row range is cut from the parts it overlaps."""
    if len(parts) == 1:
        return shard.take(parts[0])
    starts = [0]
    for part in parts:
        starts.append(starts[-1] + part.get_shape()[0])
    pieces = [part[max(a, lo) - lo : min(b, hi) - lo] for a, b in shard.ranges
              for part, lo, hi in zip(parts, starts, starts[1:]) if max(a, lo) < min(b, hi)]
    return torch.cat(pieces, dim=0)


def load_strict_into(model: Flux, state: dict[str, Tensor], source: str) -> Flux:
    """Assign `state` to `model` (built on the meta device and sharded): names and shapes must match."""
    expected = model.state_dict()
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(f"{source} does not match the transformer: missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]}")
    for key, param in expected.items():
        if param.shape != state[key].shape:
            raise CheckpointError(f"{source}: {key} gives a {list(state[key].shape)} slice, the sharded model "
                                  f"holds {list(param.shape)}")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)

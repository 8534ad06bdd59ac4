"""Tensor-parallel T5 and CLIP: text_encoder_placement "sharded" (Megatron-LM's layout, Shoeybi et al. 2019).

The D ranks of a data replica (the "replica" group: the ranks that rank0 placement broadcasts over) each
hold 1/D of both encoders' attention and MLP weights and encode the same prompts, every CFG branch of the
replica; the residual stream between layers stays whole and identical on every rank. Why the replica and
not the tensor axis: the replica is the largest group whose ranks need the same embeddings, so it divides
T5-XXL's 9.5 GB (bf16) the most, and it exists without tensor parallelism (Ulysses 2 shards T5 too).

Rank r of D holds, in every layer (heads H, head width d, MLP width m):
- T5 (no biases): SelfAttention.q, k, v [H d, d_model] -> rows of heads [r H/D, (r+1) H/D), column-parallel;
  o [d_model, H d] -> those heads' columns, row-parallel (one all-reduce); the relative attention bias
  [buckets, H] of layer 0 -> the same heads' columns. DenseReluDense.wi_0, wi_1 [m, d_model] -> rows
  [r m/D, (r+1) m/D); wo [d_model, m] -> those columns, and the feed-forward's fp32 output is all-reduced
  (T5GatedFeedForward computes wo itself, in fp32 for fp16 weights: it is wrapped, not wo replaced).
- CLIP: q_proj, k_proj, v_proj (with their biases) -> rows of the rank's heads; out_proj -> their columns,
  row-parallel; fc1 -> rows of the rank's MLP chunk, fc2 -> its columns, row-parallel (bias added once).
- Replicated: the embeddings (T5's 32128 x 4096 table is 3% of T5-XXL), the norms.
Two all-reduces per layer of [B, S, d_model]. Heads and MLP widths must divide by D (refused in one
sentence otherwise). Each rank reads only its slices from the safetensors files.
"""

from pathlib import Path

import torch
from torch import Tensor, nn

from flux_parallel.flux.clip import ClipParams, ClipTextModel
from flux_parallel.flux.t5 import T5Encoder, T5GatedFeedForward, T5Params
from flux_parallel.flux.text_encoders import (
    CLIP_FILES,
    T5_FILES,
    WEIGHTS_STEM,
    TextConditioner,
    clip_from_transformers,
    clip_params,
    encoder_folder,
    t5_from_transformers,
    t5_params,
)
from flux_parallel.parallel import comm
from flux_parallel.parallel.context import ParallelContext
from flux_parallel.parallel.tensor import RowParallelLinear, Shard, sharded_linear
from flux_parallel.weights import check_device, check_dtype, load_strict, read_json, read_safetensors, weight_files


class AllReducedFeedForward(T5GatedFeedForward):
    """T5's gated feed-forward over this rank's MLP columns, its fp32 partial output summed over the group.
    A subclass holding the same submodules, so parameter names stay those of the checkpoint."""

    def __init__(self, local: T5GatedFeedForward, group):
        nn.Module.__init__(self)
        self.wi_0, self.wi_1, self.wo, self.group = local.wi_0, local.wi_1, local.wo, group

    def forward(self, x: Tensor) -> Tensor:
        return comm.all_reduce(super().forward(x), self.group)  # [B, S, d_model] fp32


def resolve_placement(placement: str, ctx: ParallelContext, t5: T5Params, clip: ClipParams) -> str:
    """text_encoder_placement "auto" -> "sharded" where the replica has several ranks and the encoders'
    heads and MLP widths divide by their count, else "replicated"; any other value as it is. The rule:
    the least peak memory on the busiest rank without slowing the first step. "sharded" holds 1/D of
    the layers on every rank (rank0 leaves replica rank 0 holding them whole) and computes 1/D of each
    layer, for two all-reduces of [B, S, d_model] per layer."""
    if placement != "auto":
        return placement
    try:
        check_text_degree(t5, clip, ctx.replica_size)
    except ValueError:
        return "replicated"
    return "sharded" if ctx.replica_size > 1 else "replicated"


def text_params(root: Path, clip_src=None, t5_src=None) -> tuple[T5Params, ClipParams]:
    """The encoders' sizes, from a module given or the config.json of their folder (no weights read)."""
    def params(src, subfolder, patterns, parse):
        if isinstance(src, nn.Module):
            return src.params
        folder = encoder_folder(src or root, subfolder, patterns)
        return parse(read_json(folder / "config.json"), str(folder / "config.json"))

    return (params(t5_src, "text_encoder_2", T5_FILES, t5_params), params(clip_src, "text_encoder", CLIP_FILES,
                                                                           clip_params))


def check_text_degree(t5: T5Params | None, clip: ClipParams | None, degree: int) -> None:
    """One sentence when the encoders' heads or MLP widths do not split over `degree` ranks."""
    sizes = {"T5 num_heads": t5.num_heads, "T5 d_ff": t5.d_ff} if t5 is not None else {}
    if clip is not None:
        sizes |= {"CLIP num_attention_heads": clip.num_attention_heads,
                  "CLIP intermediate_size": clip.intermediate_size}
    bad = [f"{name} {n}" for name, n in sizes.items() if n % degree]
    if bad:
        raise ValueError(f"text_encoder_placement 'sharded' splits T5 and CLIP over the {degree} ranks of a data "
                         f"replica, but {', '.join(bad)} {'is' if len(bad) == 1 else 'are'} not divisible by {degree}: "
                         "use 'rank0' or 'replicated'")


def _rows(n: int, rank: int, degree: int) -> tuple[tuple[int, int]]:
    return ((rank * n // degree, (rank + 1) * n // degree),)


def t5_plan(p: T5Params, rank: int, degree: int) -> dict[str, Shard]:
    """Parameter name -> this rank's Shard: "column" and "row" linears, "slice" parameters (the module's
    own forward runs on the slice: the relative bias table's heads, wo's MLP columns)."""
    inner, d = p.num_heads * p.d_kv, p.d_model
    heads, mlp = _rows(inner, rank, degree), _rows(p.d_ff, rank, degree)
    plan = {"encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight":
            Shard("slice", 1, _rows(p.num_heads, rank, degree), full=(p.relative_attention_num_buckets, p.num_heads))}
    for i in range(p.num_layers):
        attn, ff = f"encoder.block.{i}.layer.0.SelfAttention", f"encoder.block.{i}.layer.1.DenseReluDense"
        plan |= {f"{attn}.{n}.weight": Shard("column", 0, heads, full=(inner, d)) for n in "qkv"}
        plan[f"{attn}.o.weight"] = Shard("row", 1, heads, full=(d, inner))
        plan |= {f"{ff}.{n}.weight": Shard("column", 0, mlp, full=(p.d_ff, d)) for n in ("wi_0", "wi_1")}
        plan[f"{ff}.wo.weight"] = Shard("slice", 1, mlp, full=(d, p.d_ff))
    return plan


def clip_plan(p: ClipParams, rank: int, degree: int) -> dict[str, Shard]:
    """Parameter name -> this rank's Shard (biases of column-parallel linears sliced like their rows);
    `full` is the whole linear's shape, which a LoRA adapter's factors are for (flux/lora.py)."""
    h, m = p.hidden_size, p.intermediate_size
    heads, mlp = _rows(h, rank, degree), _rows(m, rank, degree)
    plan = {}
    for i in range(p.num_hidden_layers):
        attn, mlp_prefix = f"encoder.layers.{i}.self_attn", f"encoder.layers.{i}.mlp"
        linears = {f"{attn}.{n}": Shard("column", 0, heads, full=(h, h)) for n in ("q_proj", "k_proj", "v_proj")}
        linears |= {f"{attn}.out_proj": Shard("row", 1, heads, full=(h, h)),
                    f"{mlp_prefix}.fc1": Shard("column", 0, mlp, full=(m, h)),
                    f"{mlp_prefix}.fc2": Shard("row", 1, mlp, full=(h, m))}
        for name, shard in linears.items():
            plan[f"{name}.weight"] = shard
            if shard.kind == "column":
                plan[f"{name}.bias"] = Shard("column", 0, shard.ranges, full=shard.full[:1])
    return plan


def _apply_plan(model: nn.Module, plan: dict[str, Shard], group) -> None:
    """Slice every planned parameter in place (Shard.take copies: a view would keep the whole tensor alive)
    and swap each planned linear for its sharded module (parallel/tensor.py)."""
    for name, shard in plan.items():
        if not name.endswith(".weight"):
            continue
        path = name.removesuffix(".weight")
        module, (parent, _, child) = model.get_submodule(path), path.rpartition(".")
        weight = shard.take(module.weight.data)
        if shard.kind == "slice":
            module.weight = nn.Parameter(weight)
            continue
        bias = module.bias
        if bias is not None:
            bias = plan[f"{path}.bias"].take(bias.data) if f"{path}.bias" in plan else bias.data.clone()
        setattr(model.get_submodule(parent), child, sharded_linear(shard, weight, bias, group))


def shard_t5(t5: T5Encoder, rank: int, degree: int, group) -> T5Encoder:
    """t5 (full weights, or built on the meta device) -> this rank's share, in place."""
    _apply_plan(t5, t5_plan(t5.params, rank, degree), group)
    for block in t5.encoder.block:
        attention, feed_forward = block.layer[0].SelfAttention, block.layer[1].DenseReluDense
        attention.num_heads = t5.params.num_heads // degree
        block.layer[1].DenseReluDense = AllReducedFeedForward(feed_forward, group)
    return t5.requires_grad_(False)


def shard_clip(clip: ClipTextModel, rank: int, degree: int, group) -> ClipTextModel:
    """clip (full weights, or built on the meta device) -> this rank's share, in place."""
    _apply_plan(clip, clip_plan(clip.params, rank, degree), group)
    for layer in clip.encoder.layers:
        layer.self_attn.num_heads = clip.params.num_attention_heads // degree
    return clip.requires_grad_(False)


def is_text_sharded(encoder: nn.Module) -> bool:
    return any(isinstance(m, RowParallelLinear) for m in encoder.modules())


def shard_text_encoders(text: TextConditioner, ctx: ParallelContext) -> TextConditioner:
    """Split text's encoders (whole, identical on every rank) over ctx's replica group, in place; encoders
    loaded sharded (load_t5_sharded, load_clip_sharded) stay as they are. Checks the sizes before any
    collective."""
    check_text_degree(text.t5.params, text.clip.params, ctx.replica_size)
    if ctx.replica_size == 1:
        return text
    rank, group = ctx.rank("replica"), ctx.group("replica")
    if not is_text_sharded(text.t5):
        shard_t5(text.t5, rank, ctx.replica_size, group)
    if not is_text_sharded(text.clip):
        shard_clip(text.clip, rank, ctx.replica_size, group)
    return text


def _load_sharded(build, plan: dict[str, Shard], files: list[Path], name_of, to_ours, dtype, device, source: str):
    """Read only this rank's slices and assign them to the sharded module `build()` makes on the meta
    device; strict like every loader. name_of: a file's tensor name -> ours (to find its Shard); to_ours:
    a file's state dict -> ours (the key mapping of load_t5 and load_clip)."""
    def part(key: str, lazy):
        shard = plan.get(name_of(key))
        return None if shard is None else shard.take(lazy)  # None: the whole tensor

    return load_strict(build, to_ours(read_safetensors(files, dtype, device, part=part)), source)


def load_t5_sharded(src: str | Path, ctx: ParallelContext, dtype: torch.dtype = torch.bfloat16,
                    device: torch.device | str = "cpu") -> T5Encoder:
    """This replica rank's share of the T5 encoder at `src` (what load_t5 accepts), read slice by slice."""
    dtype, device = check_dtype(dtype), check_device(device)
    folder = encoder_folder(src, "text_encoder_2", T5_FILES)
    params = t5_params(read_json(folder / "config.json"), str(folder / "config.json"))
    degree = ctx.replica_size
    check_text_degree(params, None, degree)  # before the mesh (a collective) is built
    rank, group = ctx.rank("replica"), ctx.group("replica")
    return _load_sharded(lambda: shard_t5(T5Encoder(params), rank, degree, group), t5_plan(params, rank, degree),
                         weight_files(folder, WEIGHTS_STEM), lambda key: key, t5_from_transformers, dtype, device,
                         str(folder))


def load_clip_sharded(src: str | Path, ctx: ParallelContext, dtype: torch.dtype = torch.bfloat16,
                      device: torch.device | str = "cpu") -> ClipTextModel:
    """This replica rank's share of the CLIP text model at `src` (what load_clip accepts), read slice by slice."""
    dtype, device = check_dtype(dtype), check_device(device)
    folder = encoder_folder(src, "text_encoder", CLIP_FILES)
    params = clip_params(read_json(folder / "config.json"), str(folder / "config.json"))
    degree = ctx.replica_size
    check_text_degree(None, params, degree)
    rank, group = ctx.rank("replica"), ctx.group("replica")
    return _load_sharded(lambda: shard_clip(ClipTextModel(params), rank, degree, group),
                         clip_plan(params, rank, degree), weight_files(folder, WEIGHTS_STEM),
                         lambda key: key.removeprefix("text_model."), clip_from_transformers, dtype, device,
                         str(folder))


def load_text_shards(root: Path, ctx: ParallelContext, dtype: torch.dtype, device, clip_src=None, t5_src=None
                     ) -> tuple[nn.Module, nn.Module]:
    """(CLIP, T5) for text_encoder_placement "sharded": a module given stays as it is (FluxPipeline splits
    it), a source (default: root's text_encoder/ and text_encoder_2/) is read slice by slice."""
    clip = clip_src if isinstance(clip_src, nn.Module) else load_clip_sharded(clip_src or root, ctx, dtype, device)
    t5 = t5_src if isinstance(t5_src, nn.Module) else load_t5_sharded(t5_src or root, ctx, dtype, device)
    return clip, t5

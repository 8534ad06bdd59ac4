"""Tensor parallelism for the FLUX transformer (Shoeybi et al. 2019, "Megatron-LM", arXiv:1909.08053).

Each of the T ranks of the "tensor" mesh axis holds 1/T of every block's weights and computes
1/T of its heads and MLP columns; the activations between blocks stay whole and identical on
every rank. Rank r of T holds, with h hidden, m MLP width, H heads (H % T == 0), its channels
c = [r h/T, (r+1) h/T) (the heads [r H/T, (r+1) H/T)) and its chunk M of the m MLP columns:

- double block, each stream (img, txt):
  - attn.qkv [3h, h] -> rows (q c | k c | v c) [3h/T, h], column-parallel, no communication; the
    block's num_heads becomes H/T, so its own rearrange cuts the local heads;
  - attn.proj [h, h] -> columns c [h, h/T], row-parallel: partial sums, one all-reduce, then the bias;
  - mlp.0 [m, h] -> rows M; mlp.2 [h, m] -> columns M, row-parallel: one all-reduce.
- single block:
  - linear1 [3h + m, h] -> rows (q c | k c | v c | 3h + M) [3h/T + |M|, h]: matching slices of
    both halves. The block's hidden_size becomes h/T, so its own split at 3 * hidden_size cuts the
    local q, k, v from the local MLP input;
  - linear2 [h, h + m] -> columns (c | h + M) [h, h/T + |M|]: the attention output and the MLP
    output of this rank's slices, summed by ONE all-reduce (the block adds them before its gate).
- every modulation lin [kh, h] (k = 6 double, 3 single) -> rank r's chunk of the kh rows; its
  output, a [B, kh/T] vector, is all-gathered (bytes per token: none; per image: kh values).
- The embedders (img_in, txt_in, time/vector/guidance MLPs) and the final layer are replicated:
  together they are under 1% of FLUX.1's weights, and their inputs and outputs are the small,
  replicated conditioning vector or per-token rows every rank holds anyway.

Per block: a double block does 4 all-reduces (the attention and MLP outputs of each stream, [B, L, h]
and [B, S, h]) and 2 all-gathers of [B, 6h]; a single block 1 all-reduce and 1 all-gather. Inference
only: the all-reduce is in place and not differentiable (the sequence-parallel paths are). Each
rank's weights are 1/T of the blocks' plus the replicated rest, and `load_tensor_shards` reads only
those slices from the safetensors file.

The strategy edits the model in place (it must: the point is that a rank holds only its slices),
by replacing nn.Linear modules and two attributes of each block; flux/layers.py is untouched.
Composition: the sp axes (Ulysses, ring) see H/T heads per rank and split those further, so
H % (T x ulysses) == 0; cfg, data, the parallel VAE and step caching see whole activations.
"""

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn

from flux_parallel.parallel import comm
from flux_parallel.parallel.context import ParallelContext
from flux_parallel.parallel.sequence import shard_sizes


@dataclass(frozen=True)
class Shard:
    """Which part of a full parameter a rank holds: `ranges` of rows (dim 0) or columns (dim 1),
    concatenated in order. kind: "column" (a plain local linear), "gathered" (a column-parallel
    linear whose output is all-gathered) or "row" (a row-parallel linear: all-reduce, then bias)."""

    kind: str
    dim: int
    ranges: tuple[tuple[int, int], ...]
    sizes: tuple[int, ...] = ()  # "gathered": every rank's output width, for the uneven all-gather
    full: tuple[int, ...] = ()  # the whole parameter's shape (a LoRA's factors are for the whole linear)

    def take(self, full: Tensor) -> Tensor:
        """A copy of this rank's part of the full tensor (or of a safetensors slice, which supports basic
        slicing). A copy: a slice is a view that keeps the whole tensor's storage alive (a safetensors
        slice's: the file mapping, whose pages a column slice touches in every row), and holding only a
        share is the point."""
        parts = [full[a:b] if self.dim == 0 else full[:, a:b] for a, b in self.ranges]
        return parts[0].clone(memory_format=torch.contiguous_format) if len(parts) == 1 else torch.cat(parts, self.dim)


def check_tensor_degree_of(heads: int, degree: int) -> None:
    """One sentence when `heads` cannot be split over `degree` ranks (called before any collective)."""
    if heads % degree:
        raise ValueError(f"num_heads {heads} is not divisible by tensor_degree {degree}: "
                         "every tensor-parallel rank must hold a whole number of heads")


def _chunk(n: int, rank: int, degree: int, offset: int = 0) -> tuple[int, int]:
    """Rank's contiguous chunk of n rows starting at offset (the first n % degree ranks one longer)."""
    sizes = shard_sizes(n, degree)
    start = offset + sum(sizes[:rank])
    return start, start + sizes[rank]


def shard_plan(params, rank: int, degree: int) -> dict[str, Shard]:
    """Parameter name -> this rank's Shard, for every split parameter; names not in it are replicated."""
    h, m = params.hidden_size, params.mlp_hidden_dim
    heads = tuple(_chunk(h, rank, degree, k * h) for k in range(3))  # q, k, v channels of my heads
    mlp = _chunk(m, rank, degree)
    mod = {6: _chunk(6 * h, rank, degree), 3: _chunk(3 * h, rank, degree)}
    gathered = {k: Shard("gathered", 0, (rows,), tuple(shard_sizes(k * h, degree))) for k, rows in mod.items()}
    gathered = {k: dataclasses.replace(g, full=(k * h, h)) for k, g in gathered.items()}
    linears: dict[str, Shard] = {}
    for i in range(params.depth):
        for stream in ("img", "txt"):
            prefix = f"double_blocks.{i}.{stream}"
            linears[f"{prefix}_attn.qkv"] = Shard("column", 0, heads, full=(3 * h, h))
            linears[f"{prefix}_attn.proj"] = Shard("row", 1, (heads[0],), full=(h, h))
            linears[f"{prefix}_mlp.0"] = Shard("column", 0, (mlp,), full=(m, h))
            linears[f"{prefix}_mlp.2"] = Shard("row", 1, (mlp,), full=(h, m))
            linears[f"{prefix}_mod.lin"] = gathered[6]
    for i in range(params.depth_single_blocks):
        prefix = f"single_blocks.{i}"
        linears[f"{prefix}.linear1"] = Shard("column", 0, (*heads, (3 * h + mlp[0], 3 * h + mlp[1])),
                                             full=(3 * h + m, h))
        linears[f"{prefix}.linear2"] = Shard("row", 1, (heads[0], (h + mlp[0], h + mlp[1])), full=(h, h + m))
        linears[f"{prefix}.modulation.lin"] = gathered[3]
    plan = {}
    for name, shard in linears.items():
        plan[f"{name}.weight"] = shard
        if shard.kind != "row":  # a row-parallel bias is added whole, once, after the all-reduce
            plan[f"{name}.bias"] = Shard(shard.kind, 0, shard.ranges, shard.sizes, shard.full[:1])
    return plan


class RowParallelLinear(nn.Module):
    """x [.., in_local] (this rank's input columns) -> x W^T summed over the group, plus the bias:
    [.., out], identical on every rank. weight [out, in_local] (this rank's columns), bias [out] whole
    or None (T5's linears have none)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, group):
        super().__init__()
        self.weight, self.group = nn.Parameter(weight), group
        self.bias = None if bias is None else nn.Parameter(bias)

    def forward(self, x: Tensor) -> Tensor:
        partial_sum = F.linear(x, self.weight)  # [.., out]: this rank's heads' / columns' share
        summed = comm.all_reduce(partial_sum, self.group)
        return summed if self.bias is None else summed + self.bias


class GatheredLinear(nn.Module):
    """x [.., in] whole -> this rank's output rows, all-gathered: [.., out] identical on every rank.
    weight [out_r, in], bias [out_r]; sizes: every rank's out_r. For the modulations, whose outputs
    are one small vector per image."""

    def __init__(self, weight: Tensor, bias: Tensor, group, sizes: tuple[int, ...]):
        super().__init__()
        self.weight, self.bias, self.group, self.sizes = nn.Parameter(weight), nn.Parameter(bias), group, list(sizes)

    def forward(self, x: Tensor) -> Tensor:
        return comm.all_gather(F.linear(x, self.weight, self.bias), self.group, dim=-1, sizes=self.sizes)


def sharded_linear(shard: Shard, weight: Tensor, bias: Tensor | None, group) -> nn.Module:
    """The module holding `weight` and `bias` (already this rank's parts) that computes like `shard` says;
    it keeps `shard` as `tensor_shard` (a LoRA adapter splits its factors by it: flux/lora.py)."""
    if shard.kind == "row":
        module = RowParallelLinear(weight, bias, group)
    elif shard.kind == "gathered":
        module = GatheredLinear(weight, bias, group, shard.sizes)
    else:
        module = nn.Linear(weight.shape[1], weight.shape[0], device="meta")
        module.weight, module.bias = nn.Parameter(weight), None if bias is None else nn.Parameter(bias)
    module.tensor_shard = shard
    return module


def is_tensor_sharded(model: nn.Module) -> bool:
    return any(isinstance(m, (RowParallelLinear, GatheredLinear)) for m in model.modules())


def shard_modules(model: nn.Module, rank: int, degree: int, group) -> nn.Module:
    """Replace every linear of shard_plan by its rank's part, in place, and give each block its local
    head count and width. Works on a meta-device model too (then load_tensor_shards fills it)."""
    params = model.params
    check_tensor_degree_of(params.num_heads, degree)
    plan = shard_plan(params, rank, degree)
    for name, module in list(model.named_modules()):
        shard = plan.get(f"{name}.weight")
        if shard is None:
            continue
        weight = shard.take(module.weight.data)  # copies (take's docstring)
        bias = plan[f"{name}.bias"].take(module.bias.data) if shard.kind != "row" else module.bias.data.clone()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, sharded_linear(shard, weight, bias, group))
    for block in (*model.double_blocks, *model.single_blocks):
        block.num_heads = params.num_heads // degree  # the blocks' rearranges cut the local heads
    for block in model.single_blocks:
        block.hidden_size = params.hidden_size // degree  # linear1's local rows: 3 h/T of qkv, then the MLP's
    return model.requires_grad_(False)


def parallelize_tensor(model: nn.Module, ctx: ParallelContext) -> nn.Module:
    """Shard `model` (full weights, identical on every rank) in place over ctx's tensor axis and return
    it; a model already sharded (load_tensor_shards) is returned as it is. Inputs and outputs of the
    sharded model are whole and identical on every rank of a tensor group. Refuses heads that do not
    divide by ctx.tensor_degree on every rank, before the first collective (building the mesh)."""
    check_tensor_degree_of(model.params.num_heads, ctx.tensor_degree)
    if ctx.tensor_degree == 1 or is_tensor_sharded(model):
        return model
    plain = {f"{name}.weight" for name, m in model.named_modules() if type(m) is nn.Linear}
    split = shard_plan(model.params, 0, ctx.tensor_degree)
    other = sorted(n for n in split if n.endswith(".weight") and n not in plain)
    if other:  # e.g. FP8 linears (flux/quantize.py), which keep their weights in their own format
        raise ValueError(f"tensor parallelism splits nn.Linear weights; {other[0]} belongs to another kind of "
                         "layer (fp8?), which tensor_degree > 1 does not support")
    return shard_modules(model, ctx.rank("tensor"), ctx.tensor_degree, ctx.group("tensor"))


def load_tensor_shards(model: nn.Module, file: str, rank: int, degree: int, dtype: torch.dtype,
                       device: torch.device | str = "cpu") -> tuple[nn.Module, int]:
    """Fill `model`, built on the meta device and sharded by shard_modules(model, rank, degree, ...),
    from a BFL safetensors file (our parameter names), reading only this rank's slices with
    safe_open(...).get_slice: peak memory while loading is this rank's share. Strict: a name missing
    from the file, or one in the file the model does not have, is an error naming it. Returns the
    model and the bytes read from the file."""
    plan = shard_plan(model.params, rank, degree)
    expected = model.state_dict(keep_vars=True)
    state, read = {}, 0
    with safe_open(str(file), framework="pt", device="cpu") as handle:
        _check_names(file, expected.keys(), set(handle.keys()))
    for name, param in expected.items():
        # mapped anew per tensor: the file pages a column slice touches (every row's) leave with the mapping
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            shard = plan.get(name)
            tensor = handle.get_tensor(name) if shard is None else shard.take(handle.get_slice(name))
            read += tensor.numel() * tensor.element_size()
            if tensor.shape != param.shape:
                raise ValueError(f"{file}: {name} gives a {list(tensor.shape)} slice, the sharded model holds "
                                 f"{list(param.shape)}")
            state[name] = tensor.to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False), read


def _check_names(file, ours, theirs: set) -> None:
    missing, unexpected = sorted(set(ours) - theirs), sorted(theirs - set(ours))
    if missing or unexpected:
        raise ValueError(f"{file} does not match the transformer: missing {missing[:4]}, unexpected {unexpected[:4]}")

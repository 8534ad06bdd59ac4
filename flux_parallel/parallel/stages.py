"""PipeFusion's stages: FLUX's blocks cut into contiguous ranges, and the seam that runs one range.

The double blocks and then the single blocks form one list of depth + depth_single_blocks blocks;
stage s runs a contiguous range of it. The embedders (img_in, txt_in and the conditioning vector's
MLPs) belong to the first stage, the final layer to the last. The functions below run those pieces
with the model's own public modules, in the order Flux.forward runs them, so a chain of stages
computes exactly what Flux.forward does and flux/model.py stays single-device code.

Balance rule: the stages hold equal shares of the WEIGHTS. PipeFusion is what one picks when the
weights do not fit on one device (Fang et al. 2024: the weights per device fall as 1/N), so
its split balances bytes. A block weighs its parameter count, from the shapes (hidden h, MLP width
m, head dim d; biases and the q/k RMSNorm scales included, `block_weights`):
- a double block holds two streams, each with its modulation (h x 6h), qkv (h x 3h), q/k norm
  scales (2d), proj (h x h) and MLP (h x m, m x h): 2 (10h^2 + 2hm) + small terms;
- a single block: modulation (h x 3h), linear1 (h x (3h + m)), linear2 ((h + m) x h): 7h^2 + 2hm.
At FLUX's m = 4h that is 36h^2 against 15h^2: a double block weighs 2.4 single blocks. The
embedders count with the first block and the final layer with the last, since their stages hold
them; a stage's share then differs from an equal one by less than one block.

The trade-off: per token a double block COMPUTES what a single one does (`block_flops`: a token
meets only its own stream's qkv, proj and MLP, 4h^2 + 2hm, as many multiply-adds as a single
block's linear1 and linear2). So the weight-balanced split gives the first stage, with the double
blocks, fewer blocks and the last stage more, and a pipeline runs at the pace of its slowest stage.
FLUX.1 on 2 stages: 17 double blocks (0.49x of the bytes) against 2 double + 38 single (0.51x, and
40/57 of the compute). Explicit `stage_sizes` (ParallelContext.pipefusion_stage_sizes) override the
split; `balance="compute"` gives the compute-balanced sizes to pass there (19 double + 9 single
against 29 single on FLUX.1: 0.65x of the bytes on stage 0), and tools/plan.py prints them.
"""

import torch
from torch import Tensor, nn

from flux_parallel.kernels import rope_table


def _linear(fan_in: int, fan_out: int, bias: bool = True) -> int:
    return fan_in * fan_out + fan_out * bias


def block_weights(params, kind: str) -> int:
    """Parameters of one block ("double" or "single"), from the shapes; see the module docstring."""
    h, m, d = params.hidden_size, params.mlp_hidden_dim, params.head_dim
    if kind == "double":  # per stream: modulation, qkv, q/k norm scales, proj, MLP
        stream = _linear(h, 6 * h) + _linear(h, 3 * h, params.qkv_bias) + 2 * d + _linear(h, h)
        return 2 * (stream + _linear(h, m) + _linear(m, h))
    return _linear(h, 3 * h) + _linear(h, 3 * h + m) + 2 * d + _linear(h + m, h)


def embedder_weights(params) -> int:
    """Parameters of the first stage's embedders: img_in, txt_in and the conditioning vector's MLPs."""
    h = params.hidden_size
    mlps = [256, params.vec_in_dim] + [256] * params.guidance_embed  # time_in, vector_in, guidance_in
    return _linear(params.in_channels, h) + _linear(params.context_in_dim, h) + sum(
        _linear(n, h) + _linear(h, h) for n in mlps)


def final_weights(params) -> int:
    """Parameters of the last stage's final layer: its modulation and output projection."""
    return _linear(params.hidden_size, 2 * params.hidden_size) + _linear(params.hidden_size, params.out_channels)


def block_flops(params, kind: str) -> int:
    """Multiply-adds per token of one block's linear layers ("double" or "single"): the same for both
    kinds, 4h^2 + 2hm (a double block sends a token through its own stream's weights only)."""
    h, m = params.hidden_size, params.mlp_hidden_dim
    if kind == "double":
        return 3 * h * h + h * h + 2 * h * m
    return h * (3 * h + m) + (h + m) * h


def split_stages(params, degree: int, stage_sizes: tuple[int, ...] | None = None,
                 balance: str = "weights") -> list[range]:
    """The block range of each of `degree` stages: `stage_sizes` blocks each when given, else cut where
    the running cost (`balance`: "weights", the default, or "compute") is nearest to an equal share.
    Raises one sentence for an impossible split."""
    kinds = ["double"] * params.depth + ["single"] * params.depth_single_blocks
    total = len(kinds)
    if degree > total:
        raise ValueError(f"pipefusion_degree {degree} is more than the model's {total} transformer blocks "
                         f"({params.depth} double + {params.depth_single_blocks} single): every stage needs a block")
    if stage_sizes is not None:
        if len(stage_sizes) != degree or min(stage_sizes) < 1 or sum(stage_sizes) != total:
            raise ValueError(f"pipefusion stage sizes {list(stage_sizes)} must be {degree} positive block counts "
                             f"adding up to the model's {total} blocks")
        sizes = list(stage_sizes)
    elif balance == "compute":
        sizes = _balanced_sizes([block_flops(params, k) for k in kinds], degree)
    else:
        costs = [block_weights(params, k) for k in kinds]
        costs[0] += embedder_weights(params)  # they live on the first block's stage
        costs[-1] += final_weights(params)
        sizes = _balanced_sizes(costs, degree)
    bounds = [sum(sizes[:s]) for s in range(degree + 1)]
    return [range(bounds[s], bounds[s + 1]) for s in range(degree)]


def _balanced_sizes(costs: list[int], degree: int) -> list[int]:
    """Cut k after the block whose running cost is nearest k/degree of the total, each stage non-empty."""
    running = [sum(costs[: i + 1]) for i in range(len(costs))]
    cuts = [0]
    for k in range(1, degree):
        share = running[-1] * k / degree
        lowest, highest = cuts[-1] + 1, len(costs) - (degree - k)  # leave a block for every later stage
        cuts.append(min(range(lowest, highest + 1), key=lambda end: abs(running[end - 1] - share)))
    cuts.append(len(costs))
    return [cuts[s + 1] - cuts[s] for s in range(degree)]


def stage_prefixes(params, blocks: range, first: bool, last: bool) -> tuple[str, ...]:
    """The parameter names a stage needs begin with these: its blocks, the embedders on the first stage,
    the final layer on the last."""
    depth = params.depth
    prefixes = [f"double_blocks.{i}." if i < depth else f"single_blocks.{i - depth}." for i in blocks]
    if first:
        prefixes += ["img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in."]
    if last:
        prefixes += ["final_layer."]
    return tuple(prefixes)


def stage_filter(ctx):
    """For loaders: keep(params) -> a test on parameter names, true for this rank's PipeFusion stage.
    None without stages (every rank holds the whole model). The split is validated before this rank's
    stage index is asked for (which builds ctx's mesh, a collective), so a bad split is refused
    identically on every rank."""
    if ctx.pipefusion_degree == 1:
        return None

    def keep(params):
        ranges = split_stages(params, ctx.pipefusion_degree, ctx.pipefusion_stage_sizes)
        stage = ctx.rank("pipefusion")
        prefixes = stage_prefixes(params, ranges[stage], stage == 0, stage == len(ranges) - 1)
        return lambda name: name.startswith(prefixes)

    return keep


def release_other_stages(model: nn.Module, keep) -> nn.Module:
    """Move the parameters `keep` rejects to the meta device, in place, freeing their memory: for models
    built in memory (seeded tiny weights); checkpoints load only the stage's tensors instead."""
    for name, param in list(model.named_parameters()):
        if not keep(name):
            owner = model.get_submodule(name.rpartition(".")[0])
            setattr(owner, name.rpartition(".")[2], nn.Parameter(param.to("meta"), requires_grad=False))
    return model


def stage_blocks(model: nn.Module, blocks: range) -> list[nn.Module]:
    depth = model.params.depth
    return [model.double_blocks[i] if i < depth else model.single_blocks[i - depth] for i in blocks]


def conditioning(model: nn.Module, timesteps: Tensor, y: Tensor, guidance: Tensor | None) -> Tensor:
    """The vector every block is modulated by, [B, hidden], as Flux.forward computes it (first stage)."""
    return model.conditioning(timesteps, y, guidance)


def embed_image(model: nn.Module, img: Tensor) -> Tensor:
    """Packed latents [B, L, 64] -> image hidden states [B, L, hidden] (first stage)."""
    return model.img_in(img.to(model.img_in.weight.dtype))


def embed_text(model: nn.Module, txt: Tensor) -> Tensor:
    """T5 states [B, S, context_in_dim] -> text hidden states [B, S, hidden] (first stage)."""
    return model.txt_in(txt.to(model.txt_in.weight.dtype))


def rope(model: nn.Module, txt_ids: Tensor, img_ids: Tensor) -> tuple[Tensor, Tensor]:
    """The rotary table of [txt; img] (no weights: every stage builds its own)."""
    return rope_table(torch.cat((txt_ids, img_ids), dim=1), model.params.axes_dim, model.params.theta)


def run_blocks(model: nn.Module, blocks: range, img: Tensor, txt: Tensor, vec: Tensor, pe,
               img_modulated=None) -> tuple[Tensor, Tensor]:
    """Blocks `blocks` of the concatenated list on (img [B, L, hidden], txt [B, S, hidden]) -> the new
    (img, txt). Single blocks run on [txt; img] as Flux.forward does; the streams are split again at
    the end so that every stage boundary carries the same two tensors. The same operations, in the same
    order, as that part of the whole stack. img_modulated: the first double block's modulate_img, handed
    to it where computed already (a step cache's indicator)."""
    depth = model.params.depth
    for i in (i for i in blocks if i < depth):
        handed = (img_modulated,) if i == blocks.start and img_modulated is not None else ()
        img, txt = model.double_blocks[i](img, txt, vec, pe, *handed)
    singles = [i - depth for i in blocks if i >= depth]
    if singles:
        x = torch.cat((txt, img), dim=1)  # [B, S + L, hidden]
        for j in singles:
            x = model.single_blocks[j](x, vec, pe)
        txt, img = x[:, : txt.shape[1]], x[:, txt.shape[1] :]
    return img, txt


def final(model: nn.Module, img: Tensor, vec: Tensor) -> Tensor:
    """Image hidden states -> the velocity prediction [B, L, out_channels] (last stage)."""
    return model.final_layer(img, vec)

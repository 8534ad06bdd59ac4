"""PipeFusion's stages: FLUX's blocks cut into contiguous ranges, and the seam that runs one range.

The double blocks and then the single blocks form one list of depth + depth_single_blocks blocks;
stage s runs a contiguous range of it. The embedders (img_in, txt_in and the conditioning vector's
MLPs) belong to the first stage, the final layer to the last. The functions below run those pieces
with the model's own public modules, in the order Flux.forward runs them, so a chain of stages
computes exactly what Flux.forward does and flux/model.py stays single-device code.

Balance rule (`block_cost`): a stage's cost is the multiply-adds per token of its blocks' linear
layers. From the shapes (hidden h, MLP width m):
- a double block sends each token through its own stream's qkv (h x 3h), proj (h x h) and MLP
  (h x m + m x h): 4h^2 + 2hm;
- a single block runs linear1 (h x (3h + m)) and linear2 ((h + m) x h): 4h^2 + 2hm as well.
Attention over the joint sequence is the same in both kinds. So per token a double block costs what
a single block costs (12 h^2 at FLUX's m = 4h), although it holds twice the weights: a text token
meets only the text half, an image token only the image half. The split balances compute, which is
what sets a pipeline's pace; the first stages then hold more parameter bytes (FLUX.1, 2 stages:
19 double + 9 single blocks against 29 single ones). `stage_sizes` overrides the split.
"""

import torch
from torch import Tensor, nn

from kernels import rope_table


def block_cost(params, kind: str) -> int:
    """Multiply-adds per token of one block's linear layers ("double" or "single"); see the module docstring."""
    h, m = params.hidden_size, params.mlp_hidden_dim
    if kind == "double":
        return 3 * h * h + h * h + 2 * h * m
    return h * (3 * h + m) + (h + m) * h


def split_stages(params, degree: int, stage_sizes: tuple[int, ...] | None = None) -> list[range]:
    """The block range of each of `degree` stages: `stage_sizes` blocks each when given, else cut where
    the running cost is nearest to an equal share. Raises one sentence for an impossible split."""
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
    else:
        sizes = _balanced_sizes([block_cost(params, k) for k in kinds], degree)
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
    from flux.layers import timestep_embedding  # here: flux.pipeline imports this package while it loads

    dtype = model.img_in.weight.dtype
    vec = model.time_in(timestep_embedding(timesteps, 256).to(dtype))
    if model.guidance_in is not None:
        vec = vec + model.guidance_in(timestep_embedding(guidance, 256).to(dtype))
    return vec + model.vector_in(y.to(dtype))


def embed_image(model: nn.Module, img: Tensor) -> Tensor:
    """Packed latents [B, L, 64] -> image hidden states [B, L, hidden] (first stage)."""
    return model.img_in(img.to(model.img_in.weight.dtype))


def embed_text(model: nn.Module, txt: Tensor) -> Tensor:
    """T5 states [B, S, context_in_dim] -> text hidden states [B, S, hidden] (first stage)."""
    return model.txt_in(txt.to(model.txt_in.weight.dtype))


def rope(model: nn.Module, txt_ids: Tensor, img_ids: Tensor) -> tuple[Tensor, Tensor]:
    """The rotary table of [txt; img] (no weights: every stage builds its own)."""
    return rope_table(torch.cat((txt_ids, img_ids), dim=1), model.params.axes_dim, model.params.theta)


def run_blocks(model: nn.Module, blocks: range, img: Tensor, txt: Tensor, vec: Tensor, pe) -> tuple[Tensor, Tensor]:
    """Blocks `blocks` of the concatenated list on (img [B, L, hidden], txt [B, S, hidden]) -> the new
    (img, txt). Single blocks run on [txt; img] as Flux.forward does; the streams are split again at
    the end so that every stage boundary carries the same two tensors."""
    depth = model.params.depth
    for i in (i for i in blocks if i < depth):
        img, txt = model.double_blocks[i](img, txt, vec, pe)
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

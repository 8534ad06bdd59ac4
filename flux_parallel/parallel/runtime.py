"""The one entry point the pipeline calls: every axis of the mesh, composed around the denoising loop.

    denoiser = parallelize(transformer, ctx)                  # once; modified only by tensor parallelism
    run = denoiser.start(img, img_ids, conds, guidance, true_cfg_scale)   # per generation
    img = run.finish(denoise(run.velocity, run.img, timesteps))  # the pipeline's Euler loop (flux/sampling.py)
    img = run.denoise(timesteps, on_step)                     # or, under PipeFusion, its own patch schedule

- sp (ring x ulysses): the tokens of each image are sharded over the sp group (parallel/apply.py);
  between steps a rank keeps only its rows, since the Euler update is elementwise.
- cfg: true classifier-free guidance runs the transformer on the negative and the positive
  conditioning. With cfg_degree 2 the two halves of the mesh run one branch each (cfg rank 0 the
  negative, rank 1 the positive, as xDiT orders them), exchange their predictions with one
  all-gather per step, and all apply the same combination, so the latents stay identical
  everywhere. On one cfg rank both branches run as one forward on the doubled batch.
- data: each replica makes a contiguous chunk of the batch (`batch_slice`); the images meet on
  global rank 0 at the end (`gather_batch`). Noise is drawn per image, so image i is the same
  whichever replica makes it.
- pipefusion: the blocks in stages along the pipefusion axis, the image in patches flowing through
  them (parallel/pipefusion.py); its generation drives its own denoising loop.
- tensor: every block's heads and MLP columns split over the innermost axis (parallel/tensor.py); the
  transformer is sharded in place once, here, and its inputs and outputs stay whole on every
  tensor rank, so the axes above see an ordinary model.
- The parallel VAE decodes across all ranks of one replica (`decode`).
- Image conditioning (`ImageCond`): Fill's and Control's extra channels are sharded with the tokens they
  belong to; Kontext's reference tokens are part of the sharded sequence and held fixed in the loop.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from flux_parallel.parallel import comm
from flux_parallel.parallel.apply import check_heads, parallelize_flux
from flux_parallel.parallel.cache import cache_report, cache_swaps, sp_fold, sp_sums
from flux_parallel.parallel.context import ParallelContext
from flux_parallel.parallel.halo import split_rows
from flux_parallel.parallel.pipefusion import PipeFusionGeneration, patch_bounds
from flux_parallel.parallel.sequence import shard_sizes
from flux_parallel.parallel.stages import split_stages, stage_prefixes
from flux_parallel.parallel.stripes import decode_in_stripes
from flux_parallel.parallel.swap import swapped
from flux_parallel.parallel.tensor import parallelize_tensor
from flux_parallel.parallel.vae import decode_parallel, encode_parallel

BRANCHES = ("negative", "positive")  # in cfg rank order


@dataclass(frozen=True)
class Conditioning:
    """One branch's text conditioning, for the whole batch of this replica."""

    txt: Tensor  # [B, S, context_in_dim] T5 hidden states
    txt_ids: Tensor  # [B, S, 3]
    y: Tensor  # [B, vec_in_dim] CLIP pooled output


@dataclass(frozen=True)
class ImageCond:
    """What an image-conditioned FLUX.1 adds to the packed state img [B, L, 64] of a generation.

    channels: [B, L, C] fed to the transformer after the state's 64 channels every step (Fill's masked
    image and mask, C = 320; Canny/Depth's control image, C = 64), sharded with the state's tokens.
    out_len: only the first out_len tokens are integrated; the rest (Kontext's reference tokens,
    appended after the output tokens) get a zero velocity, so the Euler update leaves them exactly
    unchanged. The sp layout thus covers the whole [output; reference] sequence and the reference
    tokens are sharded like the others, with no special case in the loop or the attention.
    """

    channels: Tensor | None = None
    out_len: int | None = None


def parallelize(model: nn.Module, ctx: ParallelContext, attention_backend: str = "auto") -> "ParallelDenoiser":
    """The denoiser for `model` on every axis of ctx; its sequence-parallel attention runs kernels
    backend `attention_backend`. Call it on every rank (it builds ctx's mesh)."""
    return ParallelDenoiser(model, ctx, attention_backend)


class ParallelDenoiser:
    def __init__(self, model: nn.Module, ctx: ParallelContext, attention_backend: str = "auto"):
        self.ctx = ctx
        # PipeFusion's block range per stage, from the config alone: refused identically on every rank
        self.stages = split_stages(model.params, ctx.pipefusion_degree, ctx.pipefusion_stage_sizes)
        check_heads(model.params.num_heads, ctx)  # tensor and Ulysses degrees, before the mesh is built
        self.model = parallelize_tensor(model, ctx)  # in place: a tensor rank keeps only its slices
        self.sp = parallelize_flux(self.model, ctx, attention_backend)

    def parameter_bytes(self) -> int:
        """Bytes of the transformer's parameters this rank computes with: its stage's under PipeFusion."""
        prefixes = ("",)  # every name
        if self.ctx.uses_pipefusion:
            stage = self.ctx.rank("pipefusion")
            prefixes = stage_prefixes(self.model.params, self.stages[stage], stage == 0,
                                      stage == self.ctx.pipefusion_degree - 1)
        return sum(p.numel() * p.element_size() for name, p in self.model.named_parameters()
                   if name.startswith(prefixes))

    def branches(self, true_cfg: bool) -> tuple[str, ...]:
        """The CFG branches this rank computes: the text encoders need only encode these."""
        if not true_cfg:
            return ("positive",)
        return (BRANCHES[self.ctx.rank("cfg")],) if self.ctx.cfg_degree == 2 else BRANCHES

    def check(self, batch: int, txt_len: int, img_len: int, true_cfg: bool, rows: int | None = None,
              cache=None) -> None:
        """One sentence per impossible request, raised identically on every rank before any collective.
        rows: the image's rows of tokens (height / 16), for PipeFusion's patches; cache: the call's
        flux.cache.CacheConfig, or None."""
        ctx = self.ctx
        if ctx.uses_pipefusion and cache is not None:  # the decision is made on the first stage (pipefusion.py)
            check_stage_cache(cache, self.stages, ctx.sp_degree)
        if ctx.uses_pipefusion and rows is not None:
            if ctx.sp_degree > 1 and ctx.patches * ctx.sp_degree > rows:
                raise ValueError(f"num_pipeline_patch {ctx.patches} x sp degree {ctx.sp_degree} is more than the "
                                 f"{rows} rows of image tokens (height / 16): every sp rank needs a row of every patch")
            patch_bounds(rows, 1, ctx.patches)
        if ctx.cfg_degree == 2 and not true_cfg:
            raise ValueError("cfg_degree 2 runs the negative and the positive branch on two halves of the mesh: "
                             "it needs a negative prompt and true_cfg_scale > 1")
        if batch < ctx.data_degree:
            raise ValueError(f"{batch} image(s) cannot be split over {ctx.data_degree} data-parallel replicas: "
                             "each replica needs at least one image")
        self.sp.layout(txt_len, img_len)  # every sp rank needs an image token

    def start(self, img: Tensor, img_ids: Tensor, conds: dict[str, Conditioning], guidance: float | None,
              true_cfg_scale: float | None, cache=None, image_cond: ImageCond | None = None) -> "Generation":
        """img [B, L, 64] and img_ids [B, L, 3] full and identical on every rank of the replica; conds has
        the conditioning of each branch in self.branches(true_cfg_scale is not None). cache: a fresh
        flux.cache.StepCache for this generation's branches, summing over `cache_sums()`, or None.
        image_cond: what an image-conditioned model adds to img (Kontext, Fill, Canny/Depth)."""
        if self.ctx.uses_pipefusion:
            branches = tuple(b for b in BRANCHES if b in conds)
            stacked = Conditioning(*(torch.cat([getattr(conds[b], f) for b in branches])
                                     for f in ("txt", "txt_ids", "y")))
            blocks = self.stages[self.ctx.rank("pipefusion")]
            image_cond = image_cond or ImageCond()
            return PipeFusionGeneration(self.model, self.ctx, blocks, img, img_ids, stacked, len(branches), guidance,
                                        true_cfg_scale, image_cond.channels, image_cond.out_len, cache)
        return Generation(self, img, img_ids, conds, guidance, true_cfg_scale, cache, image_cond)

    def cache_sums(self):
        """For a step cache: this rank's indicator sums -> the image's (parallel/cache.py); None on one device."""
        return sp_sums(self.ctx)


def check_stage_cache(cache, stages: list[range], sp_degree: int) -> None:
    """One sentence when a step cache cannot run on these PipeFusion stages: the first compute_first blocks
    must lie on the first stage (which decides), the last compute_last on the last; no sp inside a stage."""
    total = stages[-1].stop
    if sp_degree > 1:  # an sp rank's tokens of a whole-image message are not its tokens of a patch
        raise ValueError(f"a step cache under PipeFusion needs sp degree 1 inside each stage, got {sp_degree}: "
                         "each rank keeps the cache of its own tokens, and those change between the whole-image "
                         "warm-up messages and the patches")
    if cache.blocks_first > len(stages[0]):
        raise ValueError(f"compute_first {cache.blocks_first} is more than the first PipeFusion stage's "
                         f"{len(stages[0])} blocks: the blocks the cache watches must run on the first stage")
    if cache.blocks_last > len(stages[-1]):
        raise ValueError(f"compute_last {cache.blocks_last} is more than the last PipeFusion stage's "
                         f"{len(stages[-1])} blocks (of {total}): the correcting blocks must run on the last stage")


class Generation:
    """One call's denoising on this rank: its token shards, its branches' conditioning, the CFG exchange."""

    def __init__(self, denoiser: ParallelDenoiser, img: Tensor, img_ids: Tensor, conds: dict[str, Conditioning],
                 guidance: float | None, true_cfg_scale: float | None, cache=None, image_cond: ImageCond | None = None):
        self.sp, self.ctx, self.scale = denoiser.sp, denoiser.ctx, true_cfg_scale
        self.branches = tuple(b for b in BRANCHES if b in conds)  # in the order the batch stacks them
        if cache is not None and tuple(cache.branches) != self.branches:
            raise ValueError(f"the step cache is for the branches {cache.branches}, this rank runs {self.branches}")
        self.cache = cache  # a step cache's state lives as long as this generation
        self.cache_report = None  # filled by finish
        batch = img.shape[0]
        # one forward for every branch on this rank: the conditioning stacked along the batch
        txt = torch.cat([conds[b].txt for b in self.branches])
        txt_ids = torch.cat([conds[b].txt_ids for b in self.branches])
        self.y = torch.cat([conds[b].y for b in self.branches])
        self.layout = self.sp.layout(txt.shape[1], img.shape[1])
        if cache is not None and self.ctx.sp_degree > 1:  # the decision's sums ride on the sp attention's exchanges
            cache.fold = sp_fold(self.ctx, self.sp.attention_for(self.layout))
        self.img, img_ids_l, self.txt, self.txt_ids = self.sp.shard(self.layout, img, img_ids, txt, txt_ids)
        self.img_ids = img_ids_l.repeat(len(self.branches), 1, 1)
        rows = len(self.branches) * batch
        self.guidance = None if guidance is None else torch.full((rows,), guidance, device=img.device)
        image_cond = image_cond or ImageCond()
        self.channels = None if image_cond.channels is None else self.local(image_cond.channels)
        # this rank's rows are [first, first + I_r) of the full sequence; those from out_len on are held fixed
        first = sum(self.layout.img_lens[: self.sp.sp_rank])
        out_len = img.shape[1] if image_cond.out_len is None else image_cond.out_len
        self.moving = min(max(out_len - first, 0), self.img.shape[1])

    def local(self, x: Tensor) -> Tensor:
        """This rank's rows of a full per-token tensor [B, L, ..] -> [B, I_r, ..], as the state is sharded."""
        return self.layout.shard(x, "img", self.sp.sp_rank)

    def velocity(self, img_local: Tensor, t: float) -> Tensor:
        """The (guided) velocity [B, I_r, C] of this rank's rows at time t, identical on all cfg ranks."""
        n = len(self.branches)
        t_vec = torch.full((n * img_local.shape[0],), t, device=img_local.device)
        model_input = img_local if self.channels is None else torch.cat((img_local, self.channels), dim=-1)
        with swapped(cache_swaps(self.sp.model, self.cache)):
            preds = self.sp(self.layout, model_input.repeat(n, 1, 1), self.img_ids, self.txt, self.txt_ids, t_vec,
                            self.y, self.guidance).float().chunk(n)
        if self.scale is None:
            velocity = preds[0]
        else:
            if n == 1:  # cfg_degree 2: [negative, positive] from the two cfg ranks, in cfg rank order
                preds = comm.all_gather(preds[0][None], self.ctx.group("cfg"), dim=0)
            negative, positive = preds[0], preds[1]
            velocity = negative + self.scale * (positive - negative)
        if self.moving < velocity.shape[1]:  # Kontext: the model's output on the reference tokens is discarded
            velocity = torch.cat((velocity[:, : self.moving], torch.zeros_like(velocity[:, self.moving :])), dim=1)
        return velocity

    def finish(self, img_local: Tensor) -> Tensor:
        """This rank's rows -> the full [B, L, C] on every rank of the replica."""
        self.cache_report = cache_report(self.cache, self.ctx)
        return self.sp.gather(self.layout, img_local)


PLACEMENTS = ("replicated", "rank0")  # where the text encoders live: every rank, or rank 0 of each replica


def holds_text_encoders(ctx: ParallelContext, placement: str) -> bool:
    """Whether this rank holds T5 and CLIP: every rank ("replicated"), or rank 0 of each data replica
    ("rank0"). Found from the mesh order (data outermost: a replica's ranks are contiguous) without
    building the mesh, so that a loader can decide before any collective."""
    if placement not in PLACEMENTS:
        raise ValueError(f"text_encoder_placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    return placement == "replicated" or not dist.is_initialized() or dist.get_rank() % ctx.replica_size == 0


def share_conditioning(conds: dict[str, Conditioning], branches: tuple[str, ...], shapes: dict[str, tuple],
                       dtype: torch.dtype, device, ctx: ParallelContext) -> dict[str, Conditioning]:
    """The conditioning of every branch in `branches`, encoded on replica rank 0 (conds, empty elsewhere),
    on every rank of the replica: one broadcast per tensor over the replica group. shapes: "txt", "txt_ids"
    and "y" -> the full shape every rank knows from the call (batch, max_sequence_length, widths)."""
    if ctx.replica_size == 1:
        return conds
    group, shared = ctx.group("replica"), {}
    for branch in branches:
        held = conds.get(branch)
        parts = [held.txt, held.txt_ids, held.y] if held is not None else [
            torch.empty(shapes[f], dtype=dtype, device=device) for f in ("txt", "txt_ids", "y")]
        shared[branch] = Conditioning(*(comm.broadcast(x.to(dtype).contiguous(), group, src=0) for x in parts))
    return shared


def batch_slice(total: int, ctx: ParallelContext) -> slice:
    """The contiguous chunk of a batch of `total` images that this rank's data replica makes."""
    sizes = shard_sizes(total, ctx.data_degree)
    start = sum(sizes[: ctx.rank("data")])
    return slice(start, start + sizes[ctx.rank("data")])


def gather_batch(images: Tensor | None, total: int, ctx: ParallelContext) -> Tensor | None:
    """Each replica's images [b_r, ...] on its main rank -> all `total` images, in order, on global rank 0."""
    if images is None or not ctx.is_replica_main:
        return None
    if ctx.data_degree > 1:
        images = comm.all_gather(images.contiguous(), ctx.group("data"), dim=0,
                                 sizes=shard_sizes(total, ctx.data_degree))
    return images if ctx.is_main else None


def check_decode(latent_rows: int, ctx: ParallelContext, parallel_vae: bool) -> None:
    """The parallel VAE needs a latent row per rank of the replica (raised before any collective)."""
    if parallel_vae and ctx.replica_size > 1:
        split_rows(latent_rows, ctx.replica_size)


def encode(vae: nn.Module, pixels: Tensor, ctx: ParallelContext, parallel_vae: bool) -> Tensor:
    """pixels [b, 3, H, W] in [-1, 1], the same on every rank of the replica -> the posterior mean's latents
    [b, 16, H/8, W/8] on every rank of it: across the replica with the parallel VAE, else on each rank."""
    if parallel_vae and ctx.replica_size > 1:
        return encode_parallel(vae, pixels, ctx.group("replica"))
    return vae.encode(pixels)


def decode(vae: nn.Module, latents: Tensor, ctx: ParallelContext, parallel_vae: bool,
           stripes: int | None) -> Tensor | None:
    """latents [b, 16, h, w], the same on every rank of the replica -> its images [b, 3, 8h, 8w] on the
    replica's main rank (None elsewhere): across the replica, in stripes on one device, or whole."""
    if parallel_vae and ctx.replica_size > 1:
        return decode_parallel(vae, latents, ctx.group("replica"))
    if not ctx.is_replica_main:
        return None
    return decode_in_stripes(vae, latents, stripes) if stripes else vae.decode(latents)

"""parallelize_flux: the one place where the sequence-parallel strategies meet the FLUX transformer.

Every rank holds the full weights. The image and text tokens are sharded along the sequence over
the sp group (parallel/sequence.py), their position ids with them, so each rank's rotary table
is the rows of the full one it needs and no rotary tensor is ever sent. Everything in a FLUX
block except attention is token-wise, so replacing each block's `attention_fn` (the seam in
flux/layers.py) with USP attention makes the whole forward exact, with no edit inside the model.

    sp_model = parallelize_flux(model, ctx)
    img_l, img_ids_l, txt_l, txt_ids_l = sp_model.shard(img, img_ids, txt, txt_ids)
    for t_curr, t_prev in ...:  # the Euler update is elementwise: keep only local rows between steps
        img_l = img_l + (t_prev - t_curr) * sp_model(img_l, img_ids_l, txt_l, txt_ids_l, t, y, guidance)
    img = sp_model.gather(img_l)  # once, after the loop
"""

from torch import Tensor, nn

from parallel import comm
from parallel.context import ParallelContext
from parallel.sequence import SequenceLayout, make_layout
from parallel.usp import USPAttention


def parallelize_flux(model: nn.Module, ctx: ParallelContext) -> "SequenceParallelFlux":
    """Install USP attention (ctx.ulysses_degree x ctx.ring_degree) in every block of `model`, in
    place, and return the wrapper that shards, runs and gathers. Call it on every rank: the first
    call builds ctx's mesh, a collective. With an sp degree of 1 the blocks keep their attention
    and the wrapper does no communication."""
    heads = model.params.num_heads
    # Checked on every rank from the same config, before the first collective (building the mesh).
    if heads % ctx.ulysses_degree:
        raise ValueError(f"num_heads {heads} is not divisible by ulysses_degree {ctx.ulysses_degree}: "
                         "every Ulysses rank must receive a whole number of heads")
    attention = None
    if ctx.sp_degree > 1:
        attention = USPAttention(ctx.group("ulysses"), ctx.group("ring"), ctx.rank("ring"), ctx.rank("sp"))
        for block in (*model.double_blocks, *model.single_blocks):
            block.attention_fn = attention
    return SequenceParallelFlux(model, ctx, attention)


class SequenceParallelFlux(nn.Module):
    """A FLUX transformer whose tokens are sharded over ctx's sp group. Made by parallelize_flux."""

    def __init__(self, model: nn.Module, ctx: ParallelContext, attention: USPAttention | None):
        super().__init__()
        self.model = model
        self.ctx = ctx
        self.attention = attention
        self.layout: SequenceLayout | None = None
        self.sp_rank = ctx.rank("sp")

    def shard(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor) -> tuple[Tensor, ...]:
        """Full inputs, identical on every rank (img [B, L, C], img_ids [B, L, 3], txt [B, S, C_txt],
        txt_ids [B, S, 3]) -> this sp rank's contiguous rows: [B, I_r, C], [B, I_r, 3], [B, T_r, C_txt],
        [B, T_r, 3], I_r and T_r as `shard_sizes` gives them. Records the layout for attention."""
        self.layout = make_layout(txt.shape[1], img.shape[1], self.ctx.ulysses_degree, self.ctx.ring_degree)
        if self.attention is not None:
            self.attention.layout = self.layout
        r = self.sp_rank
        streams = ((img, "img"), (img_ids, "img"), (txt, "txt"), (txt_ids, "txt"))
        return tuple(self.layout.shard(x, stream, r) for x, stream in streams)

    def forward(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor,
                y: Tensor, guidance: Tensor | None = None) -> Tensor:
        """Flux.forward on this rank's shards from `shard` -> this rank's prediction [B, I_r, C_out]."""
        self._check_local(img.shape[1], txt.shape[1])
        return self.model(img, img_ids, txt, txt_ids, timesteps, y, guidance)

    def gather(self, img_local: Tensor) -> Tensor:
        """This rank's image rows [B, I_r, ..] -> the full [B, L, ..] on every rank (one uneven all-gather)."""
        self._check_local(img_local.shape[1], None)
        if self.ctx.sp_degree == 1:
            return img_local
        return comm.all_gather(img_local, self.ctx.group("sp"), dim=1, sizes=list(self.layout.img_lens), replicated=True)

    def forward_full(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor,
                     y: Tensor, guidance: Tensor | None = None) -> Tensor:
        """shard + forward + gather: full inputs in, the full prediction [B, L, C_out] on every rank."""
        return self.gather(self(*self.shard(img, img_ids, txt, txt_ids), timesteps, y, guidance))

    def _check_local(self, img_len: int, txt_len: int | None) -> None:
        if self.layout is None:
            raise RuntimeError("call shard() on the full inputs before running or gathering the sharded model")
        want = (self.layout.img_lens[self.sp_rank], self.layout.txt_lens[self.sp_rank])
        if img_len != want[0] or (txt_len is not None and txt_len != want[1]):
            raise ValueError(f"sp rank {self.sp_rank} got {img_len} image and {txt_len} text tokens, "
                             f"shard() gave it {want[0]} and {want[1]}")


def sync_gradients(model: nn.Module, ctx: ParallelContext) -> None:
    """After backward on every rank: sum each parameter's gradient over the sp group, in place.

    Each sp rank's gradient holds what its own token rows contributed (the collectives carry the
    rest back to the rank that owns it), so the sum is the one-device gradient, whether each rank
    took its loss on its own rows or every rank took the same loss on the gathered output.
    """
    if ctx.sp_degree == 1:
        return
    for param in model.parameters():
        if param.grad is not None:
            comm.all_reduce(param.grad, ctx.group("sp"))

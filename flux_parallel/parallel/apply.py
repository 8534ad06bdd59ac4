"""Sequence parallelism for the FLUX transformer: shard the tokens, swap the attention seam, gather.

Every rank holds the full weights. The image and text tokens are sharded along the sequence over
the sp group (parallel/sequence.py), their position ids with them, so each rank's rotary table
is the rows of the full one it needs and no rotary tensor is ever sent. Everything in a FLUX
block except attention is token-wise, so swapping each block's `attention_fn` (the seam in
flux/layers.py) for USP attention during the call makes the whole forward exact, with no edit
inside the model. The layout of the shards is passed explicitly to every call.

    sp = parallelize_flux(model, ctx)
    layout = sp.layout(txt_len, img_len)        # the same on every rank, no collective
    img_l, img_ids_l, txt_l, txt_ids_l = sp.shard(layout, img, img_ids, txt, txt_ids)
    for t_curr, t_prev in ...:  # the Euler update is elementwise: keep only local rows between steps
        img_l = img_l + (t_prev - t_curr) * sp(layout, img_l, img_ids_l, txt_l, txt_ids_l, t, y, guidance)
    img = sp.gather(layout, img_l)              # once, after the loop
"""

from torch import Tensor, nn

from flux_parallel.parallel import comm
from flux_parallel.parallel.context import ParallelContext
from flux_parallel.parallel.sequence import SequenceLayout, make_layout
from flux_parallel.parallel.swap import attention_swaps, swapped
from flux_parallel.parallel.tensor import check_tensor_degree_of
from flux_parallel.parallel.usp import USPAttention


def parallelize_flux(model: nn.Module, ctx: ParallelContext, attention_backend: str = "auto") -> "SequenceParallelFlux":
    """The sequence-parallel view of `model` over ctx's sp group (ctx.ulysses_degree x ctx.ring_degree),
    its attention run with kernels backend `attention_backend`. `model` is not modified. Call it on
    every rank: the first call builds ctx's mesh, a collective. With an sp degree of 1 the view runs
    the model as it is (its own attention_fn) and does no communication."""
    check_heads(model.params.num_heads, ctx)
    return SequenceParallelFlux(model, ctx, attention_backend)


def check_heads(heads: int, ctx: ParallelContext) -> None:
    """One sentence when the heads cannot be split over the tensor axis, then each tensor rank's heads
    over the Ulysses axis. Checked on every rank from the same config, before the first collective."""
    check_tensor_degree_of(heads, ctx.tensor_degree)
    local = heads // ctx.tensor_degree
    if local % ctx.ulysses_degree == 0:
        if ctx.ulysses_chunks is not None and ctx.ulysses_chunks > local // ctx.ulysses_degree:
            raise ValueError(f"ulysses_chunks {ctx.ulysses_chunks} exceeds the {local // ctx.ulysses_degree} heads "
                             f"each Ulysses rank receives ({local} heads over ulysses_degree {ctx.ulysses_degree})")
        return
    if ctx.tensor_degree == 1:
        raise ValueError(f"num_heads {heads} is not divisible by ulysses_degree {ctx.ulysses_degree}: "
                         "every Ulysses rank must receive a whole number of heads")
    raise ValueError(f"num_heads {heads} over tensor_degree {ctx.tensor_degree} leaves {local} heads per rank, "
                     f"not divisible by ulysses_degree {ctx.ulysses_degree}: every Ulysses rank must receive "
                     "a whole number of heads")


class SequenceParallelFlux(nn.Module):
    """A FLUX transformer whose tokens are sharded over ctx's sp group. Made by parallelize_flux."""

    def __init__(self, model: nn.Module, ctx: ParallelContext, attention_backend: str = "auto"):
        super().__init__()
        self.model = model
        self.ctx = ctx
        self.attention_backend = attention_backend
        self.sp_rank = ctx.rank("sp")
        self._attention: dict[SequenceLayout, USPAttention] = {}  # one per layout: the same object every step

    def layout(self, txt_len: int, img_len: int) -> SequenceLayout:
        """How txt_len text and img_len image tokens are split over the sp group."""
        return make_layout(txt_len, img_len, self.ctx.ulysses_degree, self.ctx.ring_degree)

    def shard(self, layout: SequenceLayout, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor):
        """Full inputs, identical on every rank (img [B, L, C], img_ids [B, L, 3], txt [B, S, C_txt],
        txt_ids [B, S, 3]) -> this sp rank's contiguous rows: [B, I_r, C], [B, I_r, 3], [B, T_r, C_txt],
        [B, T_r, 3], I_r and T_r as the layout gives them."""
        streams = ((img, "img"), (img_ids, "img"), (txt, "txt"), (txt_ids, "txt"))
        return tuple(layout.shard(x, stream, self.sp_rank) for x, stream in streams)

    def forward(self, layout: SequenceLayout, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor,
                timesteps: Tensor, y: Tensor, guidance: Tensor | None = None) -> Tensor:
        """Flux.forward on this rank's shards from `shard` -> this rank's prediction [B, I_r, C_out]."""
        self._check_local(layout, img.shape[1], txt.shape[1])
        if self.ctx.sp_degree == 1:
            return self.model(img, img_ids, txt, txt_ids, timesteps, y, guidance)
        with swapped(attention_swaps(self.model, self.attention_for(layout))):
            return self.model(img, img_ids, txt, txt_ids, timesteps, y, guidance)

    def gather(self, layout: SequenceLayout, img_local: Tensor) -> Tensor:
        """This rank's image rows [B, I_r, ..] -> the full [B, L, ..] on every rank (one uneven all-gather).
        In grad mode every rank is taken to compute the same thing from the result (see comm.all_gather)."""
        self._check_local(layout, img_local.shape[1], None)
        if self.ctx.sp_degree == 1:
            return img_local
        return comm.all_gather(img_local, self.ctx.group("sp"), dim=1, sizes=list(layout.img_lens), replicated=True)

    def forward_full(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor,
                     y: Tensor, guidance: Tensor | None = None) -> Tensor:
        """shard + forward + gather: full inputs in, the full prediction [B, L, C_out] on every rank."""
        layout = self.layout(txt.shape[1], img.shape[1])
        local = self(layout, *self.shard(layout, img, img_ids, txt, txt_ids), timesteps, y, guidance)
        return self.gather(layout, local)

    def attention_for(self, layout: SequenceLayout) -> USPAttention:
        """The attention_fn the blocks call during a forward with `layout`: one object per layout."""
        if layout not in self._attention:
            ctx = self.ctx
            self._attention[layout] = USPAttention(ctx.group("ulysses"), ctx.group("ring"), ctx.rank("ring"),
                                                   self.sp_rank, layout, self.attention_backend, ctx.comm_dtype,
                                                   ctx.ulysses_chunks)
        return self._attention[layout]

    def _check_local(self, layout: SequenceLayout, img_len: int, txt_len: int | None) -> None:
        want = (layout.img_lens[self.sp_rank], layout.txt_lens[self.sp_rank])
        if img_len != want[0] or (txt_len is not None and txt_len != want[1]):
            raise ValueError(f"sp rank {self.sp_rank} got {img_len} image and {txt_len} text tokens, "
                             f"its layout gives it {want[0]} and {want[1]}")


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

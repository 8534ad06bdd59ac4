"""Every collective and point-to-point call of the project goes through this module.

Functions are group-first plain functions. `count_comm()` turns on byte and time accounting
per kind of call; when it is off (the default) the accounting costs one `is None` test.
"""

import contextlib
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class CommStats:
    """Bytes this rank sent and seconds it spent blocked, per kind of call; bytes also per mesh axis."""

    bytes: dict = field(default_factory=lambda: defaultdict(int))
    seconds: dict = field(default_factory=lambda: defaultdict(float))
    calls: dict = field(default_factory=lambda: defaultdict(int))
    axis_bytes: dict = field(default_factory=lambda: defaultdict(int))

    def add(self, kind: str, axis: str, nbytes: int, seconds: float) -> None:
        self.bytes[kind] += nbytes
        self.seconds[kind] += seconds
        self.calls[kind] += 1
        self.axis_bytes[axis] += nbytes

    def as_dict(self) -> dict:
        return {k: {"bytes": self.bytes[k], "seconds": self.seconds[k], "calls": self.calls[k]} for k in self.bytes}


# --comm-dtype: what the all-to-alls and ring sends may carry instead of the activations' own dtype. bf16
# halves fp32's bytes (a rounding of ~3 significant digits); fp8 (e4m3) quarters them, each tensor scaled
# by its own amax / 448 so that it uses the whole fp8 range, the scale travelling with it. Approximate.
WIRE_DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
FP8_MAX = 448.0  # the largest finite float8_e4m3fn


def to_wire(x: Tensor, wire: str) -> tuple[Tensor, Tensor | None]:
    """x -> (what travels, its fp8 scale [1] fp32 or None): x in bf16, or x / scale in fp8 seen as uint8
    bytes (gloo sends no float8)."""
    if wire == "bf16":
        return x.to(torch.bfloat16), None
    scale = (x.detach().abs().amax().float() / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny).reshape(1)
    return (x.float() / scale).to(torch.float8_e4m3fn).view(torch.uint8), scale


def from_wire(payload: Tensor, scale: Tensor | None, dtype: torch.dtype) -> Tensor:
    """to_wire's inverse, up to the wire's rounding: back in `dtype`."""
    if scale is None:
        return payload.to(dtype)
    return (payload.view(torch.float8_e4m3fn).float() * scale).to(dtype)


_stats: CommStats | None = None
_axis_of_group: dict[str, str] = {}  # process group name -> the mesh axis it belongs to


def name_group(group, axis: str) -> None:
    """Attribute the bytes sent over `group` to mesh axis `axis` (ParallelContext names its groups)."""
    _axis_of_group.setdefault(group.group_name, axis)


@contextlib.contextmanager
def count_comm():
    """with count_comm() as stats: ... -> stats.bytes['all_to_all'] etc."""
    global _stats
    previous, _stats = _stats, CommStats()
    try:
        yield _stats
    finally:
        _stats = previous


def _record(kind: str, group, nbytes: int, start: float) -> None:
    if _stats is not None:
        axis = _axis_of_group.get((group or dist.group.WORLD).group_name, "world")
        _stats.add(kind, axis, nbytes, time.perf_counter() - start)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def all_to_all(
    x: Tensor,
    group,
    scatter_dim: int,
    gather_dim: int,
    scatter_sizes: list[int] | None = None,
    gather_sizes: list[int] | None = None,
    wire: str | None = None,
    payload: "Payload | None" = None,
) -> Tensor:
    """Split x along scatter_dim, send piece j to rank j, concatenate what arrives along gather_dim.

    Uneven shards: `scatter_sizes[j]` is the length of piece j (None: x.chunk(P) even pieces) and
    `gather_sizes[j]` is rank j's length along gather_dim (None: all equal to x's). Every rank
    passes the same lists. Shapes: [.., S, .., G_r, ..] -> [.., S_r, .., sum(G), ..].
    Differentiable: the gradient goes back by the inverse all-to-all (its adjoint). `wire` ("bf16",
    "fp8", None: x's dtype) is what travels, each piece scaled on its own for fp8 (WIRE_DTYPES); in grad
    mode x travels as it is. `payload` (Payload) rides along to every rank and arrives before x's pieces
    are unpacked.
    """
    world = dist.get_world_size(group)
    gather_sizes = gather_sizes or [x.shape[gather_dim]] * world
    if torch.is_grad_enabled() and x.requires_grad:
        if payload is not None:
            raise ValueError("all_to_all: a payload rides only on a no-grad exchange")
        return _AllToAll.apply(x, group, scatter_dim, gather_dim, scatter_sizes, gather_sizes)
    return _all_to_all(x, group, scatter_dim, gather_dim, scatter_sizes, gather_sizes, wire, payload)


def _all_to_all(x: Tensor, group, scatter_dim: int, gather_dim: int, scatter_sizes: list[int] | None,
                gather_sizes: list[int], wire: str | None = None, payload: "Payload | None" = None) -> Tensor:
    return all_to_all_start(x, group, scatter_dim, gather_dim, scatter_sizes, gather_sizes, wire, payload).wait()


def all_to_all_start(x: Tensor, group, scatter_dim: int, gather_dim: int, scatter_sizes: list[int] | None = None,
                     gather_sizes: list[int] | None = None, wire: str | None = None, payload: "Payload | None" = None,
                     out: Tensor | None = None) -> "PendingAllToAll":
    """all_to_all posted asynchronously (no grad): the data leaves while the caller computes, and
    `.wait()` returns the result (written into `out` when given, a view of the right shape, e.g. a
    head slice of a larger tensor). The seconds recorded are those blocked in `wait`."""
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    gather_sizes = gather_sizes or [x.shape[gather_dim]] * world
    if len(gather_sizes) != world or gather_sizes[rank] != x.shape[gather_dim]:
        raise ValueError(f"all_to_all: this rank holds {x.shape[gather_dim]} rows along dim {gather_dim}, the layout "
                         f"{gather_sizes} says {gather_sizes[rank] if rank < len(gather_sizes) else 'none'} "
                         f"of {world} ranks")
    if scatter_sizes is None and x.shape[scatter_dim] % world:
        raise ValueError(f"all_to_all: {x.shape[scatter_dim]} rows along dim {scatter_dim} cannot be split evenly "
                         f"over {world} ranks (pass scatter_sizes)")
    if scatter_sizes is not None and (len(scatter_sizes) != world or sum(scatter_sizes) != x.shape[scatter_dim]):
        raise ValueError(f"all_to_all: scatter_sizes {scatter_sizes} do not split {x.shape[scatter_dim]} rows "
                         f"over {world} ranks")
    pieces = x.split(scatter_sizes, dim=scatter_dim) if scatter_sizes else x.chunk(world, dim=scatter_dim)
    piece_shape = list(pieces[rank].shape)  # what every rank sends me has my piece's scatter length
    out_shape = piece_shape[:gather_dim] + [sum(gather_sizes)] + piece_shape[gather_dim + 1 :]
    if out is None:
        out = torch.empty(out_shape, dtype=x.dtype, device=x.device)
    elif list(out.shape) != out_shape:
        raise ValueError(f"all_to_all: out has shape {list(out.shape)}, the exchange gives {out_shape}")
    # One copy in, one copy out: each piece straight into a flat send buffer (cast to the wire dtype
    # first, fp8 scaled on its own), each arrival straight into its rows of the output (no .contiguous()
    # followed by a cat, no cat afterwards). A payload's words follow each piece in its segment, unrounded.
    encoded = [(piece, None) for piece in pieces] if wire is None else [to_wire(piece, wire) for piece in pieces]
    words = None if payload is None else payload.words(encoded[0][0].dtype)
    extra = 0 if words is None else words.numel()
    in_splits = [p.numel() + extra for p in pieces]
    out_splits = [torch.Size(piece_shape[:gather_dim] + [n] + piece_shape[gather_dim + 1 :]).numel() + extra
                  for n in gather_sizes]
    send = torch.empty(sum(in_splits), dtype=encoded[0][0].dtype, device=x.device)
    for (on_wire, _), dst in zip(encoded, send.split(in_splits)):
        dst[: on_wire.numel()].view(on_wire.shape).copy_(on_wire)
        if extra:
            dst[on_wire.numel() :].copy_(words)
    received = torch.empty(sum(out_splits), dtype=send.dtype, device=x.device)
    works = [dist.all_to_all_single(received, send, out_splits, in_splits, group=group, async_op=True)]
    scales = None
    if wire == "fp8":  # the scales, one per piece, follow in a second all-to-all of world floats
        scales = torch.empty(world, dtype=torch.float32, device=x.device)
        works.append(dist.all_to_all_single(scales, torch.cat([scale for _, scale in encoded]), group=group,
                                            async_op=True))
    sent_bytes = (send.numel() - in_splits[rank]) * send.element_size()
    return PendingAllToAll(works, (send, received), scales, out, out_splits, gather_sizes, gather_dim, group,
                           sent_bytes, payload, extra)


class PendingAllToAll:
    """An all-to-all in flight (all_to_all_start): `wait()` blocks until it is done, hands the payload its
    words, then copies what arrived into its rows of the output (from the wire dtype back) and returns it."""

    def __init__(self, works, buffers, scales, out, out_splits, gather_sizes, gather_dim, group, sent_bytes,
                 payload, extra):
        self._works, self._buffers, self._scales = works, buffers, scales  # buffers live until the wait
        self._out, self._out_splits = out, out_splits
        self._gather_sizes, self._gather_dim = gather_sizes, gather_dim
        self._group, self._sent_bytes = group, sent_bytes
        self._payload, self._extra = payload, extra  # the payload's words at the end of each segment

    def wait(self) -> Tensor:
        start = time.perf_counter()
        for work in self._works:
            work.wait()
        _record("all_to_all", self._group, self._sent_bytes, start)
        out, extra = self._out, self._extra
        segments = self._buffers[1].split(self._out_splits)
        if self._payload is not None:  # may raise: the caller's speculative work ends here, on every rank alike
            self._payload.arrive(torch.stack([segment[segment.numel() - extra :] for segment in segments]))
        scales = [None] * len(segments) if self._scales is None else self._scales.split(1)
        for arrived, scale, dst in zip(segments, scales, out.split(self._gather_sizes, dim=self._gather_dim)):
            # no cast when nothing was cast
            dst.copy_(from_wire(arrived[: dst.numel()].view(dst.shape), scale, out.dtype))
        return out


class _AllToAll(torch.autograd.Function):
    """The adjoint of an all-to-all is the all-to-all back: scatter along the old gather dim by the
    gather sizes, gather along the old scatter dim by the scatter sizes."""

    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim, scatter_sizes, gather_sizes):
        ctx.args = (group, gather_dim, scatter_dim, gather_sizes, scatter_sizes)
        return _all_to_all(x, group, scatter_dim, gather_dim, scatter_sizes, gather_sizes)

    @staticmethod
    def backward(ctx, grad):
        group, scatter_dim, gather_dim, scatter_sizes, gather_sizes = ctx.args
        gather_sizes = gather_sizes or [grad.shape[gather_dim]] * dist.get_world_size(group)
        return (
            _all_to_all(grad, group, scatter_dim, gather_dim, scatter_sizes, gather_sizes),
            None,
            None,
            None,
            None,
            None,
        )


def all_gather(x: Tensor, group, dim: int, sizes: list[int] | None = None, replicated: bool = False) -> Tensor:
    """Concatenate every rank's x along dim; `sizes[j]` is rank j's length there (uneven shards).

    Differentiable. By default x's gradient is the sum over ranks of their gradients for x's rows
    (the adjoint). `replicated=True` takes this rank's rows of its own gradient instead: right when
    every rank goes on to compute the same thing from the gathered tensor, as with the gathered
    output of a sequence-parallel model (Megatron-LM's gather with a split backward).
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    sizes = sizes or [x.shape[dim]] * world
    if len(sizes) != world or sizes[rank] != x.shape[dim]:
        raise ValueError(f"all_gather: this rank holds {x.shape[dim]} rows along dim {dim}, the sizes {sizes} "
                         f"are for {world} ranks")
    if torch.is_grad_enabled() and x.requires_grad:
        return _AllGather.apply(x, group, dim, sizes, replicated)
    return _all_gather(x, group, dim, sizes)


def _all_gather(x: Tensor, group, dim: int, sizes: list[int]) -> Tensor:
    world = dist.get_world_size(group)
    x = x.movedim(dim, 0)  # gather along dim 0, where uneven pieces are contiguous
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    outputs = [torch.empty_like(padded) for _ in range(world)]
    start = time.perf_counter()
    dist.all_gather(outputs, padded, group=group)
    _record("all_gather", group, _nbytes([padded]) * (world - 1), start)
    return torch.cat([o[:n] for o, n in zip(outputs, sizes)], dim=0).movedim(0, dim)


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim, sizes, replicated):
        ctx.args = (group, dim, sizes, replicated)
        return _all_gather(x, group, dim, sizes)

    @staticmethod
    def backward(ctx, grad):
        group, dim, sizes, replicated = ctx.args
        if not replicated:  # gloo has no reduce-scatter: sum the whole gradient, keep my rows
            grad = all_reduce(grad.clone(memory_format=torch.contiguous_format), group)
        return grad.split(sizes, dim=dim)[dist.get_rank(group)], None, None, None, None


def all_reduce(x: Tensor, group) -> Tensor:
    """Sum x over the group, in place; returns x."""
    start = time.perf_counter()
    dist.all_reduce(x, group=group)
    _record("all_reduce", group, _nbytes([x]), start)
    return x


def broadcast(x: Tensor, group, src: int) -> Tensor:
    """Rank src's x on every rank of the group, in place (src is a rank within the group); returns x."""
    start = time.perf_counter()
    dist.broadcast(x, src=dist.get_global_rank(group, src), group=group)
    sent = _nbytes([x]) * (dist.get_world_size(group) - 1) if dist.get_rank(group) == src else 0
    _record("broadcast", group, sent, start)
    return x


def all_gather_object(obj, group) -> list:
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


class Payload:
    """A few numbers that ride on an exchange the step makes anyway (a step cache's indicator sums, parallel/
    cache.py): every rank hands in `local`; the exchange hands every rank's copy, bit for bit and in group
    rank order, to `on_arrival` [P, *local.shape] as soon as it is in, before the exchange's own data is
    unpacked. on_arrival may raise: every rank then raises at the same point, so no collective is left
    half-entered. The numbers travel as raw bytes in the exchange's own buffer (no wire dtype rounds them),
    or, along a ring, as one more message of the same hop."""

    def __init__(self, local: Tensor | None, on_arrival: Callable[[Tensor], None]):
        self.local = local  # None until known (USP: the ring carries what the Ulysses exchange brought)
        self.on_arrival = on_arrival

    def words(self, dtype: torch.dtype) -> Tensor:
        """local's bytes seen as `dtype` elements (its byte count is a multiple of their size)."""
        return self.local.contiguous().flatten().view(torch.uint8).view(dtype)

    def arrive(self, words: Tensor) -> None:
        """words [P, m]: each rank's `words`, in group rank order."""
        self.on_arrival(words.contiguous().view(torch.uint8).view(self.local.dtype).reshape(-1, *self.local.shape))

    def ring_start(self, group) -> None:
        """Along a ring (ring.py), the entries travel as the K/V shards do: at hop s rank r sends the entry of
        rank r - s to rank r + 1, in a message of its own posted with the K/V hop; after P - 1 hops every
        rank holds every entry, and ring_arrive hands them on."""
        self.group, self.world, self.rank = group, dist.get_world_size(group), dist.get_rank(group)
        self.entries = [None] * self.world
        self.entries[self.rank] = self.held = self.local.contiguous()

    def ring_post(self, step: int) -> None:
        self.hop, held = P2P(self.group), self.held
        self.arriving = self.hop.recv(held.shape, held.dtype, held.device, src=(self.rank - 1) % self.world)
        self.hop.send(self.held, dst=(self.rank + 1) % self.world)
        self.hop.commit()
        self.step = step

    def ring_wait(self) -> None:
        self.hop.wait()
        self.entries[(self.rank - self.step - 1) % self.world] = self.held = self.arriving

    def ring_arrive(self) -> None:
        self.on_arrival(torch.stack(self.entries))


class P2P:
    """Batched point-to-point exchange: queue sends and receives, `commit()` posts them all at once,
    `wait()` blocks until they are done. Peers are ranks within `group`.

        p2p = P2P(group); buf = p2p.recv(shape_like, src=prev); p2p.send(x, dst=next)
        p2p.commit(); ...compute...; p2p.wait(); use(buf)
    """

    def __init__(self, group):
        self.group = group or dist.group.WORLD
        self._ops: list = []
        self._requests: list = []
        self._sent_bytes = 0

    def send(self, x: Tensor, dst: int) -> None:
        x = x.contiguous()
        self._ops.append(dist.P2POp(dist.isend, x, dist.get_global_rank(self.group, dst), self.group))
        self._sent_bytes += _nbytes([x])

    def recv(self, shape, dtype: torch.dtype, device, src: int) -> Tensor:
        buffer = torch.empty(shape, dtype=dtype, device=device)
        self._ops.append(dist.P2POp(dist.irecv, buffer, dist.get_global_rank(self.group, src), self.group))
        return buffer

    def commit(self) -> None:
        if self._requests:
            raise RuntimeError("P2P.commit() called twice without wait()")
        self._requests = dist.batch_isend_irecv(self._ops) if self._ops else []
        self._ops = []

    def wait(self) -> None:
        start = time.perf_counter()
        for request in self._requests:
            request.wait()
        # time counts only the blocked wait: what compute between commit and wait hid is free
        _record("p2p", self.group, self._sent_bytes, start)
        self._requests, self._sent_bytes = [], 0


def exchange(x: Tensor, group, dst: int, src: int, recv_shape) -> Tensor:
    """Send x to rank dst and receive a tensor of recv_shape from rank src (ranks within `group`),
    waiting for both. Differentiable: the gradient travels back the other way, from dst to src."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _Exchange.apply(x, group, dst, src, tuple(recv_shape))
    return _exchange(x, group, dst, src, recv_shape)


def _exchange(x: Tensor, group, dst: int, src: int, recv_shape) -> Tensor:
    p2p = P2P(group)
    received = p2p.recv(recv_shape, x.dtype, x.device, src=src)
    p2p.send(x, dst=dst)
    p2p.commit()
    p2p.wait()
    return received


class _Exchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dst, src, recv_shape):
        ctx.args = (group, src, dst, tuple(x.shape))
        return _exchange(x, group, dst, src, recv_shape)

    @staticmethod
    def backward(ctx, grad):
        group, dst, src, send_shape = ctx.args  # the way back: to the rank this came from
        return _exchange(grad, group, dst, src, send_shape), None, None, None, None

"""USP: Ulysses inside each ring group (Fang & Zhao 2024, "USP: A Unified Sequence Parallelism
Approach for Long Context Generative AI", arXiv:2405.07719).

The sp group of ulysses_degree x ring_degree ranks is a grid: a Ulysses group is the contiguous
run of ranks sharing a ring rank, a ring group the strided set sharing a Ulysses rank. The
Ulysses all-to-all turns the group's token shards into one longer shard for H/U heads; the ranks
that hold the same head slice u (one per Ulysses group) then run ring attention over those
longer shards; the inverse all-to-all returns every row to its owner. Any factorisation works.
"""

from functools import partial

from torch import Tensor

from flux_parallel.kernels import attention
from flux_parallel.parallel import comm
from flux_parallel.parallel.ring import ring_attention
from flux_parallel.parallel.sequence import SequenceLayout
from flux_parallel.parallel.ulysses import ulysses_attention


def usp_attention(q: Tensor, k: Tensor, v: Tensor, ulysses_group, ring_group, layout: SequenceLayout, ring_rank: int,
                  ring_overlap: bool = True, backend: str = "auto", wire: str | None = None,
                  payload: comm.Payload | None = None, ulysses_chunks: int | None = None) -> Tensor:
    """q, k, v [B, H, J_r, D]: sp rank r's local joint sequence (J_r = layout.joint_lens[r]), all heads
    -> [B, H, J_r, D], attention over the keys of every sp rank with kernels backend `backend`.
    A degree of 1 skips its collectives. wire: what every exchange carries (comm.WIRE_DTYPES; None exact).
    payload: reaches every sp rank, in sp rank order, on the first exchanges that cover the sp group (the
    Ulysses q/k/v all-to-all, then the ring's K/V hops, which carry the Ulysses group's entries on).
    ulysses_chunks: head chunks whose all-to-alls overlap the other chunks' (ring) attention (None: automatic)."""
    ulysses_payload = ring_payload = None
    if payload is not None and layout.ring_degree == 1:
        ulysses_payload = payload
    elif payload is not None and layout.ulysses_degree == 1:
        ring_payload = payload
    elif payload is not None:  # [R, U, ..] entries in ring then Ulysses rank order: sp rank order
        ring_payload = comm.Payload(None, lambda entries: payload.on_arrival(entries.flatten(0, 1)))
        ulysses_payload = comm.Payload(payload.local, partial(setattr, ring_payload, "local"))
    inner = partial(attention, backend=backend)
    if layout.ring_degree > 1:
        ring = partial(_ring_attention_output, group=ring_group, seq_lens=layout.ring_lens, overlap=ring_overlap,
                       backend=backend, wire=wire)
        unsent = [ring_payload]  # only the first ring (head chunk 0's, when Ulysses chunks its heads) carries it

        def inner(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return ring(q, k, v, payload=unsent.pop() if unsent else None)
    if layout.ulysses_degree == 1:
        return inner(q, k, v)
    return ulysses_attention(q, k, v, ulysses_group, layout.ulysses_lens(ring_rank), attn=inner, wire=wire,
                             payload=ulysses_payload, chunks=ulysses_chunks)


def _ring_attention_output(q: Tensor, k: Tensor, v: Tensor, group, seq_lens: list[int], overlap: bool,
                           backend: str, wire: str | None, payload: comm.Payload | None = None) -> Tensor:
    """Ring attention's output alone: inside USP nothing merges it further, so its LSE is not needed."""
    return ring_attention(q, k, v, group, seq_lens, overlap, backend, wire, payload)[0]


class USPAttention:
    """The `attention_fn` the FLUX blocks call while a sequence-parallel forward runs.

    It holds the process groups and the `SequenceLayout` of the inputs it serves, both fixed at
    construction, so no attention call needs a collective to learn the other ranks' lengths.
    """

    def __init__(self, ulysses_group, ring_group, ring_rank: int, sp_rank: int, layout: SequenceLayout,
                 backend: str = "auto", wire: str | None = None, ulysses_chunks: int | None = None):
        self.ulysses_group, self.ring_group = ulysses_group, ring_group
        self.ring_rank, self.sp_rank = ring_rank, sp_rank
        self.layout, self.backend, self.wire = layout, backend, wire
        self.ulysses_chunks = ulysses_chunks
        self.payload: comm.Payload | None = None  # what the next call's exchanges carry (carry)

    def carry(self, payload: comm.Payload | None) -> None:
        """The next call's exchanges carry `payload` to every sp rank (usp_attention); None withdraws it."""
        self.payload = payload

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        expected = self.layout.joint_lens[self.sp_rank]
        if q.shape[2] != expected:
            raise ValueError(f"sp rank {self.sp_rank} got {q.shape[2]} local tokens, its layout gives it {expected}")
        payload, self.payload = self.payload, None
        return usp_attention(q, k, v, self.ulysses_group, self.ring_group, self.layout, self.ring_rank,
                             backend=self.backend, wire=self.wire, payload=payload, ulysses_chunks=self.ulysses_chunks)

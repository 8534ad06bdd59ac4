"""How FLUX's two token streams are split along the sequence over the sequence-parallel group.

Image tokens and text tokens are each cut into contiguous shards, one per sp rank, `tensor_split`
style: the first (L mod P) ranks get one extra row. Uneven shards keep the result exact without
padding; padded rows would be attended to as keys unless masked, and replicated text would be
counted once per rank (a peer replicates the text and slices it by heads). Each rank's local joint sequence is
[txt_r; img_r]; attention is non-causal, so the order of keys across ranks does not matter.

The sp rank is ring_rank * ulysses_degree + ulysses_rank (Ulysses fastest, as ParallelContext's
flattened "sp" axis). Every rank computes the same `SequenceLayout` from the full lengths, so the
attention strategies know every rank's length without a collective.
"""

from dataclasses import dataclass

from torch import Tensor


def shard_sizes(length: int, parts: int) -> list[int]:
    """Lengths of `parts` contiguous shards of `length` rows; the first (length mod parts) get one more."""
    base, extra = divmod(length, parts)
    return [base + (rank < extra) for rank in range(parts)]


@dataclass(frozen=True)
class SequenceLayout:
    """Per sp rank lengths of the text and image shards, and how sp ranks form Ulysses x ring."""

    txt_lens: tuple[int, ...]  # [sp]
    img_lens: tuple[int, ...]  # [sp]
    ulysses_degree: int
    ring_degree: int

    @property
    def joint_lens(self) -> list[int]:
        """Length of each sp rank's local [txt_r; img_r] sequence: what one attention call holds."""
        return [t + i for t, i in zip(self.txt_lens, self.img_lens)]

    def ulysses_lens(self, ring_rank: int) -> list[int]:
        """Joint lengths of the Ulysses group at `ring_rank`, in Ulysses rank order."""
        u = self.ulysses_degree
        return self.joint_lens[ring_rank * u : (ring_rank + 1) * u]

    @property
    def ring_lens(self) -> list[int]:
        """Sequence each ring rank holds after its Ulysses all-to-all: the sum over its Ulysses group."""
        return [sum(self.ulysses_lens(g)) for g in range(self.ring_degree)]

    def shard(self, x: Tensor, stream: str, rank: int, dim: int = 1) -> Tensor:
        """Rows of `stream` ("txt" or "img") that sp rank `rank` holds: [B, L, ..] -> [B, L_rank, ..]."""
        sizes = self.txt_lens if stream == "txt" else self.img_lens
        if x.shape[dim] != sum(sizes):
            raise ValueError(f"{stream} has {x.shape[dim]} tokens along dim {dim}, the layout is for {sum(sizes)}")
        return x.split(sizes, dim=dim)[rank]


def make_layout(txt_len: int, img_len: int, ulysses_degree: int, ring_degree: int) -> SequenceLayout:
    """Split txt_len text and img_len image tokens over ulysses_degree * ring_degree ranks.

    Every rank needs at least one image token, so that every local sequence and every ring
    block is non-empty; a rank may hold no text token (its text shard is simply empty).
    """
    sp = ulysses_degree * ring_degree
    if img_len < sp:
        raise ValueError(f"{img_len} image tokens cannot be split over a sequence-parallel group of {sp} ranks")
    return SequenceLayout(tuple(shard_sizes(txt_len, sp)), tuple(shard_sizes(img_len, sp)), ulysses_degree, ring_degree)

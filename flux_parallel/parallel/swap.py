"""How every strategy installs itself: it swaps a seam of the model for the duration of a call.

A strategy lists its changes as (owner, attribute, new value) triples: the blocks' `attention_fn`
for sequence parallelism, convolutions and norms for the parallel VAE. `swapped(changes)` sets
them on entry and puts the originals back on exit, so the model object a caller holds is the
plain single-device model outside the call, whatever strategies ran inside it.
"""

import contextlib

from torch import nn


@contextlib.contextmanager
def swapped(changes: list[tuple[object, str, object]]):
    """Set owner.attribute = value for each change inside the block; restore them on exit."""
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in changes]
    try:
        for owner, name, value in changes:
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, value in reversed(originals):
            setattr(owner, name, value)


def module_swaps(root: nn.Module, replace) -> list[tuple[nn.Module, str, nn.Module]]:
    """A change for every submodule m of root for which replace(m) is not None."""
    return [(parent, name, new) for parent in list(root.modules()) for name, child in list(parent.named_children())
            if (new := replace(child)) is not None]


def attention_swaps(model: nn.Module, attention_fn) -> list[tuple[nn.Module, str, object]]:
    """A change of `attention_fn` (the seam in flux/layers.py) for every FLUX block of model."""
    return [(block, "attention_fn", attention_fn) for block in (*model.double_blocks, *model.single_blocks)]

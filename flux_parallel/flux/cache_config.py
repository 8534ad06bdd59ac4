"""What a step cache is asked for: CacheConfig (kind, threshold, DBCache's Fn/Bn, TaylorSeer's order, cache-dit's
limits), each field checked in one sentence, and check_cache, which holds it against a model. The caches
themselves are in flux/cache.py."""

import math
import numbers
from dataclasses import dataclass

from torch import nn

KINDS = ("fbcache", "teacache", "dbcache")


@dataclass(frozen=True)
class CacheConfig:
    """kind: "fbcache", "teacache" or "dbcache"; threshold: >= 0, larger skips more steps, 0 computes every step.

    compute_first / compute_last: dbcache's Fn (>= 1) and Bn (>= 0) blocks of the concatenated double +
    single blocks that run at every step (fbcache is Fn = 1, Bn = 0; teacache watches the stack's input and
    caches all of it). taylorseer_order: 0 reuses the last computed residual, 1 and 2 forecast it.
    warmup_steps: the first W steps always run. max_cached_steps, max_continuous_cached_steps: per branch,
    at most this many cached steps in all / in a row (None: no limit)."""

    kind: str
    threshold: float
    compute_first: int | None = None  # dbcache's Fn; default 1
    compute_last: int | None = None  # dbcache's Bn; default 1
    taylorseer_order: int | None = None  # default 1 for dbcache, 0 (reuse, as published) for fbcache and teacache
    warmup_steps: int = 0
    max_cached_steps: int | None = None
    max_continuous_cached_steps: int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"cache kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t) or t < 0:
            raise ValueError(f"cache threshold must be a finite number >= 0 (0 computes every step), got {t!r}")
        if self.kind != "dbcache" and (self.compute_first, self.compute_last) != (None, None):
            raise ValueError(f"compute_first and compute_last are dbcache's; {self.kind} fixes which blocks run "
                             "(fbcache is dbcache with compute_first 1, compute_last 0)")
        lowest = {"compute_first": 1, "compute_last": 0, "taylorseer_order": 0, "warmup_steps": 0,
                  "max_cached_steps": 0, "max_continuous_cached_steps": 1}
        for name, low in lowest.items():
            value = getattr(self, name)
            if value is None and name != "warmup_steps":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"cache {name} must be an integer >= {low}, got {value!r}")
        if self.taylorseer_order is not None and self.taylorseer_order > 2:
            raise ValueError(f"cache taylorseer_order must be 0, 1 or 2, got {self.taylorseer_order}")

    @property
    def blocks_first(self) -> int:
        """Blocks that run before the indicator (teacache: none, it watches the stack's input)."""
        return 0 if self.kind == "teacache" else (self.compute_first or 1)

    @property
    def blocks_last(self) -> int:
        if self.kind != "dbcache":
            return 0
        return 1 if self.compute_last is None else self.compute_last

    @property
    def order(self) -> int:
        """TaylorSeer's order. DBCache's defaults (Fn 1, Bn 1, order 1) cache 22 of 28 steps of the trained
        tiny model at threshold 0.3 with 41 dB against the uncached images (reuse: 35 dB less 6; docs/cache.md)."""
        if self.taylorseer_order is not None:
            return self.taylorseer_order
        return 1 if self.kind == "dbcache" else 0


def check_cache(cache, model: nn.Module) -> None:
    """One sentence if `cache` cannot run on `model` (raised on every rank before any collective)."""
    if cache is None:
        return
    if not isinstance(cache, CacheConfig):
        raise ValueError(f"cache must be a CacheConfig(kind, threshold) or None, got {type(cache).__name__}")
    if len(getattr(model, "double_blocks", ())) == 0 or not hasattr(model, "run_blocks"):
        raise ValueError(f"a {cache.kind} cache watches the first double block, and this model has none")
    blocks = len(model.double_blocks) + len(model.single_blocks)
    if cache.blocks_first + cache.blocks_last >= blocks:
        raise ValueError(f"compute_first {cache.blocks_first} + compute_last {cache.blocks_last} leave none of the "
                         f"model's {blocks} blocks to cache: their sum must be below {blocks}")

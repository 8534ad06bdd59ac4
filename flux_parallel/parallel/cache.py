"""Step caches on the mesh: one decision for all the ranks that share an image, one state per CFG branch.

The algorithm is flux/cache.py's single-device StepCache, which the pipeline makes fresh for each call
(its state lives in the runtime's per-call Generation); this file hands it the reduction, installs it in
the model's `run_blocks` seam for the call and collects its report.

- sp (ring x ulysses): every rank holds some of the image's tokens. Its indicator sums (never its
  means: shards may be uneven) are summed over the sp group so that every sp rank holds bit for bit the
  same sums, those of the whole image (a single device's up to fp32 rounding), and takes the same
  branch. A rank that skipped the blocks while another waited in their collectives would
  deadlock (vllm-project/vllm-omni#6180); xDiT and ParaAttention average per-rank means instead, which is
  not the image's mean when shards are uneven.
- The decision makes no collective of its own (`sp_fold`). Every rank's [2, n] float64 partial sums ride
  as a comm.Payload on the first exchange of the cached range's first block, which that block makes
  anyway: the Ulysses q/k/v all-to-all (its 16n bytes after each rank's piece), the ring's K/V hops
  (one more 16n-byte message per hop, posted with it), under USP both in turn. The block runs up to
  there speculatively; once the payload is in, every rank sums the P partials in sp rank order with the
  same float64 additions (`sum_in_rank_order`) and decides. Why every rank decides identically: the
  payload moves bytes without arithmetic, so every rank holds the same P partials bit for bit, adds
  them in the same order, and compares the same doubles with the same threshold under the same limits
  (counted per branch from the same past decisions). So every rank goes on with the block, or every
  rank raises `SkipRange` at the same point, after the same completed exchanges, and none is left in
  a collective the others never enter. A skipped step wastes the speculation: the block's modulation
  and q/k/v projections (Ulysses), plus its attention over the whole ring (ring, USP: the entries
  arrive with the last hop). A computed step wastes nothing; under CFG with branches deciding apart,
  the range runs again on the computing branch's rows (single-device code, flux/cache.py).
  `sp_sums`' own all-reduce stays for tools/bench/bench_cache.py's comparison.
- cfg: each branch has its own state, on one device (two chunks of one batched forward) and with
  cfg_degree 2 (one branch per half of the mesh) alike, so both decide the same steps.
- data: each replica decides from its own images; replicas share nothing.
"""

import dataclasses

from torch import Tensor, nn

from flux_parallel.parallel import comm
from flux_parallel.parallel.context import ParallelContext

# (parallel/ does not import flux/: the pipeline imports parallel, and flux/__init__ imports the pipeline)


def sp_sums(ctx: ParallelContext):
    """[2, n] float64 sums over this rank's tokens -> the sums over the sp group, identical on every rank, in
    a collective of their own; None when the sp group is this rank alone (the sums are then the image's).
    A generation on several sp ranks folds the sums into an exchange instead (sp_fold), so this reduction
    runs only where no fold is installed: tools/bench/bench_cache.py's comparison with the fold."""
    if ctx.sp_degree == 1:
        return None
    group = ctx.group("sp")

    def reduce_sums(local: Tensor) -> Tensor:
        if ctx.sp_degree == 2:
            # one all-reduce: each element is one IEEE addition of two numbers, and a + b == b + a bit for
            # bit, so both ranks hold the same bytes whichever rank's value a backend adds first
            return comm.all_reduce(local, group)
        # 3 or more ranks: addition is not associative, and a backend may add in a different order on each
        # rank; all-gather, then one sum in rank order over the same bytes on every rank
        return comm.all_gather(local[None], group, dim=0).sum(dim=0)

    return reduce_sums


class SkipRange(Exception):
    """Raised out of the speculative block on every sp rank at once: the folded decision skips the range."""


def sum_in_rank_order(partials: Tensor) -> Tensor:
    """[P, ...] -> [...]: ((p0 + p1) + p2) + ..., the same additions in the same order on every rank."""
    total = partials[0].clone()
    for partial in partials[1:]:
        total += partial
    return total


def sp_fold(ctx: ParallelContext, attention):
    """For StepCache.fold: the decision's sums carried by `attention` (usp.USPAttention, the attention_fn of
    every block during the call) on the cached range's first exchange; None when the sp group is this rank
    alone (no exchange to ride on, and no sums to exchange)."""
    if ctx.sp_degree == 1:
        return None

    def fold(local: Tensor, on_sums, run_range):
        decided = []

        def on_arrival(partials: Tensor) -> None:  # [P, 2, n] float64, the same bytes on every sp rank
            decided.append(on_sums(sum_in_rank_order(partials)))
            if not decided[0]:
                raise SkipRange

        attention.carry(comm.Payload(local, on_arrival))
        try:
            ran = run_range()
        except SkipRange:
            return None
        finally:
            attention.carry(None)
        if not decided:  # every rank alike: the range made no exchange, which would be a bug of the seam
            raise RuntimeError("the step cache's sums were not carried: the cached range called no sp attention")
        return ran

    return fold


def cache_swaps(model: nn.Module, cache) -> list[tuple[nn.Module, str, object]]:
    """The change that installs the cache in the model's `run_blocks` seam (none without a cache)."""
    return [] if cache is None else [(model, "run_blocks", cache.run_blocks)]


def cache_report(cache, ctx: ParallelContext) -> dict | None:
    """{kind, threshold, the other CacheConfig fields, decision_s, reduction_s, branches: {branch: computed/reused
    steps}}, with both branches on every rank under cfg_degree 2 (one object gather over the cfg group). Call it
    on every rank."""
    if cache is None:
        return None
    branches = cache.report()
    if ctx.cfg_degree > 1 and len(cache.branches) == 1:
        branches = {k: v for part in comm.all_gather_object(branches, ctx.group("cfg")) for k, v in part.items()}
    return {**dataclasses.asdict(cache.config), "decision_s": cache.decision_s, "reduction_s": cache.reduction_s,
            "branches": branches}

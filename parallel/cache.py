"""Step caches on the mesh: one decision for all the ranks that share an image, one state per CFG branch.

The algorithm is flux/cache.py's single-device StepCache, which the pipeline makes fresh for each call
(its state lives in the runtime's per-call Generation); this file hands it the reduction, installs it in
the model's `run_blocks` seam for the call and collects its report.

- sp (ring x ulysses): every rank holds some of the image's tokens. Its indicator sums (never its
  means: shards may be uneven) are all-gathered over the sp group and added up in rank order, so every
  sp rank computes bit for bit the same ratio, the one a single device computes over the whole image,
  and takes the same branch. A rank that skipped the blocks while another waited in their collectives
  would deadlock (vllm-project/vllm-omni#6180); xDiT and ParaAttention average per-rank means instead,
  which is not the image's mean when shards are uneven.
- cfg: each branch has its own state, on one device (two chunks of one batched forward) and with
  cfg_degree 2 (one branch per half of the mesh) alike, so both decide the same steps.
- data: each replica decides from its own images; replicas share nothing.
"""

from torch import Tensor, nn

from parallel import comm
from parallel.context import ParallelContext

# (parallel/ does not import flux/: the pipeline imports parallel, and flux/__init__ imports the pipeline)


def sp_sums(ctx: ParallelContext):
    """[n, 2] float64 sums over this rank's tokens -> the sums over the sp group, identical on every rank;
    None when the sp group is this rank alone (the sums are then the image's already)."""
    # PipeFusion is refused with a cache (ParallelDenoiser.start): its stages see one patch at a time, and
    # the first block and the rest of the stack live on different ranks.
    if ctx.sp_degree == 1:
        return None
    group = ctx.group("sp")

    def gather_sums(local: Tensor) -> Tensor:
        # all-gather, then one sum in rank order over the same bytes on every rank: identical results
        # by construction, whatever order a backend's all-reduce adds in
        return comm.all_gather(local[None].contiguous(), group, dim=0).sum(dim=0)

    return gather_sums


def cache_swaps(model: nn.Module, cache) -> list[tuple[nn.Module, str, object]]:
    """The change that installs the cache in the model's `run_blocks` seam (none without a cache)."""
    return [] if cache is None else [(model, "run_blocks", cache.run_blocks)]


def cache_report(cache, ctx: ParallelContext) -> dict | None:
    """{kind, threshold, decision_s, branches: {branch: computed/reused steps}}, with both branches on every
    rank under cfg_degree 2 (one object gather over the cfg group). Call it on every rank."""
    if cache is None:
        return None
    branches = cache.report()
    if ctx.cfg_degree > 1 and len(cache.branches) == 1:
        branches = {k: v for part in comm.all_gather_object(branches, ctx.group("cfg")) for k, v in part.items()}
    return {"kind": cache.config.kind, "threshold": cache.config.threshold, "decision_s": cache.decision_s,
            "branches": branches}

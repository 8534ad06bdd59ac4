"""Step caches for the FLUX block stack: First-Block-Cache, TeaCache and DBCache, with TaylorSeer forecasts.

Between neighbouring denoising steps most of the block stack's work changes its output little, so a
cheap indicator decides per step whether to run the stack or to add the residual (output - input)
stored at the last step that ran it:

- First-Block-Cache (ParaAttention, github.com/chengzeyi/ParaAttention; diffusers' FirstBlockCacheConfig):
  run the first double block; its image residual r is compared with the one of the last computed step,
  mean|r - r_prev| / mean|r_prev|. Below the threshold the remaining blocks are skipped and their stored
  residuals (image and text streams) are added to the first block's output.
- TeaCache (Liu et al. 2024, arXiv 2411.19108; ali-vilab/TeaCache, TeaCache4FLUX): the relative L1 change
  of the first double block's modulated image input, rescaled by a polynomial fitted for FLUX, is
  accumulated over steps; while the sum stays below the threshold the whole stack is skipped. The first
  and the last step always run; the sum restarts at every computed step.
- DBCache (cache-dit, github.com/vipshop/cache-dit): First-Block-Cache generalised over the concatenated
  double + single blocks. The first `compute_first` (Fn) blocks always run and their image residual is the
  indicator; on a cached step the middle is skipped and the last `compute_last` (Bn) blocks still run on
  the approximated hidden states, correcting it. fbcache is DBCache with Fn = 1, Bn = 0.
- TaylorSeer (Liu et al. 2025, "From Reusing to Forecasting", arXiv 2503.06923): on a cached step the
  skipped blocks' residual is forecast instead of repeated: the polynomial of degree k through the last
  k + 1 computed residuals (Newton's divided differences), evaluated at this step. k = 0 is reuse. The
  variable is the step index: the residual drifts smoothly from step to step, and the index spaces the
  points evenly where the shifted sigma schedule bunches them near t = 1 (tools/bench/bench_cache.py
  measures both). Order 1 and 2 apply to every kind.
- Limits as in cache-dit: `warmup_steps` (the first W steps always run), `max_cached_steps` (at most this
  many cached steps per branch), `max_continuous_cached_steps` (at most this many in a row).

Threshold 0 computes every step and gives the uncached output bit for bit. The state is per CFG
branch: the forward's batch holds one contiguous chunk of rows per branch ([negative; positive] when
both run together), each decided from its own rows, so two branches run as one batched forward decide
as they would run apart. This module is single-device code; `StepCache.run_blocks` replaces the model's
`run_blocks` seam during a call, and the caller hands in `reduce_sums`, which turns this process's sums
into the sums over the whole image, or sets `fold`, which carries them on the cached range's first
exchange instead (parallel/cache.py, over the sequence-parallel group: no collective of its own).
PipeFusion's stages use `decide_message`, `record` and `run_message` (parallel/pipefusion.py).

The decision is kept cheap: TeaCache's watched tensor is the first block's own modulated input, handed to
the block rather than computed again (DoubleStreamBlock.modulate_img), and the sums of every branch take
a few ops over one temporary and at most one reduction per step (`change_sums`).
"""

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from flux_parallel.flux.cache_config import CacheConfig
from flux_parallel.parallel.stages import run_blocks as run_block_range  # the same blocks as one stage

# TeaCache's rescaling of the relative L1 change for FLUX.1, highest power first (TeaCache4FLUX)
TEACACHE_FLUX_POLY = (498.651651, -283.781631, 55.8554382, -3.82021401, 0.264230861)


@dataclass
class BranchState:
    """One CFG branch's cache across the steps of one generation."""

    # (step, img residual, txt residual) of the last computed steps, oldest first, at most order + 1: what
    # the cached blocks added to each stream
    residuals: list[tuple[int, Tensor, Tensor]] = field(default_factory=list)
    accumulated: float = 0.0  # teacache: rescaled change summed since the last computed step
    computed: list[int] = field(default_factory=list)
    reused: list[int] = field(default_factory=list)
    cached_in_a_row: int = 0
    # per step, the value compared with the threshold (fbcache: the relative change; teacache: the
    # accumulated rescaled change); None where none was compared (first step, teacache's last)
    indicators: list[float | None] = field(default_factory=list)


def block_count(model: nn.Module) -> int:
    return len(model.double_blocks) + len(model.single_blocks)


def forecast(residuals: list[tuple[int, Tensor, Tensor]], step: int) -> tuple[Tensor, Tensor]:
    """TaylorSeer: the (img, txt) residual at `step` from the polynomial through the stored (step, img, txt)
    points, by Newton's divided differences; one point is reuse. Elementwise: any token shard forecasts its
    own tokens as one device does."""
    if len(residuals) == 1:
        return residuals[0][1], residuals[0][2]
    steps = [float(r[0]) for r in residuals]
    forecasts = []
    for stream in (1, 2):
        coefficients = [r[stream].float() for r in residuals]  # becomes the divided differences in place
        for level in range(1, len(steps)):
            for i in range(len(steps) - 1, level - 1, -1):
                coefficients[i] = (coefficients[i] - coefficients[i - 1]) / (steps[i] - steps[i - level])
        value = coefficients[-1]
        for i in range(len(steps) - 2, -1, -1):  # Horner's rule on the Newton form
            value = coefficients[i] + (step - steps[i]) * value
        forecasts.append(value.to(residuals[-1][stream].dtype))
    return forecasts[0], forecasts[1]


def local_sums(sums: Tensor) -> Tensor:
    return sums


def change_sums(signal: Tensor, reference: Tensor, n: int) -> Tensor:
    """[2, n] float64: per branch (n contiguous chunks of rows), sum|signal - reference| and sum|reference|.
    Sums, not means: the element counts of numerator and denominator cancel, on any shard. One temporary
    of the signal's size, reused for both sums (at FLUX.1's 4096 x 3072 per image, 50 MB). Summed in
    float32 by torch.sum, whose blocked (pairwise) accumulation stays within 1e-6 of float64 at millions
    of elements (torch.linalg.vector_norm(x, 1) does not on CPU: 1% off at 12M; tests/test_cache.py);
    float64 accumulation would buy no closer decisions, since the watched tensor itself differs between
    layouts by fp32 rounding."""
    scratch = torch.sub(signal, reference).abs_()  # [N, L, hidden], in the model's dtype
    differences = scratch.reshape(n, -1).sum(dim=-1, dtype=torch.float32)  # not in fp16: it overflows
    magnitudes = torch.abs(reference, out=scratch).reshape(n, -1).sum(dim=-1, dtype=torch.float32)
    return torch.stack((differences, magnitudes)).double()


class StepCache:
    """One generation's cache: call `run_blocks` once per step, in step order, with the model's arguments.

    branches: the CFG branches whose rows the forward's batch stacks, in order. reduce_sums: [2, n] float64
    sums of this process's rows (change_sums) -> the sums over every token of the image, identical on every
    process that shares the image; None on one device."""

    def __init__(self, config: CacheConfig, branches: tuple[str, ...], num_steps: int,
                 reduce_sums: Callable[[Tensor], Tensor] | None = None):
        if num_steps < 1:  # teacache must know the last step
            raise ValueError(f"a step cache needs the generation's number of steps (>= 1), got {num_steps}")
        self.config, self.branches, self.num_steps = config, branches, num_steps
        self.reduce_sums = reduce_sums or local_sums
        # fold(local sums, on_sums, run_range) -> run_range()'s result, or None where on_sums(the image's sums)
        # said False: the image's sums ride on the cached range's first exchange instead of reduce_sums' own
        # collective (parallel/cache.py). Set by the runtime on several sp ranks; None: reduce_sums.
        self.fold = None
        self.state = [BranchState() for _ in branches]
        # the whole batch's watched tensor that each branch compares with, [N, L, hidden] (fbcache: the
        # first-block residual at its last computed step; teacache: the modulated input of the last step)
        self.reference: Tensor | None = None
        self.step = 0
        # seconds spent deciding: the sums, their reduction (with waiting for the other ranks), the comparison.
        # Not the watched tensor: that is the first block's own work (fbcache: its output; teacache: its
        # modulated input, handed to it), which every step runs. reduction_s: the part spent in reduce_sums
        # and reading its result to the host (on several ranks, waits for the slowest rank included).
        self.decision_s = 0.0
        self.reduction_s = 0.0

    def run_blocks(self, model: nn.Module, img: Tensor, txt: Tensor, vec: Tensor, pe) -> tuple[Tensor, Tensor]:
        """The model's block stack, its cached range skipped for the branches whose indicator stays below the
        threshold: blocks [0, Fn) always, then [Fn, L - Bn) or the forecast residual, then [L - Bn, L)."""
        first, end = self.config.blocks_first, block_count(model) - self.config.blocks_last
        img_modulated = None
        if self.config.kind == "teacache":
            img_modulated = model.double_blocks[0].modulate_img(img, vec)
            signal = img_modulated[2]  # the first block's modulated input [N, L, hidden]
            first = 0
        else:
            img_in = img
            img, txt = run_block_range(model, range(0, first), img, txt, vec, pe)
            signal = img - img_in  # the first Fn blocks' image residual [N, L, hidden]
        cached_range = range(first, end)
        ran, compute = None, None
        if self.fold is not None and self._compares():
            ran, compute = self._folded(signal, lambda: run_block_range(model, cached_range, img, txt, vec, pe,
                                                                        img_modulated))
        if compute is None:
            compute = self.timed_decide(signal)
        img, txt = self._run_cached_range(model, img, txt, vec, pe, cached_range, compute, img_modulated, ran)
        self.step += 1
        return run_block_range(model, range(end, block_count(model)), img, txt, vec, pe)

    def _compares(self) -> bool:
        """Whether this step compares the watched tensor with the reference (needs the image's sums)."""
        return self.step > 0 and not (self.config.kind == "teacache" and self.step == self.num_steps - 1)

    def _folded(self, signal: Tensor, run_range: Callable[[], tuple[Tensor, Tensor]]):
        """The decision folded into the cached range's first exchange (self.fold): -> (the range's output for
        the whole batch, or None where some branch skips it; every branch's decision)."""
        start = time.perf_counter()
        local = change_sums(signal, self.reference, len(self.state))
        self.decision_s += time.perf_counter() - start
        decided = []

        def on_sums(sums: Tensor) -> bool:  # -> whether the whole batch runs the range, speculation kept
            decided.append(self.timed_decide(signal, sums))
            return all(decided[0])

        ran = self.fold(local, on_sums, run_range)
        return ran, decided[0]

    def timed_decide(self, signal: Tensor, sums: Tensor | None = None) -> list[bool]:
        start = time.perf_counter()
        compute = self.decide(signal, sums)
        self.decision_s += time.perf_counter() - start
        return compute

    def decide(self, signal: Tensor, sums: Tensor | None = None) -> list[bool]:
        """Per branch: run the blocks at this step? signal [N, L, hidden] is the watched tensor (fbcache: the
        first block's image residual; teacache: its modulated input). sums: the image's [2, n] change_sums,
        where already reduced (folded); else reduce_sums is called once at most. Updates the reference."""
        n = len(self.state)
        changes = [None] * n
        if self._compares():
            if sums is None:
                local = change_sums(signal, self.reference, n)
                start = time.perf_counter()
                sums = self.reduce_sums(local)
                self.reduction_s += time.perf_counter() - start
            differences, magnitudes = sums.tolist()
            changes = [d / p if p > 0 else math.inf for d, p in zip(differences, magnitudes)]
        compute = [self._decide_branch(s, change) for s, change in zip(self.state, changes)]
        if self.config.kind == "teacache" or all(compute):  # teacache compares neighbouring steps
            self.reference = signal
        elif any(compute):  # fbcache: each branch compares with its last computed step
            self.reference = torch.cat([new if c else old for c, new, old in
                                        zip(compute, signal.chunk(n), self.reference.chunk(n))])
        return compute

    def _decide_branch(self, state: BranchState, change: float | None) -> bool:
        compute = self._indicator_says_compute(state, change) or not self._may_cache(state)
        state.cached_in_a_row = 0 if compute else state.cached_in_a_row + 1
        return compute

    def _indicator_says_compute(self, state: BranchState, change: float | None) -> bool:
        threshold = self.config.threshold
        if self.config.kind != "teacache":
            state.indicators.append(change)
            return change is None or not change < threshold
        if change is not None:
            state.accumulated += sum(c * change**p for p, c in enumerate(reversed(TEACACHE_FLUX_POLY)))
        state.indicators.append(None if change is None else state.accumulated)
        if change is not None and state.accumulated < threshold:
            return False
        state.accumulated = 0.0
        return True

    def _may_cache(self, state: BranchState) -> bool:
        """The limits: warm-up steps, cached steps in all and in a row (counted per branch, so every rank agrees)."""
        c = self.config
        return (self.step >= c.warmup_steps
                and (c.max_cached_steps is None or len(state.reused) < c.max_cached_steps)
                and (c.max_continuous_cached_steps is None or state.cached_in_a_row < c.max_continuous_cached_steps))

    def _run_cached_range(self, model: nn.Module, img: Tensor, txt: Tensor, vec: Tensor, pe, blocks: range,
                          compute: list[bool], img_modulated=None, ran=None) -> tuple[Tensor, Tensor]:
        """Blocks `blocks` on the computing branches' rows; the stored (or forecast) residuals for the others.
        img_modulated: block 0's modulate_img(img, vec) for the whole batch (teacache), where computed already.
        ran: the blocks' (img, txt) output for the whole batch, where run already (a folded decision)."""
        n, todo = len(compute), [i for i, c in enumerate(compute) if c]
        if ran is not None:
            img_out, txt_out = ran
        elif len(todo) == n:  # the whole batch at once: bit for bit the uncached forward
            img_out, txt_out = run_block_range(model, blocks, img, txt, vec, pe, img_modulated)
        elif todo:  # (the first block recomputes its modulated input on these rows: rare, only under true CFG)
            def pick(x: Tensor) -> Tensor:  # the rows of the computing branches
                return torch.cat([x.chunk(n)[i] for i in todo]) if x.shape[0] == img.shape[0] else x

            img_out, txt_out = run_block_range(model, blocks, pick(img), pick(txt), pick(vec), tuple(map(pick, pe)))
        ran = dict(zip(todo, zip(img_out.chunk(len(todo)), txt_out.chunk(len(todo))))) if todo else {}
        outputs = []
        for i, (state, img_in, txt_in) in enumerate(zip(self.state, img.chunk(n), txt.chunk(n))):
            if i in ran:
                state.residuals = [*state.residuals, (self.step, *self.stored(img_in, txt_in, *ran[i]))]
                state.residuals = state.residuals[-(self.config.order + 1):]
                state.computed.append(self.step)
                outputs.append(ran[i])
            else:
                state.reused.append(self.step)
                outputs.append(self.applied(img_in, txt_in, *forecast(state.residuals, self.step)))
        if len(todo) == n:
            return img_out, txt_out
        return torch.cat([o[0] for o in outputs]), torch.cat([o[1] for o in outputs])

    def stored(self, img_in: Tensor, txt_in: Tensor, img_out: Tensor, txt_out: Tensor) -> tuple[Tensor, Tensor]:
        """What a computed step keeps of the cached blocks, per stream: their residual, the forecast target.
        Forecasting their output instead (tools/bench/cache_forecast_target.py) lost 0.6-8.6 dB at order 1,
        the default, and at order 2 between 0.2 dB gained and 3.0 dB lost, on the trained tiny model (docs/cache.md)."""
        return img_out - img_in, txt_out - txt_in

    def applied(self, img_in: Tensor, txt_in: Tensor, img_kept: Tensor, txt_kept: Tensor) -> tuple[Tensor, Tensor]:
        """A cached step's output of the cached blocks from their input and the forecast of what `stored` kept."""
        return img_in + img_kept, txt_in + txt_kept

    # PipeFusion (parallel/pipefusion.py) runs the stack in stages, one message (the whole image, or a row-band
    # patch) at a time, and every stage holds a StepCache of its own. The step's decision is made once, on the
    # first stage, from the step's first message (`decide_message`: the whole image in warm-up steps, its first
    # band after), and travels along the pipeline with it; every stage records it (`record`) and runs or
    # forecasts its own blocks of the cached range on each message of the step (`run_message`). The range's
    # residual is the sum of the stages' parts, and a forecast is linear in the stored points, so the stages'
    # forecasts add up to the whole range's, up to rounding. Residuals and the reference are kept for the whole
    # image, [N, L, hidden] by token, each message writing and reading its own rows.

    def decide_message(self, step: int, signal: Tensor, rows: slice, img_len: int) -> list[bool]:
        """The first stage: per branch, does `step` run the cached range? signal [N, l, hidden]: the watched
        tensor on this rank's tokens `rows` of the step's first message."""
        self.step, full = step, getattr(self, "reference_rows", None)
        self.reference = None if full is None else full[:, rows]
        compute = self.timed_decide(signal)
        if full is None:
            full = self.reference_rows = signal.new_zeros(signal.shape[0], img_len, signal.shape[2])
        full[:, rows] = self.reference
        return compute

    def record(self, step: int, compute: list[bool]) -> None:
        """Every stage, once per step: which branches computed it (the report; the first stage's limits)."""
        for state, c in zip(self.state, compute):
            (state.computed if c else state.reused).append(step)

    def run_message(self, run_range: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], img: Tensor, txt: Tensor,
                    step: int, rows: slice, img_len: int, first: bool, compute: list[bool]) -> tuple[Tensor, Tensor]:
        """This stage's blocks of the cached range on one message: run_range(img, txt) where some branch
        computes `step` (the whole batch runs, the skipping branches' rows are then replaced: a batch row never
        meets another), the forecast of this stage's stored residual for the others. img [N, l, hidden] holds
        this rank's tokens `rows`; txt is the text stream, kept only from the step's first message."""
        n = len(compute)
        img_out, txt_out = run_range(img, txt) if any(compute) else (img, txt)
        outputs = []
        for i, (state, img_in, txt_in) in enumerate(zip(self.state, img.chunk(n), txt.chunk(n))):
            img_i, txt_i = img_out.chunk(n)[i], txt_out.chunk(n)[i]
            if compute[i]:
                if first:  # a new point of this stage's residual, filled message by message
                    state.residuals = [*state.residuals, (step, img_i.new_zeros(img_i.shape[0], img_len,
                                                                                img_i.shape[2]), txt_i - txt_in)]
                    state.residuals = state.residuals[-(self.config.order + 1):]
                state.residuals[-1][1][:, rows] = img_i - img_in
            else:
                img_residual, txt_residual = forecast([(s, r[:, rows], t) for s, r, t in state.residuals], step)
                img_i, txt_i = img_in + img_residual, (txt_in + txt_residual if first else txt_i)
            outputs.append((img_i, txt_i))
        if all(compute):
            return img_out, txt_out
        return torch.cat([o[0] for o in outputs]), torch.cat([o[1] for o in outputs])

    def report(self) -> dict:
        """Per branch: the steps computed and reused, and each step's indicator (see BranchState)."""
        return {branch: {"computed": s.computed, "reused": s.reused, "indicators": s.indicators}
                for branch, s in zip(self.branches, self.state)}

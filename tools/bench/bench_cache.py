"""Step caches against the uncached image: steps computed, speed-up, image error, decision overhead.

    python tools/bench/bench_cache.py [--models tiny medium] [--steps 28] [--repeats 3]
                                [--fbcache 0 0.05 0.1 0.2] [--teacache 0 0.25 0.4 0.6]
                                [--dbcache 0.3:1:1:1 0.3:1:1:0 ...]
                                [--json docs/cache.json] [--image-row docs/cache_row.png]

Two models: the trained tiny pipeline (FluxPipeline.tiny) and the medium transformer of
tools/bench/bench_transformer.py (hidden 768, 12 heads, 4 double + 8 single blocks, random weights) made
dev-style (guidance embedding, shifted schedule) with the tiny text encoders and VAE. For each, one
process runs the uncached generation and every cache setting in turn, `--repeats` rounds, then two gloo
processes do the same with Ulysses 2.
Per setting: the steps computed (per CFG branch), the median denoising time and its speed-up over the
uncached one in the same layout, PSNR and max abs error of the decoded image ([0, 1]) against the
uncached one, the decision's share of an uncached step (the sums, their reduction and the comparison;
(a) timed inside the generation, the time it holds up the step, and of that the reduction, which on
several ranks includes waiting for the slower rank; (b) alone, on the same shapes, after a barrier, its
sums in a separate all-reduce), and, on 2 ranks, whether the steps and the image are those of 1 rank.
On 2 ranks also the latency of one bare reduction of the decision's size after a barrier, the floor
under (b), and after 20 ms of compute, as collectives come inside a step. On 2 ranks the decision's
sums ride on the cached range's first all-to-all (parallel/cache.py); each threshold-0 dbcache setting
also runs with them in a separate all-reduce instead ("... all-reduce" rows), alternated with the rest:
at threshold 0 every block runs, so the median step against the uncached one is what the decision adds
to a 2-rank step either way (`floors` prints both). fp32, 1 thread per process, 64x64 px for tiny (the
60 held-out captions of eval_tiny.py as one batch by default) and 128x128 px for medium. Figures drift
10-20% between runs on a shared CPU.
"""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from flux_parallel.flux.cache import StepCache
from flux_parallel.flux.cache_config import CacheConfig
from flux_parallel.flux.configs import CONFIGS
from flux_parallel.flux.model import Flux
from flux_parallel.flux.pipeline import FluxPipeline
from flux_parallel.flux.sampling import Schedule
from flux_parallel.parallel import comm
from flux_parallel.parallel.context import ParallelContext
from flux_parallel.parallel.launch import free_port, spawn
from flux_parallel.shapes.evaluate import caption_accuracy, evaluation_captions
from flux_parallel.vae import VAE_CONFIGS, AutoEncoder
from flux_parallel.weights import seeded_init

MEDIUM_DEV = dataclasses.replace(  # bench_transformer.py's MEDIUM, dev-style, fed by the tiny text encoders
    CONFIGS["tiny"], hidden_size=768, num_heads=12, depth=4, depth_single_blocks=8, axes_dim=(8, 28, 28),
    mlp_ratio=4.0, guidance_embed=True,
)
SIZES = {"tiny": 64, "medium": 128}  # pixels per side: 16 and 64 image tokens (the CPU is slow and shared)


def build_pipeline(name: str, parallel: ParallelContext | None = None) -> FluxPipeline:
    if name == "tiny":
        return FluxPipeline.tiny(parallel=parallel)
    from flux_parallel.flux.text_encoders import TextConditioner

    model = seeded_init(Flux(MEDIUM_DEV), 0)
    vae = seeded_init(AutoEncoder(VAE_CONFIGS["tiny"]), 2)
    return FluxPipeline(model, vae, TextConditioner.tiny(seed=0), Schedule(use_dynamic_shifting=True), parallel)


def settings(args) -> list[CacheConfig | None]:
    classic = [CacheConfig(kind, t) for kind in ("fbcache", "teacache") for t in getattr(args, kind)]
    return [None] + classic + [dbcache(spec) for spec in args.dbcache]


def variants(args, world: int) -> list[tuple[str, CacheConfig | None, bool]]:
    """(label, config, folded) per run: every setting with the decision folded, and on several ranks each
    threshold-0 dbcache setting again with its sums in a separate all-reduce (the path before the fold)."""
    out = [(label(c), c, True) for c in settings(args)]
    if world > 1:
        out += [(f"{label(c)} all-reduce", c, False) for c in settings(args)
                if c is not None and c.kind == "dbcache" and c.threshold == 0]
    return out


def decision_path(folded: bool):
    """Folded: as the runtime does. Not: the runtime installs no fold, so StepCache calls reduce_sums
    (parallel/cache.sp_sums: one all-reduce on 2 ranks) as before the fold."""
    return contextlib.nullcontext() if folded else mock.patch("flux_parallel.parallel.runtime.sp_fold",
                                                              lambda ctx, attention: None)


def dbcache(spec: str) -> CacheConfig:
    """"THRESHOLD:FIRST:LAST:ORDER" -> DBCache with Fn = FIRST, Bn = LAST and TaylorSeer order ORDER."""
    try:
        threshold, first, last, order = spec.split(":")
        return CacheConfig("dbcache", float(threshold), int(first), int(last), int(order))
    except ValueError as err:
        raise ValueError(f"--dbcache {spec}: expected THRESHOLD:FIRST:LAST:ORDER ({err})") from None


def label(config: CacheConfig | None) -> str:
    if config is None:
        return "none"
    if config.kind == "dbcache":
        return f"dbcache {config.threshold:g} F{config.blocks_first}B{config.blocks_last} k{config.order}"
    return f"{config.kind} {config.threshold:g}"


def measure(pipe: FluxPipeline, args, size: int, captions: list[str] | None = None) -> dict:
    """Every setting once (images, decisions, caption accuracy when `captions` are the prompts), then
    `repeats` rounds of all settings in turn (times, and the decision's seconds inside each generation)."""
    prompts = captions or [args.prompt]
    call = dict(prompt=prompts, height=size, width=size, num_steps=args.steps, seed=0, output_type="pt",
                max_sequence_length=16)
    if pipe.transformer.params.guidance_embed:
        call["guidance"] = 3.5
    results = {}
    runs = variants(args, pipe.parallel.world_size)
    for key, config, folded in runs:
        with decision_path(folded):
            image = pipe(**call, cache=config)
        cache = pipe.last_run["cache"]
        results[key] = {
            "image": image, "times": [], "step_times": [], "decision_times": [], "reduction_times": [],
            "computed": {b: r["computed"] for b, r in cache["branches"].items()} if cache else None,
            "caption": caption_accuracy(image, captions) if captions and image is not None else None}
    for _ in range(args.repeats):
        for key, config, folded in runs:
            with decision_path(folded):
                pipe(**call, cache=config)
            results[key]["times"].append(sum(pipe.last_run["steps_s"]))
            results[key]["step_times"] += pipe.last_run["steps_s"]
            cache = pipe.last_run["cache"]
            results[key]["decision_times"].append(cache["decision_s"] if cache else 0.0)
            results[key]["reduction_times"].append(cache["reduction_s"] if cache else 0.0)
    batch = len(prompts)
    for key, config, _ in runs[1:]:
        results[key]["decision_alone_s"] = decision_cost(pipe, config, batch, size, args.steps)
    results["none"]["collective_s"] = collective_floor(pipe)
    return results


def local_tokens(pipe: FluxPipeline, size: int) -> int:
    """This rank's image tokens at size x size px."""
    layout = pipe.denoiser.sp.layout(16, (size // 16) ** 2)
    return layout.img_lens[pipe.parallel.rank("sp")]


def decision_cost(pipe: FluxPipeline, config: CacheConfig, batch: int, size: int, steps: int,
                  repeats: int = 100) -> float:
    """Median seconds of one decision alone on this rank's share of the generation's watched tensor
    [batch, tokens, hidden]: the sums, their reduction, the comparison. On several ranks a barrier comes
    first, so that waiting for a slower rank (which the next attention collective would wait anyway) is
    not counted."""
    shape = (batch, local_tokens(pipe, size), pipe.transformer.params.hidden_size)
    previous, signal = torch.randn(shape), torch.randn(shape)
    cache = StepCache(config, ("positive",), steps, pipe.denoiser.cache_sums())
    cache.decide(previous)  # the first step: only sets the reference
    times = []
    for _ in range(repeats):
        cache.step, cache.reference = 1, previous  # a middle step, every time against the same reference
        if pipe.parallel.world_size > 1:
            dist.barrier()
        start = time.perf_counter()
        cache.decide(signal)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def collective_floor(pipe: FluxPipeline, repeats: int = 100, busy_s: float = 0.02) -> dict | None:
    """Median seconds of one bare reduction of the decision's [2, 1] float64 sums: the call the decision
    makes, right after a barrier ("used") and after `busy_s` of matrix products on each rank, as inside
    a step, where every collective follows a phase of compute ("after_compute"); and for comparison the
    all-gather + rank-order sum it makes on 3 or more ranks, after a barrier ("all_gather"). Alternated;
    None on one rank, where there is none."""
    reduce_sums = pipe.denoiser.cache_sums()
    if reduce_sums is None:
        return None
    group = pipe.parallel.group("sp")
    matrix = torch.randn(64, 64)  # a few microseconds a product: both ranks stop within that of 20 ms

    def compute() -> None:
        end = time.perf_counter() + busy_s
        while time.perf_counter() < end:
            matrix @ matrix

    calls = {"used": (dist.barrier, reduce_sums), "after_compute": (compute, reduce_sums),
             "all_gather": (dist.barrier, lambda sums: comm.all_gather(sums[None], group, dim=0).sum(dim=0))}
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, (before, call) in calls.items():
            sums = torch.ones(2, 1, dtype=torch.float64)
            before()
            start = time.perf_counter()
            call(sums)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def worker(rank: int, args, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    with torch.inference_mode():
        for name in args.models:
            captions = evaluation_captions("held_out", args.captions, seed=1) if name == "tiny" else None
            results = measure(build_pipeline(name, ParallelContext(ulysses_degree=2)), args, SIZES[name], captions)
            if rank == 0:
                save(results, Path(out_dir) / f"{name}.ulysses2")


def save(results: dict, stem: Path) -> None:
    save_file({k: r["image"].contiguous() for k, r in results.items()}, f"{stem}.safetensors")
    Path(f"{stem}.json").write_text(json.dumps({k: {n: v for n, v in r.items() if n != "image"}
                                                for k, r in results.items()}))


def load(stem: Path) -> dict:
    images = load_file(f"{stem}.safetensors")
    return {k: {**r, "image": images[k]} for k, r in json.loads(Path(f"{stem}.json").read_text()).items()}


def psnr(image: torch.Tensor, reference: torch.Tensor) -> float:
    mse = (image - reference).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def rows(name: str, layout: str, results: dict, one_rank: dict | None, steps: int) -> list[dict]:
    base = results["none"]
    step_s = statistics.median(base["times"]) / steps  # one uncached step
    out = []
    for key, r in results.items():
        med = statistics.median(r["times"])
        row = {"model": name, "layout": layout, "cache": key, "computed": r["computed"],
               "denoise_s": med, "speedup": step_s * steps / med, "psnr_db": psnr(r["image"], base["image"]),
               "max_abs_err": (r["image"] - base["image"]).abs().max().item(), "step_s": step_s,
               "decision_pct_of_step": 100 * statistics.median(r["decision_times"]) / steps / step_s,
               "reduction_pct_of_step": 100 * statistics.median(r["reduction_times"]) / steps / step_s,
               "decision_alone_pct_of_step": 100 * r.get("decision_alone_s", 0.0) / step_s,
               "collective_s": base["collective_s"], "caption": r.get("caption"),
               # the median step against the uncached median step: at threshold 0 every step runs every
               # block, so the difference is what deciding adds to the step, waits included
               "median_step_vs_uncached_pct": 100 * (statistics.median(r["step_times"]) /
                                                     statistics.median(base["step_times"]) - 1)}
        if one_rank is not None:
            ref = one_rank[key.removesuffix(" all-reduce")]
            row["same_steps_as_1_rank"] = r["computed"] == ref["computed"]
            row["rel_err_vs_1_rank"] = ((r["image"] - ref["image"]).norm() / ref["image"].norm()).item()
        out.append(row)
    return out


def markdown(table: list[dict], steps: int) -> str:
    lines = ["| model | layout | cache | steps computed | denoise s | speed-up | PSNR dB | max abs err | "
             "decision % of a step: in the step (its reduction) / alone | caption acc | "
             "same steps / rel err vs 1 rank |",
             "|" + "---|" * 11]
    for row in table:
        computed = ", ".join(f"{len(c)}/{steps}" for c in row["computed"].values()) if row["computed"] else \
            f"{steps}/{steps}"
        vs_one = "" if "same_steps_as_1_rank" not in row else \
            f"{'yes' if row['same_steps_as_1_rank'] else 'NO'} / {row['rel_err_vs_1_rank']:.1e}"
        reduction = f" ({row['reduction_pct_of_step']:.2f})" if row["collective_s"] else ""
        decision = "–" if row["cache"] == "none" else \
            f"{row['decision_pct_of_step']:.2f}{reduction} / {row['decision_alone_pct_of_step']:.2f}"
        lines.append(f"| {row['model']} | {row['layout']} | {row['cache']} | {computed} | {row['denoise_s']:.2f} | "
                     f"{row['speedup']:.2f}x | {row['psnr_db']:.1f} | {row['max_abs_err']:.3f} | {decision} | "
                     f"{caption_cell(row['caption'])} | {vs_one} |")
    return "\n".join(lines)


def floors(table: list[dict]) -> str:
    """One line per model and layout: the uncached step, the bare reduction under the decision, and the
    median step at threshold 0 (every block runs, and the decision is made) against the uncached one."""
    lines = []
    for row in table:
        if row["cache"] == "none":
            floor = "no reduction (one rank)" if row["collective_s"] is None else \
                f"one bare reduction (all-reduce) {1e6 * row['collective_s']['used']:.0f} us = " \
                f"{100 * row['collective_s']['used'] / row['step_s']:.2f}% of a step, after 20 ms of compute " \
                f"{1e6 * row['collective_s']['after_compute']:.0f} us = " \
                f"{100 * row['collective_s']['after_compute'] / row['step_s']:.2f}% (all-gather + sum: " \
                f"{1e6 * row['collective_s']['all_gather']:.0f} us)"
            zero = [f"{r['cache']} {r['median_step_vs_uncached_pct']:+.1f}%" for r in table
                    if (r["model"], r["layout"]) == (row["model"], row["layout"])
                    and (r["cache"].endswith(" 0") or " 0 F" in r["cache"])]
            lines.append(f"- {row['model']}, {row['layout']}: uncached step {1e3 * row['step_s']:.1f} ms; "
                         f"{floor}; median step at threshold 0 vs uncached: {', '.join(zero) or 'not run'}")
    return "\n".join(lines)


def caption_cell(accuracy: dict | None) -> str:
    """Held-out captions: both colours right / position right (where named)."""
    return "–" if accuracy is None else f"{accuracy['colours']:.0%} / {accuracy['position']:.0%}"


def image_row(results: dict, path: str) -> None:
    """uncached, then each setting, side by side, as one PNG (tools/generate.py's encoder)."""
    from flux_parallel.flux.images import write_png

    images = [r["image"][0] for r in results.values()]
    gap = torch.ones(3, images[0].shape[1], 4)
    write_png(path, torch.cat([t for image in images for t in (image, gap)][:-1], dim=2))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(SIZES), default=["tiny", "medium"])
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fbcache", type=float, nargs="*", default=[0, 0.5, 0.6, 0.8])
    parser.add_argument("--teacache", type=float, nargs="*", default=[0, 0.4, 0.8, 1.5])
    parser.add_argument("--dbcache", nargs="*", metavar="T:FIRST:LAST:ORDER",
                        default=["0:1:1:1", "0.2:1:1:0", "0.2:1:1:1", "0.2:1:1:2", "0.3:1:1:0", "0.3:1:1:1",
                                 "0.3:1:1:2", "0.4:1:1:1", "0.3:2:1:1", "0.6:1:1:0", "0.6:1:1:1"],
                        help="DBCache settings: threshold, Fn, Bn, TaylorSeer order (0 = reuse)")
    parser.add_argument("--prompt", default="a red fox in the snow", help="the medium model's prompt")
    parser.add_argument("--captions", type=int, default=60, help="held-out captions the tiny model draws as "
                        "one batch (eval_tiny.py's default count)")
    parser.add_argument("--json", default=None, help="write every row as JSON here")
    parser.add_argument("--image-row", default=None, help="write the tiny model's images (uncached, then each "
                        "setting, 1 rank) side by side as a PNG here")
    args = parser.parse_args()
    if args.steps < 1 or args.repeats < 1:
        parser.error("--steps and --repeats must be at least 1")
    try:
        settings(args)
    except ValueError as err:
        parser.error(str(err))
    torch.set_num_threads(1)
    started = time.time()
    captions = evaluation_captions("held_out", args.captions, seed=1)  # the trained tiny model's held-out set
    with torch.inference_mode():
        one_rank = {name: measure(build_pipeline(name), args, SIZES[name], captions if name == "tiny" else None)
                    for name in args.models}
    with tempfile.TemporaryDirectory() as out_dir:
        spawn(worker, 2, args, free_port(), out_dir)
        two_ranks = {name: load(Path(out_dir) / f"{name}.ulysses2") for name in args.models}
    table = []
    for name in args.models:
        table += rows(name, "1 rank", one_rank[name], None, args.steps)
        table += rows(name, "ulysses 2", two_ranks[name], one_rank[name], args.steps)
    tiny = "trained tiny (FluxPipeline.tiny)"
    print(f"\n{args.steps} steps, fp32, 1 thread per process, median of {args.repeats}, torch {torch.__version__}, "
          f"{os.cpu_count()} cores (load average {os.getloadavg()[0]:.1f}), {time.time() - started:.0f} s; "
          f"tiny = {tiny}, {SIZES['tiny']} px, {args.captions} held-out captions (caption acc: both colours / "
          f"position right); medium = {SIZES['medium']} px")
    print(markdown(table, args.steps))
    print(floors(table))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "tiny": tiny, "rows": table}, indent=1))
    if args.image_row and "tiny" in one_rank:
        image_row(one_rank["tiny"], args.image_row)


if __name__ == "__main__":
    main()

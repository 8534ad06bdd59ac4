"""Step caches against the uncached image: steps computed, speed-up, image error, decision overhead.

    python tools/bench_cache.py [--models tiny medium] [--steps 28] [--repeats 3]
                                [--fbcache 0 0.05 0.1 0.2] [--teacache 0 0.25 0.4 0.6]
                                [--json docs/cache.json] [--image-row docs/cache_row.png]

Two models: the tiny pipeline (the trained one where FluxPipeline.tiny_random exists, else the seeded
random one; the output says which) and the medium transformer of tools/bench_transformer.py (hidden 768,
12 heads, 4 double + 8 single blocks, random weights) made dev-style (guidance embedding, shifted
schedule) with the tiny text encoders and VAE. For each, one process runs the uncached generation and
every cache setting in turn, `--repeats` rounds, then two gloo processes do the same with Ulysses 2.
Per setting: the steps computed (per CFG branch), the median denoising time and its speed-up over the
uncached one in the same layout, PSNR and max abs error of the decoded image ([0, 1]) against the
uncached one, the decision's share of an uncached step (as timed inside the generation, which on several
ranks includes waiting in the gather for the slower rank; and alone, after a barrier), and, on 2 ranks,
whether the steps and the image are those of 1 rank. fp32, 1 thread per process, 64x64 px for tiny and
128x128 px for medium. The CPU is shared and noisy: figures drift 10-20% or more.
"""

import argparse
import dataclasses
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from eval_tiny import caption_accuracy, evaluation_captions
from safetensors.torch import load_file, save_file

from flux.cache import CacheConfig, StepCache
from flux.configs import CONFIGS
from flux.layers import layer_norm
from flux.model import Flux
from flux.pipeline import FluxPipeline
from flux.sampling import Schedule
from parallel.context import ParallelContext
from vae import VAE_CONFIGS, AutoEncoder
from weights import seeded_init

MEDIUM_DEV = dataclasses.replace(  # bench_transformer.py's MEDIUM, dev-style, fed by the tiny text encoders
    CONFIGS["tiny"], hidden_size=768, num_heads=12, depth=4, depth_single_blocks=8, axes_dim=(8, 28, 28),
    mlp_ratio=4.0, guidance_embed=True,
)
SIZES = {"tiny": 64, "medium": 128}  # pixels per side: 16 and 64 image tokens (the CPU is slow and shared)


def build_pipeline(name: str, parallel: ParallelContext | None = None) -> FluxPipeline:
    if name == "tiny":
        return FluxPipeline.tiny(parallel=parallel)
    from flux.text_encoders import TextConditioner

    model = seeded_init(Flux(MEDIUM_DEV), 0)
    vae = seeded_init(AutoEncoder(VAE_CONFIGS["tiny"]), 2)
    return FluxPipeline(model, vae, TextConditioner.tiny(seed=0), Schedule(use_dynamic_shifting=True), parallel)


def settings(args) -> list[CacheConfig | None]:
    return [None] + [CacheConfig(kind, t) for kind in ("fbcache", "teacache") for t in getattr(args, kind)]


def label(config: CacheConfig | None) -> str:
    return "none" if config is None else f"{config.kind} {config.threshold:g}"


def measure(pipe: FluxPipeline, args, size: int, captions: list[str] | None = None) -> dict:
    """Every setting once (images, decisions, caption accuracy when `captions` are the prompts), then
    `repeats` rounds of all settings in turn (times)."""
    call = dict(prompt=captions or args.prompt, height=size, width=size, num_steps=args.steps, seed=0,
                output_type="pt", max_sequence_length=16)
    if pipe.transformer.params.guidance_embed:
        call["guidance"] = 3.5
    results = {}
    for config in settings(args):
        image = pipe(**call, cache=config)
        cache = pipe.last_run["cache"]
        results[label(config)] = {
            "image": image, "times": [], "decision_s": cache["decision_s"] if cache else 0.0,
            "computed": {b: r["computed"] for b, r in cache["branches"].items()} if cache else None,
            "caption": caption_accuracy(image, captions) if captions and image is not None else None}
    for _ in range(args.repeats):
        for config in settings(args):
            pipe(**call, cache=config)
            results[label(config)]["times"].append(sum(pipe.last_run["steps_s"]))
    for config in settings(args)[1:]:
        results[label(config)]["decision_alone_s"] = decision_cost(pipe, config, size, args.steps)
    return results


def decision_cost(pipe: FluxPipeline, config: CacheConfig, size: int, steps: int, repeats: int = 30) -> float:
    """Median seconds of one decision alone, on this rank's share of the image: the indicator (TeaCache:
    with the modulated input), the sp gather, the comparison. On several ranks a barrier comes first, so
    that waiting for a slower rank (which the next attention collective would wait anyway) is not counted."""
    ctx, hidden = pipe.parallel, pipe.transformer.params.hidden_size
    layout = pipe.denoiser.sp.layout(16, (size // 16) ** 2)
    img, img_first = torch.randn(2, 1, layout.img_lens[ctx.rank("sp")], hidden)
    vec, block = torch.randn(1, hidden), pipe.transformer.double_blocks[0]
    cache = StepCache(config, ("positive",), steps, pipe.denoiser.cache_sums())
    cache.decide(img)  # the first step: only sets the reference
    cache.step = 1
    times = []
    for _ in range(repeats):
        if ctx.world_size > 1:
            dist.barrier()
        start = time.perf_counter()
        signal = block.img_mod(vec)[0].modulate(layer_norm(img)) if config.kind == "teacache" else img_first - img
        cache.decide(signal)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker(rank: int, args, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    with torch.inference_mode():
        for name in args.models:
            captions = evaluation_captions("held_out", args.captions, seed=1) if name == "tiny" else None
            results = measure(build_pipeline(name, ParallelContext(ulysses_degree=2)), args, SIZES[name], captions)
            if rank == 0:
                save(results, Path(out_dir) / f"{name}.ulysses2")
    dist.barrier()
    dist.destroy_process_group()


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
    base_s = statistics.median(base["times"])
    out = []
    for key, r in results.items():
        med = statistics.median(r["times"])
        row = {"model": name, "layout": layout, "cache": key, "computed": r["computed"],
               "denoise_s": med, "speedup": base_s / med, "psnr_db": psnr(r["image"], base["image"]),
               "max_abs_err": (r["image"] - base["image"]).abs().max().item(),
               "decision_pct_of_step": 100 * r["decision_s"] / steps / (base_s / steps),
               "decision_alone_pct_of_step": 100 * r.get("decision_alone_s", 0.0) / (base_s / steps),
               "caption": r.get("caption")}
        if one_rank is not None:
            ref = one_rank[key]
            row["same_steps_as_1_rank"] = r["computed"] == ref["computed"]
            row["rel_err_vs_1_rank"] = ((r["image"] - ref["image"]).norm() / ref["image"].norm()).item()
        out.append(row)
    return out


def markdown(table: list[dict], steps: int) -> str:
    lines = ["| model | layout | cache | steps computed | denoise s | speed-up | PSNR dB | max abs err | "
             "decision % of a step: in the step / alone | caption acc | same steps / rel err vs 1 rank |",
             "|" + "---|" * 11]
    for row in table:
        computed = ", ".join(f"{len(c)}/{steps}" for c in row["computed"].values()) if row["computed"] else \
            f"{steps}/{steps}"
        vs_one = "" if "same_steps_as_1_rank" not in row else \
            f"{'yes' if row['same_steps_as_1_rank'] else 'NO'} / {row['rel_err_vs_1_rank']:.1e}"
        lines.append(f"| {row['model']} | {row['layout']} | {row['cache']} | {computed} | {row['denoise_s']:.2f} | "
                     f"{row['speedup']:.2f}x | {row['psnr_db']:.1f} | {row['max_abs_err']:.3f} | "
                     f"{row['decision_pct_of_step']:.2f} / {row['decision_alone_pct_of_step']:.2f} | "
                     f"{caption_cell(row['caption'])} | "
                     f"{vs_one} |")
    return "\n".join(lines)


def caption_cell(accuracy: dict | None) -> str:
    """Held-out captions: both colours right / position right (where named)."""
    return "–" if accuracy is None else f"{accuracy['colours']:.0%} / {accuracy['position']:.0%}"


def image_row(results: dict, path: str) -> None:
    """uncached, then each setting, side by side, as one PNG (tools/generate.py's encoder)."""
    from generate import write_png

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
    parser.add_argument("--prompt", default="a red fox in the snow", help="the medium model's prompt")
    parser.add_argument("--captions", type=int, default=16, help="held-out captions the tiny model draws")
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
        mp.spawn(worker, args=(args, 29500 + os.getpid() % 1000, out_dir), nprocs=2, join=True)
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
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "tiny": tiny, "rows": table}, indent=1))
    if args.image_row and "tiny" in one_rank:
        image_row(one_rank["tiny"], args.image_row)


if __name__ == "__main__":
    main()

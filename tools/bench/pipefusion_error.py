"""PipeFusion's error against the exact images, for each warm-up and patch count, on the trained tiny model.

    python tools/bench/pipefusion_error.py [--stages 2] [--warmup 0 1 2] [--steps 8] [--captions 60] [--seed 0]
                                           [--cache THRESHOLD:FIRST:LAST:ORDER]

With stale activations the result does not depend on the number of stages (each block sees the
same fresh and stale patches whichever rank holds it; tests/test_pipefusion.py checks multi-stage
runs against this), so every row runs PipeFusion's arithmetic in one process
(ParallelContext(num_pipeline_patch=M, warmup_steps=W)) with M = N and 2N patches for each N given.
The prompts are tools/eval_tiny.py's held-out captions (colour, shape and background combinations
the model never saw in training), drawn at 64x64 px (4 rows of tokens: M <= 4) by the trained tiny
model (FluxPipeline.tiny), 20 images per batch with the noise of eval_tiny.generate. Each row gives,
against the exact images: PSNR of the images in [0, 1] (over all of them), the largest absolute
error of the images and of the latents; the held-out caption accuracy (eval_tiny.caption_accuracy:
both colours right, position right where the caption names one) of the stale images beside the
exact ones'; and the share of images whose measured colours and position equal the exact image's.
With --cache every run uses that DBCache (flux/cache.py): the exact images are then the single-device
cached ones, and each row also gives the steps computed per batch (the first stage decides from the step's
first row band after warm-up: parallel/pipefusion.py).
"""

import argparse
import math

import torch

from flux_parallel.flux.cache_config import CacheConfig
from flux_parallel.flux.pipeline import FluxPipeline
from flux_parallel.parallel.context import ParallelContext
from flux_parallel.shapes.evaluate import caption_accuracy, evaluation_captions, measure, nearest_position

SIZE, BATCH = 64, 20  # the trained tiny model's resolution; eval_tiny.generate's batches


def psnr(image: torch.Tensor, exact: torch.Tensor) -> float:
    mse = (image - exact).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def run(parallel: ParallelContext | None, captions: list[str], steps: int, seed: int,
        cache: CacheConfig | None = None) -> tuple:
    """(latents, images [n, 3, 64, 64] in [0, 1], steps computed per batch or None) of the captions; batch b
    draws its noise from seed + b."""
    pipe = FluxPipeline.tiny(parallel=parallel)
    latents, images, computed = [], [], []
    for i in range(0, len(captions), BATCH):
        call = dict(prompt=captions[i : i + BATCH], height=SIZE, width=SIZE, num_steps=steps, seed=seed + i // BATCH,
                    cache=cache)
        latents.append(pipe(**call, output_type="latent"))
        images.append(pipe(**call, output_type="pt"))
        if cache is not None:
            computed.append(len(pipe.last_run["cache"]["branches"]["positive"]["computed"]))
    return torch.cat(latents), torch.cat(images), computed or None


def reading(image: torch.Tensor) -> tuple:
    """What eval_tiny reads from an image: background, shape colour and the nearest named position."""
    seen = measure(image)
    return seen["background"], seen["colour"], seen["centroid"] and nearest_position(seen["centroid"])


def accuracy_cell(accuracy: dict) -> str:
    return f"{accuracy['colours']:.0%} / {accuracy['position']:.0%}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", type=int, nargs="+", default=[2])
    p.add_argument("--warmup", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--captions", type=int, default=60, help="held-out captions drawn")
    p.add_argument("--seed", type=int, default=0, help="picks the captions and the noise")
    p.add_argument("--cache", default=None, metavar="T:FIRST:LAST:ORDER", help="every run with this DBCache")
    args = p.parse_args(argv)
    try:
        cache = None if args.cache is None else CacheConfig("dbcache", float(args.cache.split(":")[0]),
                                                            *map(int, args.cache.split(":")[1:]))
    except (ValueError, TypeError) as err:
        p.error(f"--cache {args.cache}: expected THRESHOLD:FIRST:LAST:ORDER ({err})")
    patches = sorted({m for n in args.stages for m in (n, 2 * n)})
    if min(args.stages) < 1 or max(patches) > SIZE // 16 or min(args.warmup) < 0 or args.captions < 1:
        p.error(f"--stages must be at least 1 with 2N patches at most the {SIZE // 16} rows of a {SIZE} px image, "
                "--warmup at least 0 and --captions at least 1")
    torch.set_num_threads(1)
    captions = evaluation_captions("held_out", args.captions, args.seed)
    exact_latents, exact_images, exact_computed = run(None, captions, args.steps, args.seed, cache)
    exact_reading = [reading(image) for image in exact_images]
    exact_accuracy = caption_accuracy(exact_images, captions)
    print(f"trained tiny model, {SIZE}x{SIZE} px ({SIZE // 16} token rows), {args.steps} steps, fp32, "
          f"{args.captions} held-out captions (seed {args.seed}); exact images: caption accuracy (both colours / "
          f"position) {accuracy_cell(exact_accuracy)}, latents max abs {exact_latents.abs().max().item():.3f}"
          + ("" if cache is None else f"; all with {cache}, exact steps computed per batch {exact_computed}"))
    print("| patches M | warm-up W | PSNR (dB) | max abs error, image | max abs error, latents "
          "| caption accuracy, stale (exact) | same reading as exact |")
    print("|---|---|---|---|---|---|---|")
    for m in patches:
        for w in args.warmup:
            latents, images, computed = run(ParallelContext(num_pipeline_patch=m, warmup_steps=w), captions,
                                            args.steps, args.seed, cache)
            same = sum(reading(image) == seen for image, seen in zip(images, exact_reading)) / len(captions)
            print(f"| {m} | {w} | {psnr(images, exact_images):.2f} | {(images - exact_images).abs().max().item():.4f} "
                  f"| {(latents - exact_latents).abs().max().item():.4f} "
                  f"| {accuracy_cell(caption_accuracy(images, captions))} ({accuracy_cell(exact_accuracy)}) "
                  f"| {same:.0%} |" + ("" if computed is None else f" computed {computed}"))


if __name__ == "__main__":
    main()

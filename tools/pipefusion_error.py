"""PipeFusion's error against the exact image, for each warm-up and patch count.

    python tools/pipefusion_error.py [--stages 2 4] [--warmup 0 1 2] [--steps 8] [--size 128]

With stale activations the result does not depend on the number of stages (each block sees the
same fresh and stale patches whichever rank holds it; tests/test_pipefusion.py checks multi-stage
runs against this), so every row runs PipeFusion's arithmetic in one process
(ParallelContext(num_pipeline_patch=M, warmup_steps=W)) and compares it with the plain pipeline:
PSNR of the decoded image in [0, 1], and the largest absolute error of the image and of the latents.
M = N and 2N patches for each N given. The tiny model (FluxPipeline.tiny) is what this runs on.
"""

import argparse
import math

import torch

from flux.pipeline import FluxPipeline
from parallel.context import ParallelContext


def psnr(image: torch.Tensor, exact: torch.Tensor) -> float:
    mse = (image - exact).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def run(parallel: ParallelContext | None, call: dict) -> tuple[torch.Tensor, torch.Tensor]:
    pipe = FluxPipeline.tiny(parallel=parallel)
    latents = pipe(**call, output_type="latent")
    image = pipe(**call, output_type="pt")
    return latents, image


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", type=int, nargs="+", default=[2, 4])
    p.add_argument("--warmup", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--size", type=int, default=128, help="pixels per side (a multiple of 16)")
    p.add_argument("--prompt", default="a red fox in the snow")
    args = p.parse_args(argv)
    call = dict(prompt=args.prompt, height=args.size, width=args.size, num_steps=args.steps, max_sequence_length=16)
    exact_latents, exact_image = run(None, call)
    patches = sorted({m for n in args.stages for m in (n, 2 * n)})
    print(f"tiny model, {args.size}x{args.size} px ({args.size // 16} token rows), {args.steps} steps, fp32")
    print("| patches M | warm-up W | PSNR (dB) | max abs error, image | max abs error, latents |")
    print("|---|---|---|---|---|")
    for m in patches:
        for w in args.warmup:
            latents, image = run(ParallelContext(num_pipeline_patch=m, warmup_steps=w), call)
            print(f"| {m} | {w} | {psnr(image, exact_image):.2f} | {(image - exact_image).abs().max().item():.4f} "
                  f"| {(latents - exact_latents).abs().max().item():.4f} |")
    print(f"exact latents: max abs {exact_latents.abs().max().item():.3f}")


if __name__ == "__main__":
    main()

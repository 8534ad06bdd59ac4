"""Does the tiny FLUX draw what it is asked? Generate held-out and training captions of the shapes
data set and read each image back (flux_parallel/shapes/evaluate.py).

    python tools/eval_tiny.py                      # 60 held-out and 60 training captions, 4 steps
    python tools/eval_tiny.py --grid docs/tiny/grid.png
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from flux_parallel.flux.images import write_grid
from flux_parallel.flux.pipeline import FluxPipeline
from flux_parallel.shapes.evaluate import caption_accuracy, evaluation_captions, generate


def table(results: dict[str, dict]) -> str:
    lines = ["| captions | images | colours (shape and background) | shape colour | background | position | size |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['colours_count']} | {r['colours']:.0%} | {r['foreground']:.0%} | "
                     f"{r['background']:.0%} | {r['position']:.0%} ({r['position_count']}) | "
                     f"{r['size']:.0%} ({r['size_count']}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a checkpoint folder (default: the shipped tiny model)")
    p.add_argument("--count", type=int, default=60, help="captions per split")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the pipeline's, 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", default=None, help="write a PNG of the first 16 held-out images here")
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args(argv)
    if args.count < 1:
        p.error(f"--count must be at least 1, got {args.count}")
    torch.set_num_threads(1)
    pipe = FluxPipeline.tiny() if args.model is None else FluxPipeline.from_pretrained(args.model, dtype=torch.float32)
    results, held_out = {}, None
    for split in ("held_out", "train"):
        captions = evaluation_captions(split, args.count, args.seed)
        images = generate(pipe, captions, args.seed, args.steps)
        results[split.replace("_", "-")] = caption_accuracy(images, captions)
        held_out = (images, captions) if split == "held_out" else held_out
    print(table(results))
    if args.grid:
        write_grid(args.grid, held_out[0][:16])
        print("\n".join(f"{i + 1}. {c}" for i, c in enumerate(held_out[1][:16])))
    if args.json:
        Path(args.json).write_text(json.dumps({"steps": pipe.last_run["num_steps"], "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

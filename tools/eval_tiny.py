"""Does the tiny FLUX draw what it is asked? Generate held-out and training captions of the shapes
data set and read each image back (flux_parallel/shapes/evaluate.py).

    python tools/eval_tiny.py                      # 60 held-out and 60 training captions, 4 steps
    python tools/eval_tiny.py --grid docs/tiny/grid.png
    python tools/eval_tiny.py --kontext --grid docs/tiny/kontext_grid.png   # the tiny Kontext's edits
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from flux_parallel import flux
from flux_parallel.flux.images import write_grid
from flux_parallel.flux.pipeline import FluxPipeline
from flux_parallel.shapes import data as shapes
from flux_parallel.shapes.evaluate import (
    caption_accuracy,
    edit_accuracy,
    evaluation_captions,
    evaluation_edits,
    generate,
    generate_edits,
)


def table(results: dict[str, dict]) -> str:
    lines = ["| captions | images | colours (shape and background) | shape colour | background | position | size |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['colours_count']} | {r['colours']:.0%} | {r['foreground']:.0%} | "
                     f"{r['background']:.0%} | {r['position']:.0%} ({r['position_count']}) | "
                     f"{r['size']:.0%} ({r['size_count']}) |")
    return "\n".join(lines)


def evaluate_kontext(args) -> int:
    """Held-out and training edits; and the held-out ones with each reference swapped for another edit's,
    which shows what the edits owe to the reference."""
    tiny = Path(flux.__file__).resolve().parent / "assets" / "tiny"  # its encoders and VAE
    pipe = FluxPipeline.tiny_kontext() if args.model is None else FluxPipeline.from_pretrained(
        tiny, dtype=torch.float32, transformer=args.model, variant="kontext")
    results, shown = {}, None
    for split in ("held_out", "train"):
        edits = evaluation_edits(split, args.count, args.seed)
        images = generate_edits(pipe, edits, args.seed, args.steps)
        results[split.replace("_", "-")] = edit_accuracy(images, edits)
        shown = (edits, images) if split == "held_out" else shown
    edits = evaluation_edits("held_out", args.count, args.seed)
    others = [shapes.Edit(o.source, e.target, e.kind) for e, o in zip(edits, edits[1:] + edits[:1])]
    images = generate_edits(pipe, others, args.seed, args.steps)  # each edit's caption on the next one's source
    results["held-out, another reference"] = edit_accuracy(images, edits)
    print("| edits | count | asked colour | untouched colour kept | both |\n|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['count']} | {r['asked']:.0%} | {r['kept']:.0%} | {r['colours']:.0%} |")
    if args.grid:
        pairs = [image for e, edited in zip(*shown) for image in (shapes.render(e.source), edited)]
        write_grid(args.grid, torch.stack(pairs[:32]), columns=8)
        print("\n".join(f"{i + 1}. {e.caption}" for i, e in enumerate(shown[0][:16])))
    if args.json:
        Path(args.json).write_text(json.dumps({"steps": pipe.last_run["num_steps"], "results": results}, indent=2))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a checkpoint folder (default: the shipped tiny model)")
    p.add_argument("--count", type=int, default=60, help="captions per split")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the pipeline's, 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", default=None, help="write a PNG of the first 16 held-out images here")
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("--kontext", action="store_true", help="the tiny Kontext's edits (--model: its transformer)")
    args = p.parse_args(argv)
    if args.count < 1:
        p.error(f"--count must be at least 1, got {args.count}")
    torch.set_num_threads(1)
    if args.kontext:
        return evaluate_kontext(args)
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

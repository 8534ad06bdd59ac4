"""Does the tiny FLUX draw what it is asked? Generate captions of tools/shapes.py and measure each image.

    python tools/eval_tiny.py                      # 60 held-out and 60 training captions, 4 steps
    python tools/eval_tiny.py --grid docs/tiny/grid.png

Each image is read with simple pixel statistics: every pixel takes the nearest palette colour; the
most frequent is the background, the most frequent of the rest the shape; the shape's pixels give
its centroid (the position: the nearest named anchor) and its area (the size: the nearest of the
areas that size has). `caption_accuracy(images, captions)` is the measure, importable by other tools.
"""

import argparse
import json
import random
import re
import sys
from pathlib import Path

import shapes
import torch
from torch import Tensor

PALETTE = list(shapes.COLOURS)
CAPTION = re.compile(
    rf"^an? (?:(?P<size>small|large) )?(?P<colour>{'|'.join(PALETTE)}) (?P<shape>{'|'.join(shapes.SHAPES)})"
    rf"(?: (?P<position>in the [a-z ]+?))? on an? (?P<background>{'|'.join(PALETTE)}) background$"
)


def parse_caption(caption: str) -> dict:
    match = CAPTION.match(caption)
    if match is None:
        raise ValueError(f"caption {caption!r} is not of the shapes data set's form")
    return {k: v or "" for k, v in match.groupdict().items()}


def measure(image: Tensor) -> dict:
    """image [3, H, W] in [0, 1] -> background and shape colour names, the shape's centroid (x, y) and area in
    pixels of a 64 px image; shape colour None when every pixel has the background's colour."""
    palette = torch.tensor([shapes.COLOURS[c] for c in PALETTE], dtype=torch.float32) / 255  # [K, 3]
    pixels = image.float().flatten(1).T  # [H * W, 3]
    labels = torch.cdist(pixels, palette).argmin(dim=1)  # [H * W] nearest palette colour
    counts = torch.bincount(labels, minlength=len(PALETTE))
    background = counts.argmax().item()
    counts[background] = 0
    if counts.sum() == 0:
        return {"background": PALETTE[background], "colour": None, "centroid": None, "area": 0.0}
    colour = counts.argmax().item()
    height, width = image.shape[1:]
    mask = (labels == colour).view(height, width)
    y, x = torch.nonzero(mask, as_tuple=True)
    scale = shapes.IMAGE_SIZE / width  # report in the data set's 64 px frame
    centroid = ((x.float().mean().item() + 0.5) * scale, (y.float().mean().item() + 0.5) * scale)
    return {"background": PALETTE[background], "colour": PALETTE[colour], "centroid": centroid,
            "area": mask.sum().item() * scale**2}


def nearest_position(centroid: tuple[float, float]) -> str:
    named = {name: anchor for name, anchor in shapes.POSITIONS.items() if anchor is not None}
    return min(named, key=lambda name: (named[name][0] - centroid[0]) ** 2 + (named[name][1] - centroid[1]) ** 2)


def nearest_size(shape: str, area: float) -> str:
    """The size whose drawn area (for this shape) is nearest on a log scale."""
    centre = (shapes.IMAGE_SIZE // 2, shapes.IMAGE_SIZE // 2)
    areas = {size: shapes.shape_mask(shape, centre, half).sum().item() for size, half in shapes.SIZES.items()}
    return min(areas, key=lambda size: abs(torch.log(torch.tensor(area / areas[size]))).item())


def caption_accuracy(images: Tensor, captions: list[str]) -> dict:
    """images [B, 3, H, W] in [0, 1] -> the fraction of images whose colours (shape and background both),
    shape colour, background, position and size match their caption; position and size count only the
    captions that name one (`*_count` says how many did)."""
    if images.ndim != 4 or images.shape[0] != len(captions):
        raise ValueError(f"images must be [{len(captions)}, 3, H, W] for {len(captions)} captions, "
                         f"got {list(images.shape)}")
    right = {"colours": [], "foreground": [], "background": [], "position": [], "size": []}
    for image, caption in zip(images, captions):
        want, got = parse_caption(caption), measure(image)
        right["foreground"].append(got["colour"] == want["colour"])
        right["background"].append(got["background"] == want["background"])
        right["colours"].append(right["foreground"][-1] and right["background"][-1])
        found = got["colour"] is not None
        if want["position"]:
            right["position"].append(found and nearest_position(got["centroid"]) == want["position"])
        if want["size"]:
            right["size"].append(found and nearest_size(want["shape"], got["area"]) == want["size"])
    result = {name: sum(hits) / len(hits) if hits else float("nan") for name, hits in right.items()}
    return result | {f"{name}_count": len(hits) for name, hits in right.items()}


def evaluation_captions(split: str, count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [shapes.sample_scene(rng, split).caption for _ in range(count)]


def generate(pipe, captions: list[str], seed: int, num_steps: int | None = None, batch: int = 20) -> Tensor:
    """[len(captions), 3, 64, 64] in [0, 1]; batch b of the captions draws its noise from seed + b."""
    size = shapes.IMAGE_SIZE
    return torch.cat([
        pipe(captions[i : i + batch], height=size, width=size, num_steps=num_steps, seed=seed + i // batch,
             output_type="pt")
        for i in range(0, len(captions), batch)
    ])


def write_grid(path: str, images: Tensor, columns: int = 4, scale: int = 2) -> None:
    """The images side by side, `columns` per row, each enlarged `scale` times, 4 px apart on white."""
    from generate import write_png

    rows = -(-len(images) // columns)
    side, gap = images.shape[-1] * scale, 4
    grid = torch.ones(3, rows * (side + gap) + gap, columns * (side + gap) + gap)
    for i, image in enumerate(images):
        top, left = gap + (i // columns) * (side + gap), gap + (i % columns) * (side + gap)
        grid[:, top : top + side, left : left + side] = image.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    write_png(path, grid)


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
    from flux.pipeline import FluxPipeline

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

"""Does the tiny FLUX draw what it is asked? Generate captions of shapes/data.py and measure each image
(tools/eval_tiny.py is its command).

Each image is read with simple pixel statistics: every pixel takes the nearest palette colour; the
most frequent is the background, the most frequent of the rest the shape; the shape's pixels give
its centroid (the position: the nearest named anchor) and its area (the size: the nearest of the
areas that size has). `caption_accuracy(images, captions)` is the measure, importable by other tools.
"""

import random
import re

import torch
from torch import Tensor

from flux_parallel.shapes import data as shapes

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


def edit_accuracy(images: Tensor, edits: list) -> dict:
    """images [B, 3, H, W] in [0, 1], the results of shapes.Edit's -> the fraction whose asked colour is there
    (the shape's or the background's, by the edit's kind), whose untouched part kept its colour, and both
    ("colours": the edit check)."""
    if images.ndim != 4 or images.shape[0] != len(edits):
        raise ValueError(f"images must be [{len(edits)}, 3, H, W] for {len(edits)} edits, got {list(images.shape)}")
    right = {"asked": [], "kept": [], "colours": []}
    for image, edit in zip(images, edits):
        got = measure(image)
        asked, kept = ("colour", "background") if edit.kind == "shape" else ("background", "colour")
        right["asked"].append(got[asked] == getattr(edit.target, asked))
        right["kept"].append(got[kept] == getattr(edit.source, kept))
        right["colours"].append(right["asked"][-1] and right["kept"][-1])
    return {name: sum(hits) / len(hits) for name, hits in right.items()} | {"count": len(edits)}


def evaluation_edits(split: str, count: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    return [shapes.sample_edit(rng, split) for _ in range(count)]


def generate_edits(pipe, edits: list, seed: int, num_steps: int | None = None, batch: int = 20) -> Tensor:
    """[len(edits), 3, 64, 64] in [0, 1]: a Kontext pipeline's result for each edit's source and caption."""
    sources = torch.stack([shapes.render(e.source) for e in edits])
    size = shapes.IMAGE_SIZE
    return torch.cat([
        pipe([e.caption for e in edits[i : i + batch]], image=sources[i : i + batch], height=size, width=size,
             num_steps=num_steps, seed=seed + i // batch, output_type="pt", auto_resize=False)
        for i in range(0, len(edits), batch)
    ])

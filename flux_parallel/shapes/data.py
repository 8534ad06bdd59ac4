"""A seeded synthetic data set of captioned shapes, drawn on the fly: the tiny FLUX's training data.

Each image is one flat-coloured circle, square or triangle on a flat background, 64x64 px, with
a plain-English caption that names the shape, its colour and the background's, and, sometimes,
its size and position:

    "a small green triangle in the top left corner on a blue background"
    "a red circle on a yellow background"

The held-out split is a fixed set of (colour, shape, background) combinations that the training
split never draws, in any size or position: the model must compose them from parts it has seen.
"""

import functools
import itertools
import random
from dataclasses import dataclass, replace

import torch
from torch import Tensor

IMAGE_SIZE = 64
COLOURS = {  # RGB, far enough apart that the nearest palette colour classifies a pixel
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 135, 30),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 7, "": 11, "large": 16}  # half the shape's width in px; medium goes unnamed
POSITIONS = {  # the shape's centre in px (x, y) before a jitter; "" places it anywhere
    "in the top left corner": (18, 18),
    "in the top right corner": (46, 18),
    "in the bottom left corner": (18, 46),
    "in the bottom right corner": (46, 46),
    "in the center": (32, 32),
    "": None,
}
JITTER = 3  # px either way around a named position
HELD_OUT_SEED, HELD_OUT_COUNT = 2024, 20


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    size: str  # a key of SIZES
    position: str  # a key of POSITIONS
    centre: tuple[int, int]  # (x, y) in px

    @property
    def caption(self) -> str:
        noun_phrase = " ".join(w for w in (self.size, self.colour, self.shape, self.position) if w)
        return f"{article(noun_phrase)} {noun_phrase} on {article(self.background)} {self.background} background"


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def all_combinations() -> list[tuple[str, str, str]]:
    """Every (colour, shape, background) with a background unlike the shape's colour."""
    return [(c, s, b) for c, s, b in itertools.product(COLOURS, SHAPES, COLOURS) if c != b]


@functools.cache
def held_out_combinations() -> frozenset[tuple[str, str, str]]:
    """A fixed random 20 of the 168 combinations, never drawn for training."""
    return frozenset(random.Random(HELD_OUT_SEED).sample(all_combinations(), HELD_OUT_COUNT))


def sample_scene(rng: random.Random, split: str = "train") -> Scene:
    """One scene of the split ("train" or "held_out"), drawn from `rng`."""
    held_out = held_out_combinations()
    if split not in ("train", "held_out"):
        raise ValueError(f"split must be 'train' or 'held_out', got {split!r}")
    pool = sorted(held_out) if split == "held_out" else [c for c in all_combinations() if c not in held_out]
    colour, shape, background = rng.choice(pool)
    size, position = rng.choice(list(SIZES)), rng.choice(list(POSITIONS))
    half = SIZES[size]
    if POSITIONS[position] is None:
        centre = (rng.randint(half, IMAGE_SIZE - half), rng.randint(half, IMAGE_SIZE - half))
    else:
        centre = tuple(c + rng.randint(-JITTER, JITTER) for c in POSITIONS[position])
    return Scene(shape, colour, background, size, position, centre)


def shape_mask(shape: str, centre: tuple[int, int], half: float, size: int = IMAGE_SIZE) -> Tensor:
    """[size, size] bool: the pixels (by their centres) inside the shape."""
    y, x = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    dx, dy = x - centre[0], y - centre[1]
    if shape == "circle":
        return dx**2 + dy**2 <= half**2
    if shape == "square":
        return (dx.abs() <= half) & (dy.abs() <= half)
    # an upright triangle, apex on top: it widens from 0 to 2 * half over its height of 2 * half
    return (dy.abs() <= half) & (dx.abs() <= (dy + half) / 2)


def render(scene: Scene) -> Tensor:
    """[3, 64, 64] in [0, 1]."""
    mask = shape_mask(scene.shape, scene.centre, SIZES[scene.size])
    colour, background = (torch.tensor(COLOURS[c])[:, None, None] / 255 for c in (scene.colour, scene.background))
    return torch.where(mask, colour, background)


def make_batch(rng: random.Random, count: int, split: str = "train") -> tuple[Tensor, list[str]]:
    """`count` images [count, 3, 64, 64] in [0, 1] and their captions."""
    scenes = [sample_scene(rng, split) for _ in range(count)]
    return torch.stack([render(s) for s in scenes]), [s.caption for s in scenes]


def caption_corpus() -> list[str]:
    """Every training caption (one per word choice): the text the tokenizers' vocabularies are learnt from."""
    combinations = [c for c in all_combinations() if c not in held_out_combinations()]
    return [
        Scene(shape, colour, background, size, position, (0, 0)).caption
        for (colour, shape, background), size, position in itertools.product(combinations, SIZES, POSITIONS)
    ]


# Edits for the tiny Kontext: a source scene, an instruction in a fixed grammar, the scene it asks for.
EDIT_KINDS = ("shape", "background")


@dataclass(frozen=True)
class Edit:
    source: Scene
    target: Scene
    kind: str  # "shape": recolour the shape, keep the background; "background": the other way round

    @property
    def caption(self) -> str:
        if self.kind == "shape":
            return f"make the {self.target.shape} {self.target.colour}"
        return f"change the background to {self.target.background}"


def sample_edit(rng: random.Random, split: str = "train") -> Edit:
    """An edit whose result is a scene of the split: held-out edits produce the held-out (colour, shape,
    background) combinations, which training edits never produce nor start from."""
    held_out = held_out_combinations()
    while True:
        target, kind = sample_scene(rng, split), rng.choice(EDIT_KINDS)
        kept = target.background if kind == "shape" else target.colour  # the part the edit leaves alone
        old = rng.choice([c for c in COLOURS if c not in (kept, target.colour, target.background)])
        source = replace(target, colour=old) if kind == "shape" else replace(target, background=old)
        if split == "held_out" or (source.colour, source.shape, source.background) not in held_out:
            return Edit(source, target, kind)


def edit_corpus() -> list[str]:
    """Every edit caption the grammar makes."""
    return [f"make the {s} {c}" for s in SHAPES for c in COLOURS] + [f"change the background to {c}" for c in COLOURS]

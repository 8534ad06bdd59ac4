"""flux_parallel/shapes/data.py (the tiny model's data set) and the pixel statistics of tools/eval_tiny.py."""

import random

import pytest
import torch

from flux_parallel.shapes import data as shapes
from flux_parallel.shapes import evaluate as eval_tiny


def test_the_data_set_is_seeded():
    images, captions = shapes.make_batch(random.Random(7), 32)
    again, same = shapes.make_batch(random.Random(7), 32)
    other, different = shapes.make_batch(random.Random(8), 32)
    assert torch.equal(images, again) and captions == same
    assert captions != different and not torch.equal(images, other)
    assert images.shape == (32, 3, 64, 64) and images.min() >= 0 and images.max() <= 1


def test_held_out_combinations_never_appear_in_training():
    held_out = shapes.held_out_combinations()
    assert len(held_out) == shapes.HELD_OUT_COUNT and held_out == shapes.held_out_combinations()
    rng = random.Random(0)
    train = {(s.colour, s.shape, s.background) for s in (shapes.sample_scene(rng) for _ in range(3000))}
    assert not train & held_out
    assert len(train) == len(shapes.all_combinations()) - len(held_out)  # every other combination is drawn
    test = {(s.colour, s.shape, s.background) for s in (shapes.sample_scene(rng, "held_out") for _ in range(500))}
    assert test == held_out
    corpus = set(shapes.caption_corpus())  # what the tokenizers learn from: training captions only
    assert not {s.caption for s in (shapes.sample_scene(rng, "held_out") for _ in range(200))} & corpus


def test_captions_read_as_english():
    scene = shapes.Scene("triangle", "green", "orange", "small", "in the top left corner", (18, 18))
    assert scene.caption == "a small green triangle in the top left corner on an orange background"
    assert shapes.Scene("circle", "orange", "red", "", "", (30, 30)).caption == "an orange circle on a red background"
    with pytest.raises(ValueError, match="split must be 'train' or 'held_out'"):
        shapes.sample_scene(random.Random(0), "test")


def test_pixel_statistics_read_the_drawn_scenes():
    images, captions = shapes.make_batch(random.Random(3), 200, "held_out")
    perfect = eval_tiny.caption_accuracy(images, captions)
    assert all(perfect[k] == 1.0 for k in ("colours", "foreground", "background", "position", "size"))
    assert perfect["position_count"] > 100 and perfect["size_count"] > 80  # most captions name them
    swapped = eval_tiny.caption_accuracy(images.flip(0), captions)  # every image against another's caption
    assert swapped["colours"] < 0.25 and swapped["position"] < 0.5  # 20 held-out combinations: some repeat
    blank = eval_tiny.caption_accuracy(torch.ones_like(images[:4]), captions[:4])
    assert blank["foreground"] == 0.0
    with pytest.raises(ValueError, match="is not of the shapes data set's form"):
        eval_tiny.parse_caption("a red fox in the snow")

"""tools/train_tiny.py end to end at toy sizes: it writes a FLUX folder that the ordinary loaders read, and
the text encoders in it are the trained ones, not their seeded starting point."""

import dataclasses

import torch
import train_tiny
from safetensors.torch import load_file

from flux_parallel.flux.pipeline import FluxPipeline
from flux_parallel.flux.t5 import T5_CONFIGS, T5Encoder
from flux_parallel.flux.tokenizers import load_t5_tokenizer
from flux_parallel.weights import seeded_init


def test_train_tiny_writes_a_loadable_folder_with_trained_text_encoders(tmp_path):
    argv = ["--output", str(tmp_path), "--vae-steps", "2", "--vae-batch", "2", "--transformer-steps", "3",
            "--transformer-batch", "4", "--pool", "8", "--seed", "3"]
    assert train_tiny.main(argv) == 0
    pipe = FluxPipeline.from_pretrained(tmp_path, dtype=torch.float32)
    image = pipe("a red circle on a blue background", height=64, width=64, num_steps=2, seed=0, output_type="pt")
    assert image.shape[-2:] == (64, 64) and torch.isfinite(image).all()
    assert pipe.text.model_max_length == train_tiny.TEXT_TOKENS
    # the T5 weights written are not the seeded ones the training started from
    vocab = load_t5_tokenizer(tmp_path).vocab_size
    start = seeded_init(T5Encoder(dataclasses.replace(T5_CONFIGS["tiny"], vocab_size=vocab)), 3 + 1).state_dict()
    written = load_file(tmp_path / "text_encoder_2" / "model.safetensors")
    assert written.keys() == start.keys()
    assert not all(torch.equal(written[k], start[k]) for k in start)

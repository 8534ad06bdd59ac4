"""TextConditioner: prompts -> (txt, txt_ids, y) equal to the transformers path diffusers' FluxPipeline takes."""

import dataclasses
import time

import pytest
import torch
from helpers import CORPUS, PROMPTS, clip_model, rel_err, write_clip_files, write_t5_files
from transformers import CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

from flux_parallel import flux
from flux_parallel.flux import tokenizer_training as tt
from flux_parallel.flux.clip import CLIP_CONFIGS, ClipTextModel
from flux_parallel.flux.t5 import T5_CONFIGS, T5Encoder
from flux_parallel.flux.text_encoders import TextConditioner
from flux_parallel.weights import CheckpointError

PROMPTS = PROMPTS[:3] + PROMPTS[4:6] + PROMPTS[-1:]  # plain, empty, whitespace, unicode and over-long prompts


def t5_model(seed, vocab_size):
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab_size, d_model=24, d_kv=6, d_ff=40, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu"
    )
    return T5EncoderModel(config).eval()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A diffusers-style pipeline folder with small random encoders and the tokenizers they go with."""
    root = tmp_path_factory.mktemp("pipeline")
    (root / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    write_clip_files(root / "tokenizer", *tt.tiny_clip_vocab())
    write_t5_files(root / "tokenizer_2", tt.train_spiece(CORPUS.splitlines(), 200), model_max_length=512)
    clip_tok, t5_tok = (
        CLIPTokenizer.from_pretrained(root / "tokenizer"),
        T5TokenizerFast.from_pretrained(root / "tokenizer_2"),
    )
    clip = clip_model(0, len(clip_tok), eos_token_id=2)  # the released CLIP-L config's legacy eos id
    t5 = t5_model(1, len(t5_tok) + 20)  # like T5-XXL, more embeddings (32128) than tokens (32100)
    clip.save_pretrained(root / "text_encoder")
    t5.save_pretrained(root / "text_encoder_2", max_shard_size="20KB")
    return root, clip_tok, t5_tok, clip, t5


def reference(clip_tok, t5_tok, clip, t5, prompts, length):
    """diffusers FluxPipeline's _get_clip_prompt_embeds and _get_t5_prompt_embeds."""

    def ids(tokenizer, max_length):
        return tokenizer(
            prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        ).input_ids

    with torch.no_grad():
        return t5(ids(t5_tok, length))[0], clip(ids(clip_tok, 77)).pooler_output


@pytest.mark.parametrize("length", [None, 40])
def test_equals_transformers(pipeline, length):
    root, *ref_parts = pipeline
    cond = TextConditioner.from_pretrained(root, dtype=torch.float32)
    assert cond.model_max_length == 512 and cond.max_sequence_length == 512
    with pytest.warns(UserWarning, match="too long"):
        txt, txt_ids, y = cond(PROMPTS, max_sequence_length=length)
    ref_txt, ref_y = reference(*ref_parts, PROMPTS, length or 512)
    assert txt.shape == (len(PROMPTS), length or 512, 24) and y.shape == (len(PROMPTS), 32)
    assert torch.equal(txt_ids, torch.zeros(len(PROMPTS), length or 512, 3))
    assert rel_err(txt, ref_txt) <= 1e-5 and rel_err(y, ref_y) <= 1e-5  # fp32, same math


def test_overrides(pipeline, tmp_path):
    root, clip_tok, t5_tok, _, _ = pipeline
    other_clip, other_t5 = clip_model(5, len(clip_tok), eos_token_id=767), t5_model(6, len(t5_tok))
    other_clip.save_pretrained(tmp_path / "clip")
    other_t5.save_pretrained(tmp_path / "t5")
    module = flux.load_t5(tmp_path / "t5", torch.float32)
    cond = TextConditioner.from_pretrained(
        root, dtype=torch.float32, text_encoder=tmp_path / "clip", text_encoder_2=module
    )
    assert cond.t5 is module
    txt, _, y = cond(PROMPTS[:2], max_sequence_length=16)
    ref_txt, ref_y = reference(clip_tok, t5_tok, other_clip, other_t5, PROMPTS[:2], 16)
    assert rel_err(txt, ref_txt) <= 1e-5 and rel_err(y, ref_y) <= 1e-5


def test_tiny_offline_and_seeded():
    start = time.perf_counter()
    cond = TextConditioner.tiny(seed=3)
    txt, txt_ids, y = cond(["a red fox in the snow", ""], max_sequence_length=32)
    assert time.perf_counter() - start < 5.0
    assert txt.shape == (2, 32, flux.CONFIGS["tiny"].context_in_dim) and y.shape == (2, flux.CONFIGS["tiny"].vec_in_dim)
    assert txt_ids.shape == (2, 32, 3) and not txt_ids.any()
    assert cond(["a red fox in the snow"], 32)[0].shape == (1, 32, 64)
    again = TextConditioner.tiny(seed=3)(["a red fox in the snow", ""], max_sequence_length=32)
    other = TextConditioner.tiny(seed=4)(["a red fox in the snow", ""], max_sequence_length=32)
    assert torch.equal(txt, again[0]) and torch.equal(y, again[2])
    assert not torch.allclose(txt, other[0]) and not torch.allclose(y, other[2])
    assert not torch.allclose(y[0], y[1])  # the prompt matters
    bf16 = TextConditioner.tiny(seed=3, dtype=torch.bfloat16)(["a red fox in the snow", ""], max_sequence_length=32)
    assert bf16[0].dtype == bf16[2].dtype == torch.bfloat16
    assert rel_err(bf16[0], txt) < 3e-2 and rel_err(bf16[2], y) < 3e-2  # bf16 rounding (2^-8) over a few layers


def test_release_and_move():
    cond = TextConditioner.tiny()
    assert cond.to("cpu") is cond
    cond.release()
    assert cond.clip is None and cond.t5 is None
    with pytest.raises(ValueError, match="the text encoders were released"):
        cond("a prompt")


def test_mismatched_parts():
    clip_tok, t5_tok = tt.tiny_clip_tokenizer(), tt.tiny_t5_tokenizer()
    clip, t5 = ClipTextModel(CLIP_CONFIGS["tiny"]), T5Encoder(T5_CONFIGS["tiny"])
    small_t5 = T5Encoder(dataclasses.replace(T5_CONFIGS["tiny"], vocab_size=100))
    with pytest.raises(
        ValueError, match=rf"the T5 tokenizer has {t5_tok.vocab_size} tokens but the T5 encoder embeds only 100"
    ):
        TextConditioner(clip_tok, t5_tok, clip, small_t5)
    small_clip = ClipTextModel(dataclasses.replace(CLIP_CONFIGS["tiny"], vocab_size=700, eos_token_id=699))
    with pytest.raises(ValueError, match="the CLIP tokenizer has 768 tokens but the CLIP text encoder embeds only 700"):
        TextConditioner(clip_tok, t5_tok, small_clip, t5)
    with pytest.raises(
        ValueError, match=r"ends prompts with id \[767\] but the CLIP text encoder pools at eos_token_id 5"
    ):
        TextConditioner(clip_tok, t5_tok, ClipTextModel(dataclasses.replace(CLIP_CONFIGS["tiny"], eos_token_id=5)), t5)
    with pytest.raises(ValueError, match="pads to 77 tokens but the CLIP text encoder has 60 positions"):
        TextConditioner(
            clip_tok, t5_tok, ClipTextModel(dataclasses.replace(CLIP_CONFIGS["tiny"], max_position_embeddings=60)), t5
        )


def test_bad_calls(pipeline, tmp_path):
    cond = TextConditioner.tiny()
    with pytest.raises(
        ValueError, match="max_length 513 for the T5 tokenizer must be an integer from 1 to its model_max_length 512"
    ):
        cond("a prompt", max_sequence_length=513)
    with pytest.raises(ValueError, match="prompt 0 is of type int, not a string"):
        cond([7])
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="pipeline folder without a tokenizer/ folder"):
        TextConditioner.from_pretrained(tmp_path)

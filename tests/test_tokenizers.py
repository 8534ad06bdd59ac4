"""The CLIP and T5 tokenizers id for id against transformers' CLIPTokenizer and T5TokenizerFast,
on tokenizer files built here, and their bad inputs."""

import warnings

import pytest
import torch
from helpers import CORPUS, PROMPTS, write_clip_files, write_t5_files
from transformers import CLIPTokenizer, T5TokenizerFast

from flux_parallel import flux
from flux_parallel.flux import tokenizer_training as tt
from flux_parallel.flux import tokenizers as tk
from flux_parallel.weights import CheckpointError


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tokenizer folders: (ours, transformers') built from vocab.json + merges.txt / spiece.model, from the
    tokenizer.json that transformers writes for them, and from the built-in tiny tokenizers."""
    root = tmp_path_factory.mktemp("tokenizers")
    clip = write_clip_files(root / "clip", *tt.clip_vocab(CORPUS.splitlines(), 200))
    t5 = write_t5_files(root / "t5", tt.train_spiece(CORPUS.splitlines(), 200), model_max_length=512)
    CLIPTokenizer.from_pretrained(clip).save_pretrained(root / "clip_json")
    T5TokenizerFast.from_pretrained(t5).save_pretrained(root / "t5_json")
    assert (root / "clip_json" / "tokenizer.json").is_file() and (root / "t5_json" / "tokenizer.json").is_file()
    tiny_clip = write_clip_files(root / "tiny_clip", *tt.tiny_clip_vocab())
    tiny_t5 = write_t5_files(root / "tiny_t5", tt.tiny_spiece_model())
    return dict(
        clip=clip, clip_json=root / "clip_json", t5=t5, t5_json=root / "t5_json", tiny_clip=tiny_clip, tiny_t5=tiny_t5
    )


def reference_ids(tokenizer, prompts, length):
    return tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids


@pytest.mark.parametrize("name", ["clip", "clip_json", "tiny_clip"])
def test_clip_equals_transformers(files, name):
    ours = tt.tiny_clip_tokenizer() if name == "tiny_clip" else flux.load_clip_tokenizer(files[name])
    ref = CLIPTokenizer.from_pretrained(files[name])
    assert ours.max_length == 77 and ours.vocab_size == len(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the long prompt is truncated; its warning is tested below
        ids = ours(PROMPTS)
    assert ids.dtype == torch.long and ids.shape == (len(PROMPTS), 77)
    assert torch.equal(ids, reference_ids(ref, PROMPTS, 77))
    assert torch.equal(ours(PROMPTS[0]), reference_ids(ref, PROMPTS[:1], 77))  # a single string is a batch of one


@pytest.mark.parametrize("name", ["t5", "t5_json", "tiny_t5"])
def test_t5_equals_transformers(files, name):
    ours = tt.tiny_t5_tokenizer() if name == "tiny_t5" else flux.load_t5_tokenizer(files[name])
    ref = T5TokenizerFast.from_pretrained(files[name])
    assert ours.vocab_size == len(ref)
    for length in (512, 24):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ids = ours(PROMPTS, max_length=length)
        assert ids.shape == (len(PROMPTS), length)
        assert torch.equal(ids, reference_ids(ref, PROMPTS, length))


@pytest.mark.parametrize("kind", ["clip", "t5"])
def test_truncation_warns_how_many_tokens_were_dropped(files, kind):
    ours = (
        flux.load_clip_tokenizer(files["clip"])
        if kind == "clip"
        else flux.load_t5_tokenizer(files["t5"], max_length=30)
    )
    ref = (CLIPTokenizer if kind == "clip" else T5TokenizerFast).from_pretrained(files[kind])
    long = PROMPTS[-1]
    tokens = len(ref(long, add_special_tokens=False).input_ids)
    kept = ours.max_length - (2 if kind == "clip" else 1)  # start and end tokens for CLIP, end token for T5
    with pytest.warns(
        UserWarning,
        match=rf"prompt 1 is too long for the {kind.upper()} tokenizer: "
        rf"its last {tokens - kept} of {tokens} tokens were dropped",
    ):
        ours(["short", long])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a prompt that fits does not warn
        ours(["short"])


def test_t5_length_comes_from_tokenizer_config(files, tmp_path):
    write_t5_files(tmp_path, (files["t5"] / "spiece.model").read_bytes(), model_max_length=256)
    assert flux.load_t5_tokenizer(tmp_path).max_length == 256
    assert flux.load_t5_tokenizer(tmp_path, max_length=128).max_length == 128
    assert flux.load_t5_tokenizer(tmp_path).model_max_length == 256
    # without tokenizer_config.json: T5 v1.1's 512
    assert (
        flux.load_t5_tokenizer(
            write_t5_files(tmp_path / "bare", (files["t5"] / "spiece.model").read_bytes())
        ).max_length
        == 512
    )


def test_pipeline_folder(files, tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    write_clip_files(tmp_path / "tokenizer", *tt.tiny_clip_vocab())
    write_t5_files(tmp_path / "tokenizer_2", (files["t5"] / "spiece.model").read_bytes())
    assert torch.equal(flux.load_clip_tokenizer(tmp_path)(PROMPTS[:3]), tt.tiny_clip_tokenizer()(PROMPTS[:3]))
    assert torch.equal(flux.load_t5_tokenizer(tmp_path)(PROMPTS[:3]), flux.load_t5_tokenizer(files["t5"])(PROMPTS[:3]))


def test_builtin_tokenizers_are_deterministic():
    vocab, spiece = tt.tiny_clip_vocab(), tt.tiny_spiece_model()
    tt.tiny_clip_vocab.cache_clear()
    tt.tiny_spiece_model.cache_clear()
    assert (
        tt.tiny_clip_vocab() == vocab
        and tk.read_spiece(tt.tiny_spiece_model(), "a")[0] == tk.read_spiece(spiece, "b")[0]
    )
    assert tt.tiny_clip_tokenizer().vocab_size == 768 and tt.tiny_t5_tokenizer().vocab_size <= 512


@pytest.mark.parametrize(
    "prompts, message",
    [
        (3, "a prompt must be a string or a list of strings, got int"),
        (["fine", None], "prompt 1 is of type NoneType, not a string"),
        ([], "the list of prompts is empty"),
    ],
)
def test_bad_prompts(prompts, message):
    for tokenizer in (tt.tiny_clip_tokenizer(), tt.tiny_t5_tokenizer()):
        with pytest.raises(ValueError, match=message):
            tokenizer(prompts)


def test_bad_lengths():
    with pytest.raises(
        ValueError, match="max_length 78 for the CLIP tokenizer must be an integer from 2 to its model_max_length 77"
    ):
        tt.tiny_clip_tokenizer()("a", max_length=78)
    with pytest.raises(
        ValueError, match="max_length 0 for the T5 tokenizer must be an integer from 1 to its model_max_length 512"
    ):
        tt.tiny_t5_tokenizer(max_length=0)


def test_missing_or_bad_files(files, tmp_path):
    with pytest.raises(
        CheckpointError, match="has no CLIP tokenizer files: tokenizer.json, or vocab.json with merges.txt"
    ):
        flux.load_clip_tokenizer(tmp_path)
    with pytest.raises(CheckpointError, match="has no T5 tokenizer files: tokenizer.json or spiece.model"):
        flux.load_t5_tokenizer(tmp_path)
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="is a pipeline folder without a tokenizer_2/ folder"):
        flux.load_t5_tokenizer(tmp_path)
    with pytest.raises(CheckpointError, match="no such file or folder"):
        flux.load_clip_tokenizer(tmp_path / "absent")
    truncated = write_t5_files(tmp_path / "truncated", (files["t5"] / "spiece.model").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="spiece.model is not a readable SentencePiece model"):
        flux.load_t5_tokenizer(truncated)
    with pytest.raises(CheckpointError, match="holds a BPE model, not the unigram model of a T5 tokenizer"):
        (tmp_path / "t5_wrong").mkdir()
        (tmp_path / "t5_wrong" / "tokenizer.json").write_bytes((files["clip_json"] / "tokenizer.json").read_bytes())
        flux.load_t5_tokenizer(tmp_path / "t5_wrong")

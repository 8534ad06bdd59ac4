"""The CLIP text model against transformers' CLIPTextModel (both end-of-text conventions), and the loader's
bad inputs."""

import json

import pytest
import torch
from helpers import rel_err
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from flux_parallel import flux
from flux_parallel.flux.clip import CLIP_CONFIGS, ClipTextModel
from flux_parallel.weights import CheckpointError

SMALL = dict(
    vocab_size=99,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=16,
    projection_dim=8,
)


def reference_clip(seed=0, **overrides):
    torch.manual_seed(seed)
    model = CLIPTextModel(CLIPTextConfig(**{**SMALL, **overrides})).eval()
    with torch.no_grad():  # layer norms start at (1, 0): make them differ so a misplaced one shows
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(0.3 * torch.randn_like(param))
    return model


def prompt_ids(eos, pad, high_token):
    """[3, 16]: start token, text, end-of-text, padding; one row holds a text token above the eos id."""
    rows = []
    for length, extra in [(5, None), (14, None), (3, high_token)]:
        text = torch.randint(3, 40, (length,)).tolist() + ([extra] if extra else [])
        row = [0] + text + [eos]
        rows.append(row + [pad] * (16 - len(row)))
    return torch.tensor(rows)


@pytest.mark.parametrize(
    "eos, pad, act",
    [
        (
            2,
            98,
            "quick_gelu",
        ),  # legacy config (the released CLIP-L says 2): pooled at argmax(ids); the eos token 98 is the largest id
        (
            50,
            50,
            "quick_gelu",
        ),  # current convention: the first eos token, although larger ids come before it and pads equal it
        (98, 1, "gelu"),
    ],
)
def test_equals_transformers(tmp_path, eos, pad, act):
    model = reference_clip(eos_token_id=eos, hidden_act=act)
    model.save_pretrained(tmp_path)
    ours = flux.load_clip(tmp_path, dtype=torch.float32)
    assert ours.params.eos_token_id == eos and ours.params.hidden_act == act
    ids = prompt_ids(98 if eos == 2 else eos, pad, high_token=97)
    with torch.no_grad():
        ref = model(input_ids=ids).pooler_output
        out = ours(ids)
    assert out.shape == (3, 32)
    assert rel_err(out, ref) <= 1e-5  # fp32, same math: only summation order differs


def test_pipeline_folder_and_legacy_position_ids(tmp_path):
    model = reference_clip(eos_token_id=2)
    (tmp_path / "model_index.json").write_text("{}")
    model.save_pretrained(tmp_path / "text_encoder")
    file = tmp_path / "text_encoder" / "model.safetensors"
    # The layout of the released FLUX.1 text_encoder/: transformers 4 names, position ids as before 4.31.
    state = {f"text_model.{key}": value for key, value in load_file(file).items()}
    state["text_model.embeddings.position_ids"] = torch.arange(16)[None]
    save_file(state, file)
    ids = prompt_ids(98, 98, 97)
    with torch.no_grad():
        assert rel_err(flux.load_clip(tmp_path, torch.float32)(ids), model(input_ids=ids).pooler_output) <= 1e-5


def test_presets():
    l14 = CLIP_CONFIGS["l14"]
    assert (l14.hidden_size, l14.num_hidden_layers, l14.num_attention_heads, l14.intermediate_size) == (
        768,
        12,
        12,
        3072,
    )
    assert (l14.max_position_embeddings, l14.vocab_size) == (77, 49408)
    assert CLIP_CONFIGS["tiny"].hidden_size == flux.CONFIGS["tiny"].vec_in_dim


def test_too_long_input():
    model = ClipTextModel(CLIP_CONFIGS["tiny"])
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, length <= 77\], got shape \[1, 78\]"):
        model(torch.zeros(1, 78, dtype=torch.long))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(eos_token_id=[2, 3]), "eos_token_id must be one integer, got [2, 3]"),
        (dict(hidden_act="relu"), "hidden_act 'relu' is not supported"),
        (dict(num_attention_heads=5), "hidden_size 32 is not divisible by num_attention_heads 5"),
        (dict(vocab_size=100), "embeddings.token_embedding.weight has shape [99, 32], the config expects [100, 32]"),
    ],
)
def test_checkpoint_errors(tmp_path, change, message):
    reference_clip().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError) as err:
        flux.load_clip(tmp_path)
    assert message in str(err.value)


def test_pipeline_folder_without_text_encoder(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="pipeline folder without a text_encoder/ folder"):
        flux.load_clip(tmp_path)

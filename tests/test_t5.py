"""The T5 v1.1 encoder against transformers' T5EncoderModel, and its loader's bad inputs."""

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err
from safetensors.torch import load_file, save_file
from transformers import T5Config, T5EncoderModel
from transformers.models.t5.modeling_t5 import T5Attention as HFT5Attention

from flux_parallel import flux
from flux_parallel.flux.t5 import T5_CONFIGS, T5Params, relative_position_bucket
from flux_parallel.weights import CheckpointError

# Small, but with more tokens than max_distance so that the exact, log-spaced and clipped buckets all occur.
SMALL = dict(
    vocab_size=120,
    d_model=32,
    d_kv=8,
    d_ff=48,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=12,
    feed_forward_proj="gated-gelu",
)


def reference_t5(seed=0, **overrides):
    torch.manual_seed(seed)
    model = T5EncoderModel(T5Config(**{**SMALL, **overrides})).eval()
    with torch.no_grad():  # norm scales are initialised to 1: make them differ so a misplaced scale shows
        for param in model.parameters():
            if param.ndim == 1:
                param.mul_(1 + 0.3 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The same small random T5 saved as one file, sharded with an index, and inside a pipeline folder."""
    model = reference_t5()
    root = tmp_path_factory.mktemp("t5")
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="20KB")
    (root / "pipe").mkdir()
    (root / "pipe" / "model_index.json").write_text("{}")
    model.save_pretrained(root / "pipe" / "text_encoder_2", max_shard_size="20KB")
    return model, root


def test_bucket_equals_transformers():
    relative = torch.arange(-300, 301)[None, :]
    for buckets, distance in [(32, 128), (8, 12), (6, 20)]:
        ours = relative_position_bucket(relative, buckets, distance)
        ref = HFT5Attention._relative_position_bucket(relative, True, buckets, distance)
        assert torch.equal(ours, ref), (buckets, distance)


@pytest.mark.parametrize("layout", ["single", "sharded", "pipe"])
def test_equals_transformers(saved, layout):
    model, root = saved
    if layout == "sharded":
        assert (root / layout / "model.safetensors.index.json").is_file()
    ours = flux.load_t5(root / layout, dtype=torch.float32)
    assert ours.params == T5Params(**{k: v for k, v in SMALL.items() if k != "feed_forward_proj"})
    ids = torch.randint(0, SMALL["vocab_size"], (2, 40))
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state
        out = ours(ids)
    assert out.shape == (2, 40, 32) and out.dtype == torch.float32
    assert rel_err(out, ref) <= 1e-5  # fp32, same math: only summation order differs


def test_tied_embedding_stored_either_way(saved, tmp_path):
    model, root = saved
    state = load_file(root / "single" / "model.safetensors")
    state["encoder.embed_tokens.weight"] = state.pop("shared.weight")
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((root / "single" / "config.json").read_text())
    ids = torch.randint(0, SMALL["vocab_size"], (1, 9))
    with torch.no_grad():
        assert rel_err(flux.load_t5(tmp_path, torch.float32)(ids), model(input_ids=ids).last_hidden_state) <= 1e-5


def naive_half_forward(model, ids):
    """A straightforward port: everything, the residual stream included, in the weights' dtype."""

    def norm(x, layer_norm):
        return layer_norm.weight * (x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)

    x = model.shared(ids)
    bias = model.encoder.block[0].layer[0].SelfAttention.position_bias(ids.shape[1])
    for block in model.encoder.block:
        attn, ff = block.layer
        x = x + attn.SelfAttention(norm(x, attn.layer_norm), bias)
        d = ff.DenseReluDense
        h = norm(x, ff.layer_norm)
        x = x + d.wo(F.gelu(d.wi_0(h), approximate="tanh") * d.wi_1(h))
    return norm(x, model.encoder.final_layer_norm)


def test_half_precision_stays_finite(saved, tmp_path):
    """T5-XXL's feed-forward outputs exceed fp16's 65504; here a large `wo` makes the small model do the same."""
    model, root = saved
    state = load_file(root / "single" / "model.safetensors")
    for key in state:
        if key.endswith("wo.weight"):
            state[key] = state[key] * 3e4
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((root / "single" / "config.json").read_text())
    ids = torch.randint(0, SMALL["vocab_size"], (2, 16))
    with torch.no_grad():
        ref = flux.load_t5(tmp_path, torch.float32)(ids)  # equals transformers in fp32 (test above)
        assert ref.isfinite().all() and ref.abs().max() < 1e3
        half = flux.load_t5(tmp_path, torch.float16)
        assert not naive_half_forward(half, ids).isfinite().all()  # the input does overflow a naive port
        for dtype, tol in [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)]:  # ~10 rounding steps of 2^-11 / 2^-8
            out = flux.load_t5(tmp_path, dtype)(ids)
            assert out.dtype == dtype and out.isfinite().all()
            assert rel_err(out, ref) <= tol


def test_tiny_preset_fits_the_tiny_transformer():
    assert T5_CONFIGS["tiny"].d_model == flux.CONFIGS["tiny"].context_in_dim
    xxl = T5_CONFIGS["xxl"]
    assert (xxl.d_model, xxl.num_layers, xxl.num_heads, xxl.d_kv, xxl.d_ff, xxl.vocab_size) == (
        4096,
        24,
        64,
        64,
        10240,
        32128,
    )
    tiny_bytes = sum(p.numel() * 4 for p in flux.t5.T5Encoder(T5_CONFIGS["tiny"]).parameters())
    assert tiny_bytes < 600_000


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: (d / "config.json").unlink(), "nor a transformers model folder"),
        (lambda d: (d / "model.safetensors").unlink(), "has no model.safetensors nor model.safetensors.index.json"),
        (lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"), "only pickle weights"),
        (lambda d: (d / "model.safetensors").write_bytes(b"\x10\x00garbage"), "not a readable safetensors file"),
        (lambda d: edit_config(d, feed_forward_proj="relu"), "feed_forward_proj 'relu' is not supported"),
        (lambda d: edit_config(d, num_heads=0), "T5 sizes must be positive, got num_heads 0"),
        (lambda d: edit_config(d, d_ff=64), "has shape [48, 32], the config expects [64, 32]"),
        (
            lambda d: edit_weights(d, drop="encoder.final_layer_norm.weight"),
            "missing 1 weights the model needs: encoder.final_layer_norm.weight",
        ),
        (
            lambda d: edit_weights(d, add="encoder.block.9.layer.0.layer_norm.weight"),
            "1 weights the model does not know: encoder.block.9",
        ),
    ],
)
def test_checkpoint_errors(saved, tmp_path, change, message):
    _, root = saved
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((root / "single" / name).read_bytes())
    change(tmp_path)
    with pytest.raises(CheckpointError) as err:
        flux.load_t5(tmp_path, torch.float32)
    assert message in str(err.value)


def test_pipeline_folder_without_text_encoder_2(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="pipeline folder without a text_encoder_2/ folder"):
        flux.load_t5(tmp_path)


def test_bad_input_ids(saved):
    ours = flux.load_t5(saved[1] / "single", torch.float32)
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, length\], got shape \[7\]"):
        ours(torch.zeros(7, dtype=torch.long))


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def edit_weights(folder, drop=None, add=None):
    state = load_file(folder / "model.safetensors")
    if drop:
        del state[drop]
    if add:
        state[add] = torch.ones(SMALL["d_model"])
    save_file(state, folder / "model.safetensors")

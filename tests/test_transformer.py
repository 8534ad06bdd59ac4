"""The FLUX.1 transformer against diffusers' FluxTransformer2DModel, through every checkpoint kind."""

import dataclasses
import json

import pytest
import torch
from diffusers import FluxTransformer2DModel
from helpers import diffusers_model, rel_err, write_source
from safetensors.torch import save_file

from flux_parallel import flux
from flux_parallel.flux.checkpoint import bfl_to_diffusers, diffusers_to_bfl, params_from_bfl_keys
from flux_parallel.flux.layers import linear_of_cat
from flux_parallel.weights import CheckpointError

TINY = flux.CONFIGS["tiny"]


def inputs(params: flux.FluxParams, batch=2, img_len=24, txt_len=7):
    ids = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(img_len // 4), indexing="ij"), -1).reshape(-1, 2)
    img_ids = torch.cat((torch.zeros(img_len, 1), ids.float()), dim=1)
    return dict(
        img=torch.randn(batch, img_len, params.in_channels),
        img_ids=img_ids.expand(batch, -1, -1),
        txt=torch.randn(batch, txt_len, params.context_in_dim),
        txt_ids=torch.zeros(batch, txt_len, 3),
        timesteps=torch.rand(batch),
        y=torch.randn(batch, params.vec_in_dim),
        guidance=torch.full((batch,), 3.5) if params.guidance_embed else None,
    )


def reference_output(model: FluxTransformer2DModel, x: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(
            hidden_states=x["img"],
            encoder_hidden_states=x["txt"],
            pooled_projections=x["y"],
            timestep=x["timesteps"],
            img_ids=x["img_ids"][0],
            txt_ids=x["txt_ids"][0],
            guidance=x["guidance"],
        ).sample


@pytest.mark.parametrize("guidance", [False, True], ids=["schnell", "dev"])
@pytest.mark.parametrize("kind", ["bfl", "component", "sharded", "pipeline"])
def test_parity_with_diffusers(kind, guidance, tmp_path):
    params = dataclasses.replace(TINY, guidance_embed=guidance)
    ref = diffusers_model(params)
    model = flux.load_transformer(write_source(kind, ref, params, tmp_path), dtype=torch.float32)
    assert model.params == params
    x = inputs(params)
    with torch.no_grad():
        ours = model(**x)
    # fp32, same operations up to summation order and fused kernels: rounding stays near 1e-7;
    # 1e-5 is the project's parity bound in fp32
    assert rel_err(ours, reference_output(ref, x)) <= 1e-5


@pytest.mark.parametrize("guidance", [False, True], ids=["schnell", "dev"])
def test_position_ids_without_batch_dim(guidance):
    """diffusers' transformer takes img_ids [L, 3] and txt_ids [S, 3] (one set for every image); so do we."""
    params = dataclasses.replace(TINY, guidance_embed=guidance)
    ref = diffusers_model(params)
    model = flux.Flux(params).eval()
    model.load_state_dict(diffusers_to_bfl(dict(ref.state_dict()), params))
    x = inputs(params)
    unbatched = {**x, "img_ids": x["img_ids"][0].clone(), "txt_ids": x["txt_ids"][0].clone()}
    assert unbatched["img_ids"].shape == (24, 3) and unbatched["txt_ids"].shape == (7, 3)
    with torch.no_grad():
        ours = model(**unbatched)
        assert torch.equal(ours, model(**x))  # the same positions for every image: the same computation
    # fp32, same operations up to summation order and fused kernels (reference_output passes 2-D ids too)
    assert rel_err(ours, reference_output(ref, x)) <= 1e-5


def test_bf16_close_to_fp32(tmp_path):
    ref = diffusers_model(TINY)
    path = write_source("component", ref, TINY, tmp_path)
    x = inputs(TINY)
    with torch.no_grad():
        out32 = flux.load_transformer(path, dtype=torch.float32)(**x)
        out16 = flux.load_transformer(path, dtype=torch.bfloat16)(**x)
    assert out16.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa; through 4 blocks of random weights a few percent is expected
    assert rel_err(out16.float(), out32) < 0.05


def test_key_names_match_diffusers_converter_at_full_size():
    """Our parameter names are the BFL ones: diffusers' own BFL converter must accept them (meta tensors)."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    for name in ("schnell", "dev"):
        params = flux.CONFIGS[name]
        with torch.device("meta"):
            ours = flux.Flux(params).state_dict()
            ref = diffusers_model_meta(params).state_dict()
        converted = convert_flux_transformer_checkpoint_to_diffusers(dict(ours))
        assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in ref.items()}
        assert params_from_bfl_keys({k: list(v.shape) for k, v in ours.items()}, name) == params


def diffusers_model_meta(params):
    return FluxTransformer2DModel(guidance_embeds=params.guidance_embed)


def test_mapping_round_trip():
    params = flux.CONFIGS["tiny-dev"]
    state = flux.Flux(params).state_dict()
    back = diffusers_to_bfl(bfl_to_diffusers(state, params), params)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


# ---- bad input: one sentence naming the file or shape ----


@pytest.fixture
def component(tmp_path):
    return write_source("component", diffusers_model(TINY), TINY, tmp_path)


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or folder"):
        flux.load_transformer(tmp_path / "nope")


def test_unreachable_repo(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="neither a local path nor a Hugging Face repo"):
        flux.load_transformer("nobody-here/no-such-model")


def test_folder_of_neither_layout(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="neither a diffusers pipeline or transformer folder"):
        flux.load_transformer(tmp_path)


def test_truncated_file(component):
    shard = component / "diffusion_pytorch_model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        flux.load_transformer(component, dtype=torch.float32)


def test_garbage_file(tmp_path):
    path = tmp_path / "flux1-x.safetensors"
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match=str(path)):
        flux.load_transformer(path)


def test_missing_and_unexpected_keys(tmp_path):
    state = diffusers_to_bfl(dict(diffusers_model(TINY).state_dict()), TINY)
    state["bogus.weight"] = state.pop("final_layer.linear.bias")
    path = tmp_path / "flux1-x.safetensors"
    save_file(state, path)
    (tmp_path / "config.json").write_text(json.dumps({"axes_dim": list(TINY.axes_dim)}))
    with pytest.raises(CheckpointError, match="missing 1 weights the model needs: final_layer.linear.bias"):
        flux.load_transformer(path)
    state["final_layer.linear.bias"] = state.pop("bogus.weight")
    state["bogus.weight"] = torch.zeros(1)
    save_file(state, path)
    with pytest.raises(CheckpointError, match="does not know: bogus.weight"):
        flux.load_transformer(path)


def test_shape_mismatch(component):
    config = json.loads((component / "config.json").read_text())
    config["pooled_projection_dim"] = 48
    (component / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match=r"vector_in.in_layer.weight has shape \[96, 32\], the config expects \[96, 48\]"
    ):
        flux.load_transformer(component)


def test_pickle_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"num_layers": 1}))
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="never unpickled"):
        flux.load_transformer(tmp_path)
    with pytest.raises(CheckpointError, match="pickle checkpoints are never loaded"):
        flux.load_transformer(tmp_path / "diffusion_pytorch_model.bin")


def test_unsupported_dtype_or_device_is_the_callers_fault(component):
    for bad in (dict(dtype=torch.int8), dict(device="warp-drive"), dict(device="cuda:99")):
        with pytest.raises(ValueError, match="unsupported dtype|is not a device|does not exist") as err:
            flux.load_transformer(component, **bad)
        assert not isinstance(err.value, CheckpointError), bad  # the arguments are wrong, not the checkpoint


def test_rope_axes_that_cannot_be_inferred(tmp_path):
    params = dataclasses.replace(TINY)  # head_dim 8 cannot be split 16:56:56
    path = tmp_path / "flux1-x.safetensors"
    save_file(flux.Flux(params).state_dict(), path)
    with pytest.raises(ValueError, match="head_dim 8 cannot be split 16:56:56"):
        flux.load_transformer(path)
    model = flux.load_transformer(path, dtype=torch.float32, config={"axes_dim": (2, 2, 4)})
    assert model.params == params


@pytest.mark.parametrize(
    "field, shape, message",
    [("txt", (2, 7, 32), r"txt must have shape \[2, 7, 64\]"), ("y", (3, 32), r"y must have shape \[2, 32\]"),
     ("img_ids", (2, 5, 3), r"img_ids must have shape \[2, 24, 3\]"),
     ("img_ids", (5, 3), r"img_ids must have shape \[2, 24, 3\] or \[24, 3\] \(from img \[2, 24, 64\]\), got \[5, 3\]"),
     ("txt_ids", (7, 2), r"txt_ids must have shape \[2, 7, 3\] or \[7, 3\]"),
     ("txt_ids", (3,), r"txt_ids must have shape \[2, 7, 3\] or \[7, 3\]")],
)
def test_forward_shape_errors(field, shape, message):
    x = inputs(TINY)
    x[field] = torch.zeros(shape)
    with pytest.raises(ValueError, match=message):
        flux.Flux(TINY)(**x)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_of_cat_is_the_linear_of_the_concatenation(bias):
    """The single block's linear2 without the concatenation: two GEMMs over the weight's column blocks."""
    linear = torch.nn.Linear(5 + 7, 3, bias=bias)
    left, right = torch.randn(2, 4, 5), torch.randn(2, 4, 7)
    torch.testing.assert_close(linear_of_cat(linear, left, right), linear(torch.cat((left, right), dim=-1)))

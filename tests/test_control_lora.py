"""A BFL Canny/Depth control LoRA (img_in widened to 128 channels) turns a text model into a Control model
while it is loaded: against diffusers' FluxControlPipeline with the same factors loaded by load_lora_weights.

diffusers reads BFL's control layout only at the 12B sizes (its converter hard-codes 19 + 38 blocks and
3072 features), so it gets the same factors in its PEFT layout: x_embedder's lora_A takes 128 inputs and
load_lora_weights zero-pads x_embedder to 128 columns (`_maybe_expand_transformer_param_shape_or_error_`).
"""

import pytest
import torch
from diffusers import FluxControlPipeline
from helpers import rel_err
from safetensors.torch import save_file
from test_image_modes import (  # noqa: F401 (posterior_mean: diffusers encodes the control image at the mean)
    CALL,
    COMPONENTS,
    HEIGHT,
    PROMPT,
    TOLERANCE,
    WIDTH,
    noise_for,
    ours_call,
    posterior_mean,
    random_image,
)
from test_pipeline import save_reference_pipeline

from flux_parallel.flux.pipeline import FluxPipeline
from flux_parallel.flux.sampling import pack
from flux_parallel.weights import CheckpointError

RANK, SCALE = 4, 0.85  # 0.85: BFL's CLI default for its control LoRAs
# our (BFL) module -> diffusers' name of the same linear (checkpoint._linear_pairs)
MODULES = {"img_in": "x_embedder", "double_blocks.0.img_attn.proj": "transformer_blocks.0.attn.to_out.0",
           "single_blocks.1.linear2": "single_transformer_blocks.1.proj_out", "final_layer.linear": "proj_out"}


@pytest.fixture
def pipelines(tmp_path):
    """(diffusers' FluxControlPipeline, our pipeline) on the same small dev weights (a 64-channel img_in)."""
    dev = save_reference_pipeline(tmp_path, "dev")
    theirs = FluxControlPipeline(**{name: dev.components[name] for name in COMPONENTS})
    return theirs, FluxPipeline.from_pretrained(tmp_path, dtype=torch.float32)


def control_lora(model) -> tuple[dict, dict]:
    """Random factors (lora_B.bias too) in BFL's layout and in diffusers' PEFT layout; img_in's take 128."""
    generator, bfl, peft = torch.Generator().manual_seed(11), {}, {}
    for name, theirs in MODULES.items():
        out_features, in_features = model.get_submodule(name).weight.shape
        in_features = 128 if name == "img_in" else in_features
        down = torch.randn(RANK, in_features, generator=generator) / in_features**0.5
        up, bias = 0.3 * torch.randn(out_features, RANK, generator=generator), 0.1 * torch.randn(out_features)
        for state, key in ((bfl, name), (peft, f"transformer.{theirs}")):
            state |= {f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up, f"{key}.lora_B.bias": bias}
    return bfl, peft


def test_control_lora_equals_diffusers_and_unloads_exactly(pipelines, tmp_path):
    theirs, ours = pipelines
    text_image = ours(**ours_call(latents=noise_for(), height=HEIGHT, width=WIDTH))
    base_state = {k: v.clone() for k, v in ours.transformer.state_dict().items()}
    bfl, peft = control_lora(ours.transformer)
    save_file(bfl, tmp_path / "bfl.safetensors")
    save_file(peft, tmp_path / "peft.safetensors")
    theirs.load_lora_weights(str(tmp_path / "peft.safetensors"), adapter_name="canny")
    theirs.set_adapters(["canny"], [SCALE])
    ours.load_lora(tmp_path / "bfl.safetensors", "canny", scale=SCALE)
    assert ours.kind == "control" and ours.transformer.params.in_channels == 128
    control = random_image(8)
    with torch.no_grad():  # diffusers takes a tensor control image as it is: give it in [-1, 1]
        expected = theirs(prompt=PROMPT, control_image=control * 2 - 1, height=HEIGHT, width=WIDTH,
                          latents=pack(noise_for()), **CALL).images
    result = ours(**ours_call(control_image=control, latents=noise_for()))
    assert rel_err(result, expected) <= TOLERANCE
    assert rel_err(result, ours(**ours_call(control_image=1 - control, latents=noise_for()))) > 1e-3
    ours.unload_lora("canny")
    assert ours.kind == "text" and ours.transformer.img_in.weight.shape[1] == 64
    state = ours.transformer.state_dict()
    assert state.keys() == base_state.keys() and all(torch.equal(state[k], base_state[k]) for k in state)
    assert torch.equal(ours(**ours_call(latents=noise_for(), height=HEIGHT, width=WIDTH)), text_image)


def test_control_lora_transformer_takes_latents_then_control_latents(pipelines, tmp_path):
    """[B, L, 128] = [latents | control latents]; the widened columns start at zero, so the control
    channels act through the LoRA factors only; fused equals unfused."""
    _, ours = pipelines
    bfl, _ = control_lora(ours.transformer)
    save_file(bfl, tmp_path / "bfl.safetensors")
    ours.load_lora(tmp_path / "bfl.safetensors", "canny", scale=SCALE)
    x = torch.randn(1, 6, 128, generator=torch.Generator().manual_seed(3))
    args = (torch.zeros(1, 6, 3), torch.randn(1, 5, 64), torch.zeros(1, 5, 3), torch.rand(1), torch.randn(1, 32),
            torch.full((1,), 3.5))
    with torch.no_grad():
        unfused = ours.transformer(x, *args)
        ours.fuse_lora()
        assert rel_err(ours.transformer(x, *args), unfused) <= 1e-5  # fp32 merge, one rounding per weight
        with pytest.raises(ValueError, match=r"img must be \[B, L, 128\]"):
            ours.transformer(x[..., :64], *args)


def test_second_control_lora_is_refused(pipelines, tmp_path):
    _, ours = pipelines
    bfl, _ = control_lora(ours.transformer)
    save_file(bfl, tmp_path / "bfl.safetensors")
    ours.load_lora(tmp_path / "bfl.safetensors", "canny")
    with pytest.raises(CheckpointError, match="already adapts it"):
        ours.load_lora(tmp_path / "bfl.safetensors", "depth")
    assert list(ours.lora_adapters) == ["canny"] and ours.kind == "control"

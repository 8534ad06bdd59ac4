"""The FLUX autoencoder against diffusers' AutoencoderKL on the same random weights, from every source kind."""

import json

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from helpers import VAE_SCALE, VAE_SHIFT, VAE_TINY, diffusers_config, perturb, rel_err
from safetensors.torch import save_file

from flux_parallel.vae import AutoEncoder, load_autoencoder
from flux_parallel.vae.checkpoint import bfl_to_diffusers, diffusers_to_bfl
from flux_parallel.weights import CheckpointError

TINY, SCALE, SHIFT = VAE_TINY, VAE_SCALE, VAE_SHIFT  # the reference config of helpers.diffusers_config


def reference_decode(ref: AutoencoderKL, z: torch.Tensor) -> torch.Tensor:
    return ref.decode(z / SCALE + SHIFT).sample


def assert_parity(ours: AutoEncoder, ref: AutoencoderKL) -> None:
    z = torch.randn(1, 16, 5, 6)
    x = torch.rand(1, 3, 40, 48) * 2 - 1
    with torch.no_grad():
        # fp32 against fp32: only summation order differs, far below 1e-5
        assert rel_err(ours.decode(z), reference_decode(ref, z)) <= 1e-5
        mode = (ref.encode(x).latent_dist.mode() - SHIFT) * SCALE
        assert rel_err(ours.encode(x), mode) <= 1e-5
        sample = (ref.encode(x).latent_dist.sample(torch.Generator().manual_seed(3)) - SHIFT) * SCALE
        assert rel_err(ours.encode(x, sample=True, generator=torch.Generator().manual_seed(3)), sample) <= 1e-5


@pytest.fixture(scope="module")
def diffusers_vae():
    torch.manual_seed(0)
    return perturb(AutoencoderKL(**diffusers_config()), seed=1)


def test_diffusers_vae_folder(diffusers_vae, tmp_path):
    diffusers_vae.save_pretrained(tmp_path / "vae")
    ours = load_autoencoder(tmp_path / "vae")
    assert ours.params == TINY
    assert_parity(ours, diffusers_vae)


def test_pipeline_folder(diffusers_vae, tmp_path):
    diffusers_vae.save_pretrained(tmp_path / "vae")
    (tmp_path / "model_index.json").write_text(json.dumps({"vae": ["diffusers", "AutoencoderKL"]}))
    assert_parity(load_autoencoder(tmp_path), diffusers_vae)


def test_bfl_file_against_diffusers_own_conversion(tmp_path):
    """A BFL-layout file, read by us and by diffusers' single-file converter (an independent mapping)."""
    state = perturb(AutoEncoder(TINY), seed=2).state_dict()
    save_file(state, tmp_path / "ae.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"norm_groups": TINY.norm_groups}))  # groups are not in the shapes
    ref = AutoencoderKL(**diffusers_config())
    ref.load_state_dict(convert_ldm_vae_checkpoint(dict(state), diffusers_config()), strict=True)
    for src in (tmp_path / "ae.safetensors", tmp_path):  # the file, or a folder holding it
        ours = load_autoencoder(src)
        assert ours.params == TINY
        assert_parity(ours, ref.eval())


def test_config_beside_bfl_file_overrides(tmp_path):
    save_file(AutoEncoder(TINY).state_dict(), tmp_path / "ae.safetensors")
    (tmp_path / "config.json").write_text(
        json.dumps({**diffusers_config(), "scaling_factor": 0.5, "shift_factor": None})
    )
    ours = load_autoencoder(tmp_path / "ae.safetensors", dtype=torch.bfloat16)
    assert (ours.params.scale_factor, ours.params.shift_factor) == (0.5, 0.0)
    assert ours.decoder.conv_in.weight.dtype == torch.bfloat16


def test_key_mapping_round_trip(diffusers_vae):
    state = diffusers_vae.state_dict()
    back = bfl_to_diffusers(diffusers_to_bfl(dict(state), TINY), TINY)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_odd_latent_decodes_to_eight_times(diffusers_vae):
    ours = AutoEncoder(TINY).eval()
    ours.load_state_dict(diffusers_to_bfl(diffusers_vae.state_dict(), TINY))
    z = torch.randn(1, 16, 13, 21)
    with torch.no_grad():
        image = ours.decode(z)
        assert image.shape == (1, 3, 104, 168)
        assert rel_err(image, reference_decode(diffusers_vae, z)) <= 1e-5


def test_bad_inputs_are_refused(tmp_path):
    ours = AutoEncoder(TINY).eval()
    with pytest.raises(ValueError, match=r"\[B, 16, h, w\], got \[1, 4, 8, 8\]"):
        ours.decode(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="multiples of 8, got \\[1, 3, 36, 40\\]"):
        ours.encode(torch.randn(1, 3, 36, 40))
    state = AutoEncoder(TINY).state_dict()
    save_file(state, tmp_path / "ae.safetensors")
    with pytest.raises(CheckpointError, match="not divisible by norm_groups 32 .* config.json with norm_groups"):
        load_autoencoder(tmp_path / "ae.safetensors")
    state.pop("decoder.mid.attn_1.q.weight")
    save_file(state, tmp_path / "ae.safetensors")
    with pytest.raises(CheckpointError, match="missing 1 weights the model needs: decoder.mid.attn_1.q.weight"):
        load_autoencoder(tmp_path / "ae.safetensors", config={"norm_groups": 4})
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a diffusers pipeline or vae folder"):
        load_autoencoder(tmp_path / "empty")


def test_pickle_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(diffusers_config()))
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="holds only pickle weights .*never unpickled"):
        load_autoencoder(tmp_path)
    with pytest.raises(CheckpointError, match="pickle checkpoints are never loaded"):
        load_autoencoder(tmp_path / "diffusion_pytorch_model.bin")

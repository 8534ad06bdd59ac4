"""The whole text-to-image path against diffusers' FluxPipeline on a small random pipeline it saves."""

import dataclasses
import json
import re
import warnings

import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from diffusers import FluxPipeline as DiffusersFluxPipeline
from helpers import (
    clip_model,
    diffusers_config,
    diffusers_model,
    perturb,
    rel_err,
    write_clip_files,
    write_source,
    write_t5_files,
)
from safetensors.torch import save_file
from transformers import CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

from flux_parallel import flux
from flux_parallel.flux import tokenizer_training as tt
from flux_parallel.flux.checkpoint import diffusers_to_bfl
from flux_parallel.flux.pipeline import FluxPipeline
from flux_parallel.flux.pipeline_folder import load_schedule, pipeline_kind
from flux_parallel.flux.sampling import Schedule, get_schedule, pack, unpack
from flux_parallel.weights import CheckpointError

HEIGHT, WIDTH = 48, 80  # 3x5 packed tokens: not square, so a row/column mix-up shows
PROMPTS = ["a red fox in the snow", ""]
SCHEDULERS = {
    "schnell": dict(shift=1.0, use_dynamic_shifting=False),
    "dev": dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                base_image_seq_len=256, max_image_seq_len=4096),
    "fixed shift": dict(shift=3.0, use_dynamic_shifting=False),  # schedule test only
}


def save_reference_pipeline(root, variant: str) -> DiffusersFluxPipeline:
    params = flux.CONFIGS["tiny-dev" if variant == "dev" else "tiny"]
    write_clip_files(root / "tokenizer", *tt.tiny_clip_vocab())
    (root / "tokenizer" / "tokenizer_config.json").write_text('{"model_max_length": 77}')  # as FLUX's repos have
    write_t5_files(root / "tokenizer_2", tt.tiny_spiece_model(), model_max_length=512)
    clip_tok = CLIPTokenizer.from_pretrained(root / "tokenizer")
    t5_tok = T5TokenizerFast.from_pretrained(root / "tokenizer_2")
    torch.manual_seed(1)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=params.context_in_dim, d_kv=8, d_ff=48, num_layers=2,
                                 num_heads=4, feed_forward_proj="gated-gelu"))
    torch.manual_seed(2)
    pipe = DiffusersFluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULERS[variant]),
        vae=perturb(AutoencoderKL(**diffusers_config()), seed=3),
        text_encoder=clip_model(0, len(clip_tok), eos_token_id=2),
        tokenizer=clip_tok,
        text_encoder_2=perturb(t5.eval(), seed=4),
        tokenizer_2=t5_tok,
        transformer=diffusers_model(params),
    )
    pipe.save_pretrained(root)
    return pipe


@pytest.fixture(scope="module", params=["schnell", "dev"])
def saved(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    return root, save_reference_pipeline(root, request.param), request.param


def reference_image(pipe: DiffusersFluxPipeline, noise, steps, guidance, length):
    packed = DiffusersFluxPipeline._pack_latents(noise, noise.shape[0], 16, noise.shape[2], noise.shape[3])
    with torch.no_grad():
        return pipe(PROMPTS, height=HEIGHT, width=WIDTH, num_inference_steps=steps, guidance_scale=guidance,
                    latents=packed, max_sequence_length=length, output_type="pt").images


@pytest.mark.parametrize("steps", [1, 3])
def test_image_equals_diffusers(saved, steps):
    root, ref, variant = saved
    noise = torch.randn(len(PROMPTS), 16, HEIGHT // 8, WIDTH // 8)
    ours = FluxPipeline.from_pretrained(root, dtype=torch.float32)
    assert ours.schedule.use_dynamic_shifting == (variant == "dev")
    guidance = 4.0 if variant == "dev" else None
    image = ours(PROMPTS, height=HEIGHT, width=WIDTH, num_steps=steps, guidance=guidance, latents=noise,
                 max_sequence_length=24, output_type="pt")
    expected = reference_image(ref, noise, steps, guidance if guidance else 3.5, 24)
    assert image.shape == (2, 3, HEIGHT, WIDTH)
    # fp32 end to end; 1e-4 elementwise on images in [0, 1] leaves room for the reordered sums of two
    # implementations over a few steps (the difference seen is about 1e-6)
    torch.testing.assert_close(image, expected, rtol=0, atol=1e-4)


def test_true_cfg_equals_diffusers(saved):
    """Negative prompts with true_cfg_scale > 1: two predictions per step, neg + scale * (pos - neg)."""
    root, ref, variant = saved
    noise = torch.randn(len(PROMPTS), 16, HEIGHT // 8, WIDTH // 8)
    guidance = 4.0 if variant == "dev" else None
    negatives = ["blurry", "a dog"]
    ours = FluxPipeline.from_pretrained(root, dtype=torch.float32)
    image = ours(PROMPTS, height=HEIGHT, width=WIDTH, num_steps=2, guidance=guidance, latents=noise,
                 max_sequence_length=24, output_type="pt", negative_prompt=negatives, true_cfg_scale=3.0)
    packed = DiffusersFluxPipeline._pack_latents(noise, noise.shape[0], 16, noise.shape[2], noise.shape[3])
    with torch.no_grad():
        expected = ref(PROMPTS, negative_prompt=negatives, true_cfg_scale=3.0, height=HEIGHT, width=WIDTH,
                       num_inference_steps=2, guidance_scale=guidance or 3.5, latents=packed, max_sequence_length=24,
                       output_type="pt").images
    without_cfg = ours(PROMPTS, height=HEIGHT, width=WIDTH, num_steps=2, guidance=guidance, latents=noise,
                       max_sequence_length=24, output_type="pt")
    assert (image - without_cfg).abs().max() > 1e-2  # the negative branch changed the image
    # fp32 end to end; we run both branches as one batched forward, diffusers as two: rounding only
    assert rel_err(image, expected) <= 1e-5


def test_bfl_single_file_overrides_give_the_same_image(saved, tmp_path):
    root, ref, variant = saved
    params = flux.CONFIGS["tiny-dev" if variant == "dev" else "tiny"]
    (tmp_path / "t").mkdir(), (tmp_path / "ae").mkdir()
    save_file(diffusers_to_bfl(dict(ref.transformer.state_dict()), params), tmp_path / "t" / "flux1-tiny.safetensors")
    (tmp_path / "t" / "config.json").write_text('{"axes_dim": [2, 2, 4]}')  # head_dim 8 has no 16:56:56 split
    from flux_parallel.vae import VAE_CONFIGS
    from flux_parallel.vae.checkpoint import (
        diffusers_to_bfl as vae_to_bfl,  # proven against diffusers' converter in test_vae
    )

    save_file(vae_to_bfl(dict(ref.vae.state_dict()), VAE_CONFIGS["tiny"]), tmp_path / "ae" / "ae.safetensors")
    (tmp_path / "ae" / "config.json").write_text('{"norm_groups": 4}')  # a BFL file implies 32 groups
    noise = torch.randn(1, 16, HEIGHT // 8, WIDTH // 8)
    call = dict(prompt="a fox", height=HEIGHT, width=WIDTH, num_steps=2, latents=noise, max_sequence_length=16,
                output_type="pt")
    plain = FluxPipeline.from_pretrained(root, dtype=torch.float32)(**call)
    overridden = FluxPipeline.from_pretrained(
        root,
        dtype=torch.float32,
        transformer=tmp_path / "t" / "flux1-tiny.safetensors",
        vae=tmp_path / "ae" / "ae.safetensors",
    )(**call)
    # same weights; only the load path differs (1x1 conv vs linear attention projections in the VAE)
    torch.testing.assert_close(overridden, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["schnell", "dev", "fixed shift"])
@pytest.mark.parametrize("steps, seq_len", [(4, 256), (28, 4096), (7, 1000)])
def test_schedule_equals_diffusers_scheduler(variant, steps, seq_len):
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULERS[variant])
    mu = Schedule(**{k: v for k, v in SCHEDULERS[variant].items()}).mu(seq_len)
    scheduler.set_timesteps(sigmas=[1 - i / steps for i in range(steps)], mu=mu)
    ours = get_schedule(steps, seq_len, Schedule(**SCHEDULERS[variant]))
    torch.testing.assert_close(torch.tensor(ours), scheduler.sigmas.float(), rtol=1e-6, atol=1e-6)


def test_public_name():
    assert flux.FluxPipeline is FluxPipeline


def test_pack_unpack_round_trip():
    latents = torch.randn(2, 16, 6, 10)
    packed = pack(latents)
    assert torch.equal(packed, DiffusersFluxPipeline._pack_latents(latents, 2, 16, 6, 10))
    assert torch.equal(unpack(packed, 48, 80), latents)


def test_tiny_pipeline_outputs():
    pipe = FluxPipeline.tiny_random()
    latents = pipe("a fox", height=32, width=48, num_steps=2, output_type="latent")
    assert latents.shape == (1, 16, 4, 6)
    images = pipe(["a fox", "a cat"], height=32, width=48, num_steps=2, output_type="pil")
    assert [im.size for im in images] == [(48, 32)] * 2


def test_vae_stripes_give_the_same_image():
    call = dict(prompt="a fox", height=64, width=48, num_steps=1, output_type="pt")
    plain = FluxPipeline.tiny_random()(**call)
    torch.testing.assert_close(FluxPipeline.tiny_random(vae_stripes=3)(**call), plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "call, message",
    [
        (dict(height=40), "height 40 is not a multiple of 16: the nearest valid sizes are 32 and 48"),
        (dict(num_steps=0), "num_steps must be at least 1"),
        (dict(max_sequence_length=10_000), "max_sequence_length 10000 is outside"),
        (dict(max_sequence_length=0), "max_sequence_length 0 is outside"),
        (dict(output_type="np"), "output_type must be"),
        (dict(latents=torch.zeros(1, 16, 3, 3)), r"latents must have shape \[1, 16, 4, 4\]"),
        (dict(prompt=3), "prompt"),
    ],
)
def test_bad_calls(call, message):
    pipe = FluxPipeline.tiny_random()
    with pytest.raises(ValueError, match=message):
        pipe(**{"prompt": "x", "height": 32, "width": 32, "num_steps": 1, **call})


def test_bad_vae_stripes_refused_before_any_work():
    with pytest.raises(ValueError, match="vae_stripes must be a positive integer"):
        FluxPipeline.tiny_random(vae_stripes=0)


def test_guidance_on_schnell_warns_and_is_ignored():
    pipe = FluxPipeline.tiny_random()
    call = dict(prompt="", height=32, width=32, num_steps=1, output_type="latent")
    with pytest.warns(UserWarning, match="no guidance embedding"):
        with_guidance = pipe(guidance=7.0, **call)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(with_guidance, pipe(**call))  # empty prompt is valid


def test_latents_are_checked_before_the_text_encoders_run():
    pipe = FluxPipeline.tiny_random()
    with pytest.raises(ValueError, match="latents must have shape"):
        pipe("x", height=32, width=32, num_steps=1, latents=torch.zeros(1, 16, 3, 3))
    assert "text_encoding_s" not in pipe.last_run


def test_an_override_of_the_wrong_class_is_refused(tmp_path):
    with pytest.raises(ValueError, match="transformer must be a Flux or a checkpoint source, got a Linear"):
        FluxPipeline.from_pretrained(tmp_path, transformer=torch.nn.Linear(1, 1))


@pytest.mark.parametrize("config, message", [
    ({"use_karras_sigmas": True}, "use_karras_sigmas True is not supported"),
    ({"base_image_seq_len": 256, "max_image_seq_len": 256}, "max_image_seq_len 256 must exceed base_image_seq_len 256"),
])
def test_bad_scheduler_config(tmp_path, config, message):
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        load_schedule(tmp_path, guidance_embed=True)


# ---- model_index.json and the transformer's input channels: the variant, or a refusal, at load ----


def pipeline_folder(root, class_name="FluxPipeline", in_channels=64, kind="pipeline"):
    """A folder holding only a tiny transformer (`kind` as test_transformer.write_source writes it) and,
    for a pipeline folder, a model_index.json naming `class_name`: the refusals come before anything else is read."""
    params = dataclasses.replace(flux.CONFIGS["tiny"], in_channels=in_channels)  # out_channels stays 64
    root.mkdir(parents=True, exist_ok=True)
    path = write_source(kind, diffusers_model(params), params, root)
    if kind == "pipeline":
        index = {"_class_name": class_name, "transformer": ["diffusers", "FluxTransformer2DModel"]}
        (root / "model_index.json").write_text(json.dumps(index))
    return path


@pytest.mark.parametrize("class_name, variant", [
    ("FluxPriorReduxPipeline", "FLUX.1 Redux"),
    ("FluxControlNetPipeline", "ControlNet conditioning"),
    ("StableDiffusion3Pipeline", "StableDiffusion3Pipeline"),
])
def test_other_pipeline_folders_are_refused(tmp_path, class_name, variant):
    pipeline_folder(tmp_path, class_name)
    with pytest.raises(CheckpointError) as err:
        FluxPipeline.from_pretrained(tmp_path, dtype=torch.float32)
    message = str(err.value)
    assert f"{tmp_path / 'model_index.json'} describes a {class_name}" in message and variant in message
    assert "the FLUX.1 pipelines that run here are FluxPipeline, FluxImg2ImgPipeline" in message and "\n" not in message


@pytest.mark.parametrize("class_name, channels, kind", [
    ("FluxPipeline", 64, "text"), ("FluxImg2ImgPipeline", 64, "text"), ("FluxInpaintPipeline", 64, "text"),
    ("FluxKontextPipeline", 64, "kontext"), ("FluxFillPipeline", 384, "fill"), ("FluxControlPipeline", 128, "control"),
])
def test_variant_pipeline_folders_give_their_kind(tmp_path, class_name, channels, kind):
    pipeline_folder(tmp_path, class_name, in_channels=channels)
    assert pipeline_kind(tmp_path) == kind


def test_a_variant_with_other_channels_is_refused(tmp_path):
    pipeline_folder(tmp_path, "FluxFillPipeline")
    with pytest.raises(CheckpointError, match="model_index.json's pipeline needs a transformer with 384 input "
                                              "channels, this one takes 64"):
        pipeline_kind(tmp_path)
    with pytest.raises(CheckpointError, match="variant canny needs a transformer with 128 input channels"):
        pipeline_kind(tmp_path, variant="canny")


@pytest.mark.parametrize("channels, kind", [(384, "fill"), (128, "control"), (96, None)])
@pytest.mark.parametrize("source", ["pipeline", "bfl"])
def test_transformer_input_channels_give_the_kind(tmp_path, source, channels, kind):
    path = pipeline_folder(tmp_path, in_channels=channels, kind=source)
    assert flux.load_transformer(path, dtype=torch.float32).params.in_channels == channels  # a loadable transformer
    if kind is not None:
        assert pipeline_kind(tmp_path) == kind
        return
    file = tmp_path / "transformer" / "config.json" if source == "pipeline" else path
    with pytest.raises(CheckpointError) as err:
        FluxPipeline.from_pretrained(tmp_path, dtype=torch.float32)
    message = str(err.value)
    assert message.startswith(f"{file}: the transformer takes 96 input channels: it is a FLUX variant this pipeline "
                              "does not run") and "\n" not in message


def test_transformer_override_gives_the_kind(tmp_path):
    fill = pipeline_folder(tmp_path / "fill", in_channels=384, kind="bfl")
    odd = pipeline_folder(tmp_path / "odd", in_channels=96, kind="bfl")
    pipeline_folder(tmp_path / "plain")
    assert pipeline_kind(tmp_path / "plain") == "text"  # the folder itself is a plain text-to-image one
    assert pipeline_kind(tmp_path / "plain", transformer=fill) == "fill"
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(odd))}: the transformer takes 96 input channels"):
        FluxPipeline.from_pretrained(tmp_path / "plain", dtype=torch.float32, transformer=odd)
    module = flux.load_transformer(odd, dtype=torch.float32)
    with pytest.raises(CheckpointError, match="^the transformer given: the transformer takes 96 input channels"):
        FluxPipeline.from_pretrained(tmp_path / "plain", dtype=torch.float32, transformer=module)


@pytest.mark.parametrize("text, fault", [
    ("{not json", "cannot read"),
    ("[1, 2]", "is not a JSON object"),
    ('{"transformer": ["diffusers", "FluxTransformer2DModel"]}', "has no _class_name"),
    ('{"_class_name": ["FluxPipeline"]}', "has no _class_name"),
])
def test_corrupt_model_index_is_refused(tmp_path, text, fault):
    pipeline_folder(tmp_path)
    (tmp_path / "model_index.json").write_text(text)
    with pytest.raises(CheckpointError) as err:
        FluxPipeline.from_pretrained(tmp_path, dtype=torch.float32)
    message = str(err.value)
    assert str(tmp_path / "model_index.json") in message and fault in message and "\n" not in message


def test_plain_pipeline_folders_pass_the_check(saved, tmp_path):
    assert pipeline_kind(saved[0]) == "text"  # as diffusers' FluxPipeline.save_pretrained writes it
    for kind in ("pipeline", "bfl", "component"):
        path = pipeline_folder(tmp_path / kind, kind=kind)
        assert pipeline_kind(tmp_path / kind if kind != "component" else path) == "text"
        assert pipeline_kind(saved[0], transformer=path) == "text"
    assert pipeline_kind(saved[0], transformer=flux.Flux(flux.CONFIGS["tiny"])) == "text"

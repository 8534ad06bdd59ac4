"""LoRA adapters in every layout against diffusers' load_lora_weights (or, where diffusers' converter
is hard-wired to the 12B sizes, against the weights merged by hand), fused and unfused, several at
once, unloaded bit for bit, and refused with one sentence when the file is wrong."""

import json

import generate
import pytest
import torch
from diffusers import FluxPipeline as DiffusersFluxPipeline
from helpers import diffusers_model, rel_err
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from flux_parallel.flux import CONFIGS, Flux
from flux_parallel.flux.checkpoint import diffusers_to_bfl
from flux_parallel.flux.compile import compile_blocks, compile_counters
from flux_parallel.flux.pipeline import FluxPipeline
from flux_parallel.flux.quantize import quantize_fp8
from flux_parallel.flux.sampling import Schedule
from flux_parallel.flux.text_encoders import TextConditioner
from flux_parallel.vae import VAE_CONFIGS, AutoEncoder
from flux_parallel.weights import CheckpointError, seeded_init

P = CONFIGS["tiny-dev"]  # guidance_in too: every kind of linear of FLUX.1-dev
RANK = 4
# fp32: our factors are applied as two thin products per slice, PEFT's per diffusers module, and
# kohya's alpha/rank is folded into the factors by diffusers' converter: rounding only, about 1e-7
TOL = 1e-4


def base_models(seed: int = 0):
    """A random diffusers transformer and our pipeline around a transformer with the same weights."""
    torch.manual_seed(seed)
    ref = diffusers_model(P)
    ours = Flux(P).eval()
    ours.load_state_dict(diffusers_to_bfl(dict(ref.state_dict()), P))
    vae = seeded_init(AutoEncoder(VAE_CONFIGS["tiny"]), 2)
    return ref, FluxPipeline(ours, vae, TextConditioner.tiny(seed=0), Schedule())


def inputs(batch=2, img_len=24, txt_len=7):
    generator = torch.Generator().manual_seed(7)
    ids = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(img_len // 4), indexing="ij"), -1).reshape(-1, 2)
    return dict(
        img=torch.randn(batch, img_len, P.in_channels, generator=generator),
        img_ids=torch.cat((torch.zeros(img_len, 1), ids.float()), dim=1),
        txt=torch.randn(batch, txt_len, P.context_in_dim, generator=generator),
        txt_ids=torch.zeros(txt_len, 3),
        timesteps=torch.rand(batch, generator=generator),
        y=torch.randn(batch, P.vec_in_dim, generator=generator),
        guidance=torch.full((batch,), 3.5),
    )


@torch.no_grad()
def ours_out(pipe: FluxPipeline, x: dict) -> torch.Tensor:
    return pipe.transformer(**x)


@torch.no_grad()
def diffusers_out(ref, x: dict) -> torch.Tensor:
    return ref(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
               timestep=x["timesteps"], img_ids=x["img_ids"], txt_ids=x["txt_ids"], guidance=x["guidance"]).sample


def diffusers_loaded(ref, files: dict, weights: dict | None = None):
    """ref with the LoRA files loaded by diffusers (adapter name -> path), at `weights`."""
    pipe = DiffusersFluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                 tokenizer_2=None, transformer=ref)
    for name, path in files.items():
        pipe.load_lora_weights(str(path), adapter_name=name)
    if weights:
        pipe.set_adapters(list(weights), list(weights.values()))
    return pipe


def factor_pair(generator, out_features: int, in_features: int, rank: int = RANK):
    """Random down [rank, in] and up [out, rank]: a nonzero up, so that a wrong placement shows."""
    down = torch.randn(rank, in_features, generator=generator) / in_features**0.5
    return down, 0.3 * torch.randn(out_features, rank, generator=generator)


def peft_lora(ref, seed: int) -> dict:
    """diffusers/PEFT keys on every linear of the diffusers transformer (its separate q/k/v included)."""
    generator, state = torch.Generator().manual_seed(seed), {}
    for name, module in ref.named_modules():
        if isinstance(module, torch.nn.Linear):
            down, up = factor_pair(generator, module.out_features, module.in_features)
            state[f"transformer.{name}.lora_A.weight"], state[f"transformer.{name}.lora_B.weight"] = down, up
    return state


def kohya_lora(model: Flux, seed: int, skip=()) -> tuple[dict, dict]:
    """kohya keys on our linears (but `skip`), alpha 2 (scale 1/2) -> (state, {module: (down, up, scale)})."""
    generator, state, factors = torch.Generator().manual_seed(seed), {}, {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.startswith(skip):
            down, up = factor_pair(generator, module.out_features, module.in_features)
            key = "lora_unet_" + name.replace(".", "_")
            state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = down, up
            state[f"{key}.alpha"] = torch.tensor(2.0)
            factors[name] = (down, up, 2.0 / RANK)
    return state, factors


# What diffusers' kohya converter cannot be the oracle for: it splits linear1 at the 12B sizes
# (dims=[3072]*3 + [12288]), and it writes the embedders' and final layer's keys without the
# `transformer.` prefix, so load_lora_weights silently drops them. The merged-weights test covers these.
NOT_IN_DIFFUSERS_KOHYA = ("single_blocks.0.linear1", "single_blocks.1.linear1", "img_in", "txt_in", "time_in",
                          "vector_in", "guidance_in", "final_layer")


def write(state: dict, path, metadata: dict | None = None):
    save_file(state, path, metadata=metadata)
    return path


def merged_reference(base: Flux, factors: dict) -> Flux:
    """`base` with W + scale * up @ down merged by hand: the oracle where diffusers has none."""
    state = {k: v.clone() for k, v in base.state_dict().items()}
    for name, (down, up, scale) in factors.items():
        state[f"{name}.weight"] += scale * up @ down
    model = Flux(P).eval()
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("fuse, rslora", [(False, False), (True, False), (False, True)],
                         ids=["unfused", "fused", "rslora"])
def test_peft_lora_equals_diffusers(fuse, rslora, tmp_path):
    ref, pipe = base_models()
    state = peft_lora(ref, seed=1)
    # lora_alpha 8 over rank 4 for most modules (scale 2, or 8 / sqrt(4) = 4 rank-stabilised), alpha 2
    # for proj_out: the header's LoraConfig
    config = {"transformer.r": RANK, "transformer.lora_alpha": 8, "transformer.alpha_pattern": {"proj_out": 2},
              "transformer.target_modules": sorted({k.split(".lora_")[0].removeprefix("transformer.") for k in state}),
              "transformer.use_rslora": rslora}
    path = write(state, tmp_path / "peft.safetensors", {"lora_adapter_metadata": json.dumps(config)})
    x = inputs()
    base = ours_out(pipe, x)
    pipe.load_lora(path, "a")
    if fuse:
        pipe.fuse_lora()
    expected = diffusers_out(diffusers_loaded(ref, {"a": path}).transformer, x)
    assert rel_err(base, expected) > 0.01  # the LoRA changes the output: the comparison below can fail
    assert rel_err(ours_out(pipe, x), expected) <= TOL


@pytest.mark.parametrize("fuse", [False, True], ids=["unfused", "fused"])
def test_kohya_lora_equals_diffusers(fuse, tmp_path):
    ref, pipe = base_models()
    state, _ = kohya_lora(pipe.transformer, seed=2, skip=NOT_IN_DIFFUSERS_KOHYA)
    path = write(state, tmp_path / "kohya.safetensors")
    x = inputs()
    pipe.load_lora(path, "k")
    if fuse:
        pipe.fuse_lora()
    expected = diffusers_out(diffusers_loaded(ref, {"k": path}).transformer, x)
    assert rel_err(ours_out(pipe, x), expected) <= TOL


@pytest.mark.parametrize("layout", ["kohya", "comfyui", "comfyui-peft"])
def test_bfl_named_lora_equals_merged_weights(layout, tmp_path):
    """Every linear, linear1 and the embedders included, against W + alpha/rank * up @ down."""
    _, pipe = base_models()
    state, factors = kohya_lora(pipe.transformer, seed=3)
    if layout != "kohya":  # the same factors under ComfyUI's names: diffusion_model.<our name>
        names = {"lora_unet_" + n.replace(".", "_"): n for n in factors}
        down, up = (".lora_down", ".lora_up") if layout == "comfyui" else (".lora_A", ".lora_B")
        state = {f"diffusion_model.{names[k.split('.')[0]]}" + k[k.index("."):].replace(".lora_down", down)
                 .replace(".lora_up", up): v for k, v in state.items()}
    x = inputs()
    expected = merged_reference(pipe.transformer, factors)(**x)
    pipe.load_lora(write(state, tmp_path / "lora.safetensors"))
    assert rel_err(ours_out(pipe, x), expected) <= TOL
    assert pipe.lora_adapters == {"default_0": 1.0}


def test_two_adapters_equal_set_adapters(tmp_path):
    ref, pipe = base_models()
    peft = write(peft_lora(ref, seed=4), tmp_path / "a.safetensors")
    kohya = write(kohya_lora(pipe.transformer, seed=5, skip=NOT_IN_DIFFUSERS_KOHYA)[0], tmp_path / "b.safetensors")
    x = inputs()
    pipe.load_lora(peft, "a")
    pipe.load_lora(kohya, "b", scale=0.2)
    qkv = pipe.transformer.double_blocks[0].img_attn.qkv
    scale_tensor = qkv.scales["b"]
    pipe.set_lora_scales({"a": 0.7, "b": 0.4})
    assert qkv.scales["b"] is scale_tensor  # changed in place: a compiled block keeps its graph
    assert pipe.lora_adapters == pytest.approx({"a": 0.7, "b": 0.4})
    expected = diffusers_out(diffusers_loaded(ref, {"a": peft, "b": kohya}, {"a": 0.7, "b": 0.4}).transformer, x)
    assert rel_err(ours_out(pipe, x), expected) <= TOL
    pipe.fuse_lora()
    assert rel_err(ours_out(pipe, x), expected) <= TOL


@pytest.mark.parametrize("fuse", [False, True], ids=["unfused", "fused"])
def test_unload_restores_the_base_model_exactly(fuse, tmp_path):
    ref, pipe = base_models()
    x = inputs()
    base, base_state = ours_out(pipe, x), {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    kohya = write(kohya_lora(pipe.transformer, seed=7)[0], tmp_path / "b.safetensors")
    pipe.load_lora(write(peft_lora(ref, seed=6), tmp_path / "a.safetensors"), "a")
    pipe.load_lora(kohya, "b")
    if fuse:
        pipe.fuse_lora()
    pipe.unload_lora("a")
    only_b = ours_out(pipe, x)
    pipe.unload_lora()
    assert not torch.equal(only_b, base)
    assert torch.equal(ours_out(pipe, x), base)
    assert pipe.lora_adapters == {}
    assert all(type(m) is not torch.nn.Module and "LoRA" not in type(m).__name__ for m in pipe.transformer.modules())
    assert all(torch.equal(v, base_state[k]) for k, v in pipe.transformer.state_dict().items())


def _bad_files(ref, pipe, tmp_path) -> dict:
    state = peft_lora(ref, seed=8)
    wrong_rank = dict(state)
    wrong_rank["transformer.x_embedder.lora_B.weight"] = torch.randn(P.hidden_size, RANK + 1)
    other_model = dict(state)
    other_model["transformer.proj_out.lora_A.weight"] = torch.randn(RANK, 2 * P.hidden_size)
    widened = dict(state)  # 128 input channels widen img_in (a control LoRA, test_control_lora.py); 192 no model takes
    widened["transformer.x_embedder.lora_A.weight"] = torch.randn(RANK, 3 * P.in_channels)
    write(state, tmp_path / "whole.safetensors")
    data = (tmp_path / "whole.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    torch.save(state, tmp_path / "pytorch_lora_weights.bin")
    return {
        "unknown keys": (write({**state, "transformer.no_such.lora_A.weight": torch.ones(2, 2)},
                               tmp_path / "unknown.safetensors"), "no_such"),
        "wrong rank": (write(wrong_rank, tmp_path / "rank.safetensors"), "img_in"),
        "another model": (write(other_model, tmp_path / "other.safetensors"), "proj_out"),
        "widened img_in": (write(widened, tmp_path / "control.safetensors"), "down [4, 192]"),
        "truncated": (tmp_path / "truncated.safetensors", "truncated"),
        "empty": (write({}, tmp_path / "empty.safetensors"), "holds no tensors"),
        "pickle": (tmp_path / "pytorch_lora_weights.bin", "safetensors"),
    }


@pytest.mark.parametrize("case", ["unknown keys", "wrong rank", "another model", "widened img_in", "truncated",
                                  "empty", "pickle"])
def test_bad_lora_file_is_refused_and_changes_nothing(case, tmp_path):
    ref, pipe = base_models()
    x = inputs()
    base = ours_out(pipe, x)
    path, named = _bad_files(ref, pipe, tmp_path)[case]
    with pytest.raises(CheckpointError) as err:
        pipe.load_lora(path)
    message = str(err.value)
    assert named in message and "\n" not in message and message.count(". ") == 0
    assert pipe.lora_adapters == {}
    assert torch.equal(ours_out(pipe, x), base)


def xlabs_lora(seed: int) -> dict:
    """XLabs keys: each double block's img/txt qkv and proj, each single block's qkv rows and linear2."""
    hidden, generator, state = P.hidden_size, torch.Generator().manual_seed(seed), {}
    double = {"qkv_lora1": (3 * hidden, hidden), "proj_lora1": (hidden, hidden), "qkv_lora2": (3 * hidden, hidden),
              "proj_lora2": (hidden, hidden)}
    single = {"qkv_lora": (3 * hidden, hidden), "proj_lora": (hidden, hidden + P.mlp_hidden_dim)}
    for kind, count, layers in (("double_blocks", P.depth, double), ("single_blocks", P.depth_single_blocks, single)):
        for i in range(count):
            for name, shape in layers.items():
                down, up = factor_pair(generator, *shape)
                state[f"{kind}.{i}.processor.{name}.down.weight"] = down
                state[f"{kind}.{i}.processor.{name}.up.weight"] = up
    return state


@pytest.mark.parametrize("fuse", [False, True], ids=["unfused", "fused"])
def test_xlabs_lora_equals_diffusers(fuse, tmp_path):
    ref, pipe = base_models()
    path = write(xlabs_lora(seed=9), tmp_path / "xlabs.safetensors")
    x = inputs()
    pipe.load_lora(path, "x", scale=0.6)
    if fuse:
        pipe.fuse_lora()
    expected = diffusers_out(diffusers_loaded(ref, {"x": path}, {"x": 0.6}).transformer, x)
    assert rel_err(ours_out(pipe, x), expected) <= TOL


def test_bfl_control_lora_equals_merged_weights(tmp_path):
    """lora_A/lora_B on every linear, lora_B.bias scaled with the adapter, QK-norm scales replaced
    (not scaled); unloading gives the base model back exactly."""
    _, pipe = base_models()
    x = inputs()
    base_model, base = pipe.transformer, ours_out(pipe, x)
    generator, state, expected_state = torch.Generator().manual_seed(10), {}, dict(base_model.state_dict())
    scale = 0.85  # BFL's CLI default for its control LoRAs
    for name, module in base_model.named_modules():
        if isinstance(module, torch.nn.Linear):
            down, up = factor_pair(generator, module.out_features, module.in_features)
            bias = torch.randn(module.out_features, generator=generator)
            state |= {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up, f"{name}.lora_B.bias": bias}
            expected_state[f"{name}.weight"] = expected_state[f"{name}.weight"] + scale * up @ down
            expected_state[f"{name}.bias"] = expected_state[f"{name}.bias"] + scale * bias
    for key in ("double_blocks.1.txt_attn.norm.key_norm.scale", "single_blocks.0.norm.query_norm.scale"):
        state[key] = expected_state[key] = torch.rand(P.head_dim, generator=generator) + 0.5
    reference = Flux(P).eval()
    reference.load_state_dict(expected_state)
    pipe.load_lora(write(state, tmp_path / "control.safetensors"), "depth", scale=scale)
    assert rel_err(ours_out(pipe, x), reference(**x)) <= TOL
    pipe.unload_lora("depth")
    assert torch.equal(ours_out(pipe, x), base)


def clip_lora(clip, layout: str, seed: int) -> dict:
    """Random factors on CLIP's linears, in diffusers' (transformers 4 names) or kohya's layout."""
    generator, state = torch.Generator().manual_seed(seed), {}
    for name, module in clip.named_modules():
        if isinstance(module, torch.nn.Linear):
            down, up = factor_pair(generator, module.out_features, module.in_features)
            if layout == "diffusers":
                state[f"text_encoder.text_model.{name}.lora_A.weight"] = down
                state[f"text_encoder.text_model.{name}.lora_B.weight"] = up
            else:
                key = "lora_te1_text_model_" + name.replace(".", "_")
                state |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up}
                state[f"{key}.alpha"] = torch.tensor(8.0)
    return state


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_clip_lora_equals_diffusers(layout, tmp_path):
    """A CLIP LoRA changes the pooled vector the pipeline encodes, as diffusers' does transformers' CLIP."""
    ref, pipe = base_models()
    clip = pipe.text.clip
    theirs = CLIPTextModel(CLIPTextConfig(vocab_size=768, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, max_position_embeddings=77, eos_token_id=767,
                                          bos_token_id=766, projection_dim=8)).eval()
    theirs.load_state_dict(clip.state_dict(), strict=False)  # the same names (transformers 5)
    ids = pipe.text.clip_tokenizer(["a red fox", "a photo of a cat"])
    with torch.no_grad():
        base_y = clip(ids)
        assert rel_err(base_y, theirs(ids).pooler_output) <= 1e-5  # the same CLIP before any LoRA
    path = write(clip_lora(clip, layout, seed=11), tmp_path / "clip.safetensors")
    pipe.load_lora(path, "c", scale=0.5)
    diffusers_pipe = DiffusersFluxPipeline(scheduler=None, vae=None, text_encoder=theirs, tokenizer=None,
                                           text_encoder_2=None, tokenizer_2=None, transformer=ref)
    diffusers_pipe.load_lora_weights(str(path), adapter_name="c")
    diffusers_pipe.set_adapters(["c"], [0.5])
    with torch.no_grad():
        expected = theirs(ids).pooler_output
        assert rel_err(base_y, expected) > 0.01
        assert rel_err(clip(ids), expected) <= TOL
        _, _, y = pipe.text(["a red fox", "a photo of a cat"], 16)  # what the pipeline encodes before denoising
    assert rel_err(y, expected) <= TOL


@pytest.mark.parametrize("value", ["lora.safetensors:strong", ":0.5", "lora.safetensors:nan"])
def test_generate_refuses_a_bad_lora_value(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--model", "tiny-random", "--lora", value])
    assert exit_info.value.code == 2
    assert f"--lora {value}: give [NAME=]PATH_OR_ID or [NAME=]PATH_OR_ID:SCALE" in capsys.readouterr().err


def test_generate_fuse_lora_needs_a_lora(capsys):
    with pytest.raises(SystemExit):
        generate.main(["--model", "tiny-random", "--fuse-lora"])
    assert "--fuse-lora merges the adapters of --lora" in capsys.readouterr().err


def test_generate_bad_lora_file_exits_1(tmp_path, capsys):
    (tmp_path / "style.bin").write_bytes(b"never unpickled")
    assert generate.main(["--model", "tiny-random", "--lora", str(tmp_path / "style.bin")]) == 1
    err = capsys.readouterr().err
    assert f"--lora {tmp_path / 'style.bin'}:" in err and "safetensors only" in err


def test_generate_with_two_loras_fused_reports_them(tmp_path):
    first, second = (write(kohya_lora(Flux(CONFIGS["tiny"]), seed)[0], tmp_path / f"{seed}.safetensors")
                     for seed in (12, 13))
    common = ["--model", "tiny-random", "--prompt", "a fox", "--height", "32", "--width", "32", "--steps", "1"]
    assert generate.main([*common, "--output", str(tmp_path / "base.png")]) == 0
    report = tmp_path / "report.json"
    assert generate.main([*common, "--lora", f"{first}:0.5", "--lora", str(second), "--fuse-lora",
                          "--output", str(tmp_path / "lora.png"), "--report", str(report)]) == 0
    lora = json.loads(report.read_text())["lora"]
    memory = lora.pop("memory")
    assert lora == {"adapters": {"lora_0": 0.5, "lora_1": 1.0}, "sources": [f"{first}:0.5", str(second)],
                    "fused": True}
    assert memory["device_bytes"]["lora_0"] == memory["device_bytes"]["lora_1"] > 0 and memory["fused_host_bytes"] > 0
    assert (tmp_path / "base.png").read_bytes() != (tmp_path / "lora.png").read_bytes()


def test_compiled_blocks_follow_scale_changes_without_recompiling(tmp_path):
    """Scales are tensors changed in place: compiled blocks read the new value and keep their graphs."""
    ref, pipe = base_models()
    pipe.load_lora(write(peft_lora(ref, seed=14), tmp_path / "a.safetensors"), "a")
    x = inputs()
    eager = {}
    for scale in (1.0, 0.3):
        pipe.set_lora_scales({"a": scale})
        eager[scale] = ours_out(pipe, x)
    compile_blocks(pipe.transformer, backend="aot_eager")  # dynamo's guards without inductor's code generation
    pipe.set_lora_scales({"a": 1.0})
    assert torch.equal(ours_out(pipe, x), eager[1.0])
    graphs = compile_counters()
    pipe.set_lora_scales({"a": 0.3})
    assert torch.equal(ours_out(pipe, x), eager[0.3])
    assert compile_counters() == graphs


def test_lora_on_fp8_linears_runs_unfused(tmp_path):
    """FP8 block linears (flux/quantize.py) keep their format: the LoRA adds its products unfused."""
    ref, pipe = base_models()
    path = write(peft_lora(ref, seed=15), tmp_path / "a.safetensors")
    x = inputs()
    pipe.load_lora(path, "a")
    full_precision = ours_out(pipe, x)
    pipe.unload_lora()
    quantize_fp8(pipe.transformer)
    fp8_base = ours_out(pipe, x)
    pipe.load_lora(path, "a")
    # FP8's rounding of weights and activations: a few percent of the output (tests/test_quantize.py);
    # without the LoRA the output is about 100% away
    assert rel_err(ours_out(pipe, x), full_precision) < 0.1 < rel_err(fp8_base, full_precision)
    with pytest.raises(ValueError, match="FP8 layers run LoRA unfused only"):
        pipe.fuse_lora()
    pipe.unload_lora()
    assert torch.equal(ours_out(pipe, x), fp8_base)


def test_lora_from_a_folder(tmp_path):
    """A folder: diffusers' pytorch_lora_weights.safetensors, or the file weight_name names."""
    ref, pipe = base_models()
    x = inputs()
    state = peft_lora(ref, seed=16)
    write(state, tmp_path / "pytorch_lora_weights.safetensors")
    write(state, tmp_path / "style.safetensors")
    pipe.load_lora(tmp_path, "default_file")
    expected = ours_out(pipe, x)
    pipe.unload_lora()
    pipe.load_lora(tmp_path, "named", weight_name="style.safetensors")
    assert torch.equal(ours_out(pipe, x), expected)
    with pytest.raises(CheckpointError, match="holds no other.safetensors: pass weight_name="):
        pipe.load_lora(tmp_path, weight_name="other.safetensors")
    assert list(pipe.lora_adapters) == ["named"]


def test_unprefixed_peft_keys_equal_prefixed_ones(tmp_path):
    """FluxTransformer2DModel.save_lora_adapter writes PEFT keys without `transformer.`."""
    ref, pipe = base_models()
    state = peft_lora(ref, seed=17)
    x = inputs()
    pipe.load_lora(write(state, tmp_path / "prefixed.safetensors"), "prefixed")
    expected = ours_out(pipe, x)
    pipe.unload_lora()
    unprefixed = {k.removeprefix("transformer."): v for k, v in state.items()}
    pipe.load_lora(write(unprefixed, tmp_path / "unprefixed.safetensors"), "unprefixed")
    assert torch.equal(ours_out(pipe, x), expected)


def test_the_memory_report_counts_factors_on_the_device_and_fused_originals_on_the_host(tmp_path):
    _, pipe = base_models()
    state, factors = kohya_lora(pipe.transformer, seed=7)
    pipe.load_lora(write(state, tmp_path / "b.safetensors"), "b")
    factor_bytes = sum((down.numel() + up.numel()) * 4 for down, up, _ in factors.values())  # fp32
    assert pipe.lora.memory() == {"device_bytes": {"b": factor_bytes}, "fused_host_bytes": 0}
    pipe.fuse_lora()
    touched = [m for name, m in pipe.transformer.named_modules() if name in factors]
    weight_bytes = sum((m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)) * 4 for m in touched)
    assert pipe.lora.memory() == {"device_bytes": {"b": factor_bytes}, "fused_host_bytes": weight_bytes}

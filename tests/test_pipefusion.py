"""PipeFusion: stages, schedule, stale K/V, and real multi-stage runs against one process.

Two references, both single-process:
- the plain pipeline: with warmup_steps >= the number of steps PipeFusion runs the whole image
  through the stages every step and must give exactly its result;
- PipeFusion's arithmetic on one device (ParallelContext(num_pipeline_patch=M), one stage): the
  multi-stage runs with stale activations must reproduce it, since each block sees the same fresh
  and stale patches whichever rank holds it.
"""


import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from flux_parallel.flux.cache_config import CacheConfig
from flux_parallel.flux.configs import CONFIGS
from flux_parallel.flux.layers import DoubleStreamBlock, SingleStreamBlock
from flux_parallel.flux.model import Flux
from flux_parallel.flux.pipeline import FluxPipeline
from flux_parallel.parallel import comm, pipefusion
from flux_parallel.parallel.context import ParallelContext
from flux_parallel.parallel.launch import run_distributed
from flux_parallel.parallel.pipefusion import make_schedule, patch_bounds
from flux_parallel.parallel.stages import (
    block_flops,
    block_weights,
    embedder_weights,
    final_weights,
    split_stages,
    stage_prefixes,
)
from flux_parallel.parallel.swap import swapped

# 6 rows x 2 columns of image tokens: patch counts 1..6, 4 and 5 uneven
CALL = dict(prompt="a red fox", height=96, width=32, num_steps=3, max_sequence_length=7, output_type="latent")


def tiny_pipeline(**options) -> FluxPipeline:
    return FluxPipeline.tiny_random(seed=0, **options)


def test_block_weights_and_flops_from_the_shapes():
    params = CONFIGS["tiny"]
    double = DoubleStreamBlock(params.hidden_size, params.num_heads, params.mlp_ratio, params.qkv_bias)
    single = SingleStreamBlock(params.hidden_size, params.num_heads, params.mlp_ratio)
    # weights: every parameter of the block, biases and norm scales included
    assert block_weights(params, "double") == sum(p.numel() for p in double.parameters())
    assert block_weights(params, "single") == sum(p.numel() for p in single.parameters())
    for name in ("tiny-dev", "dev"):  # with a guidance embedder; FLUX.1's shapes
        config = CONFIGS[name]
        with torch.device("meta"):
            model = Flux(config)
        assert embedder_weights(config) + final_weights(config) + config.depth * block_weights(config, "double") + \
            config.depth_single_blocks * block_weights(config, "single") == sum(p.numel() for p in model.parameters())
        assert final_weights(config) == sum(p.numel() for p in model.final_layer.parameters())
    ratio = block_weights(CONFIGS["dev"], "double") / block_weights(CONFIGS["dev"], "single")
    assert 2.39 < ratio < 2.41  # 36 h^2 against 15 h^2, plus biases
    # per token: one stream's linear weights (an image token never meets the text weights)
    image_stream = [double.img_attn.qkv, double.img_attn.proj, double.img_mlp[0], double.img_mlp[2]]
    assert block_flops(params, "double") == sum(m.weight.numel() for m in image_stream)
    assert block_flops(params, "single") == single.linear1.weight.numel() + single.linear2.weight.numel()
    assert block_flops(CONFIGS["dev"], "double") == block_flops(CONFIGS["dev"], "single") == 12 * 3072**2


def test_split_stages():
    tiny, dev = CONFIGS["tiny"], CONFIGS["dev"]  # 2 + 2 and 19 + 38 blocks
    # weight-balanced (the default): the double blocks weigh more, so the first stage gets fewer blocks
    assert split_stages(tiny, 2) == [range(0, 1), range(1, 4)]
    assert [len(r) for r in split_stages(dev, 2)] == [17, 40]
    # compute-balanced (for explicit stage sizes): every block costs the same per token
    assert split_stages(tiny, 2, balance="compute") == [range(0, 2), range(2, 4)]
    assert split_stages(tiny, 3, balance="compute") == [range(0, 1), range(1, 3), range(3, 4)]
    assert [len(r) for r in split_stages(dev, 4, balance="compute")] == [14, 14, 15, 14]
    assert split_stages(tiny, 2, (1, 3)) == [range(0, 1), range(1, 4)]
    with pytest.raises(ValueError, match="pipefusion_degree 5 is more than the model's 4 transformer blocks"):
        split_stages(tiny, 5)
    with pytest.raises(ValueError, match=r"stage sizes \[2, 3\] must be 2 positive block counts adding up to"):
        split_stages(tiny, 2, (2, 3))


def _stage_params(model, params, ranges) -> list[int]:
    """Parameters each stage holds: its blocks, the embedders on the first, the final layer on the last."""
    held = []
    for s, blocks in enumerate(ranges):
        prefixes = stage_prefixes(params, blocks, s == 0, s == len(ranges) - 1)
        held.append(sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefixes)))
    return held


@pytest.mark.parametrize("name, most", [("dev", 0.52), ("medium", 0.56)])
def test_stages_hold_equal_shares_of_the_weights(name, most):
    """FLUX.1: 0.511x of the bytes on the fuller of 2 stages. The medium benchmark config: 0.556x, the
    least any contiguous split reaches there (one double block is 13% of that small model)."""
    from bench_transformer import MEDIUM

    params = MEDIUM if name == "medium" else CONFIGS[name]
    with torch.device("meta"):
        model = Flux(params)
    total, blocks = sum(p.numel() for p in model.parameters()), params.depth + params.depth_single_blocks
    largest = block_weights(params, "double") + embedder_weights(params)  # the first block and what goes with it
    for n in (2, 3, 4):
        held = _stage_params(model, params, split_stages(params, n))
        assert sum(held) == total and all(abs(h - total / n) <= largest for h in held)  # within a block of equal
    two = _stage_params(model, params, split_stages(params, 2))
    fullest = [max(_stage_params(model, params, split_stages(params, 2, (k, blocks - k)))) for k in range(1, blocks)]
    assert max(two) == min(fullest) and max(two) <= most * total
    compute = _stage_params(model, params, split_stages(params, 2, balance="compute"))
    assert max(compute) > max(two)  # the compute-balanced split loads the first stage more


def test_context_validation():
    with pytest.raises(ValueError, match="warmup_steps must be a non-negative integer, got -1"):
        ParallelContext(warmup_steps=-1)
    with pytest.raises(ValueError, match="num_pipeline_patch must be a positive integer, got 0"):
        ParallelContext(num_pipeline_patch=0)
    with pytest.raises(ValueError, match="has 2 block counts for pipefusion_degree 1"):
        ParallelContext(pipefusion_stage_sizes=(1, 3), num_pipeline_patch=2)
    with pytest.raises(ValueError, match="more than the 6 rows of image tokens"):
        tiny_pipeline(parallel=ParallelContext(num_pipeline_patch=7))(**CALL)


def test_schedule_keeps_the_first_stage_busy_with_enough_patches():
    patches = patch_bounds(5, 2, 3)
    assert patches == [(0, 4), (4, 8), (8, 10)]  # uneven bands of whole rows
    slots = [m.slot for m in make_schedule(3, 1, patches, 10, num_stages=3)]
    assert slots == [0, 3, 4, 5, 6, 7, 8]  # warm-up step alone; then patch after patch, no bubble
    slots = [m.slot for m in make_schedule(2, 0, patches, 10, num_stages=4)]
    assert slots == [0, 1, 2, 4, 5, 6]  # fewer patches than stages: stage 0 waits for patch 0's return


def test_one_device_pipefusion_is_exact_without_stale_activations_and_approximate_with():
    exact = tiny_pipeline()(**CALL)
    for patches, warmup in [(4, 3), (5, 9), (1, 0)]:  # whole-image steps only, or one patch: nothing stale
        out = tiny_pipeline(parallel=ParallelContext(num_pipeline_patch=patches, warmup_steps=warmup))(**CALL)
        torch.testing.assert_close(out, exact, rtol=0, atol=0)  # the same operations in the same order
    pipe = tiny_pipeline(parallel=ParallelContext(num_pipeline_patch=3, warmup_steps=1))
    stale = pipe(**CALL)
    error = (stale - exact).abs().max().item()
    assert 0 < error < float("inf")  # stale K/V change the result, by a finite amount
    # a step cache at threshold 0 computes every step: the uncached PipeFusion result bit for bit
    for kind in ("fbcache", "teacache", "dbcache"):
        assert torch.equal(pipe(**CALL, cache=CacheConfig(kind, 0)), stale), kind


def _check_rank(rank, world, degrees, cases, expected_file):
    expected = load_file(expected_file)
    for name, (options, call) in cases.items():
        pipe = tiny_pipeline(parallel=ParallelContext(**degrees, **options), parallel_vae=call.pop("vae", False))
        out = pipe(**call)
        if "cache-stale" in name:  # transfers overlapped (the default) or one batch per slot: the same bits, the
            # step cache's decision byte included (it travels with each step's first message)
            with swapped([(pipefusion, "OVERLAP", not pipefusion.OVERLAP)]):
                other = pipe(**call)
            assert (other is None) if rank != 0 else torch.equal(other, out), name
            assert rank != 0 or _computed(pipe) == expected[f"{name}/computed"].tolist(), name
        if rank != 0:
            assert out is None
            continue
        # fp32; exact cases: the stages run Flux.forward's operations in its order; stale cases: each
        # block sees the same patches as on one device. Bitwise in practice; 1e-5 is the project's bar.
        torch.testing.assert_close(out, expected[name], rtol=1e-5, atol=1e-5, msg=name)
        assert pipe.last_run["comm_bytes_per_step_by_axis"]["pipefusion"] > 0
        if "cache" in call:  # the same steps skipped as the reference's (the first stage decided, the last reports)
            assert _computed(pipe) == expected[f"{name}/computed"].tolist(), name
    # each rank holds only its stage's parameters; together the stages hold the model once
    held = sum(p.numel() * p.element_size() for p in pipe.transformer.parameters() if not p.is_meta)
    assert held == pipe.denoiser.parameter_bytes()
    full = sum(p.numel() * p.element_size() for p in pipe.transformer.parameters())
    every_rank = comm.all_gather_object(held, dist.group.WORLD)  # each group of stages holds one model
    assert held < full and sum(every_rank) == full * world // degrees["pipefusion_degree"]
    return pipe


def _expected(cases, tmp_path) -> str:
    tensors = {}
    for name, (options, call) in cases.items():
        call = dict(call)
        vae = call.pop("vae", False)
        reference = {k: v for k, v in options.items() if k in ("num_pipeline_patch", "warmup_steps")}
        stale = reference.get("warmup_steps", 99) < call["num_steps"]
        parallel = ParallelContext(**reference) if stale else None  # the one-device PipeFusion, or the plain one
        pipe = tiny_pipeline(parallel=parallel, parallel_vae=vae)
        tensors[name] = pipe(**call).contiguous()
        if "cache" in call:
            computed = _computed(pipe)
            assert 0 < len(computed) < call["num_steps"], (name, computed)  # some steps skipped, not all
            tensors[f"{name}/computed"] = torch.tensor(computed)
    save_file(tensors, tmp_path / "expected.safetensors")
    return str(tmp_path / "expected.safetensors")


def _computed(pipe) -> list[int]:
    return pipe.last_run["cache"]["branches"]["positive"]["computed"]


# a step cache under PipeFusion: Fn = 1 on the first stage, Bn = 1 on the last, the middle on the stages
# between (split over two of them on 3 stages); 8 steps, so that the indicator has steps to skip
CACHED = dict(CALL, num_steps=8, cache=CacheConfig("dbcache", 0.8, compute_first=1, compute_last=1,
                                                   taylorseer_order=2))
# every step one whole-image message: the single-device cached image, the same skipped steps
CACHED_EXACT = {"cache-exact-M3": (dict(num_pipeline_patch=3, warmup_steps=8), CACHED)}


def _cases(exact_patches, stale):
    cases = {f"exact-M{m}": (dict(num_pipeline_patch=m, warmup_steps=3), dict(CALL)) for m in exact_patches}
    cases |= {f"stale-M{m}-W{w}": (dict(num_pipeline_patch=m, warmup_steps=w), dict(CALL)) for m, w in stale}
    return cases


@pytest.mark.parametrize("stages, exact_patches, stale", [
    (2, [1, 2, 3, 4, 5, 6], [(2, 1), (5, 0)]),
    (3, [5], [(3, 1), (2, 0)]),
    (4, [4], [(6, 1)]),
])
def test_pipefusion_equals_one_device(stages, exact_patches, stale, tmp_path):
    """With a step cache too: exact with whole-image steps, and after warm-up the one-device PipeFusion's."""
    cases = _cases(exact_patches, stale)
    if stages == 2:
        cases |= CACHED_EXACT | {"cache-stale-M2-W1": (dict(num_pipeline_patch=2, warmup_steps=1), CACHED)}
    if stages == 3:
        cases |= {"cache-stale-M3-W2": (dict(num_pipeline_patch=3, warmup_steps=2), CACHED)}
    run_distributed(_check_rank, stages, dict(pipefusion_degree=stages), cases, _expected(cases, tmp_path))


CFG = dict(negative_prompt="blurry", true_cfg_scale=2.5)


@pytest.mark.parametrize("degrees, cases", [
    # cfg halves of 2 stages each, images decoded by the parallel VAE over all 4 ranks of the replica
    (dict(cfg_degree=2, pipefusion_degree=2), {"cfg-exact": (dict(warmup_steps=3),
                                                             dict(CALL, **CFG, output_type="pt", vae=True)),
                                               "cfg-stale": (dict(num_pipeline_patch=3, warmup_steps=1),
                                                             dict(CALL, **CFG)),
                                               # one branch per half, each stage keeping its K/V as one device
                                               "cfg-cache-stale": (dict(num_pipeline_patch=2, warmup_steps=1),
                                                                   dict(CACHED, **CFG))}),
    # two replicas (3 images), each 2 stages running both CFG branches as one batch
    (dict(data_degree=2, pipefusion_degree=2), {"data-stale": (dict(num_pipeline_patch=2, warmup_steps=1),
                                                               dict(CALL, **CFG, prompt=["a fox", "snow", "a cat"]))}),
])
def test_pipefusion_composes_with_cfg_data_and_the_parallel_vae(degrees, cases, tmp_path):
    world = degrees.get("cfg_degree", 1) * degrees.get("data_degree", 1) * degrees["pipefusion_degree"]
    run_distributed(_check_rank, world, degrees, cases, _expected(cases, tmp_path))


def _check_sp_rank(rank, world, degrees, cases, expected_file):
    last = _check_rank(rank, world, degrees, cases, expected_file)
    assert last.last_run["comm_bytes_per_step"]["all_gather"] > 0  # the fresh K/V shards, over the sp group
    pipe = tiny_pipeline(parallel=ParallelContext(**degrees, num_pipeline_patch=4))
    with comm.count_comm() as stats, pytest.raises(ValueError) as error:
        pipe(**CALL)  # 4 patches x 2 sp ranks need 8 rows; the image has 6
    assert not stats.calls and "every sp rank needs a row of every patch" in str(error.value)
    with comm.count_comm() as stats, pytest.raises(ValueError) as error:
        last(**CACHED)
    assert not stats.calls and "needs sp degree 1 inside each stage" in str(error.value)


@pytest.mark.parametrize("degrees, cases", [
    (dict(pipefusion_degree=2, ulysses_degree=2), {"exact-M3": (dict(num_pipeline_patch=3, warmup_steps=3), CALL),
                                                   "stale-M2-W1": (dict(num_pipeline_patch=2, warmup_steps=1), CALL)}),
    (dict(pipefusion_degree=2, ring_degree=2), {"cfg-stale-M3-W0": (dict(num_pipeline_patch=3, warmup_steps=0),
                                                                    dict(CALL, **CFG))}),
])
def test_pipefusion_with_sequence_parallel_stages(degrees, cases, tmp_path):
    """2 sp ranks inside each of 2 stages: each holds a shard of every patch and of the text."""
    cases = {name: (options, dict(call)) for name, (options, call) in cases.items()}
    run_distributed(_check_sp_rank, 4, degrees, cases, _expected(cases, tmp_path))


def _refused(rank, world, options, message, call=CALL):
    with comm.count_comm() as stats, pytest.raises(ValueError) as error:
        pipe = tiny_pipeline(parallel=ParallelContext(pipefusion_degree=world, **options))
        pipe(**call)
    assert not stats.calls  # refused before the first collective
    messages = comm.all_gather_object(str(error.value), dist.group.WORLD)
    assert messages == [messages[0]] * world and message in messages[0]


def test_pipefusion_refusals_are_identical_on_every_rank():
    run_distributed(_refused, 2, dict(num_pipeline_patch=7), "more than the 6 rows of image tokens")
    run_distributed(_refused, 2, dict(pipefusion_stage_sizes=(1, 2)), "must be 2 positive block counts adding up")
    run_distributed(_refused, 2, {}, "compute_first 2 is more than the first PipeFusion stage's 1 blocks",
                    dict(CALL, cache=CacheConfig("dbcache", 0.1, compute_first=2, compute_last=0)))


@pytest.mark.parametrize("argv, message", [
    (["--warmup-steps", "-1"], "--warmup-steps must be at least 0, got -1"),
    (["--num-pipeline-patch", "0"], "--num-pipeline-patch must be at least 1, got 0"),
    (["--pipefusion_parallel_degree", "0"], "--pipefusion-degree must be at least 1, got 0"),
])
def test_generate_usage_errors(argv, message, capsys):
    import generate

    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--model", "tiny", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("layout", ["bfl", "diffusers"])
def test_a_stage_loads_only_its_tensors(layout, tmp_path):
    from flux_parallel.flux.checkpoint import bfl_to_diffusers, load_transformer
    from flux_parallel.flux.model import Flux
    from flux_parallel.parallel.stages import stage_prefixes
    from flux_parallel.weights import seeded_init

    params = CONFIGS["tiny"]
    model = seeded_init(Flux(params), 0)
    state = model.state_dict()
    if layout == "bfl":
        path = tmp_path / "flux1-tiny.safetensors"
        save_file(state, path)
        (tmp_path / "config.json").write_text('{"axes_dim": [2, 2, 4]}')
    else:
        path = tmp_path / "transformer"
        path.mkdir()
        save_file(bfl_to_diffusers(state, params), path / "diffusion_pytorch_model.safetensors")
        (path / "config.json").write_text(
            '{"_class_name": "FluxTransformer2DModel", "in_channels": 64, "num_layers": 2, "num_single_layers": 2, '
            '"attention_head_dim": 8, "num_attention_heads": 12, "joint_attention_dim": 64, '
            '"pooled_projection_dim": 32, "guidance_embeds": false, "axes_dims_rope": [2, 2, 4]}')
    prefixes = stage_prefixes(params, range(1, 3), first=False, last=False)  # the middle stage of 3
    stage = load_transformer(path, dtype=torch.float32, keep=lambda p: lambda name: name.startswith(prefixes))
    for name, param in stage.named_parameters():
        if name.startswith(prefixes):
            torch.testing.assert_close(param, state[name], rtol=0, atol=0)
        else:
            assert param.is_meta, name
    assert any(not p.is_meta for p in stage.parameters()) and any(p.is_meta for p in stage.parameters())


def test_cost_model_pipefusion():
    """Weights per device fall with the stages; PipeFusion wins on PCIe L40s and loses on NVLinked H100s
    (xDiT docs/performance/flux.md); on 24 GB cards only PipeFusion holds FLUX.1-dev."""
    import dataclasses

    from flux_parallel.planning import cost_model as cm
    from flux_parallel.planning import planner as plan

    w = plan.make_workload("dev", 1024, "bf16", steps=28)
    one = cm.stage_weight_bytes(w, 1)[0]
    two = cm.stage_weight_bytes(w, 2)
    assert sum(two) == one and max(two) <= 0.55 * one  # weight-balanced, 17 double blocks : the rest: 0.511
    compute = cm.stage_weight_bytes(w, 2, cm.compute_balanced_sizes(w, 2))
    assert cm.compute_balanced_sizes(w, 2) == (28, 29)
    assert sum(compute) == one and 0.6 * one < max(compute) < 0.66 * one  # 19 double + 9 single on stage 0: 0.653
    assert cm.pipefusion_or_ulysses(w, plan.PRESETS["l40-pcie"], 8)["choice"] == "pipefusion"
    assert cm.pipefusion_or_ulysses(w, plan.PRESETS["h100-nvlink"], 4)["choice"] == "ulysses"
    small = dataclasses.replace(plan.PRESETS["l40-pcie"], memory_gib=24)
    verdict = cm.pipefusion_or_ulysses(w, small, 4)
    assert verdict["choice"] == "pipefusion" and not verdict["ulysses"]["fits"]
    two_cards = cm.pipefusion_or_ulysses(w, small, 2)  # on two 24 GB cards only the weight-balanced split fits
    assert two_cards["pipefusion"]["fits"] and not two_cards["compute_balanced"]["fits"]
    warm = cm.predict_pipefusion(w, plan.PRESETS["l40-pcie"], 4, warmup=28)["denoise_s"]
    assert warm > cm.predict_pipefusion(w, plan.PRESETS["l40-pcie"], 4, warmup=1)["denoise_s"]  # the bubbles
    # the compute-balanced split trades bytes for pace: its slowest stage runs fewer blocks
    verdict = cm.pipefusion_or_ulysses(w, plan.PRESETS["l40-pcie"], 4)
    balanced, default = verdict["compute_balanced"], verdict["pipefusion"]
    assert balanced["stage_sizes"] == [14, 14, 15, 14] and default["stage_sizes"] == [9, 8, 19, 21]
    assert balanced["denoise_s"] < default["denoise_s"]
    assert balanced["transformer_bytes_per_device"] > default["transformer_bytes_per_device"]
    rows = plan.pipefusion_rows(w, plan.PRESETS["l40-pcie"], 4)  # what the planner prints: both splits
    assert [(r["stages"], r["split"], r["sizes"]) for r in rows if r["stages"] == 2] == [
        (2, "weights", "17 40"), (2, "compute", "28 29")]
    assert {r["stages"] for r in rows} == {2, 3, 4}


def _no_exchange_rank(rank, world):
    from bench_pipefusion import NO_EXCHANGE

    from flux_parallel.flux.sampling import flux_inputs
    from flux_parallel.parallel.runtime import Conditioning, parallelize
    from flux_parallel.weights import seeded_init

    model = seeded_init(Flux(CONFIGS["tiny"]), 0)
    x = flux_inputs(CONFIGS["tiny"], (6, 2), 7, seed=0)
    ctx = ParallelContext(pipefusion_degree=2, num_pipeline_patch=3, warmup_steps=1)
    ctx.rank("pipefusion")  # builds the mesh (collectives) before counting
    cond = {"positive": Conditioning(x["txt"], x["txt_ids"], x["y"])}
    generation = parallelize(model, ctx).start(x["img"], x["img_ids"], cond, None, None)
    with swapped([(pipefusion, "comm", NO_EXCHANGE)]), comm.count_comm() as stats:
        out = generation.denoise([1.0, 0.7, 0.4, 0.0])
    assert not stats.calls and torch.isfinite(out).all()  # each rank ran its stage alone, waiting for nobody


def test_the_benchmark_ceiling_runs_each_stage_without_messages():
    """bench_parallel.py --steps: PipeFusion's no-exchange ceiling sends nothing and cannot wait on a peer."""
    run_distributed(_no_exchange_rank, 2)


def test_bench_parallel_refuses_a_bad_pipefusion_row(capsys):
    import bench_parallel

    with pytest.raises(SystemExit) as exit_info:
        bench_parallel.main(["--steps", "2", "--pipefusion", "2:weights"])
    assert exit_info.value.code == 2 and "--pipefusion '2:weights': give a patch count" in capsys.readouterr().err


def test_pipefusion_error_tool_reports_exact_rows_as_exact(capsys):
    """tools/bench/pipefusion_error.py on the trained tiny model: with W >= steps every row is the exact image."""
    import pipefusion_error

    pipefusion_error.main(["--captions", "2", "--steps", "2", "--warmup", "2", "0"])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| 2 |")
            or line.startswith("| 4 |")]
    exact = [r for r in rows if r[1] == "2"]
    assert len(rows) == 4 and all(r[2] == "inf" and r[3] == "0.0000" and r[-1] == "100% |" for r in exact)
    assert all(r[2] != "inf" for r in rows if r[1] == "0")  # stale K/V from the first step on: not exact

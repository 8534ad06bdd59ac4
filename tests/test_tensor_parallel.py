"""Tensor parallelism (parallel/tensor.py) equals the single-process transformer and pipeline, holds
its share of the weights, and reads only its slices from a BFL safetensors file."""

import copy
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import PARAMS, assert_rel_close, one_and_two_ranks, tiny_flux, tiny_flux_inputs
from safetensors.torch import load_file, save_file

from flux_parallel.flux import CONFIGS, Flux
from flux_parallel.flux.cache_config import CacheConfig
from flux_parallel.flux.pipeline import FluxPipeline
from flux_parallel.flux.sampling import Schedule
from flux_parallel.flux.text_encoders import TextConditioner
from flux_parallel.parallel import comm
from flux_parallel.parallel import tensor as tp
from flux_parallel.parallel.context import ParallelContext
from flux_parallel.parallel.launch import run_distributed
from flux_parallel.vae import VAE_CONFIGS, AutoEncoder
from flux_parallel.weights import seeded_init

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "flux_parallel" / "flux" / "assets" / "tiny"
CALL = dict(prompt=["a red fox", ""], height=48, width=64, num_steps=2, max_sequence_length=7, output_type="pt")


def _forward_matches(rank, world):
    base = tiny_flux()
    x = tiny_flux_inputs(7, (5, 5))
    with torch.no_grad():
        ref = base(**x)
        sharded = tp.parallelize_tensor(copy.deepcopy(base), ParallelContext(tensor_degree=world))
        with comm.count_comm() as stats:
            out = sharded(**x)
    # fp32: only the order of the sums over heads and MLP columns changes (partial sums, then the all-reduce)
    assert_rel_close(out, ref, f"tensor degree {world}, rank {rank}")
    # per block: double 4 all-reduces + 2 all-gathers (the modulations), single 1 + 1
    other = copy.deepcopy(base)
    other.single_blocks[0].linear1 = torch.nn.Identity()  # stands in for an FP8 linear: not an nn.Linear to split
    with pytest.raises(ValueError, match="single_blocks.0.linear1.weight belongs to another kind of layer"):
        tp.parallelize_tensor(other, ParallelContext(tensor_degree=world))
    assert stats.calls["all_reduce"] == 4 * PARAMS.depth + PARAMS.depth_single_blocks
    assert stats.calls["all_gather"] == 2 * PARAMS.depth + PARAMS.depth_single_blocks


@pytest.mark.parametrize("world", [2, 3])
def test_tensor_parallel_forward_equals_single_process(world):
    run_distributed(_forward_matches, world)


def _pipeline_matches(rank, world, degrees, expected_file):
    ctx = ParallelContext(**degrees)
    # tensor innermost: a TP group is two neighbouring ranks (one node), the axes above strided over it
    assert dist.get_process_group_ranks(ctx.group("tensor")) == [rank - rank % 2, rank - rank % 2 + 1]
    first = rank - rank % ctx.replica_size  # the parallel VAE's group: the replica's contiguous ranks, tensor included
    assert dist.get_process_group_ranks(ctx.group("replica")) == list(range(first, first + ctx.replica_size))
    # the 6 latent rows of a 48 px image give the parallel VAE at most 6 ranks
    pipe = FluxPipeline.tiny_random(seed=0, parallel=ctx, parallel_vae=ctx.replica_size <= 6)
    image = pipe(**CALL, negative_prompt="blurry", true_cfg_scale=3.0)
    if rank == 0:
        # fp32; sums over heads, MLP columns and keys in another order: rounding only (the project's 1e-5 bound)
        torch.testing.assert_close(image, load_file(expected_file)["image"], rtol=1e-5, atol=1e-5)
        by_axis = pipe.last_run["comm_bytes_per_step_by_axis"]
        # every axis in use exchanged during the loop (data replicas share nothing until the images meet)
        assert all(by_axis[name.removesuffix("_degree")] > 0 for name in degrees if name != "data_degree")


def _layouts_match(rank, world, layouts, expected_file):
    for degrees in layouts:  # one set of ranks, a mesh per layout
        _pipeline_matches(rank, world, degrees, expected_file)


@pytest.mark.parametrize("layouts", [[dict(tensor_degree=2, ulysses_degree=2), dict(tensor_degree=2, ring_degree=2),
                                      dict(tensor_degree=2, cfg_degree=2), dict(tensor_degree=2, data_degree=2)],
                                     [dict(tensor_degree=2, ulysses_degree=2, cfg_degree=2)]],
                         ids=["tp2-x-ulysses2-ring2-cfg2-data2", "tp2-ulysses2-cfg2"])
def test_tensor_parallel_pipeline_equals_single_process(layouts, tmp_path):
    expected = FluxPipeline.tiny_random(seed=0)(**CALL, negative_prompt="blurry", true_cfg_scale=3.0)
    save_file({"image": expected.contiguous()}, tmp_path / "expected.safetensors")
    world = math.prod(layouts[0].values())
    run_distributed(_layouts_match, world, layouts, str(tmp_path / "expected.safetensors"), timeout_s=240.0)


DEEP = dataclasses.replace(CONFIGS["tiny"], depth=4, depth_single_blocks=8)  # the blocks dominate, as in FLUX.1


def _parameter_bytes(rank, world, one_rank_bytes):
    pipe = FluxPipeline(**_parts(DEEP), parallel=ParallelContext(tensor_degree=world))
    pipe(**CALL)
    mine = pipe.last_run["transformer_parameter_bytes"]
    assert comm.all_gather_object(mine, dist.group.WORLD) == [mine] * world  # every rank holds an equal share
    ratio = mine / one_rank_bytes
    assert ratio <= 0.55, f"a TP={world} rank holds {ratio:.3f} of the weights"


def _parts(params) -> dict:
    """A pipeline's parts with seeded random weights, the transformer at `params`."""
    return dict(transformer=seeded_init(Flux(params), 0), vae=seeded_init(AutoEncoder(VAE_CONFIGS["tiny"]), 2),
                text=TextConditioner.tiny(seed=0), schedule=Schedule(use_dynamic_shifting=False))


def test_tensor_parallel_rank_holds_about_half_the_weights():
    one = FluxPipeline(**_parts(DEEP))
    one(**CALL)
    run_distributed(_parameter_bytes, 2, one.last_run["transformer_parameter_bytes"])


class _Recorder:
    """safe_open's handle, recording what is read: whole tensors by name, and the bytes of every slice."""

    def __init__(self, handle, log):
        self.handle, self.log = handle, log

    def keys(self):
        return self.handle.keys()

    def get_tensor(self, name):
        self.log["whole"].append(name)
        return self.handle.get_tensor(name)

    def get_slice(self, name):
        return _SliceRecorder(self.handle.get_slice(name), self.log)


class _SliceRecorder:
    def __init__(self, part, log):
        self.part, self.log = part, log

    def get_shape(self):
        return self.part.get_shape()

    def __getitem__(self, index):
        out = self.part[index]
        self.log["sliced_bytes"] += out.numel() * out.element_size()
        return out


def test_sharded_loading_reads_only_the_rank_slices(tmp_path, monkeypatch):
    full = tiny_flux()
    file = tmp_path / "flux1-tiny.safetensors"
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, file)
    log = {"whole": [], "sliced_bytes": 0}
    opened = tp.safe_open

    class Opened:
        def __init__(self, *args, **kwargs):
            self.ctx = opened(*args, **kwargs)

        def __enter__(self):
            return _Recorder(self.ctx.__enter__(), log)

        def __exit__(self, *exc):
            return self.ctx.__exit__(*exc)

    monkeypatch.setattr(tp, "safe_open", Opened)
    rank, degree = 1, 3
    with torch.device("meta"):
        meta = Flux(PARAMS)
    loaded, read = tp.load_tensor_shards(tp.shard_modules(meta, rank, degree, None), file, rank, degree, torch.float32)
    expected = tp.shard_modules(copy.deepcopy(full), rank, degree, None).state_dict()
    plan = tp.shard_plan(PARAMS, rank, degree)
    assert not set(log["whole"]) & plan.keys()  # no split parameter is read whole
    split_bytes = sum(expected[k].numel() * 4 for k in plan)
    assert log["sliced_bytes"] == split_bytes  # exactly this rank's slices
    assert read == sum(v.numel() * 4 for v in expected.values()) < 0.45 * file.stat().st_size
    assert expected.keys() == loaded.state_dict().keys()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_diffusers_folder_sharded_loading_reads_only_the_rank_slices(tmp_path, monkeypatch):
    """A diffusers folder: each fused tensor (qkv, linear1) is cut from its separate parts, none read whole."""
    from helpers import diffusers_model

    from flux_parallel.flux import checkpoint

    diffusers_model(PARAMS).save_pretrained(tmp_path / "transformer", max_shard_size="300KB")  # several files
    whole = checkpoint.load_transformer(tmp_path / "transformer", torch.float32)
    # the loader end to end, at degree 1 (no process group): the whole model, strictly loaded
    one = checkpoint.load_transformer_tensor_parallel(tmp_path / "transformer", ParallelContext(), torch.float32)
    assert one.state_dict().keys() == whole.state_dict().keys()
    assert all(torch.equal(v, whole.state_dict()[k]) for k, v in one.state_dict().items())
    log = {"whole": [], "sliced_bytes": 0}
    opened = checkpoint.safe_open
    monkeypatch.setattr(checkpoint, "safe_open", lambda *a, **k: _OpenedRecording(opened(*a, **k), log))
    rank, degree = 1, 3
    plan = tp.shard_plan(PARAMS, rank, degree)
    state = checkpoint.read_diffusers_shards(tmp_path / "transformer", PARAMS, plan, torch.float32, "cpu")
    expected = tp.shard_modules(whole, rank, degree, None).state_dict()
    assert state.keys() == expected.keys()
    for key, value in state.items():
        assert torch.equal(value, expected[key]), key
    split_sources = {d for ours, theirs in checkpoint._key_pairs(PARAMS) if ours in plan for d in theirs}
    assert log["whole"] and not set(log["whole"]) & split_sources  # no part of a split parameter is read whole
    assert log["sliced_bytes"] == sum(expected[k].numel() * 4 for k in plan)  # exactly this rank's slices


class _OpenedRecording:
    def __init__(self, ctx, log):
        self.ctx, self.log = ctx, log

    def __enter__(self):
        return _Recorder(self.ctx.__enter__(), self.log)

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc)


def _heads_refused(rank, world):
    ctx = ParallelContext(tensor_degree=world)
    odd = Flux(dataclasses.replace(PARAMS, num_heads=4, axes_dim=(8, 8, 8)))  # 4 heads on 3 tensor ranks
    with pytest.raises(ValueError) as error:
        FluxPipeline(**{**_parts(PARAMS), "transformer": odd}, parallel=ctx)
    assert ctx._mesh is None  # refused before building the mesh, the first collective
    messages = comm.all_gather_object(str(error.value), dist.group.WORLD)
    assert messages == [messages[0]] * world
    assert messages[0].startswith("num_heads 4 is not divisible by tensor_degree 3:") and messages[0].count(".") == 0


def test_heads_not_dividing_tensor_degree_are_refused_on_every_rank():
    run_distributed(_heads_refused, 3)


def test_torchrun_tensor_parallel_writes_the_same_image(tmp_path):
    """`torchrun --nproc_per_node 2 tools/generate.py --tensor-parallel-degree 2` == one process (BFL file: sliced),
    the text encoders sharded too (--text-encoder-placement auto; their files: sliced)."""
    common = ["--model", "tiny", "--height", "48", "--width", "64", "--steps", "2", "--prompt", "a red fox"]
    report = tmp_path / "report.json"
    one, two = one_and_two_ranks(tmp_path, common, ["--tensor_parallel_degree", "2", "--use-parallel-vae",
                                                    "--text-encoder-placement", "auto", "--report", str(report)])
    # the float images agree to ~1e-6; 8-bit rounding can move a value sitting on a .5 boundary by one
    assert abs(one - two).max() <= 1
    figures = json.loads(report.read_text())
    assert figures["tensor_degree"] == 2 and figures["comm_bytes_per_step"]["all_reduce"] > 0
    assert figures["text_encoder_placement"] == "sharded"  # auto: 2 ranks divide the tiny encoders' heads
    held = [r["parameter_bytes"] for r in figures["ranks"]]
    assert held[0] == held[1] < 0.7 * (ROOT / "flux_parallel/flux/assets/tiny/flux1-tiny.safetensors").stat().st_size
    text = [r["parameter_bytes_by_stage"]["text"] for r in figures["ranks"]]
    whole = sum((ASSETS / f / "model.safetensors").stat().st_size for f in ("text_encoder", "text_encoder_2"))
    assert text[0] == text[1] < 0.8 * whole  # the tiny encoders' embeddings (replicated): a quarter
    for rank in figures["ranks"]:  # each stage's own peak (this process's resident set on a CPU)
        assert {"before", "text", "denoise", "vae"} <= rank["peak_memory_bytes_by_stage"].keys()
        assert min(rank["peak_memory_bytes_by_stage"].values()) > 50 * 2**20  # an interpreter with torch


CACHE_CALL = dict(prompt=["a red fox"], negative_prompt="blurry", true_cfg_scale=2.5, height=48, width=32,
                  num_steps=8, max_sequence_length=7, output_type="pt")
CACHES = [CacheConfig("fbcache", 0.8), CacheConfig("teacache", 1.5)]


def _decisions(pipe) -> dict:
    return {b: {k: r[k] for k in ("computed", "reused")} for b, r in pipe.last_run["cache"]["branches"].items()}


def _cache_matches(rank, world, expected_file, records):
    pipe = FluxPipeline.tiny_random(seed=0, parallel=ParallelContext(tensor_degree=world))
    expected = load_file(expected_file)
    for i, cache in enumerate(CACHES):
        image = pipe(**CACHE_CALL, cache=cache)
        # every tensor rank sees bit-identical whole activations (all-reduced, all-gathered), so each takes
        # the single device's decisions without a reduction of its own
        assert comm.all_gather_object(_decisions(pipe), dist.group.WORLD) == [records[i]] * world
        if rank == 0:  # fp32, sums over heads in another order: rounding only
            torch.testing.assert_close(image, expected[str(i)], rtol=1e-5, atol=1e-5)


def test_step_caches_decide_identically_on_every_tensor_rank(tmp_path):
    one = FluxPipeline.tiny_random(seed=0)
    images, records = {}, []
    for i, cache in enumerate(CACHES):
        images[str(i)] = one(**CACHE_CALL, cache=cache).contiguous()
        records.append(_decisions(one))
        assert all(r["reused"] for r in records[-1].values()), cache  # the test sees steps skipped
    save_file(images, tmp_path / "expected.safetensors")
    run_distributed(_cache_matches, 2, str(tmp_path / "expected.safetensors"), records)


PIPE_CALL = dict(prompt=["a red fox"], height=48, width=32, num_steps=3, max_sequence_length=7, output_type="pt")
STALE = dict(num_pipeline_patch=2, warmup_steps=1)  # steps 2 and 3 run on stale K/V: PipeFusion's own arithmetic


def _pipefusion_matches(rank, world, expected, full_bytes):
    ctx = ParallelContext(tensor_degree=2, pipefusion_degree=2, **STALE)
    # the 6 latent rows of a 48 px image give the parallel VAE at most 6 ranks
    pipe = FluxPipeline.tiny_random(seed=0, parallel=ctx, parallel_vae=ctx.replica_size <= 6)
    image = pipe(**PIPE_CALL)
    if rank == 0:  # fp32; each block sees the patches it sees on one device, its head sums in another order
        torch.testing.assert_close(image, expected, rtol=1e-5, atol=1e-5)
    assert all(pipe.last_run["comm_bytes_per_step_by_axis"][a] > 0 for a in ("tensor", "pipefusion"))
    held = comm.all_gather_object(pipe.last_run["transformer_parameter_bytes"], dist.group.WORLD)
    assert sum(held) < 1.1 * full_bytes  # 4 ranks hold about one model: a stage each, split over 2 tensor ranks


def test_tensor_parallel_stages_of_pipefusion_equal_one_device_pipefusion():
    expected = FluxPipeline.tiny_random(seed=0, parallel=ParallelContext(**STALE))(**PIPE_CALL)
    one = FluxPipeline.tiny_random(seed=0)
    full_bytes = sum(p.numel() * p.element_size() for p in one.transformer.parameters())
    run_distributed(_pipefusion_matches, 4, expected, full_bytes)


def test_planner_says_which_tensor_layouts_fit_in_24gb(capsys):
    import plan

    from flux_parallel.planning import cost_model as cm
    from flux_parallel.planning import planner

    w = planner.make_workload("dev", 1024, "bf16")
    full = cm.param_count(Flux, w.flux) * 2
    assert 0.49 < cm.tensor_weight_bytes(w, 2) / full < 0.51  # FLUX.1: the embedders are under 1%
    assert plan.main(["--model", "dev", "--hardware", "a100-nvlink", "--gpus", "4", "--gpu-memory", "24GB"]) == 0
    out = capsys.readouterr().out
    rows = {r["tensor_degree"]: r for r in planner.tensor_rows(w, dataclasses.replace(
        planner.PRESETS["a100-nvlink"], memory_gib=24.0), 4)}
    # the whole transformer (22 GiB in bf16) and T5 leave no room on a 24 GB card; half of it does
    assert not rows[1]["fits"] and rows[2]["fits"] and not rows[2]["ulysses_fits"]
    assert "do not fit: one device, Ulysses 2, Ulysses 3, Ulysses 4" in out
    # sharded text encoders: T5-XXL + CLIP-L (9.5 GiB whole) split over the tensor ranks where 64 and 12
    # heads divide (2 and 4, not 3); the replicated embeddings (0.3 GiB) stay whole
    sharded = dataclasses.replace(w, text_placement="sharded")
    text_gib = {t: cm.weights(sharded, t)[1] / cm.GIB for t in (1, 2, 3, 4)}
    assert text_gib[3] == text_gib[1]
    assert 0.5 < text_gib[2] / text_gib[1] < 0.53 and 0.25 < text_gib[4] / text_gib[1] < 0.28
    shrunk = {r["tensor_degree"]: r for r in planner.tensor_rows(sharded, dataclasses.replace(
        planner.PRESETS["a100-nvlink"], memory_gib=24.0), 4)}
    assert shrunk[2]["peak_gib"] < rows[2]["peak_gib"] - 4 and shrunk[3]["peak_gib"] == rows[3]["peak_gib"]
    assert plan.main(["--model", "dev", "--gpus", "4", "--gpu-memory", "24GB", "--text-encoder-placement",
                      "sharded"]) == 0
    assert "text encoders sharded" in capsys.readouterr().out
    with pytest.raises(ValueError, match="is not a size like 24GB"):
        planner.parse_memory("lots")


def _placement_matches(rank, world, degrees, expected_file):
    expected = load_file(expected_file)
    pipe = FluxPipeline.tiny_random(seed=0, parallel=ParallelContext(**degrees), text_encoder_placement="rank0")
    assert (pipe.text.t5 is None and pipe.text.clip is None) == (rank != 0)  # only replica rank 0 holds them
    image = pipe(**CALL, negative_prompt="blurry", true_cfg_scale=3.0)
    if rank == 0:  # fp32: the broadcast embeddings are the encoded ones, bit for bit; the rest as above
        torch.testing.assert_close(image, expected["image"], rtol=1e-5, atol=1e-5)
    if degrees == dict(cfg_degree=2):  # in the same processes: a spawn costs seconds
        _sharded_text_matches(rank, ParallelContext(**degrees), expected)


def _sharded_text_matches(rank, ctx, expected):
    """text_encoder_placement "sharded": both cfg ranks encode both branches, each with half of every layer."""
    from flux_parallel.flux.text_parallel import load_text_shards

    pipe = FluxPipeline.tiny_random(seed=0, parallel=ctx, text_encoder_placement="sharded")
    image = pipe(**CALL, negative_prompt="blurry", true_cfg_scale=3.0)
    if rank == 0:  # fp32: the embeddings differ by rounding (partial sums, then the all-reduce), as the transformer's
        torch.testing.assert_close(image, expected["image"], rtol=1e-5, atol=1e-5)
    # the trained tiny encoders, each rank reading only its slices of the files
    clip, t5 = load_text_shards(ASSETS, ctx, torch.float32, "cpu")
    q = t5.encoder.block[1].layer[0].SelfAttention.q.weight  # [heads/2 x d_kv, d_model]: this rank's heads
    whole = load_file(ASSETS / "text_encoder_2" / "model.safetensors")["encoder.block.1.layer.0.SelfAttention.q.weight"]
    torch.testing.assert_close(q, whole.chunk(2)[rank], rtol=0, atol=0)
    fc2 = clip.encoder.layers[0].mlp.fc2.weight  # [hidden, intermediate/2]: this rank's MLP columns
    assert fc2.shape[1] * 2 == clip.params.intermediate_size
    tokenizers = TextConditioner.tokenizers_only(ASSETS)
    text = TextConditioner(tokenizers.clip_tokenizer, tokenizers.t5_tokenizer, clip, t5)
    txt, _, y = text(["a red fox", "blurry"], 7)
    assert_rel_close(txt, expected["txt"], "sharded T5")
    assert_rel_close(y, expected["y"], "sharded CLIP")


@pytest.mark.parametrize("degrees", [dict(tensor_degree=2), dict(cfg_degree=2)], ids=["tp2", "cfg2"])
def test_text_encoders_on_rank0_or_sharded_equal_one_process(degrees, tmp_path):
    """rank0, cfg 2: rank 0 encodes both branches (it runs only the negative one) and rank 1 receives the
    positive. sharded (cfg 2): T5 and CLIP split over the replica, loaded slice by slice."""
    image = FluxPipeline.tiny_random(seed=0)(**CALL, negative_prompt="blurry", true_cfg_scale=3.0)
    txt, _, y = FluxPipeline.tiny().text(["a red fox", "blurry"], 7)
    save_file({"image": image.contiguous(), "txt": txt, "y": y}, tmp_path / "expected.safetensors")
    run_distributed(_placement_matches, 2, degrees, str(tmp_path / "expected.safetensors"))


def test_text_placement_auto_and_sizes_that_do_not_divide():
    from types import SimpleNamespace

    from flux_parallel.flux.clip import CLIP_CONFIGS
    from flux_parallel.flux.t5 import T5_CONFIGS
    from flux_parallel.flux.text_parallel import check_text_degree, resolve_placement

    t5, clip = T5_CONFIGS["xxl"], CLIP_CONFIGS["l14"]
    auto = {size: resolve_placement("auto", SimpleNamespace(replica_size=size), t5, clip) for size in (1, 2, 4, 8)}
    assert auto == {1: "replicated", 2: "sharded", 4: "sharded", 8: "replicated"}  # CLIP's 12 heads on 8 ranks

    check_text_degree(T5_CONFIGS["xxl"], CLIP_CONFIGS["l14"], 4)  # 64 and 12 heads, 10240 and 3072 wide
    with pytest.raises(ValueError, match="CLIP num_attention_heads 12 is not divisible by 8: use 'rank0'"):
        check_text_degree(T5_CONFIGS["xxl"], CLIP_CONFIGS["l14"], 8)

"""The planner: hardware presets, workloads of the real models, calibration of this machine, and
the tables that rank parallel layouts by the latency cost_model.py predicts (tools/plan.py is its command).

`cpu-here` measures this machine (matmul, attention, convolution, memory and gloo bandwidth; ~10 s);
a hardware JSON holds the fields of `cost_model.Hardware`."""

import dataclasses
import datetime
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from flux_parallel.flux.clip import CLIP_CONFIGS, ClipParams, ClipTextModel
from flux_parallel.flux.configs import CONFIGS
from flux_parallel.flux.model import Flux
from flux_parallel.flux.sampling import flux_inputs
from flux_parallel.flux.t5 import T5_CONFIGS, T5Encoder, T5Params
from flux_parallel.flux.text_parallel import shard_clip, shard_t5
from flux_parallel.parallel import comm
from flux_parallel.parallel.launch import free_port
from flux_parallel.planning import cost_model as cm
from flux_parallel.vae.autoencoder import VAE_CONFIGS, AutoEncoder, SpatialAttention

# Achievable rates, not datasheet peaks. H100: measured on one H100 80GB HBM3 (torch 2.11, bf16) with
# our code: GEMMs of FLUX's shapes 720-770 TFLOP/s, SDPA head dim 128 600-690, the VAE's 512-wide
# head 120, a copy 3.0 TB/s, the decoder 0.089 s at 1024 px and a 57-block step 0.180 / 0.896 s
# at 1024 / 2048 px, 44 ms at 16 tokens (the host floor). A100 and L40: the same efficiencies
# applied to their datasheets, checked against xDiT's figures (FLUX.1-schnell 2048 px on one A100
# "about 10 s"; 4xL40 at 1024 px 1.41 s). Links: NCCL all-to-all and send/recv bandwidth per GPU.
PRESETS = {
    "h100-nvlink": cm.Hardware(
        name="h100-nvlink", device="cuda", matmul_flops=720e12, attention_flops=650e12,
        wide_attention_flops=120e12, vae_flops=122e12, memory_bw=3.0e12, memory_gib=79.2,
        links=(cm.Link(8, 350e9, 380e9, 15e-6), cm.Link(4096, 45e9, 45e9, 30e-6)),
        kernel_overhead_s=10e-6, host_op_s=10e-6, overlap=2.0, conv_workspace=2.0, reserved_gib=0.6,
    ),
    "a100-nvlink": cm.Hardware(
        name="a100-nvlink", device="cuda", matmul_flops=250e12, attention_flops=190e12,
        wide_attention_flops=45e12, vae_flops=50e12, memory_bw=1.8e12, memory_gib=79.2,
        links=(cm.Link(8, 230e9, 240e9, 15e-6), cm.Link(4096, 22e9, 22e9, 30e-6)),
        kernel_overhead_s=12e-6, host_op_s=10e-6, overlap=2.0, conv_workspace=2.0, reserved_gib=0.6,
    ),
    # PCIe Gen4 x16 without NVLink, two sockets of four GPUs: inside a socket P2P runs at ~20 GB/s
    # and an all-to-all (all pairs at once through the root complex) at about half; across the
    # socket link (QPI/UPI, staged through host memory) each GPU gets a few GB/s.
    "l40-pcie": cm.Hardware(
        name="l40-pcie", device="cuda", matmul_flops=120e12, attention_flops=100e12,
        wide_attention_flops=25e12, vae_flops=24e12, memory_bw=0.78e12, memory_gib=44.5,
        links=(cm.Link(4, 10e9, 20e9, 15e-6), cm.Link(8, 2.5e9, 2.5e9, 40e-6), cm.Link(4096, 2.5e9, 2.5e9, 40e-6)),
        kernel_overhead_s=12e-6, host_op_s=10e-6, overlap=2.0, conv_workspace=2.0, reserved_gib=0.6,
    ),
}

# Presets of our configs; the text encoders' parameters are counted from their configs (T5-XXL's
# encoder is 4.76e9, CLIP-L's text model 1.23e8); text length 256 (schnell) / 512 (dev).
_REAL = dict(vae="flux", t5="xxl", clip="l14", encoder_ops=840)
MODELS = {
    "schnell": dict(flux="schnell", txt_len=256, steps=4, **_REAL),
    "dev": dict(flux="dev", txt_len=512, steps=28, **_REAL),
    "tiny": dict(flux="tiny", vae="tiny", t5="tiny", clip="tiny", txt_len=256, steps=4, encoder_ops=130),
}


def detect_vae_attention(attention_module=None) -> str:
    """'math' if the VAE's mid-block attention (vae/autoencoder.py's SpatialAttention unless given)
    hands SDPA inputs it can only run with the kernel that materialises the [tokens x tokens] scores
    (non-contiguous q/k/v do that), else 'fused'. Asks SDPA's own kernel choice on the CPU, whose
    layout rule CUDA's shares."""

    if attention_module is None:

        attention_module = SpatialAttention()
    choices, sdpa = [], F.scaled_dot_product_attention

    def recording(q, k, v, *args, **kwargs):
        choices.append(torch.ops.aten._fused_sdp_choice(q, k, v))
        return sdpa(q, k, v, *args, **kwargs)

    F.scaled_dot_product_attention = recording  # restored below: only this call is observed
    try:
        x = torch.randn(1, 8, 4, 4)
        attention_module(x, x, x)
    finally:
        F.scaled_dot_product_attention = sdpa
    return "math" if int(SDPBackend.MATH) in choices else "fused"


def make_workload(model: str, resolution: int, dtype: str, steps: int | None = None, vae_dtype: str | None = None,
                  vae_attention: str = "auto", release_encoders: bool = False,
                  text_placement: str = "replicated") -> cm.Workload:
    """The workload of `model` (schnell, dev, tiny) at resolution x resolution px. vae_dtype
    defaults to dtype; vae_attention 'auto' probes the code (detect_vae_attention)."""

    if model not in MODELS:
        raise ValueError(f"--model {model!r} is not one of {sorted(MODELS)}")
    if steps is not None and steps < 1:
        raise ValueError(f"--steps must be at least 1, got {steps}")
    spec = dict(MODELS[model])
    t5, clip = T5_CONFIGS[spec.pop("t5")], CLIP_CONFIGS[spec.pop("clip")]
    spec.update(flux=CONFIGS[spec["flux"]], vae=VAE_CONFIGS[spec["vae"]], steps=steps or spec["steps"],
                t5_params=cm.param_count(T5Encoder, t5), clip_params=cm.param_count(ClipTextModel, clip),
                text_replicated_params=text_replicated_params(t5, clip),
                text_split_gcd=math.gcd(t5.num_heads, t5.d_ff, clip.num_attention_heads, clip.intermediate_size))
    if vae_attention == "auto":
        vae_attention = detect_vae_attention()
    return cm.Workload(height=resolution, width=resolution, dtype=dtype, vae_dtype=vae_dtype or dtype,
                       vae_attention=vae_attention, release_encoders=release_encoders,
                       text_placement=text_placement, **spec)


def text_replicated_params(t5: T5Params, clip: ClipParams) -> int:
    """The parameters text_encoder_placement "sharded" keeps whole on every rank (embeddings, norms),
    counted from flux/text_parallel.py's own split of meta-device encoders over 2 ranks."""
    with torch.device("meta"):
        halves = [shard_t5(T5Encoder(t5), 0, 2, None), shard_clip(ClipTextModel(clip), 0, 2, None)]
    half = sum(p.numel() for m in halves for p in m.parameters())
    return 2 * half - cm.param_count(T5Encoder, t5) - cm.param_count(ClipTextModel, clip)


def hardware_from_json(path: str) -> cm.Hardware:
    try:
        fields = json.loads(Path(path).read_text())
        fields["links"] = tuple(cm.Link(**link) for link in fields["links"])
        return cm.Hardware(**fields)
    except (OSError, json.JSONDecodeError, TypeError, KeyError) as e:
        raise ValueError(f"--hardware-json {path}: not a hardware description ({e})") from None


def _rate(fn, work: float, seconds: float) -> float:
    """work per second of fn, best of the repeats that fit in `seconds` (after one warm-up)."""
    fn()
    best, spent = float("inf"), 0.0
    while spent < seconds or best == float("inf"):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
    return work / best


def _time_calls(fn, reps: int) -> float:
    """Fastest of `reps` calls after one warm-up; a fixed count, so ranks stay in step."""
    fn()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _gloo_probe(rank: int, port: int, out: str, reps: int) -> None:
    """All-to-all and ring send/recv between 2 processes, through parallel/comm.py as the code sends."""


    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))

    def a2a(x):
        return lambda: comm.all_to_all(x, None, scatter_dim=0, gather_dim=1)

    def hop(x):
        def run():
            p2p = comm.P2P(dist.group.WORLD)
            p2p.recv(x.shape, x.dtype, x.device, src=1 - rank)
            p2p.send(x, dst=1 - rank)
            p2p.commit()
            p2p.wait()
        return run

    small, big = torch.zeros(2, 16), torch.zeros(2, 2**19)  # 128 B, 4 MiB
    result = {}
    for name, make in (("a2a", a2a), ("p2p", hop)):
        latency = _time_calls(make(small), 4 * reps)
        sent = big.numel() * 4 / (2 if name == "a2a" else 1)  # an all-to-all keeps half of it
        result[name] = (latency, sent / max(_time_calls(make(big), reps) - latency, 1e-9))
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def probe_links(reps: int = 5) -> cm.Link:
    """One tier for all local processes, measured between 2 gloo ranks."""

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "links.json")
        # fork: the children need no fresh interpreter and torch import (seconds on a busy
        # machine); calibrate_cpu calls this before any torch op has started a thread pool
        mp.start_processes(_gloo_probe, args=(free_port(), out, reps), nprocs=2, join=True, start_method="fork")
        (a2a_lat, a2a_bw), (p2p_lat, p2p_bw) = json.loads(Path(out).read_text()).values()
    return cm.Link(size=4096, alltoall_bw=a2a_bw, p2p_bw=p2p_bw, latency_s=(a2a_lat + p2p_lat) / 2)


def calibrate_cpu(w: cm.Workload, seconds: float = 3.0) -> cm.Hardware:
    """Measure this machine for workload w with one thread per rank, as the CPU benchmark runs
    (fp32): gloo links, then the rates of w's own shapes (GEMMs of its width, attention of its
    head size, its VAE decoder), which at tiny widths are far below the large-shape rates."""

    link = probe_links()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            rates = _compute_rates(w, seconds / 6)
    finally:
        torch.set_num_threads(threads)
    return cm.Hardware(
        name="cpu-here", device="cpu", **rates, links=(link,), overlap=1.0, conv_workspace=1.0,
        memory_gib=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / cm.GIB, reserved_gib=0.3,
        dtype="fp32", shared_memory=True, cores=os.cpu_count() or 1,
    )


def _compute_rates(w: cm.Workload, share: float) -> dict:

    f = w.flux
    rows = 512 if f.hidden_size <= 1024 else 64  # a fraction of a second at any width
    a, b = torch.randn(rows, f.hidden_size), torch.randn(f.hidden_size, f.mlp_hidden_dim)
    q, wide = torch.randn(1, f.num_heads, 512, f.head_dim), torch.randn(1, 1, 512, w.vae.widths[-1])
    src, dst = torch.randn(2**23), torch.empty(2**23)
    host_op_s = _host_op_seconds(share)
    return dict(
        matmul_flops=_rate(lambda: a @ b, 2 * rows * f.hidden_size * f.mlp_hidden_dim, share),
        attention_flops=_rate(lambda: F.scaled_dot_product_attention(q, q, q), 4 * 512**2 * f.hidden_size, share),
        wide_attention_flops=_rate(
            lambda: F.scaled_dot_product_attention(wide, wide, wide), 4 * 512**2 * wide.shape[-1], share
        ),
        vae_flops=_vae_rate(w, host_op_s, share),
        memory_bw=_rate(lambda: dst.copy_(src), 2 * 4 * src.numel(), share),
        kernel_overhead_s=0.0,  # a CPU op's fixed cost is all host time
        host_op_s=host_op_s,
    )


def _host_op_seconds(share: float) -> float:
    """The tiny transformer at 24 tokens does almost no arithmetic: its time is per-op overhead."""

    p = CONFIGS["tiny"]
    model, inputs = Flux(p).eval(), flux_inputs(p, grid=(4, 4), txt_tokens=8)
    return 1 / _rate(lambda: model(**inputs), cm.transformer_host_ops(p), share)


def _vae_rate(w: cm.Workload, host_op_s: float, share: float) -> float:
    """Effective decoder FLOP rate: our decoder on a small latent, its host ops taken out."""

    side = 16 if w.vae.ch <= 32 else 4  # ~1-10 GFLOP
    small = dataclasses.replace(w, height=side * w.vae.downsample, width=side * w.vae.downsample, vae_dtype="fp32")
    walk = cm.DecoderWalk(small, 1.0, parts=1)
    vae, z = AutoEncoder(w.vae).eval(), torch.randn(1, w.vae.z_channels, side, side)
    seconds = walk.flops / _rate(lambda: vae.decode(z), walk.flops, share)
    return walk.flops / max(seconds - walk.ops * host_op_s, 0.2 * seconds)


def load_hardware(name: str | None, json_path: str | None, model: str, calibrate_s: float = 3.0) -> cm.Hardware:
    """A preset, a JSON description, or cpu-here calibrated for `model`'s shapes."""
    if json_path:
        return hardware_from_json(json_path)
    if name == "cpu-here":
        return calibrate_cpu(make_workload(model, 256, "fp32", vae_attention="fused"), calibrate_s)
    if name not in PRESETS:
        raise ValueError(f"--hardware {name!r} is not one of {sorted(PRESETS) + ['cpu-here']}")
    return PRESETS[name]


COLUMNS = [("ulysses", "ulysses_degree", "d"), ("ring", "ring_degree", "d"), ("gpus", "world_size", "d"),
           ("par.VAE", "use_parallel_vae", ""), ("latency s", "latency_s", ".3f"), ("step s", "step_s", ".4f"),
           ("comm/step s", "step_comm_s", ".4f"), ("VAE s", "vae_s", ".3f"), ("peak GiB", "peak_memory_gib", ".1f"),
           ("fits", "fits", ""), ("peak in", "peak_phase", "")]


def format_table(rows: list[dict], columns=COLUMNS) -> str:
    """A markdown table, one row per configuration in the given order."""
    head = "| # | " + " | ".join(name for name, _, _ in columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 1)]
    for i, row in enumerate(rows, 1):
        cells = [
            format(row[key], spec)
            if spec
            else ("yes" if row[key] is True else "no" if row[key] is False else str(row[key]))
            for _, key, spec in columns
        ]
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


PIPEFUSION_COLUMNS = [("stages", "stages", "d"), ("split", "split", ""), ("blocks per stage", "sizes", ""),
                      ("transformer GiB/device", "gib", ".2f"), ("denoise s", "denoise_s", ".3f"),
                      ("Ulysses denoise s", "ulysses_s", ".3f"), ("fits", "fits", ""),
                      ("Ulysses fits", "ulysses_fits", "")]


def pipefusion_rows(w: cm.Workload, hw: cm.Hardware, gpus: int) -> list[dict]:
    """PipeFusion (M = N, W = 1) on every stage count up to `gpus` that Ulysses can match: the default
    weight-balanced split, then the compute-balanced one (pass its sizes as --pipefusion-stage-sizes)."""
    rows = []
    for n in range(2, min(gpus, w.flux.depth + w.flux.depth_single_blocks) + 1):
        if w.flux.num_heads % n:
            continue
        verdict = cm.pipefusion_or_ulysses(w, hw, n)
        for split, key in (("weights", "pipefusion"), ("compute", "compute_balanced")):
            pipe = verdict[key]
            rows.append({"stages": n, "split": split, "sizes": " ".join(map(str, pipe["stage_sizes"])),
                         "gib": pipe["transformer_bytes_per_device"] / cm.GIB, "denoise_s": pipe["denoise_s"],
                         "ulysses_s": verdict["ulysses"]["denoise_s"], "fits": pipe["fits"],
                         "ulysses_fits": verdict["ulysses"]["fits"]})
    return rows


TENSOR_COLUMNS = [("tensor degree", "tensor_degree", "d"), ("transformer GiB/device", "gib", ".2f"),
                  ("denoise peak GiB", "peak_gib", ".2f"), ("denoise s", "denoise_s", ".3f"),
                  ("Ulysses denoise s", "ulysses_s", ".3f"), ("fits", "fits", ""), ("Ulysses fits", "ulysses_fits", "")]


def tensor_rows(w: cm.Workload, hw: cm.Hardware, gpus: int) -> list[dict]:
    """Tensor parallelism on every degree up to `gpus` that divides the heads, beside Ulysses over as many ranks
    (which holds the whole transformer on every rank)."""
    rows = []
    for t in (t for t in range(1, min(gpus, w.flux.num_heads) + 1) if w.flux.num_heads % t == 0):
        tensor, ulysses = cm.predict_tensor(w, hw, t), cm.predict(w, hw, cm.Config(t, 1, False))
        rows.append({"tensor_degree": t, "gib": tensor["transformer_bytes_per_device"] / cm.GIB,
                     "peak_gib": tensor["denoise_peak_gib"], "denoise_s": tensor["denoise_s"],
                     "ulysses_s": w.steps * ulysses["step_s"], "fits": tensor["fits"],
                     "ulysses_fits": ulysses["fits"]})
    return rows


def parse_memory(text: str) -> float:
    """'24GB', '24GiB', '80G' or '24' -> GiB (a '24GB' card's memory is read as 24 GiB)."""
    number = text.strip().upper().removesuffix("B").removesuffix("I").removesuffix("G")
    try:
        gib = float(number)
    except ValueError:
        raise ValueError(f"--gpu-memory {text!r} is not a size like 24GB") from None
    if gib <= 0:
        raise ValueError(f"--gpu-memory must be positive, got {text!r}")
    return gib


def bench_records(path: str) -> list[dict]:
    """The measurement records of a tools/benchmark.py JSON: a list, or a dict holding one."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--validate {path}: cannot read a benchmark JSON ({e})") from None
    if isinstance(data, dict):
        data = next(
            (data[k] for k in ("records", "measurements", "results", "runs") if isinstance(data.get(k), list)), None
        )
    needed = {"ulysses_degree", "ring_degree", "use_parallel_vae", "resolution", "latency_s"}
    if not isinstance(data, list) or not all(isinstance(r, dict) and needed <= r.keys() for r in data):
        raise ValueError(f"--validate {path}: expected a list of records with {sorted(needed)}")
    return data


def validate(records: list[dict], model: str, hw: cm.Hardware, steps: int | None = None, dtype: str | None = None,
             **options) -> list[dict]:
    """The prediction beside each measured record (error = predicted / measured - 1). A record's
    own "model" and "steps" win over the arguments; options are make_workload's."""
    if options.get("vae_attention", "auto") == "auto":
        options["vae_attention"] = detect_vae_attention()
    rows = []
    for rec in records:
        name = rec.get("model") if rec.get("model") in MODELS else model
        w = make_workload(name, int(rec["resolution"]), dtype or hw.dtype, rec.get("steps", steps), **options)
        cfg = cm.Config(int(rec["ulysses_degree"]), int(rec["ring_degree"]), bool(rec["use_parallel_vae"]))
        predicted = cm.predict(w, hw, cfg)["latency_s"]
        rows.append(
            {
                "resolution": rec["resolution"],
                "ulysses_degree": cfg.ulysses_degree,
                "ring_degree": cfg.ring_degree,
                "use_parallel_vae": cfg.use_parallel_vae,
                "measured_s": float(rec["latency_s"]),
                "predicted_s": predicted,
                "error": predicted / float(rec["latency_s"]) - 1,
            }
        )
    return rows


VALIDATE_COLUMNS = [("px", "resolution", "d"), ("ulysses", "ulysses_degree", "d"), ("ring", "ring_degree", "d"),
                    ("par.VAE", "use_parallel_vae", ""), ("measured s", "measured_s", ".3f"),
                    ("predicted s", "predicted_s", ".3f"), ("error", "error", "+.0%")]


def describe(model: str, w: cm.Workload, hw: cm.Hardware, gpus: int) -> str:
    """The assumptions behind a table, in one line."""
    encoders = "released after encoding" if w.release_encoders else "kept on the device"
    return (f"{model}, {w.steps} steps, {w.height}x{w.width} px, up to {gpus} x {hw.name}: transformer {w.dtype}, "
            f"VAE {w.vae_dtype} with {w.vae_attention} mid-block attention, text encoders {w.text_placement}, "
            f"{encoders}")

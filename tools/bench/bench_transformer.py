"""Forward latency of our FLUX transformer, eager and compiled, against diffusers' FluxTransformer2DModel.

    python tools/bench/bench_transformer.py [--repeats 7] [--img-tokens 1024] [--txt-tokens 128] [--threads N]
                                      [--columns eager compiled ...] [--no-compile]
                                      [--device cuda --dtype bfloat16] [--config schnell --depth 2 --single 4]
    # on one GPU: FLUX.1-schnell size, bf16, 1024 and 2048 px (4096 and 16384 image tokens), MFU vs the peak
    python tools/bench/bench_transformer.py --device cuda --dtype bfloat16 --config schnell --img-tokens 4096 \\
        --txt-tokens 512 --peak-tflops 989 --repeats 10

One process, fp32 on the CPU by default, a medium config (hidden 768, 12 heads of 64, 4 double + 8 single
blocks). The same random weights in every column; within each repeat every column runs once, in turn
(alternated), each call timed on its own; the median is reported. Columns (those that cannot run on this
device or dtype are listed as "not measured" with the reason):
    eager                ours, kernels' default attention
    compiled             ours, flux.compile.compile_blocks (regional, dynamic shapes), default attention
    compiled+<backend>   compiled, every other attention backend available here (kernels.available_backends)
    compiled+fp8         compiled, flux.quantize.quantize_fp8 (GPUs with FP8 tensor cores only)
    diffusers            FluxTransformer2DModel, eager
    diffusers-compiled   FluxTransformer2DModel.compile_repeated_blocks (its regional compilation)
Compile time is the first call's extra time over a warm call. Errors are relative to ours eager.
CPU ms is the process's CPU time per call (time.process_time): on a shared machine it counts the work
done, not the wait for a core; with --threads 1 it is the cleanest figure (OpenMP threads spin).
"""

import argparse
import copy
import dataclasses
import statistics
import time

import torch

from flux_parallel.flux.checkpoint import bfl_to_diffusers
from flux_parallel.flux.compile import compile_blocks, set_attention_backend
from flux_parallel.flux.configs import CONFIGS
from flux_parallel.flux.model import Flux
from flux_parallel.flux.quantize import fp8_supported, quantize_fp8
from flux_parallel.flux.sampling import flux_inputs
from flux_parallel.kernels import BACKENDS, available_backends, default_backend
from flux_parallel.weights import seeded_init

MEDIUM = dataclasses.replace(
    CONFIGS["schnell"], hidden_size=768, num_heads=12, depth=4, depth_single_blocks=8, axes_dim=(8, 28, 28)
)


def make_models(params):
    from diffusers import FluxTransformer2DModel

    # norm scales 1 and N(0, 1/fan_in) weights: attention is far from uniform, so the error columns
    # would show a wrong key order or RoPE row (tiny N(0, 0.02) norm scales made every softmax flat)
    ours = seeded_init(Flux(params), 0).eval()
    ref = FluxTransformer2DModel(
        in_channels=params.in_channels, num_layers=params.depth, num_single_layers=params.depth_single_blocks,
        attention_head_dim=params.head_dim, num_attention_heads=params.num_heads,
        joint_attention_dim=params.context_in_dim, pooled_projection_dim=params.vec_in_dim,
        guidance_embeds=params.guidance_embed, axes_dims_rope=params.axes_dim,
    ).eval()
    ref.load_state_dict(bfl_to_diffusers(ours.state_dict(), params))
    return ours, ref


def make_inputs(params, img_tokens, txt_tokens):
    """One image of about img_tokens tokens: a side x (img_tokens // side) grid, side its square root."""
    side = int(img_tokens**0.5)
    inputs = flux_inputs(params, (side, img_tokens // side), txt_tokens)
    return {k: v for k, v in inputs.items() if v is not None}  # no guidance entry for a schnell-like config


def forward_flops(params, img_tokens: int, txt_tokens: int) -> float:
    """Multiply-adds x 2 of one forward: the blocks' linears (2 x tokens x weights) and attention
    (q k^T and p v: 4 x L^2 x hidden per block); embedders and final layer are negligible."""
    h, m, length = params.hidden_size, params.mlp_hidden_dim, img_tokens + txt_tokens
    double_weights = 2 * (3 * h * h + h * h + 2 * h * m)  # per stream: qkv, proj, mlp in and out
    single_weights = h * (3 * h + m) + (h + m) * h
    linear = 2 * length * (params.depth * double_weights / 2 + params.depth_single_blocks * single_weights)
    attention = 4 * length**2 * h * (params.depth + params.depth_single_blocks)
    return linear + attention


def build_columns(ours, ref, names, device, dtype) -> tuple[dict, dict]:
    """name -> model to call, and name -> why it was not measured."""
    skipped, columns = {}, {}
    for name in names:
        if name == "eager":
            columns[name] = ours
        elif name == "compiled":
            columns[name] = compile_blocks(copy.deepcopy(ours))
        elif name == "compiled+fp8":
            if fp8_supported(device):
                columns[name] = compile_blocks(quantize_fp8(copy.deepcopy(ours)))
            else:
                skipped[name] = f"no FP8 tensor cores on {device}"
        elif name.startswith("compiled+"):
            backend = name.removeprefix("compiled+")
            if backend in available_backends(device, dtype):
                columns[name] = compile_blocks(set_attention_backend(copy.deepcopy(ours), backend))
            else:
                skipped[name] = f"attention backend {backend} not available on {device} for {dtype}"
        elif name == "diffusers":
            columns[name] = ref
        elif name == "diffusers-compiled":
            compiled_ref = copy.deepcopy(ref)
            compiled_ref.compile_repeated_blocks(dynamic=True)
            columns[name] = compiled_ref
    return columns, skipped


def default_columns(device, dtype) -> list[str]:
    # `compiled` runs the default, `auto`: PyTorch's SDPA (with default_backend's kernel) or flash3
    auto = "flash3" if default_backend(device, dtype) == "flash3" else "sdpa"
    others = [b for b in available_backends(device, dtype) if b != auto]
    return ["eager", "compiled", *[f"compiled+{b}" for b in others], "compiled+fp8", "diffusers",
            "diffusers-compiled"]


def call(model, x):
    if isinstance(model, Flux):
        return model(**x)
    return model(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                 timestep=x["timesteps"], img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0]).sample


def measure(columns: dict, x: dict, repeats: int, sync) -> tuple[dict, dict, dict, dict, dict]:
    """-> name -> median wall seconds, name -> median CPU seconds of this process, name -> first-call wall
    seconds, name -> output, name -> every repeat's wall seconds; every repeat runs each column once, in turn."""
    first, outputs = {}, {}
    wall, cpu = {name: [] for name in columns}, {name: [] for name in columns}
    with torch.inference_mode():
        for name, model in columns.items():  # the first call compiles
            sync()
            start = time.perf_counter()
            outputs[name] = call(model, x).float()
            sync()
            first[name] = time.perf_counter() - start
        for _ in range(repeats):
            for name, model in columns.items():
                sync()
                start, start_cpu = time.perf_counter(), time.process_time()
                call(model, x)
                sync()
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    median = statistics.median
    return {k: median(v) for k, v in wall.items()}, {k: median(v) for k, v in cpu.items()}, first, outputs, wall


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--img-tokens", type=int, default=1024)
    parser.add_argument("--txt-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--config", default="medium", help="'medium', or a preset (schnell, dev) at full width")
    parser.add_argument("--depth", type=int, default=None, help="double blocks (default: the config's)")
    parser.add_argument("--single", type=int, default=None, help="single blocks (default: the config's)")
    parser.add_argument("--columns", nargs="+", default=None, help="default: every column (see above)")
    parser.add_argument("--no-compile", action="store_true", help="only the eager columns (the old two-column run)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak: adds an MFU column")
    args = parser.parse_args()
    if args.config != "medium" and args.config not in CONFIGS:
        parser.error(f"--config {args.config!r} is neither 'medium' nor one of {sorted(CONFIGS)}")
    for flag in ("repeats", "img_tokens", "txt_tokens", "depth", "single", "peak_tflops"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            parser.error(f"--{flag.replace('_', '-')} must be positive, got {value}")
    known = ("eager", "compiled", "compiled+fp8", "diffusers", "diffusers-compiled")
    bad = [c for c in args.columns or [] if c not in known and c.removeprefix("compiled+") not in BACKENDS]
    if bad:
        parser.error(f"--columns {' '.join(bad)}: unknown; choose from {', '.join(known)} or compiled+<backend>")
    return args


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    params = MEDIUM if args.config == "medium" else CONFIGS[args.config]
    depth = args.depth if args.depth is not None else params.depth
    single = args.single if args.single is not None else params.depth_single_blocks
    params = dataclasses.replace(params, depth=depth, depth_single_blocks=single)
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    ours, ref = (m.to(device, dtype) for m in make_models(params))
    x = {k: v.to(device, dtype if k in ("img", "txt", "y") else torch.float32)
         for k, v in make_inputs(params, args.img_tokens, args.txt_tokens).items()}
    names = args.columns or (["eager", "diffusers"] if args.no_compile else default_columns(device, dtype))
    columns, skipped = build_columns(ours, ref, names, device, dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    med, med_cpu, first, outputs, walls = measure(columns, x, args.repeats, sync)

    print(f"{args.config} config ({params.depth}+{params.depth_single_blocks} blocks), {x['img'].shape[1]} image + "
          f"{args.txt_tokens} text tokens, {args.dtype} on {device}, {args.threads} threads, {args.repeats} "
          f"alternated repeats, torch {torch.__version__}, default attention {default_backend(device, dtype)}")
    base, base_cpu = med.get("eager"), med_cpu.get("eager")
    flops = forward_flops(params, x["img"].shape[1], args.txt_tokens)
    print(f"{'column':22} {'median ms':>10} {'vs eager':>9} {'CPU ms':>9} {'vs eager':>9} {'compile s':>10} "
          f"{'rel err':>8}"
          + (f" {'MFU':>6}" if args.peak_tflops else ""))
    for name in names:
        if name in skipped:
            print(f"{name:22} not measured: {skipped[name]}")
            continue
        ref_out = outputs.get("eager", outputs[name])
        err = ((outputs[name] - ref_out).norm() / ref_out.norm()).item()
        speedup = f"{base / med[name]:8.2f}x" if base else "        -"
        speedup_cpu = f"{base_cpu / med_cpu[name]:8.2f}x" if base_cpu else "        -"
        mfu = f" {flops / med[name] / (args.peak_tflops * 1e12):6.1%}" if args.peak_tflops else ""
        print(f"{name:22} {med[name] * 1e3:10.1f} {speedup} {med_cpu[name] * 1e3:9.1f} {speedup_cpu} "
              f"{max(first[name] - med[name], 0):10.1f} {err:8.1e}{mfu}")
    if "eager" in walls and "diffusers" in walls:  # within a repeat both ran back to back: the steadier figure
        ratios = sorted(a / b for a, b in zip(walls["eager"], walls["diffusers"]))
        print(f"eager / diffusers, per repeat: median {statistics.median(ratios):.3f}, "
              f"range {ratios[0]:.3f}-{ratios[-1]:.3f} over {len(ratios)} repeats")



if __name__ == "__main__":
    main()

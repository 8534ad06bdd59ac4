"""Which parallel configuration to run FLUX.1 with, predicted before spending device hours.

    python tools/plan.py --model schnell --hardware a100-nvlink --gpus 8 --resolution 1024 [--steps 4] [--json]
    python tools/plan.py --model tiny --hardware cpu-here --gpus 2 --resolution 256 --validate bench.json

    python tools/plan.py --model dev --hardware a100-nvlink --gpus 4 --gpu-memory 24GB   # which layouts fit

Ranks every (ulysses, ring) factorisation of every world size up to --gpus, with and without the
parallel VAE, by the latency flux_parallel/planning/cost_model.py predicts; configurations that do not fit in a
device's memory come last. Tables of PipeFusion and tensor parallelism (each beside Ulysses over
as many devices, with the layouts that do not fit) follow. `--json` prints the list (best first)
instead of a table. `cpu-here` measures this machine first (matmul, attention, convolution,
memory and gloo bandwidth; ~10 s); `--hardware-json FILE` reads a description with the fields of `cost_model.Hardware`.
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from flux_parallel.planning import cost_model as cm
from flux_parallel.planning.planner import (
    MODELS,
    PIPEFUSION_COLUMNS,
    PRESETS,
    TENSOR_COLUMNS,
    VALIDATE_COLUMNS,
    bench_records,
    describe,
    format_table,
    load_hardware,
    make_workload,
    parse_memory,
    pipefusion_rows,
    tensor_rows,
    validate,
)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="schnell", help=f"one of {sorted(MODELS)}")
    p.add_argument("--hardware", default="a100-nvlink", help=f"one of {sorted(PRESETS) + ['cpu-here']}")
    p.add_argument("--hardware-json", help="a JSON file with the fields of cost_model.Hardware (overrides --hardware)")
    p.add_argument("--gpus", type=int, default=8, help="devices available: every world size up to this is planned")
    p.add_argument("--resolution", type=int, default=1024, help="image side in pixels (square images)")
    p.add_argument("--steps", type=int, help="denoising steps (default: 4 for schnell and tiny, 28 for dev)")
    p.add_argument(
        "--dtype", choices=sorted(cm.DTYPE_BYTES), help="transformer and text encoders (default: the hardware's)"
    )
    p.add_argument("--vae-dtype", choices=sorted(cm.DTYPE_BYTES), help="VAE decoder (default: --dtype)")
    p.add_argument("--vae-attention", choices=["auto", "fused", "math"], default="auto",
                   help="the mid block's attention kernel; auto probes flux_parallel/vae/autoencoder.py")
    p.add_argument("--release-encoders", action="store_true", help="T5 and CLIP leave the device after encoding")
    p.add_argument("--text-encoder-placement", choices=["auto", "replicated", "rank0", "sharded"], default="auto",
                   help="generate.py's: T5 and CLIP whole on every rank, whole on rank 0 (the busiest device still "
                        "holds them), or split over the ranks where their heads and widths divide (sharded, and "
                        "auto, the default: whole where they do not)")
    p.add_argument("--gpu-memory", help="one device's memory, e.g. 24GB (overrides the hardware's)")
    p.add_argument("--json", action="store_true", help="print the ranked configurations as JSON")
    p.add_argument("--validate", metavar="BENCH_JSON", help="compare predictions with a tools/benchmark.py JSON")
    p.add_argument(
        "--calibrate-seconds", type=float, default=3.0, help="time for cpu-here's compute probes (gloo adds ~5-10 s)"
    )
    p.add_argument(
        "--save-hardware", metavar="FILE", help="write the hardware description (e.g. cpu-here's) for --hardware-json"
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    options = dict(vae_dtype=args.vae_dtype, vae_attention=args.vae_attention, release_encoders=args.release_encoders,
                   text_placement="sharded" if args.text_encoder_placement == "auto" else args.text_encoder_placement)
    try:
        # the workload's own checks first: cpu-here's calibration takes seconds
        make_workload(args.model, args.resolution, args.dtype or "bf16", args.steps, **options)
        if args.save_hardware and not Path(args.save_hardware).resolve().parent.is_dir():
            raise ValueError(
                f"--save-hardware {args.save_hardware}: the folder "
                f"{Path(args.save_hardware).resolve().parent} does not exist"
            )
        memory = parse_memory(args.gpu_memory) if args.gpu_memory else None
        hw = load_hardware(args.hardware, args.hardware_json, args.model, args.calibrate_seconds)
        hw = dataclasses.replace(hw, memory_gib=memory) if memory else hw
        if args.save_hardware:
            Path(args.save_hardware).write_text(json.dumps(dataclasses.asdict(hw), indent=1))
        if args.validate:
            rows = validate(bench_records(args.validate), args.model, hw, args.steps, args.dtype, **options)
            print(json.dumps(rows, indent=1) if args.json else format_table(rows, VALIDATE_COLUMNS))
            if rows and not args.json:
                print(
                    f"mean |error| {sum(abs(r['error']) for r in rows) / len(rows):.0%} over {len(rows)} configurations"
                )
            return 0
        w = make_workload(args.model, args.resolution, args.dtype or hw.dtype, args.steps, **options)
        rows = cm.plan(w, hw, args.gpus)
    except ValueError as e:
        print(f"plan.py: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(describe(args.model, w, hw, args.gpus))
        print(format_table(rows))
        pipefusion = pipefusion_rows(w, hw, args.gpus)
        if pipefusion:
            print("\nPipeFusion (M = N patches, 1 warm-up step) against Ulysses over the same devices; the weight-"
                  "balanced split is the default, the compute-balanced one runs with --pipefusion-stage-sizes:")
            print(format_table(pipefusion, PIPEFUSION_COLUMNS))
        print_tensor_rows(tensor_rows(w, hw, args.gpus), hw)
    return 0


def print_tensor_rows(rows: list[dict], hw) -> None:
    """Tensor parallelism beside Ulysses over as many ranks, and the layouts that do not fit."""
    print(f"\nTensor parallelism (--tensor-parallel-degree T, one all-reduce per attention and per MLP) against "
          f"Ulysses over the same devices, {hw.memory_gib:g} GiB per device:")
    print(format_table(rows, TENSOR_COLUMNS))
    tight = [f"tensor {r['tensor_degree']}" if r["tensor_degree"] > 1 else "one device" for r in rows if not r["fits"]]
    tight += [f"Ulysses {r['tensor_degree']}" for r in rows if not r["ulysses_fits"] and r["tensor_degree"] > 1]
    print("do not fit: " + (", ".join(tight) if tight else "none"))


if __name__ == "__main__":
    sys.exit(main())

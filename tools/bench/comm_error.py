"""--comm-dtype's error and byte saving: what bf16 and fp8 exchanges cost in accuracy, on 2 gloo ranks.

    python tools/bench/comm_error.py [--captions 60] [--steps 4 28] [--json docs/comm_dtype.json]

For Ulysses 2 and Ring 2 with each wire dtype:
- the trained tiny model (FluxPipeline.tiny) draws eval_tiny's held-out captions as one batch: PSNR of the
  decoded images against the exact ones (same layout, comm_dtype None), max abs error, held-out caption
  accuracy (both colours / position), and the bytes a rank sends per step;
- the medium transformer (hidden 768, 12 heads, 4 double + 8 single blocks, random weights), one forward
  at 1024 image + 128 text tokens: the relative error of its output against the exact parallel output.
fp32 everywhere else; the figures are deterministic (no timing), so a shared machine does not move them.
"""

import argparse
import dataclasses
import json
import math
import tempfile
from pathlib import Path

import torch

from flux_parallel.flux.configs import CONFIGS
from flux_parallel.flux.model import Flux
from flux_parallel.flux.pipeline import FluxPipeline
from flux_parallel.flux.sampling import flux_inputs
from flux_parallel.parallel.apply import parallelize_flux
from flux_parallel.parallel.context import ParallelContext
from flux_parallel.parallel.launch import run_distributed
from flux_parallel.shapes.evaluate import caption_accuracy, evaluation_captions
from flux_parallel.weights import seeded_init

MEDIUM = dataclasses.replace(CONFIGS["tiny"], hidden_size=768, num_heads=12, depth=4, depth_single_blocks=8,
                             axes_dim=(8, 28, 28), mlp_ratio=4.0)
LAYOUTS = {"ulysses 2": dict(ulysses_degree=2), "ring 2": dict(ring_degree=2)}
WIRES = (None, "bf16", "fp8")


def psnr(image: torch.Tensor, reference: torch.Tensor) -> float:
    mse = (image - reference).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def tiny_rows(captions: list[str], steps: int, degrees: dict) -> dict:
    """wire -> (images, bytes per step) of the trained tiny model on this rank (images on rank 0 only)."""
    out = {}
    for wire in WIRES:
        pipe = FluxPipeline.tiny(parallel=ParallelContext(**degrees, comm_dtype=wire))
        images = pipe(captions, height=64, width=64, num_steps=steps, seed=0, output_type="pt",
                      max_sequence_length=16)
        out[wire] = (images, sum(pipe.last_run["comm_bytes_per_step"].values()))
    return out


def medium_output(degrees: dict, wire: str | None) -> torch.Tensor:
    model = seeded_init(Flux(MEDIUM), 0)
    x = flux_inputs(MEDIUM, (32, 32), 128, seed=1)
    sp = parallelize_flux(model, ParallelContext(**degrees, comm_dtype=wire))
    return sp.forward_full(**x)


def _worker(rank: int, world: int, args, out_dir: str) -> None:
    torch.set_num_threads(1)
    captions = evaluation_captions("held_out", args.captions, seed=1)
    rows = []
    with torch.inference_mode():
        for layout, degrees in LAYOUTS.items():
            exact_medium = medium_output(degrees, None)
            for steps in args.steps:
                runs = tiny_rows(captions, steps, degrees)
                exact, exact_bytes = runs[None]
                for wire in WIRES[1:]:
                    images, sent = runs[wire]
                    error = (medium_output(degrees, wire) - exact_medium).norm() / exact_medium.norm()
                    if rank == 0:
                        rows.append(dict(layout=layout, steps=steps, wire=wire, psnr_db=psnr(images, exact),
                                         max_abs_err=(images - exact).abs().max().item(),
                                         captions=caption_accuracy(images, captions),
                                         exact_captions=caption_accuracy(exact, captions),
                                         bytes_per_step=sent, exact_bytes_per_step=exact_bytes,
                                         medium_rel_err=error.item()))
    if rank == 0:
        Path(out_dir, "rows.json").write_text(json.dumps(rows))


def table(rows: list[dict]) -> str:
    lines = ["| layout | steps | wire | bytes/step/rank vs exact | PSNR dB | max abs err | held-out captions "
             "(colours / position; exact) | medium forward rel err |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c, e = r["captions"], r["exact_captions"]
        lines.append(f"| {r['layout']} | {r['steps']} | {r['wire']} | {r['bytes_per_step'] / 1e3:.1f} kB "
                     f"({r['bytes_per_step'] / r['exact_bytes_per_step']:.2f}x) | {r['psnr_db']:.1f} | "
                     f"{r['max_abs_err']:.3f} | {c['colours']:.0%} / {c['position']:.0%} ({e['colours']:.0%} / "
                     f"{e['position']:.0%}) | {r['medium_rel_err']:.1e} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--captions", type=int, default=60, help="held-out captions drawn as one batch")
    p.add_argument("--steps", type=int, nargs="+", default=[4, 28])
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    if args.captions < 1 or min(args.steps) < 1:
        p.error("--captions and --steps must be at least 1")
    with tempfile.TemporaryDirectory() as out_dir:
        run_distributed(_worker, 2, args, out_dir, timeout_s=1800)
        rows = json.loads(Path(out_dir, "rows.json").read_text())
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"captions": args.captions, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

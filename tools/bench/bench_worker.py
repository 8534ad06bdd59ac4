"""One rank of a tools/benchmark.py configuration; torchrun starts one per device.

    torchrun --standalone --nproc_per_node 2 tools/bench/bench_worker.py --model tiny --ulysses-degree 2 \
        --cases 256:off 256:on --results out.jsonl --errors err

Loads the pipeline once, then for every case (resolution : parallel VAE off/on) runs the warm-up
and the repeats, each started from a barrier so that a run's latency is its slowest rank's. Rank 0
appends one JSON line per case holding every rank's summary. Any exception is written as one line
to `<errors>.rank<r>` and the rank exits, which makes torchrun stop its peers.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from flux_parallel.flux.pipeline import FluxPipeline
from flux_parallel.memory import peak_memory_bytes, reset_peak_memory
from flux_parallel.parallel.comm import all_gather_object
from flux_parallel.parallel.context import ParallelContext, close_distributed, exit_process, init_distributed
from flux_parallel.weights import DTYPES, seeded_init


def random_modules(name: str, dtype: torch.dtype, device) -> tuple:
    """(transformer, VAE, CLIP, T5) of preset `name` at full size with random weights: timing needs
    the shapes, not the weights. Built on the meta device, so memory is spent once, in `dtype`."""
    from flux_parallel.flux import CONFIGS, Flux
    from flux_parallel.flux.clip import CLIP_CONFIGS, ClipTextModel
    from flux_parallel.flux.t5 import T5_CONFIGS, T5Encoder
    from flux_parallel.vae import VAE_CONFIGS, AutoEncoder

    small = name.startswith("tiny")  # tiny-dev: the tiny encoders fit its 64-wide context
    with torch.device("meta"):
        modules = (
            Flux(CONFIGS[name]),
            AutoEncoder(VAE_CONFIGS["tiny" if small else "flux"]),
            ClipTextModel(CLIP_CONFIGS["tiny" if small else "l14"]),
            T5Encoder(T5_CONFIGS["tiny" if small else "xxl"]),
        )
    return tuple(seeded_init(m.to(dtype).to_empty(device=device), seed) for seed, m in enumerate(modules))


def random_pipeline(name: str, dtype: torch.dtype, device, **options) -> FluxPipeline:
    """A preset with random weights and the built-in tiny tokenizers (their ids fit any vocabulary)."""
    from flux_parallel.flux.configs import CONFIGS
    from flux_parallel.flux.sampling import Schedule
    from flux_parallel.flux.text_encoders import TextConditioner
    from flux_parallel.flux.tokenizer_training import tiny_clip_tokenizer, tiny_t5_tokenizer

    model, ae, clip, t5 = random_modules(name, dtype, device)
    text = TextConditioner(tiny_clip_tokenizer(), tiny_t5_tokenizer(), clip, t5)
    return FluxPipeline(model, ae, text, Schedule(use_dynamic_shifting=CONFIGS[name].guidance_embed), **options)


def build(args, device: torch.device, ctx: ParallelContext) -> FluxPipeline:
    from flux_parallel.flux.configs import CONFIGS

    dtype = DTYPES[args.dtype]
    if args.model != "tiny" and args.model in CONFIGS:
        return random_pipeline(args.model, dtype, device, parallel=ctx)
    if args.model == "tiny":
        return FluxPipeline.tiny(dtype=dtype, device=device, parallel=ctx)
    return FluxPipeline.from_pretrained(args.model, dtype=dtype, device=device, parallel=ctx)


def one_run(pipe: FluxPipeline, args, resolution: int, device: torch.device) -> dict:
    dist.barrier()  # every rank starts together: a run lasts until its slowest rank is done
    start = time.perf_counter()
    pipe(args.prompt, height=resolution, width=resolution, num_steps=args.steps,
         max_sequence_length=args.max_sequence_length, output_type="pt")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    run = pipe.last_run
    return dict(total_s=time.perf_counter() - start, text_encoding_s=run["text_encoding_s"], steps_s=run["steps_s"],
                vae_decode_s=run.get("vae_decode_s", 0.0), comm_bytes_per_step=dict(run.get("comm_bytes_per_step", {})),
                vae_comm_bytes=dict(run.get("vae_comm_bytes", {})))


def summarize(runs: list[dict], peak_bytes: int) -> dict:
    """Medians over the repeats of this rank's stages; byte counts are the same in every run."""
    def median(key):
        return statistics.median(r[key] for r in runs)

    return dict(
        total_s=median("total_s"),
        totals_s=[r["total_s"] for r in runs],
        text_encoding_s=median("text_encoding_s"),
        step_s=statistics.median(s for r in runs for s in r["steps_s"]),
        denoise_s=statistics.median(sum(r["steps_s"]) for r in runs),
        vae_decode_s=median("vae_decode_s"),
        steps=len(runs[-1]["steps_s"]),
        peak_memory_bytes=peak_bytes,
        comm_bytes_per_step=runs[-1]["comm_bytes_per_step"],
        vae_comm_bytes=runs[-1]["vae_comm_bytes"],
    )


def run_case(pipe: FluxPipeline, args, resolution: int, parallel_vae: bool, device: torch.device) -> dict:
    pipe.parallel_vae = parallel_vae  # the same loaded pipeline decodes either way
    reset_peak_memory(device)
    runs = [one_run(pipe, args, resolution, device) for _ in range(args.warmup + args.repeats)]
    return summarize(runs[args.warmup:], peak_memory_bytes(device))


def parse_case(text: str) -> tuple[int, bool]:
    resolution, _, vae = text.partition(":")
    if not resolution.isdigit() or vae not in ("off", "on"):
        raise argparse.ArgumentTypeError(f"a case is RESOLUTION:off or RESOLUTION:on, got {text!r}")
    return int(resolution), vae == "on"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--cases", nargs="+", type=parse_case, required=True, help="RESOLUTION:off|on (parallel VAE)")
    p.add_argument("--ulysses-degree", type=int, default=1)
    p.add_argument("--ring-degree", type=int, default=1)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--max-sequence-length", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompt", default="a photo of a forest with mist swirling around the tree trunks")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a collective may wait")
    p.add_argument("--results", required=True, help="JSON lines file rank 0 appends a case to")
    p.add_argument("--errors", required=True, help="prefix of the one-line error file of each rank")
    return p.parse_args(argv)


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}"[:500]


def main(argv=None) -> int:
    args = parse_args(argv)
    device = init_distributed(args.device, timeout_s=args.timeout)
    torch.set_num_threads(args.threads)
    rank, case = (dist.get_rank() if dist.is_initialized() else 0), None
    try:
        pipe = build(args, device, ParallelContext(ulysses_degree=args.ulysses_degree, ring_degree=args.ring_degree))
        for case in args.cases:
            ranks = all_gather_object(run_case(pipe, args, *case, device), None)
            if rank == 0:
                with open(args.results, "a") as f:
                    f.write(json.dumps(dict(resolution=case[0], use_parallel_vae=case[1], ranks=ranks)) + "\n")
    except Exception as err:  # noqa: BLE001 - reported to the benchmark, which records it and goes on
        error = dict(
            resolution=case[0] if case else None, use_parallel_vae=case[1] if case else None, error=one_line(err)
        )
        Path(f"{args.errors}.rank{rank}").write_text(json.dumps(error))
        sys.stderr.write(f"bench_worker rank {rank}: {error['error']}\n")
        sys.stderr.flush()
        os._exit(1)  # peers may sit in a collective: torchrun stops them when this rank is gone
    close_distributed()
    return 0


if __name__ == "__main__":
    exit_process(main())

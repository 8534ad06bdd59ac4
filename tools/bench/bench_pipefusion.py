"""Whole denoising loops on 2 CPU ranks: PipeFusion beside one rank and Ulysses (tools/bench/bench_parallel.py --steps).

    python tools/bench/bench_parallel.py --steps 28 --img-tokens 1024 [--txt-tokens 128] [--repeats 1]
                                   [--pipefusion 2 4 2:compute] [--memory-steps 2]

The medium config of tools/bench/bench_transformer.py (hidden 768, 12 heads, 4 double + 8 single blocks),
fp32, seeded random weights. Two gloo ranks, one thread each, rank r pinned to core r (--no-pin: not).
A variant is a whole denoising loop of --steps Euler steps, not one transformer call; within each
repeat every variant runs once, alternated, each timed from a barrier to a barrier; the median over
the repeats is reported. Variants:
- one rank: flux_parallel/flux/sampling.py's Euler loop on rank 0 (rank 1 waits in the barrier);
- ulysses 2: flux_parallel/parallel/runtime.py's loop, the image's tokens split over both ranks;
- pipefusion M=m: 2 stages (the default weight-balanced split of flux_parallel/parallel/stages.py), m patches, one
  warm-up step; "M=m, compute split": explicit stage sizes that balance per-token compute instead;
- each PipeFusion variant's no-exchange ceiling, defined as the Ulysses one of the per-call table is
  (what each rank computes with the messages left out): every rank runs its stage's blocks over its
  patches as the schedule has them, but the point-to-point messages and the two broadcasts are left
  out (a receive hands back zeros at once), so no rank ever waits for another. Its latency is the
  busier rank's: what PipeFusion reaches here when messages cost nothing and the warm-up bubble is
  free. Not exact (stage 1 computes on zeros); it only measures the work.
Parameter bytes are those each rank computes with (its stage's under PipeFusion). Peak memory: each
variant runs again for --memory-steps steps in fresh processes that hold only what it holds (under
PipeFusion the stage's parameters, the rest left on the meta device as a stage-only checkpoint load
leaves it); the peak resident set (VmHWM) of each rank from before the model is built, and the
process's resident set at that point (Python and torch), are reported. One warm-up step and one
pipelined step allocate everything a longer loop does (the stale K/V buffers on the first step).
"""

import json
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from bench_transformer import MEDIUM, make_inputs
from torch import nn

from flux_parallel.flux.model import Flux
from flux_parallel.flux.pipeline import denoise_on_mesh
from flux_parallel.flux.sampling import Schedule, denoise, get_schedule
from flux_parallel.memory import peak_memory_bytes, reset_peak_memory, resident_bytes
from flux_parallel.parallel import comm, pipefusion
from flux_parallel.parallel.context import ParallelContext, bind_to_cores
from flux_parallel.parallel.launch import free_port, spawn
from flux_parallel.parallel.runtime import Conditioning, parallelize
from flux_parallel.parallel.stages import split_stages, stage_filter
from flux_parallel.parallel.swap import swapped
from flux_parallel.weights import seeded_init

WORLD = 2


def parse_pipefusion(spec: str) -> tuple[int, bool]:
    """"4" -> (4 patches, weight split); "2:compute" -> (2 patches, compute-balanced stage sizes)."""
    patches, _, split = spec.partition(":")
    if not patches.isdigit() or int(patches) < 1 or split not in ("", "compute"):
        raise ValueError(f"--pipefusion {spec!r}: give a patch count, optionally followed by ':compute'")
    return int(patches), split == "compute"


def contexts(specs: list[str]) -> dict[str, dict | None]:
    """variant name -> ParallelContext keywords (None: one rank). Ceilings share their variant's keywords."""
    out = {"one rank": None, "ulysses 2": dict(ulysses_degree=2)}
    compute = tuple(len(r) for r in split_stages(MEDIUM, WORLD, balance="compute"))
    for patches, by_compute in map(parse_pipefusion, specs):
        name = f"pipefusion M={patches}" + (f", compute split {compute[0]}+{compute[1]}" if by_compute else "")
        out[name] = dict(pipefusion_degree=WORLD, num_pipeline_patch=patches, warmup_steps=1,
                         pipefusion_stage_sizes=compute if by_compute else None)
    return out


class NoMessages:
    """comm.P2P with the messages left out: a receive hands back zeros at once, a send is dropped."""

    def __init__(self, group):
        pass

    def send(self, x, dst):
        pass

    def recv(self, shape, dtype, device, src):
        return torch.zeros(shape, dtype=dtype, device=device)

    def commit(self):
        pass

    def wait(self):
        pass


NO_EXCHANGE = SimpleNamespace(P2P=NoMessages, broadcast=lambda *args, **kwargs: None, all_gather=comm.all_gather)


def loops(model: nn.Module, x: dict, timesteps: list[float], specs: list[str]) -> dict:
    """name -> (run() on this rank, parameter bytes this rank computes with or None when it computes nothing)."""
    cond = {"positive": Conditioning(x["txt"], x["txt_ids"], x["y"])}

    def one_rank():
        if dist.get_rank() != 0:
            return None
        t_vec = torch.ones(1)
        return denoise(lambda img, t: model(img, x["img_ids"], x["txt"], x["txt_ids"], t_vec.fill_(t), x["y"]),
                       x["img"], timesteps)

    everything = sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)
    out = {}
    for name, degrees in contexts(specs).items():
        if degrees is None:
            out[name] = (one_rank, everything if dist.get_rank() == 0 else None)
            continue
        denoiser = parallelize(model, ParallelContext(**degrees))
        run = lambda d=denoiser: denoise_on_mesh(d.start(x["img"], x["img_ids"], cond, None, None), timesteps)  # noqa: E731
        out[name] = (run, denoiser.parameter_bytes())
        if "pipefusion_degree" in degrees:
            def ceiling(run=run):
                with swapped([(pipefusion, "comm", NO_EXCHANGE)]):
                    return run()

            out[f"{name}: no exchange (ceiling)"] = (ceiling, denoiser.parameter_bytes())
    return out


def setup(rank: int, port: int, pin: bool) -> None:
    if pin:
        bind_to_cores(rank, WORLD)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)


def timing_worker(rank: int, port: int, args, tokens: int, out_file: str) -> None:
    setup(rank, port, args.pin)
    model = seeded_init(Flux(MEDIUM), 0).eval().requires_grad_(False)
    torch.manual_seed(0)
    x = make_inputs(MEDIUM, tokens, args.txt_tokens)
    timesteps = get_schedule(args.steps, x["img"].shape[1], Schedule())
    runs = loops(model, x, timesteps, args.pipefusion)
    times, sent = {name: [] for name in runs}, {}
    with torch.inference_mode():
        for _ in range(args.repeats):
            for name, (run, _) in runs.items():
                dist.barrier()
                start = time.perf_counter()
                with comm.count_comm() as stats:
                    run()
                dist.barrier()
                times[name].append(time.perf_counter() - start)
                sent[name] = sum(stats.bytes.values()) / args.steps
    rows = {name: dict(times=t, params=runs[name][1], sent=sent[name]) for name, t in times.items()}
    everyone = comm.all_gather_object(rows, None)
    if rank == 0:
        Path(out_file).write_text(json.dumps(everyone))


def held_model(ctx: ParallelContext | None) -> nn.Module:
    """The medium transformer with what this rank holds: everything, or under PipeFusion only its stage's
    parameters, materialised from the meta device (random values: only their memory matters here)."""
    keep = stage_filter(ctx) if ctx is not None else None
    if keep is None:
        return seeded_init(Flux(MEDIUM), 0).eval().requires_grad_(False)
    with torch.device("meta"):
        model = Flux(MEDIUM)
    wanted = keep(MEDIUM)
    for name, param in list(model.named_parameters()):
        if wanted(name):
            owner, _, attr = name.rpartition(".")
            value = torch.empty(param.shape)
            value.normal_(0.0, param[0].numel() ** -0.5) if param.ndim > 1 else value.fill_(1.0)
            setattr(model.get_submodule(owner), attr, nn.Parameter(value, requires_grad=False))
    return model.eval()


def memory_worker(rank: int, port: int, args, tokens: int, degrees: dict | None, out_file: str) -> None:
    setup(rank, port, args.pin)
    runtime = resident_bytes()
    reset_peak_memory(torch.device("cpu"))
    ctx = ParallelContext(**degrees) if degrees is not None else None
    model = held_model(ctx) if ctx is not None or rank == 0 else None
    torch.manual_seed(0)
    x = make_inputs(MEDIUM, tokens, args.txt_tokens)
    timesteps = get_schedule(args.memory_steps, x["img"].shape[1], Schedule())
    with torch.inference_mode():
        if ctx is None and rank == 0:
            t_vec = torch.ones(1)
            denoise(lambda img, t: model(img, x["img_ids"], x["txt"], x["txt_ids"], t_vec.fill_(t), x["y"]),
                    x["img"], timesteps)
        elif ctx is not None:
            cond = {"positive": Conditioning(x["txt"], x["txt_ids"], x["y"])}
            denoise_on_mesh(parallelize(model, ctx).start(x["img"], x["img_ids"], cond, None, None), timesteps)
    peak = comm.all_gather_object((peak_memory_bytes(torch.device("cpu")), runtime), None)
    if rank == 0:
        Path(out_file).write_text(json.dumps(peak))


def run(args) -> None:
    """Every --img-tokens size: the timed loops, then each variant's peak memory; a table per size (args as
    bench_parallel.main parses and checks them)."""
    with tempfile.TemporaryDirectory() as folder:
        for tokens in args.img_tokens:
            out = str(Path(folder) / "times.json")
            spawn(timing_worker, WORLD, free_port(), args, tokens, out)
            ranks = json.loads(Path(out).read_text())
            memory = {}
            for name, degrees in contexts(args.pipefusion).items() if args.memory_steps else ():
                out = str(Path(folder) / "memory.json")
                spawn(memory_worker, WORLD, free_port(), args, tokens, degrees, out)
                memory[name] = json.loads(Path(out).read_text())
            report(ranks, memory, args, tokens)


def report(ranks: list[dict], memory: dict, args, tokens: int) -> None:
    latency = {name: statistics.median(max(r[name]["times"][i] for r in ranks) for i in range(args.repeats))
               for name in ranks[0]}  # each repeat lasts until the slower rank is done
    one, whole = latency["one rank"], ranks[0]["one rank"]["params"]
    print(f"\nmedium config, {tokens} image + {args.txt_tokens} text tokens, {args.steps}-step loops, fp32, "
          f"{WORLD} gloo ranks x 1 thread, median of {args.repeats}, torch {torch.__version__}")
    steps = f" ({args.memory_steps} steps)" if memory else ""
    print("| variant | latency s | speed-up over 1 rank | vs its ceiling | parameter bytes rank 0 / 1 (x one rank) "
          f"| peak RSS MB rank 0 / 1{steps} | MB sent per step rank 0 / 1 |")
    print("|---|---:|---:|---:|---|---|---|")
    for name in ranks[0]:
        ceiling = latency.get(f"{name}: no exchange (ceiling)")
        vs = f"{latency[name] / ceiling:.2f}" if ceiling else "–"
        held = " / ".join("–" if r[name]["params"] is None else f"{r[name]['params']:,}" for r in ranks)
        share = " / ".join("–" if r[name]["params"] is None else f"{r[name]['params'] / whole:.3f}" for r in ranks)
        peaks = memory.get(name)
        peak = " / ".join(f"{p / 1e6:,.0f}" for p, _ in peaks) if peaks else "–"
        sent = " / ".join(f"{r[name]['sent'] / 1e6:.2f}" for r in ranks)
        print(f"| {name} | {latency[name]:.2f} | {one / latency[name]:.2f}x | {vs} | {held} ({share}) | {peak} "
              f"| {sent} |")
    if memory:
        runtime = ["–" if rss is None else f"{rss / 1e6:,.0f}" for _, rss in next(iter(memory.values()))]
        print(f"resident before the model was built (Python and torch): {' / '.join(runtime)} MB")
    print("times per repeat (s): " + "; ".join(
        f"{name}: {[round(max(r[name]['times'][i] for r in ranks), 2) for i in range(args.repeats)]}"
        for name in ranks[0]))

"""What PipeFusion's overlapped transfers hide: 2 CPU ranks, each loop with and without overlap, alternated.

    python tools/bench/bench_pipefusion_overlap.py [--img-tokens 1024] [--txt-tokens 128] [--steps 6]
                                                   [--repeats 5] [--pipefusion 2 4 2:compute] [--no-pin]

The medium config of tools/bench/bench_transformer.py (hidden 768, 12 heads, 4 double + 8 single blocks),
fp32, seeded random weights; two gloo ranks with one thread each, rank r pinned to core r; PipeFusion with
2 stages, one warm-up step, the --pipefusion variants of tools/bench/bench_parallel.py ("M" patches with the
default weight-balanced split, "M:compute" with the compute-balanced one). Within each repeat every variant
runs its whole --steps Euler loop twice, once with parallel/pipefusion.OVERLAP on (each stage's input
received a slot ahead, every wait deferred to where the data is needed) and once off (one batch per slot,
waited for at once); the order of the two flips every repeat. Each loop is timed from a barrier to a barrier
and lasts until the slower rank is done; medians over the repeats are reported.

Columns: wall seconds of the loop; each rank's seconds blocked in PipeFusion's slot transfers (comm.count_comm
"p2p": the waits, which hold both transfer time and time spent waiting for the peer's compute), and in all its
waits (p2p and the two broadcasts: with overlap the first stage's last waits move into the final broadcast);
"hidden" = 1 - blocked(overlapped) / blocked(one batch per slot), per rank. The two orders' final latents are
compared bit for bit.
"""

import argparse
import statistics
import sys
import time

import torch
import torch.distributed as dist
from bench_pipefusion import contexts, parse_pipefusion, setup
from bench_transformer import MEDIUM, make_inputs

from flux_parallel.flux.model import Flux
from flux_parallel.flux.pipeline import denoise_on_mesh
from flux_parallel.flux.sampling import Schedule, get_schedule
from flux_parallel.parallel import comm, pipefusion
from flux_parallel.parallel.context import ParallelContext
from flux_parallel.parallel.launch import free_port, spawn
from flux_parallel.parallel.runtime import Conditioning, parallelize
from flux_parallel.parallel.swap import swapped
from flux_parallel.weights import seeded_init

WORLD = 2
ORDERS = {True: "overlapped", False: "one batch per slot"}


def timed_loop(denoiser, x: dict, cond: dict, timesteps: list[float], overlap: bool) -> tuple[dict, torch.Tensor]:
    """One whole loop with pipefusion.OVERLAP = overlap -> ({wall, p2p, waits} seconds on this rank, latents)."""
    with swapped([(pipefusion, "OVERLAP", overlap)]):
        dist.barrier()
        start = time.perf_counter()
        with comm.count_comm() as stats:
            img = denoise_on_mesh(denoiser.start(x["img"], x["img_ids"], cond, None, None), timesteps)
        dist.barrier()
        wall = time.perf_counter() - start
    p2p = stats.seconds.get("p2p", 0.0)
    return {"wall": wall, "p2p": p2p, "waits": p2p + stats.seconds.get("broadcast", 0.0)}, img


def worker(rank: int, port: int, args) -> None:
    setup(rank, port, args.pin)
    model = seeded_init(Flux(MEDIUM), 0).eval().requires_grad_(False)
    torch.manual_seed(0)
    x = make_inputs(MEDIUM, args.img_tokens, args.txt_tokens)
    timesteps = get_schedule(args.steps, x["img"].shape[1], Schedule())
    cond = {"positive": Conditioning(x["txt"], x["txt_ids"], x["y"])}
    denoisers = {name: parallelize(model, ParallelContext(**degrees))
                 for name, degrees in contexts(args.pipefusion).items() if degrees and "pipefusion_degree" in degrees}
    runs = {(name, overlap): [] for name in denoisers for overlap in ORDERS}
    same_bits = dict.fromkeys(denoisers, True)
    with torch.inference_mode():
        for repeat in range(args.repeats):
            for name, denoiser in denoisers.items():
                latents = {}
                for overlap in (True, False) if repeat % 2 == 0 else (False, True):
                    seconds, latents[overlap] = timed_loop(denoiser, x, cond, timesteps, overlap)
                    runs[name, overlap].append(seconds)
                same_bits[name] &= torch.equal(latents[True], latents[False])
    everyone = comm.all_gather_object(runs, None)
    if rank == 0:
        report(everyone, same_bits, args)


def report(ranks: list[dict], same_bits: dict, args) -> None:
    def median(name, overlap, key, rank=None):
        runs = [r[name, overlap] for r in ranks]
        if rank is None:  # a loop lasts until the slower rank is done
            return statistics.median(max(r[i][key] for r in runs) for i in range(args.repeats))
        return statistics.median(run[key] for run in runs[rank])

    print(f"\nPipeFusion transfers, medium config, {args.img_tokens} image + {args.txt_tokens} text tokens, "
          f"{args.steps}-step loops (W = 1), fp32, {WORLD} gloo ranks x 1 thread, median of {args.repeats}, "
          f"alternated, torch {torch.__version__}")
    print("| variant | transfers | wall s | p2p blocked s rank 0 / 1 | all waits s rank 0 / 1 | p2p hidden rank 0 / 1 "
          "| wall / one batch per slot | same bits |")
    print("|---|---|---:|---|---|---|---:|---|")
    for name in same_bits:
        for overlap, order in ORDERS.items():
            blocked = " / ".join(f"{median(name, overlap, 'p2p', r):.3f}" for r in range(WORLD))
            waits = " / ".join(f"{median(name, overlap, 'waits', r):.3f}" for r in range(WORLD))
            hidden = " / ".join(
                f"{1 - median(name, True, 'p2p', r) / median(name, False, 'p2p', r):.0%}"
                if median(name, False, "p2p", r) > 0 else "–" for r in range(WORLD)) if overlap else "–"
            ratio = median(name, overlap, "wall") / median(name, False, "wall")
            print(f"| {name} | {order} | {median(name, overlap, 'wall'):.2f} | {blocked} | {waits} | {hidden} "
                  f"| {ratio:.3f} | {'yes' if same_bits[name] else 'NO'} |")
    print("walls per repeat (s): " + "; ".join(
        f"{name}, {order}: {[round(max(r[name, overlap][i]['wall'] for r in ranks), 2) for i in range(args.repeats)]}"
        for name in same_bits for overlap, order in ORDERS.items()))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img-tokens", type=int, default=1024)
    parser.add_argument("--txt-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6, help="Euler steps per loop (the first is the warm-up)")
    parser.add_argument("--repeats", type=int, default=5, help="alternated rounds (median)")
    parser.add_argument("--pipefusion", nargs="+", default=["2"],
                        help="variants: a patch count, optionally ':compute' (compute-balanced stage sizes)")
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin rank r to core r")
    args = parser.parse_args(argv)
    if args.steps < 2 or args.repeats < 1 or args.img_tokens < 1 or args.txt_tokens < 0:
        parser.error(f"--steps must be at least 2 (a warm-up and a pipelined step), --repeats and --img-tokens at "
                     f"least 1, --txt-tokens at least 0; got {args.steps}, {args.repeats}, {args.img_tokens}, "
                     f"{args.txt_tokens}")
    for spec in args.pipefusion:
        try:
            parse_pipefusion(spec)
        except ValueError as error:
            parser.error(str(error))
    spawn(worker, WORLD, free_port(), args)


if __name__ == "__main__":
    sys.exit(main())

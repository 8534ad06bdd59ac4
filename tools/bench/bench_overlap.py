"""How much communication the overlapped exchanges hide: 2 CPU ranks, Ulysses and Ring with and without overlap.

    python tools/bench/bench_overlap.py [--img-tokens 1024 2048 4096] [--repeats 3] [--transformer-repeats 5]
                                        [--depth 1 --single 2] [--chunks N]
    python tools/benchmark.py --suite overlap [--repeats 3]      # the same, through the benchmark entry point

Two gloo ranks with one thread each, rank r pinned to core r, fp32, the same random weights everywhere.
First row: one transformer forward of the medium config (tools/bench/bench_transformer.py: hidden 768,
12 heads of 64, 4 double + 8 single blocks) at 1024 image + 128 text tokens, ours against diffusers'
FluxTransformer2DModel, on rank 0 alone (--transformer-repeats, median). Then, per image token count, a
shorter model of the same width (--depth double + --single single blocks: the exchange-to-compute ratio of
a block does not depend on how many there are, and the whole suite has to fit in 3 minutes) runs:
    one rank alone                        rank 0, the whole forward, rank 1 waits
    both ranks, whole forward (ceiling)   each rank the whole forward at the same time
    ulysses 2, no overlap                 ParallelContext(ulysses_chunks=1): each all-to-all on the critical path
    ulysses 2, overlapped                 the automatic rule's chunk count (parallel/ulysses.auto_chunks; 1,
                                          the same as the row above, where the messages are too small) or --chunks
    ring 2, no overlap / overlapped       ring_attention(overlap=False / True)
    diffusers ulysses 2                   ContextParallelConfig(ulysses_degree=2) on the same gloo group
Every row is a step on full inputs (shard, forward, gather), timed from a barrier to a barrier; within a
repeat every row runs once, in turn (alternated); the median over repeats is reported. The ceiling's
speed-up is 2 x (one rank alone) / (both ranks, whole forward): the contention of two busy cores and the
attention work of a sequence-parallel rank, without any exchange. "of ceiling" is a row's speed-up over
one rank divided by the ceiling's. "blocked" is the time rank 0 spent waiting in the strategy's exchanges
(comm.count_comm: all-to-alls for Ulysses, the ring's waited hops for Ring); "hidden" is
1 - blocked(overlapped) / blocked(no overlap), the share of the exchange time that overlap took off the
critical path. Errors are the max abs difference over the max abs of one rank's output (ours).

Not measured here: diffusers' ring (its ring attention needs an attention backend returning a log-sum-exp,
which its CPU backends do not), and USP (Ulysses x Ring needs at least 4 ranks: on 2 cores that is 2
ranks per core, which measures the scheduler; usp_attention passes the chunk count to its Ulysses part,
so chunk c+1's all-to-all overlaps chunk c's ring attention there too).
"""

import argparse
import dataclasses
import datetime
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
from bench_parallel import count_diffusers_bytes, diffusers_call
from bench_transformer import MEDIUM, make_inputs, make_models

from flux_parallel.flux.sampling import flux_inputs
from flux_parallel.parallel import comm
from flux_parallel.parallel.apply import parallelize_flux
from flux_parallel.parallel.context import ParallelContext, bind_to_cores
from flux_parallel.parallel.launch import free_port, spawn
from flux_parallel.parallel.ring import ring_attention
from flux_parallel.parallel.swap import attention_swaps, swapped
from flux_parallel.parallel.ulysses import auto_chunks

WORLD = 2
ONE_RANK, CEILING = "one rank alone", "both ranks, whole forward (ceiling)"
ULYSSES, ULYSSES_OVERLAP = "ulysses 2, no overlap", "ulysses 2, overlapped"
RING, RING_OVERLAP = "ring 2, no overlap", "ring 2, overlapped"
DIFFUSERS = "diffusers ulysses 2"
EXCHANGE_KIND = {ULYSSES: "all_to_all", ULYSSES_OVERLAP: "all_to_all", RING: "p2p", RING_OVERLAP: "p2p",
                 DIFFUSERS: None}


def timed(rank: int, ranks: int, fn) -> tuple[float, float, dict, object]:
    """(seconds barrier to barrier, CPU seconds of this process's threads in fn, seconds blocked in our
    exchanges per kind, output); ranks >= `ranks` only wait."""
    dist.barrier()
    start, cpu_start = time.perf_counter(), time.process_time()
    with comm.count_comm() as counted:
        out = fn() if rank < ranks else None
    cpu = time.process_time() - cpu_start
    dist.barrier()
    return time.perf_counter() - start, cpu, counted.seconds, out


def run_rows(rank: int, rows: dict, repeats: int) -> dict:
    """name -> (ranks, fn): one warm-up each (also the outputs), then `repeats` alternated rounds.
    -> name -> {"times", "cpu", "blocked", "out"} on this rank."""
    stats = {}
    for name, (ranks, fn) in rows.items():
        *_, out = timed(rank, ranks, fn)
        stats[name] = {"times": [], "cpu": [], "blocked": {}, "out": out}
    for _ in range(repeats):
        for name, (ranks, fn) in rows.items():
            seconds, cpu, blocked, _ = timed(rank, ranks, fn)
            stats[name]["times"].append(seconds)
            stats[name]["cpu"].append(cpu)
            for kind, s in blocked.items():
                stats[name]["blocked"].setdefault(kind, []).append(s)
    return stats


def rel_err(out, ref) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


def transformer_row(rank: int, repeats: int) -> None:
    """Ours against diffusers, the medium config at 1024 image tokens, on rank 0 alone."""
    torch.manual_seed(0)
    ours, ref = make_models(MEDIUM)
    x = make_inputs(MEDIUM, 1024, 128)
    rows = {"ours": (1, lambda: ours(**x)), "diffusers": (1, lambda: diffusers_call(ref, x))}
    with torch.inference_mode():
        stats = run_rows(rank, rows, repeats)
    if rank == 0:
        ours_s, ref_s = (statistics.median(stats[n]["times"]) for n in rows)
        err = rel_err(stats["diffusers"]["out"], stats["ours"]["out"])
        print(f"transformer forward, medium config, {x['img'].shape[1]} image + 128 text tokens, fp32, 1 thread, "
              f"median of {repeats}: ours {ours_s * 1e3:.0f} ms, diffusers {ref_s * 1e3:.0f} ms, "
              f"ours / diffusers {ours_s / ref_s:.3f}, rel err {err:.1e}")
        sys.stdout.flush()


def make_rows(model, ref_cp, x: dict, chunks: int | None) -> dict:
    """name -> (ranks that run it, fn) for one input `x`."""
    ulysses = parallelize_flux(model, ParallelContext(ulysses_degree=WORLD, ulysses_chunks=1))
    overlapped = ParallelContext(ulysses_degree=WORLD, ulysses_chunks=chunks_used(model.params, x, chunks))
    ulysses_overlap = parallelize_flux(model, overlapped)
    ring = parallelize_flux(model, ParallelContext(ring_degree=WORLD))

    def ring_not_overlapped():
        layout = ring.layout(x["txt"].shape[1], x["img"].shape[1])
        local = ring.shard(layout, x["img"], x["img_ids"], x["txt"], x["txt_ids"])
        group = ring.ctx.group("ring")
        serial = lambda q, k, v: ring_attention(q, k, v, group, layout.ring_lens, overlap=False)[0]  # noqa: E731
        with swapped(attention_swaps(model, serial)):
            out = model(*local, x["timesteps"], x["y"], x.get("guidance"))
        return ring.gather(layout, out)

    rows = {
        ONE_RANK: (1, lambda: model(**x)),
        CEILING: (WORLD, lambda: model(**x)),
        ULYSSES: (WORLD, lambda: ulysses.forward_full(**x)),
        ULYSSES_OVERLAP: (WORLD, lambda: ulysses_overlap.forward_full(**x)),
        RING: (WORLD, ring_not_overlapped),
        RING_OVERLAP: (WORLD, lambda: ring.forward_full(**x)),
    }
    if x["img"].shape[1] % WORLD == 0 and x["txt"].shape[1] % WORLD == 0:  # its equipartition sharder asserts it
        rows[DIFFUSERS] = (WORLD, lambda: diffusers_call(ref_cp, x))
    return rows


def grid_inputs(params, img_tokens: int, txt_tokens: int) -> dict:
    """One image of exactly img_tokens tokens on the most nearly square grid (2048: 32 x 64)."""
    rows = max(r for r in range(1, int(img_tokens**0.5) + 1) if img_tokens % r == 0)
    inputs = flux_inputs(params, (rows, img_tokens // rows), txt_tokens)
    return {k: v for k, v in inputs.items() if v is not None}  # no guidance entry for a schnell-like config


def chunks_used(params, x: dict, chunks: int | None) -> int:
    """The chunk count the overlapped Ulysses row runs with: --chunks, or the automatic rule on a rank's
    q/k/v (its joint sequence, all heads, fp32), whether or not ulysses.OVERLAP_BY_DEFAULT is on."""
    if chunks is not None:
        return chunks
    local_tokens = -(-(x["img"].shape[1] + x["txt"].shape[1]) // WORLD)
    qkv_bytes = 3 * x["img"].shape[0] * params.num_heads * local_tokens * params.head_dim * 4
    return auto_chunks(params.num_heads // WORLD, qkv_bytes)


def report(params, x: dict, args, stats: dict) -> None:
    med = {name: statistics.median(s["times"]) for name, s in stats.items()}
    ceiling = 2 * med[ONE_RANK] / med[CEILING]
    reference = stats[ONE_RANK]["out"]
    print(f"\n{x['img'].shape[1]} image + {x['txt'].shape[1]} text tokens; width 768, {params.depth} double + "
          f"{params.depth_single_blocks} single blocks; median of {args.repeats}; overlapped Ulysses in "
          f"{chunks_used(params, x, args.chunks)} chunks; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores")
    print("| row | ms per step | speed-up over 1 rank | of ceiling | CPU ms (rank 0) | ms blocked in exchanges "
          "(rank 0) | hidden | rel err |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    blocked = {name: statistics.median(stats[name]["blocked"].get(kind, [0.0]))
               for name, kind in EXCHANGE_KIND.items() if kind}
    if DIFFUSERS not in stats:
        print(f"{DIFFUSERS}: not run, its equipartition sharding needs image and text token counts divisible by "
              f"{WORLD}")
    hidden = {ULYSSES_OVERLAP: 1 - blocked[ULYSSES_OVERLAP] / max(blocked[ULYSSES], 1e-9),
              RING_OVERLAP: 1 - blocked[RING_OVERLAP] / max(blocked[RING], 1e-9)}
    for name, s in stats.items():
        speedup = med[ONE_RANK] / med[name]
        cells = (
            f"{med[name] * 1e3:.0f}",
            f"{ceiling:.2f}x" if name == CEILING else f"{speedup:.2f}x",
            "1.000" if name == CEILING else ("–" if name == ONE_RANK else f"{speedup / ceiling:.3f}"),
            f"{statistics.median(s['cpu']) * 1e3:.0f}",
            f"{blocked[name] * 1e3:.0f}" if name in blocked else "–",
            f"{hidden[name]:.0%}" if name in hidden else "–",
            "–" if name == CEILING else f"{rel_err(s['out'], reference):.1e}",
        )
        print(f"| {name} | " + " | ".join(cells) + " |")
    for faster, slower in ((ULYSSES_OVERLAP, ULYSSES), (RING_OVERLAP, RING)):
        print(f"{faster}: {med[faster] / med[slower]:.3f} of the time of {slower}")
    sys.stdout.flush()


def worker(rank: int, port: int, args) -> None:
    bind_to_cores(rank, WORLD)
    torch.set_num_threads(1)
    torch.accelerator.device_count = lambda: 1  # diffusers derives a device index from it
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(minutes=30))
    from diffusers import ContextParallelConfig

    count_diffusers_bytes({"bytes": 0})
    if args.transformer_repeats:
        transformer_row(rank, args.transformer_repeats)
    params = dataclasses.replace(MEDIUM, depth=args.depth, depth_single_blocks=args.single)
    torch.manual_seed(0)  # the same weights and inputs on both ranks
    model, ref_cp = make_models(params)
    ref_cp.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))
    with torch.inference_mode():
        for tokens in args.img_tokens:
            x = grid_inputs(params, tokens, args.txt_tokens)
            stats = run_rows(rank, make_rows(model, ref_cp, x, args.chunks), args.repeats)
            if rank == 0:
                report(params, x, args, stats)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img-tokens", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--txt-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="alternated rounds per token count (median)")
    parser.add_argument("--transformer-repeats", type=int, default=5,
                        help="rounds of the ours-vs-diffusers forward row (0: skip it)")
    parser.add_argument("--depth", type=int, default=1, help="double blocks of the sequence-parallel rows' model")
    parser.add_argument("--single", type=int, default=2, help="single blocks of the sequence-parallel rows' model")
    parser.add_argument("--chunks", type=int, default=None,
                        help="Ulysses head chunks of the overlapped row (default: the automatic rule)")
    args = parser.parse_args(argv)
    heads_per_rank = MEDIUM.num_heads // WORLD
    if args.repeats < 1 or args.transformer_repeats < 0 or args.txt_tokens < 0 or min(args.img_tokens) < WORLD:
        parser.error(f"--repeats must be at least 1, --transformer-repeats and --txt-tokens at least 0, "
                     f"--img-tokens at least {WORLD}")
    if args.depth < 0 or args.single < 0 or args.depth + args.single < 1:
        parser.error(f"--depth and --single must not be negative, and give at least one block together, got "
                     f"{args.depth} and {args.single}")
    if args.chunks is not None and not 1 <= args.chunks <= heads_per_rank:
        parser.error(f"--chunks must be between 1 and the {heads_per_rank} heads per Ulysses rank, got {args.chunks}")
    spawn(worker, WORLD, free_port(), args)


if __name__ == "__main__":
    main()

"""Sequence-parallel speed-up of the FLUX transformer on the CPU: ours (Ulysses, Ring) and diffusers'.

    python tools/bench/bench_parallel.py [--img-tokens 1024 4096] [--txt-tokens 128] [--repeats 5] [--no-pin]
    python tools/bench/bench_parallel.py --steps 28 --img-tokens 1024 --repeats 1 [--pipefusion 2 4 2:compute]
    python tools/bench/bench_parallel.py --kontext --img-tokens 1024   # Kontext: 1024 output + 1024 reference tokens

With --steps the rows are whole denoising loops instead: one rank, Ulysses 2 and PipeFusion (2 stages,
M patches) beside each PipeFusion variant's no-exchange ceiling, with per-rank parameter bytes and
peak memory; tools/bench/bench_pipefusion.py runs them and says how. Without it, as follows.

The medium config of tools/bench/bench_transformer.py (hidden 768, 12 heads of 64, 4 double + 8 single
blocks), fp32, the same random weights everywhere. Two gloo ranks with one thread each, rank r
pinned to core r; the one-rank baselines run on rank 0 while rank 1 waits in a barrier. Within each repeat every
variant runs once, alternated; each is timed from a barrier to a barrier, and the median over
repeats is reported. A step is one transformer call on full inputs (shard, forward, gather), as
diffusers' context parallelism does it in every call; our denoising loop gathers only once.

Bytes are what rank 0 sends per step (ours: comm.count_comm; diffusers: its functional
collectives, wrapped). "Hidden" is the share of the ring's transfer time that overlapping took
off the critical path: 1 - (blocked wait, overlapped) / (blocked wait, transfers serialised).
The "no exchange" row runs what each Ulysses rank computes with the all-to-alls left out (its own
rows stand in for the others'): the speed-up two ranks reach here when communication is free.
"ours tensor" is tensor parallelism over the 2 ranks (parallel/tensor.py: each rank holds half of every
block and all-reduces after each attention and MLP); its ceiling row leaves the all-reduces and
all-gathers out.

diffusers' `enable_parallelism` needs an accelerator count: it is patched to 1 in the workers.
Its ring needs an attention backend with a log-sum-exp, which the CPU lacks, so it is absent.
"""

import argparse
import copy
import datetime
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
from bench_pipefusion import parse_pipefusion
from bench_pipefusion import run as run_loops
from bench_transformer import MEDIUM, make_inputs, make_models

from flux_parallel.kernels import attention
from flux_parallel.parallel import comm
from flux_parallel.parallel import tensor as tensor_module
from flux_parallel.parallel.apply import parallelize_flux
from flux_parallel.parallel.context import ParallelContext, bind_to_cores
from flux_parallel.parallel.launch import free_port, spawn
from flux_parallel.parallel.ring import ring_attention
from flux_parallel.parallel.swap import attention_swaps, swapped
from flux_parallel.parallel.tensor import parallelize_tensor

WORLD = 2


def diffusers_call(model, x):
    return model(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                 timestep=x["timesteps"], img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0], return_dict=False)[0]


def count_diffusers_bytes(counter: dict) -> None:
    """Wrap the functional collectives diffusers' context parallelism calls, counting bytes sent
    (even splits over WORLD ranks, as its equipartition mode uses)."""
    import torch.distributed._functional_collectives as funcol

    all_to_all, all_gather = funcol.all_to_all_single, funcol.all_gather_tensor

    def counted_all_to_all(x, *args, **kwargs):
        counter["bytes"] += x.numel() * x.element_size() * (WORLD - 1) // WORLD
        return all_to_all(x, *args, **kwargs)

    def counted_all_gather(x, *args, **kwargs):
        counter["bytes"] += x.numel() * x.element_size() * (WORLD - 1)
        return all_gather(x, *args, **kwargs)

    funcol.all_to_all_single, funcol.all_gather_tensor = counted_all_to_all, counted_all_gather


def make_variants(rank, ours, ref, ref_cp, x):
    """name -> (ranks that run it, function). One copy of our weights serves the one-rank baseline and
    every strategy: the sequence-parallel views swap the blocks' attention only during their call."""
    wrapped = {
        name: parallelize_flux(ours, ParallelContext(**{f"{name}_degree": WORLD})) for name in ("ulysses", "ring")
    }

    def with_attention(sp_model, attention_fn):
        """shard, forward with attention_fn at the seam, gather: forward_full with another attention."""
        layout = sp_model.layout(x["txt"].shape[1], x["img"].shape[1])
        local = sp_model.shard(layout, x["img"], x["img_ids"], x["txt"], x["txt_ids"])
        with swapped(attention_swaps(ours, attention_fn)):
            out = ours(*local, x["timesteps"], x["y"], x.get("guidance"))
        return sp_model.gather(layout, out)

    def ring_not_overlapped():
        sp_model = wrapped["ring"]
        lens = sp_model.layout(x["txt"].shape[1], x["img"].shape[1]).ring_lens
        group = sp_model.ctx.group("ring")
        return with_attention(sp_model, lambda q, k, v: ring_attention(q, k, v, group, lens, overlap=False)[0])

    sharded = parallelize_tensor(copy.deepcopy(ours), ParallelContext(tensor_degree=WORLD))  # this rank's half
    return {
        "ours 1 rank": (1, lambda: ours(**x)),
        "ours tensor": (WORLD, lambda: sharded(**x)),
        TENSOR_NO_EXCHANGE: (WORLD, lambda: tensor_work_without_exchange(sharded, x)),
        "diffusers 1 rank": (1, lambda: diffusers_call(ref, x)),
        "ours ulysses": (WORLD, lambda: wrapped["ulysses"].forward_full(**x)),
        "ours ring": (WORLD, lambda: wrapped["ring"].forward_full(**x)),
        "ours ring, not overlapped": (WORLD, ring_not_overlapped),
        "diffusers ulysses": (WORLD, lambda: diffusers_call(ref_cp, x)),
        NO_EXCHANGE: (WORLD, lambda: with_attention(wrapped["ulysses"], ulysses_work_without_exchange)),
    }


NO_EXCHANGE = "ours ulysses work, no exchange (ceiling)"
TENSOR_NO_EXCHANGE = "ours tensor work, no exchange (ceiling)"


class _NoExchange:
    """Stands in for comm inside parallel/tensor.py: the all-reduce returns this rank's partial sums and the
    all-gather repeats this rank's slice. Not exact; it measures what 2 tensor ranks reach when
    communication costs nothing."""

    @staticmethod
    def all_reduce(x, group):
        return x

    @staticmethod
    def all_gather(x, group, dim, sizes):
        return torch.cat([x] * len(sizes), dim=dim)


def tensor_work_without_exchange(sharded, x):
    with swapped([(tensor_module, "comm", _NoExchange)]):
        return sharded(**x)


def ulysses_work_without_exchange(q, k, v):
    """What a Ulysses rank computes in attention, [B, H/P, P * L_r, D], with the all-to-alls left out:
    its own rows stand in for the other ranks'. Not exact; it only measures what 2 ranks can reach
    on this machine when communication costs nothing."""
    heads, rows = q.shape[1] // WORLD, q.shape[2]
    q, k, v = (torch.cat([t[:, :heads]] * WORLD, dim=2) for t in (q, k, v))
    out = attention(q, k, v)[:, :, :rows]
    return torch.cat([out] * WORLD, dim=1)


def timed(rank, ranks, fn):
    """Seconds from a barrier to a barrier; ranks >= `ranks` only wait.
    Returns (seconds, this rank's thread CPU seconds in fn, output)."""
    dist.barrier()
    start, cpu_start = time.perf_counter(), time.thread_time()
    out = fn() if rank < ranks else None
    cpu = time.thread_time() - cpu_start
    dist.barrier()
    return time.perf_counter() - start, cpu, out


def measure(rank, variants, repeats, diffusers_bytes):
    """Warm-up (also errors and bytes), then alternated repeats -> per-variant stats on rank 0."""
    stats = {}
    reference = {}
    for name, (ranks, fn) in variants.items():
        before = diffusers_bytes["bytes"]
        with comm.count_comm() as counted:
            _, _, out = timed(rank, ranks, fn)
        base = reference.setdefault(name.split()[0], out)  # "ours" / "diffusers": the 1-rank output
        err = ((out - base).abs().max() / base.abs().max()).item() if out is not None and base is not None else 0.0
        err = float("nan") if name in (NO_EXCHANGE, TENSOR_NO_EXCHANGE) else err
        sent = sum(counted.bytes.values()) + diffusers_bytes["bytes"] - before
        stats[name] = {"times": [], "p2p_wait": [], "bytes": sent, "err": err}
    per_rank = {"cpu": [], "a2a_wait": []}  # ours ulysses, this rank: thread CPU and all-to-all wait per step
    for _ in range(repeats):
        for name, (ranks, fn) in variants.items():
            with comm.count_comm() as counted:
                seconds, cpu, _ = timed(rank, ranks, fn)
            stats[name]["times"].append(seconds)
            stats[name]["p2p_wait"].append(counted.seconds.get("p2p", 0.0))
            if name == "ours ulysses":
                per_rank["cpu"].append(cpu)
                per_rank["a2a_wait"].append(counted.seconds.get("all_to_all", 0.0))
    stats["ulysses per rank"] = comm.all_gather_object(per_rank, None)
    return stats


def worker(rank, port, args):
    if args.pin:
        bind_to_cores(rank, WORLD)
    torch.set_num_threads(1)
    torch.accelerator.device_count = lambda: 1  # diffusers derives a device index from it
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(minutes=30))
    from diffusers import ContextParallelConfig

    torch.manual_seed(0)  # the same weights and inputs on both ranks
    ours, ref = make_models(MEDIUM)
    ref_cp = copy.deepcopy(ref)
    ref_cp.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))
    if rank != 0:
        del ref  # rank 1 never runs the one-rank baselines
        ref = None
    diffusers_bytes = {"bytes": 0}
    count_diffusers_bytes(diffusers_bytes)
    with torch.inference_mode():
        for tokens in args.img_tokens:
            x = kontext_inputs(tokens, args.txt_tokens) if args.kontext else make_inputs(MEDIUM, tokens,
                                                                                          args.txt_tokens)
            stats = measure(rank, make_variants(rank, ours, ref, ref_cp, x), args.repeats, diffusers_bytes)
            if rank == 0:
                report(x["img"].shape[1], args, stats)  # the tokens make_inputs' grid holds


def kontext_inputs(tokens: int, txt_tokens: int) -> dict:
    """A Kontext-sized sequence: `tokens` output tokens followed by as many reference tokens, ids (1, row,
    col) on the reference's own grid (flux/image_modes.py): twice the image tokens, of uneven shards when
    the count is odd."""
    x = make_inputs(MEDIUM, tokens, txt_tokens)
    reference_ids = x["img_ids"].clone()
    reference_ids[..., 0] = 1
    return {**x, "img": torch.cat([x["img"], torch.randn_like(x["img"])], dim=1),
            "img_ids": torch.cat([x["img_ids"], reference_ids], dim=1)}


def report(tokens, args, stats):
    per_rank = stats.pop("ulysses per rank")
    med = {name: statistics.median(s["times"]) for name, s in stats.items()}
    serial_wait = statistics.median(stats["ours ring, not overlapped"]["p2p_wait"])
    overlapped_wait = statistics.median(stats["ours ring"]["p2p_wait"])
    print(f"\n{tokens} image + {args.txt_tokens} text tokens, fp32, 1 thread per rank, median of {args.repeats}, "
          f"torch {torch.__version__}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("| variant | ms per step | speed-up over 1 rank | MB sent per rank per step | rel err vs 1 rank |")
    print("|---|---:|---:|---:|---:|")
    for name, s in stats.items():
        single = med[name.split()[0] + " 1 rank"]
        cells = (
            f"{med[name] * 1e3:.0f}",
            f"{single / med[name]:.2f}x",
            f"{s['bytes'] / 1e6:.1f}",
            "–" if s["err"] != s["err"] else f"{s['err']:.1e}",
        )
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"ring transfers: blocked {serial_wait * 1e3:.1f} ms per step when serialised, "
          f"{overlapped_wait * 1e3:.1f} ms when overlapped: {1 - overlapped_wait / max(serial_wait, 1e-9):.0%} hidden")
    cpu = [[round(c * 1e3) for c in r["cpu"]] for r in per_rank]
    wait = [[round(w * 1e3) for w in r["a2a_wait"]] for r in per_rank]
    gaps = [abs(a - b) / max(a, b) for a, b in zip(*cpu)]
    print(
        f"ours ulysses, per repeat: thread CPU ms of rank 0 {cpu[0]}, rank 1 {cpu[1]} (the same work); ms blocked "
        f"in all-to-alls, rank 0 {wait[0]}, rank 1 {wait[1]}; "
        f"CPU time differs by {statistics.median(gaps):.0%} (median)"
    )
    sys.stdout.flush()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img-tokens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--txt-tokens", type=int, default=128)
    parser.add_argument("--kontext", action="store_true",
                        help="Kontext's doubled sequence: each --img-tokens count of output tokens and as many "
                             "reference tokens (the reference's ids)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="let the ranks float between cores (by default rank r is pinned to core r)")
    parser.add_argument("--steps", type=int, default=None,
                        help="time whole denoising loops of this many steps, with the PipeFusion rows")
    parser.add_argument("--pipefusion", nargs="+", default=["2", "4", "2:compute"],
                        help="with --steps: PipeFusion rows, M patches each, M:compute for the compute-balanced split")
    parser.add_argument("--memory-steps", type=int, default=2,
                        help="with --steps: steps of each variant's peak-memory run in fresh processes (0: none)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.txt_tokens < 0 or min(args.img_tokens) < WORLD:
        parser.error(
            f"--repeats must be at least 1, --txt-tokens at least 0 and --img-tokens at least {WORLD} (one per rank)"
        )
    if args.steps is None:
        spawn(worker, WORLD, free_port(), args)
        return
    if args.steps < 1 or args.memory_steps < 0:
        parser.error(f"--steps must be at least 1 and --memory-steps at least 0, got {args.steps} and "
                     f"{args.memory_steps}")
    for spec in args.pipefusion:
        try:
            parse_pipefusion(spec)
        except ValueError as e:
            parser.error(str(e))
    run_loops(args)


if __name__ == "__main__":
    main()

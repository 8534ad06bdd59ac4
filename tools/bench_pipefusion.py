"""PipeFusion against Ulysses on 2 CPU ranks: whole denoising loops of the medium transformer.

    python tools/bench_pipefusion.py [--steps 28] [--img-tokens 1024] [--txt-tokens 128] [--repeats 3]

The medium config of tools/bench_transformer.py (hidden 768, 12 heads, 4 double + 8 single blocks),
fp32, seeded random weights. Two gloo ranks, one thread each, rank r pinned to core r. Variants, run
once each per repeat, alternated, each timed from a barrier to a barrier (median over repeats):
- one rank: the plain Euler loop on rank 0 (rank 1 waits in the barrier);
- the ceiling: half of that, what two ranks reach when the work splits perfectly and moves for free;
- Ulysses 2 (parallel/runtime.py's loop), PipeFusion 2 stages with M = 2 and 4 patches, W = 1.
Parameter bytes are those each rank computes with (its stage's under PipeFusion). Peak memory per
variant is not separable here (one process runs every variant): see tools/generate.py --report.
"""

import argparse
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from bench_transformer import MEDIUM, make_inputs
from common import free_port

from flux.model import Flux
from flux.sampling import Schedule, denoise, get_schedule
from parallel import comm
from parallel.context import ParallelContext, bind_to_cores
from parallel.runtime import Conditioning, parallelize
from weights import seeded_init

WORLD = 2


def variants(model, x, timesteps):
    """name -> (run() -> latents, parameter bytes this rank computes with)."""
    cond = {"positive": Conditioning(x["txt"], x["txt_ids"], x["y"])}

    def one_rank():
        if dist.get_rank() != 0:
            return None
        t_vec = torch.ones(1)
        return denoise(lambda img, t: model(img, x["img_ids"], x["txt"], x["txt_ids"], t_vec.fill_(t), x["y"]),
                       x["img"], timesteps)

    out = {"one rank": (one_rank, sum(p.numel() * p.element_size() for p in model.parameters()))}
    contexts = {"ulysses 2": dict(ulysses_degree=2)}
    contexts |= {f"pipefusion M={m}": dict(pipefusion_degree=2, num_pipeline_patch=m, warmup_steps=1) for m in (2, 4)}
    for name, degrees in contexts.items():
        denoiser = parallelize(model, ParallelContext(**degrees))
        out[name] = (lambda d=denoiser: d.start(x["img"], x["img_ids"], cond, None, None).denoise(timesteps),
                     denoiser.parameter_bytes())
    return out


def worker(rank: int, port: int, args) -> None:
    bind_to_cores(rank, WORLD)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    params = MEDIUM
    model = seeded_init(Flux(params), 0).eval().requires_grad_(False)
    torch.manual_seed(0)
    x = make_inputs(params, args.img_tokens, args.txt_tokens)
    timesteps = get_schedule(args.steps, x["img"].shape[1], Schedule())
    runs = variants(model, x, timesteps)
    times = {name: [] for name in runs}
    sent = {}
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
    rows = {name: (statistics.median(t), runs[name][1], sent[name]) for name, t in times.items()}
    everyone = comm.all_gather_object(rows, None)
    if rank == 0:
        report(everyone, args)
    dist.barrier()
    dist.destroy_process_group()


def report(ranks: list[dict], args) -> None:
    one = ranks[0]["one rank"][0]
    print(f"medium config, {args.img_tokens} image + {args.txt_tokens} text tokens, {args.steps} steps, fp32, "
          f"2 gloo ranks x 1 thread, median of {args.repeats}")
    print("| variant | latency s | speed-up | vs ceiling | parameter bytes rank 0 / 1 | bytes sent/step rank 0 / 1 |")
    print("|---|---|---|---|---|---|")
    print(f"| ceiling (one rank / 2) | {one / 2:.2f} | 2.00 | 1.00 | | |")
    for name in ranks[0]:
        latency = max(r[name][0] for r in ranks)
        params = " / ".join(f"{r[name][1]:,}" for r in ranks)
        sent = " / ".join(f"{r[name][2]:,.0f}" for r in ranks)
        print(f"| {name} | {latency:.2f} | {one / latency:.2f} | {latency / (one / 2):.2f} | {params} | {sent} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--img-tokens", type=int, default=1024)
    p.add_argument("--txt-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    mp.spawn(worker, args=(free_port(), args), nprocs=WORLD, join=True)


if __name__ == "__main__":
    main()

"""CFG and data parallelism on the CPU: two ranks against one, beside the no-exchange ceiling.

    python tools/bench/bench_mesh.py [--img-tokens 1024] [--txt-tokens 128] [--steps 2] [--repeats 3]

The medium config of tools/bench/bench_transformer.py (hidden 768, 12 heads of 64, 4 double + 8 single
blocks), fp32, the same random weights and conditioning on both ranks, two gloo ranks with one
thread each (rank r pinned to core r). Every variant denoises `--steps` Euler steps of one
generation through parallel.runtime; the one-rank variants run on rank 0 while rank 1 waits in a
barrier. Within each repeat the variants alternate; the median over repeats is reported.

- true CFG: one image, a negative and a positive conditioning. One rank runs both branches as one
  batched forward (what the pipeline does) and, to decide that, as two forwards; `--cfg-degree 2`
  runs one branch per rank and all-gathers the predictions every step. Its ceiling: each rank runs
  its branch's forwards and nothing else.
- data: 4 images, no CFG. One rank denoises all four; `--data-parallel-degree 2` gives each rank two
  and gathers the latents once at the end. Its ceiling: each rank's two images, no gather.
"""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
from bench_transformer import MEDIUM, make_inputs, make_models

from flux_parallel.flux.sampling import denoise
from flux_parallel.parallel import Conditioning, ParallelContext, batch_slice, comm, gather_batch, parallelize
from flux_parallel.parallel.context import bind_to_cores
from flux_parallel.parallel.launch import free_port, spawn

WORLD = 2
SCALE = 3.0  # true_cfg_scale


def conditioning(x: dict, batch: int, seed: int) -> Conditioning:
    gen = torch.Generator().manual_seed(seed)
    txt = torch.randn(batch, *x["txt"].shape[1:], generator=gen)
    return Conditioning(txt, torch.zeros(*txt.shape[:2], 3), torch.randn(batch, x["y"].shape[1], generator=gen))


def one_rank_cfg(model, x, conds, steps, batched: bool):
    """Both branches on one rank (no runtime: a ParallelContext of degree 1 cannot exist in a 2-rank job)."""
    def velocity(img, t):
        def forward(img, c):
            t_vec = torch.full((img.shape[0],), t)
            return model(img, x["img_ids"].expand(img.shape[0], -1, -1), c.txt, c.txt_ids, t_vec, c.y)

        neg, pos = conds["negative"], conds["positive"]
        if batched:
            both = Conditioning(*(torch.cat(pair) for pair in zip((neg.txt, neg.txt_ids, neg.y),
                                                                  (pos.txt, pos.txt_ids, pos.y))))
            negative, positive = forward(img.repeat(2, 1, 1), both).chunk(2)
        else:
            negative, positive = forward(img, neg), forward(img, pos)
        return negative + SCALE * (positive - negative)

    return denoise(velocity, x["img"], schedule(steps))


def schedule(steps: int) -> list[float]:
    return [1 - i / steps for i in range(steps)] + [0.0]


def make_variants(rank, model, x, steps):
    conds = {"negative": conditioning(x, 1, 1), "positive": conditioning(x, 1, 2)}
    cfg = parallelize(model, ParallelContext(cfg_degree=WORLD))
    mine = cfg.branches(true_cfg=True)[0]

    def cfg_parallel():
        run = cfg.start(x["img"], x["img_ids"], {mine: conds[mine]}, None, SCALE)
        return run.finish(denoise(run.velocity, run.img, schedule(steps)))

    def cfg_ceiling():  # this rank's branch, no exchange
        c = conds[mine]
        return denoise(lambda img, t: model(img, x["img_ids"], c.txt, c.txt_ids, torch.full((1,), t), c.y),
                       x["img"], schedule(steps))

    images = 4
    noise = x["img"].repeat(images, 1, 1)
    data_cond = conditioning(x, images, 3)
    data_ctx = ParallelContext(data_degree=WORLD)
    data = parallelize(model, data_ctx)

    def data_parallel(gather=True):
        part = batch_slice(images, data_ctx)
        c = Conditioning(data_cond.txt[part], data_cond.txt_ids[part], data_cond.y[part])
        run = data.start(noise[part], x["img_ids"].expand(part.stop - part.start, -1, -1), {"positive": c}, None, None)
        latents = run.finish(denoise(run.velocity, run.img, schedule(steps)))
        return gather_batch(latents, images, data_ctx) if gather else latents

    def data_one_rank():
        c = data_cond
        ids = x["img_ids"].expand(images, -1, -1)
        return denoise(lambda img, t: model(img, ids, c.txt, c.txt_ids, torch.full((images,), t), c.y),
                       noise, schedule(steps))

    return {
        "true CFG, 1 rank, one batched forward": (1, lambda: one_rank_cfg(model, x, conds, steps, batched=True)),
        "true CFG, 1 rank, two forwards": (1, lambda: one_rank_cfg(model, x, conds, steps, batched=False)),
        "true CFG, cfg-degree 2": (WORLD, cfg_parallel),
        "true CFG, no exchange (ceiling)": (WORLD, cfg_ceiling),
        "4 images, 1 rank": (1, data_one_rank),
        "4 images, data-parallel-degree 2": (WORLD, data_parallel),
        "4 images, no gather (ceiling)": (WORLD, lambda: data_parallel(gather=False)),
    }


def timed(rank, ranks, fn):
    dist.barrier()
    start = time.perf_counter()
    out = fn() if rank < ranks else None
    dist.barrier()
    return time.perf_counter() - start, out


def worker(rank, args):
    bind_to_cores(rank, WORLD)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    model, _ = make_models(MEDIUM)
    x = make_inputs(MEDIUM, args.img_tokens, args.txt_tokens)
    with torch.inference_mode():
        variants = make_variants(rank, model, x, args.steps)
        outputs, times, sent = {}, {name: [] for name in variants}, {}
        for name, (ranks, fn) in variants.items():  # warm-up; outputs and bytes
            with comm.count_comm() as stats:
                _, outputs[name] = timed(rank, ranks, fn)
            sent[name] = sum(stats.bytes.values())
        for _ in range(args.repeats):
            for name, (ranks, fn) in variants.items():
                times[name].append(timed(rank, ranks, fn)[0])
    if rank == 0:
        report(args, variants, times, sent, outputs)


def report(args, variants, times, sent, outputs):
    med = {name: statistics.median(t) for name, t in times.items()}
    baseline = {"true CFG": med["true CFG, 1 rank, one batched forward"], "4 images": med["4 images, 1 rank"]}
    exact = {"true CFG": outputs["true CFG, 1 rank, one batched forward"], "4 images": outputs["4 images, 1 rank"]}
    print(f"\n{args.img_tokens} image + {args.txt_tokens} text tokens, {args.steps} steps, fp32, 1 thread per rank, "
          f"median of {args.repeats}, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores")
    print("| variant | s per generation | speed-up over 1 rank | MB sent by rank 0 | rel err vs 1 rank |")
    print("|---|---:|---:|---:|---:|")
    for name in variants:
        kind = name.split(",")[0]
        out, ref = outputs[name], exact[kind]
        err = "–" if "ceiling" in name else f"{((out - ref).norm() / ref.norm()).item():.1e}"
        print(f"| {name} | {med[name]:.2f} | {baseline[kind] / med[name]:.2f}x | {sent[name] / 1e6:.2f} | {err} |")
    sys.stdout.flush()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img-tokens", type=int, default=1024)
    parser.add_argument("--txt-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.repeats < 1 or args.steps < 1 or args.txt_tokens < 0 or args.img_tokens < 1:
        parser.error("--repeats and --steps must be at least 1, --img-tokens at least 1, --txt-tokens at least 0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    spawn(worker, WORLD, args)


if __name__ == "__main__":
    main()

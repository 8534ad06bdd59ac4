"""Throughput and latency of tools/serve.py, and its overhead over a direct FluxPipeline call.

    python tools/bench/bench_serve.py --output docs/serve.json
    python tools/bench/bench_serve.py --layouts one replicas2 --requests 32   # 1 replica vs 2

Starts the real service in each --layouts (one: one process; ulysses2: two ranks under torchrun with
--ulysses-degree 2 --use-parallel-vae, one replica of two; replicas2: two ranks with
--data-parallel-degree 2, two replicas of one rank each, running their own batches), each unbatched
(--max-batch 1) and batched (--max-batch 8), on the tiny model, and sends it requests from 1, 4 and 16
concurrent clients, each its own seed: requests per second, the p50 / p95 of the client's latency
(queueing included) and the mean batch a request ran in. Then the overhead: the same 256 px request as
a direct call of a FluxPipeline in this process, through the one-process service's /generate and its
/v1/images/generations (b64_json), alternated, median of --repeats each; and per /generate request, the
client's latency minus the pipeline time that the service itself measured (X-Report).
"""

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

from flux_parallel.flux.pipeline import FluxPipeline

ROOT = Path(__file__).resolve().parents[2]  # the repository
PROMPT = "a photo of a forest with mist swirling around the tree trunks"
LAYOUTS = {"one": (1, []), "ulysses2": (2, ["--ulysses-degree", "2", "--use-parallel-vae"]),
           "replicas2": (2, ["--data-parallel-degree", "2"])}  # name -> (ranks, serve.py's flags)


def start_service(layout: str, threads: int, model: str = "tiny", max_batch: int = 1) -> tuple[subprocess.Popen, str]:
    """serve.py in `layout` (LAYOUTS) on a free port; returns once it prints the address it serves on."""
    ranks, flags = LAYOUTS[layout]
    serve = [str(ROOT / "tools" / "serve.py"), "--model", model, "--port", "0", "--max-queue", "64",
             "--max-batch", str(max_batch), *flags]
    if ranks > 1:
        serve = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), *serve]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, *serve], stdout=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:
        if "http://" in line:
            return proc, line.split()[-1]
    raise RuntimeError(f"serve.py exited with status {proc.wait()} before serving")


def stop_service(proc: subprocess.Popen, ranks: int) -> None:
    """SIGTERM to every rank, as torchrun forwards one (rank 0 finishes, then stops them all)."""
    if ranks == 1:
        proc.terminate()
    else:
        for pid in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split():
            os.kill(int(pid), signal.SIGTERM)
    proc.wait(timeout=60)


def timed_request(client: httpx.Client, body: dict) -> tuple[float, dict]:
    """(client latency, the service's own report: stage timings, batch size) of one request."""
    start = time.perf_counter()
    reply = client.post("/generate", json=body)
    latency = time.perf_counter() - start
    reply.raise_for_status()
    return latency, json.loads(reply.headers["x-report"])


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def load_test(url: str, clients: int, requests: int, size: int) -> dict:
    """`requests` requests from `clients` concurrent clients (each waits for its answer before the next)."""
    def body(seed: int) -> dict:  # each request its own seed, as clients send
        return {"prompt": PROMPT, "height": size, "width": size, "seed": seed}

    with httpx.Client(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients)) as client:
        timed_request(client, body(0))  # warm-up
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            replies = list(pool.map(lambda i: timed_request(client, body(i)), range(requests)))
        wall = time.perf_counter() - start
    latencies = [t for t, _ in replies]
    return {"clients": clients, "requests": requests, "requests_per_s": requests / wall,
            "p50_s": percentile(latencies, 50), "p95_s": percentile(latencies, 95),
            "mean_batch": statistics.mean(r["batch_size"] for _, r in replies)}


def overhead(url: str, size: int, repeats: int, threads: int, model: str = "tiny") -> dict:
    """The service's two routes against a direct call of the same pipeline, alternated, one request at a time."""
    torch.set_num_threads(threads)
    pipe = FluxPipeline.tiny() if model == "tiny" else FluxPipeline.tiny_random()
    body = {"prompt": PROMPT, "height": size, "width": size}
    openai_body = {"prompt": PROMPT, "size": f"{size}x{size}", "response_format": "b64_json"}
    direct, served, openai, outside, png = [], [], [], [], []
    with httpx.Client(base_url=url, timeout=600) as client:
        for i in range(repeats + 1):  # the first of each is a warm-up
            start = time.perf_counter()
            pipe(PROMPT, height=size, width=size, output_type="pt")
            direct_s = time.perf_counter() - start
            latency, report = timed_request(client, body)
            start = time.perf_counter()
            client.post("/v1/images/generations", json=openai_body).raise_for_status()
            openai_s = time.perf_counter() - start
            if i:
                direct.append(direct_s)
                served.append(latency)
                openai.append(openai_s)
                outside.append(latency - report["stages"]["total_s"])
                png.append(report["stages"]["png_encode_s"])
    direct_s, served_s, outside_s = statistics.median(direct), statistics.median(served), statistics.median(outside)
    openai_s = statistics.median(openai)
    return {"size": size, "repeats": repeats, "direct_s": direct_s, "service_s": served_s,
            "overhead_vs_direct": served_s / direct_s - 1, "openai_s": openai_s,
            "openai_overhead_vs_direct": openai_s / direct_s - 1, "outside_pipeline_s": outside_s,
            "outside_pipeline_share": outside_s / served_s, "png_encode_s": statistics.median(png)}


def table(results: list[dict]) -> str:
    lines = ["| layout | --max-batch | clients | requests | requests/s | p50 latency | p95 latency | mean batch |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['layout']} | {r['max_batch']} | {r['clients']} | {r['requests']} | "
                     f"{r['requests_per_s']:.2f} | {r['p50_s']:.2f} s | {r['p95_s']:.2f} s | {r['mean_batch']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny", "tiny-random"], default="tiny",
                   help="the trained tiny model, or the seeded random one (the earlier runs' model)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels, a multiple of 16")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=16, help="per concurrency level (at least the clients)")
    p.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS),
                   help="one process; one replica of two Ulysses ranks; two data-parallel replicas of one rank")
    p.add_argument("--max-batch", type=int, nargs="+", default=[1, 8], help="the service's --max-batch values")
    p.add_argument("--repeats", type=int, default=10, help="of the overhead comparison")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (and of the direct call)")
    p.add_argument("--output", help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.size % 16 or args.size < 16 or min(args.clients) < 1 or args.repeats < 1:
        p.error("--size must be a multiple of 16, and --clients and --repeats at least 1")
    results, cost = [], None
    for layout in args.layouts:
        for max_batch in args.max_batch:
            proc, url = start_service(layout, args.threads, args.model, max_batch)
            try:
                for clients in args.clients:
                    load = load_test(url, clients, max(args.requests, clients), args.size)
                    results.append({"layout": layout, "max_batch": max_batch, **load})
                    print(table(results[-1:]).splitlines()[-1], flush=True)
                if layout == "one" and max_batch == 1:
                    cost = overhead(url, args.size, args.repeats, args.threads, args.model)
            finally:
                stop_service(proc, LAYOUTS[layout][0])
    print(table(results))
    if cost:
        print(f"overhead at {cost['size']} px: /generate {cost['service_s']:.3f} s "
              f"({cost['overhead_vs_direct']:+.1%}), "
              f"/v1/images/generations {cost['openai_s']:.3f} s ({cost['openai_overhead_vs_direct']:+.1%}) vs "
              f"direct {cost['direct_s']:.3f} s; outside the pipeline {cost['outside_pipeline_s'] * 1e3:.1f} ms "
              f"({cost['outside_pipeline_share']:.1%} of a request), of which PNG encoding "
              f"{cost['png_encode_s'] * 1e3:.1f} ms")
    if args.output:
        machine = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                   "threads_per_rank": args.threads}
        Path(args.output).write_text(json.dumps({"machine": machine, "load": results, "overhead": cost}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

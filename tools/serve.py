"""Serve FLUX.1 over HTTP: the model loads once, the ranks of a replica run each batch of requests together.

    python tools/serve.py --model tiny --port 8000
    torchrun --nproc_per_node 2 tools/serve.py --model tiny --ulysses-degree 2 --use-parallel-vae --port 8000
    torchrun --nproc_per_node 4 tools/serve.py --model tiny --data-parallel-degree 2 --ulysses-degree 2
    python tools/serve.py --model ... --lora style=style.safetensors --lora ink=ink.safetensors

Takes every model and parallel flag of tools/generate.py. Rank 0 serves the API and the page on
--host:--port and queues the requests (serve/app.py). The rank loop below hands each batch to every
rank of a replica as a JSON message over a gloo group (a broadcast from the replica's first rank), and
they run the pipeline on it. With --data-parallel-degree N there are N replicas, and each takes the next
batch from the one queue whenever it is free, apart from the others: rank 0 runs the first replica and
relays batches, progress and images to and from the others' first ranks (serve/replicas.py).

While no request waits, a replica's first rank sends a heartbeat every --heartbeat seconds, so an idle
rank never waits on a collective longer than that, and the death of a rank fails its replica's next
collective (within --timeout) instead of leaving a hung service: that replica answers its running batch
503 and takes no more work, /health shows it "down", and the others go on; when the last replica fails,
rank 0 exits non-zero. Under torchrun a failed replica's surviving ranks idle until the job is stopped
instead of exiting non-zero, which would make torchrun's agent end every rank; a rank that dies outright
still ends a torchrun job (its agent's design): isolation from that needs ranks started without it. SIGTERM (or
Ctrl-C) stops taking requests, finishes the running batches, answers the queued ones 503 and exits 0 on
every rank.

LoRA adapters (--lora NAME=PATH, repeatable) load once at start; a request's `loras` field sets their
scales for its call (the ones it leaves out at 0), on every rank, without reloading.
"""

import argparse
import datetime
import os
import signal
import sys
import threading
import time
import traceback

import torch
import torch.distributed as dist
from generate import add_pipeline_arguments, apply_defaults, build_pipeline, check_pipeline_usage

from flux_parallel.flux.sampling import check_image_size, get_noise
from flux_parallel.memory import peak_memory_bytes, reset_peak_memory
from flux_parallel.parallel.context import close_distributed, exit_process
from flux_parallel.serve.app import Job, JobQueue, create_app
from flux_parallel.serve.openai import EDIT_PARAMS, edit_arguments
from flux_parallel.serve.replicas import (
    FromRankZero,
    control_groups,
    mark_down,
    relay,
    replica_ranks,
    replica_status,
    run_replicas_apart,
    send,
)
from flux_parallel.serve.request import Limits
from flux_parallel.weights import CheckpointError

OK, FAILED, FATAL = 0, 1, 2  # a job's outcome on one rank; the ranks agree on the worst


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pipeline_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (the address is printed)")
    p.add_argument("--height", type=int, default=None, help="of requests without one (default as generate.py)")
    p.add_argument("--width", type=int, default=None, help="of requests without one (default as generate.py)")
    p.add_argument("--max-queue", type=int, default=16, help="requests waiting besides the running one; more get 429")
    p.add_argument("--max-prompt-length", type=int, default=Limits.max_prompt_length, help="characters")
    p.add_argument("--max-size", type=int, default=Limits.max_size, help="pixels per side a request may ask for")
    p.add_argument("--max-steps", type=int, default=Limits.max_steps, help="steps a request may ask for")
    p.add_argument("--heartbeat", type=float, default=5.0, help="seconds between rank 0's messages when idle")
    p.add_argument("--max-batch", type=int, default=8, help="requests that agree on size, steps and guidance "
                   "run as one batch of up to this many (1: one at a time)")
    p.add_argument("--batch-window-ms", type=float, default=20.0, help="how long a request waits for company")
    p.add_argument("--max-images", type=int, default=Limits.max_images, help="images one OpenAI request may ask "
                   "for (its n)")
    p.add_argument("--max-body-bytes", type=int, default=Limits.max_body_bytes, help="larger requests get 413")
    p.add_argument("--url-ttl", type=float, default=3600.0, help="seconds the images of url responses are served")
    p.add_argument("--png-level", type=int, default=0, choices=range(10), metavar="{0..9}",
                   help="zlib level of the PNGs sent: 0 stores the pixels (a 256 px image in 0.7 ms instead of 36, "
                        "1.4x the bytes); 6 is generate.py's")
    p.set_defaults(prompt=None)  # generate.apply_defaults also fills in generate.py's --prompt; unused here
    args = p.parse_args(argv)
    apply_defaults(args)
    check_pipeline_usage(p, args)
    for name in ("height", "width"):
        try:
            check_image_size(name, getattr(args, name))
        except ValueError as err:
            p.error(f"--{err}")
    for flag in ("max_queue", "max_prompt_length", "max_size", "max_steps", "max_images", "max_body_bytes",
                 "max_batch"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if not 0 <= args.batch_window_ms <= 10_000:
        p.error(f"--batch-window-ms must be between 0 and 10000, got {args.batch_window_ms}")
    if not args.url_ttl > 0:
        p.error(f"--url-ttl must be above 0 seconds, got {args.url_ttl}")
    if not 0 < args.heartbeat < args.timeout:
        p.error(f"--heartbeat must be above 0 and below --timeout ({args.timeout}), got {args.heartbeat}")
    if not 0 <= args.port < 65536:
        p.error(f"--port must be between 0 and 65535, got {args.port}")
    return args


def broadcast_message(message: dict | None, group) -> dict:
    """The group's first rank's message to every rank of it, as JSON bytes (never a pickle): replicas.send."""
    return message if group is None else send(message, group, 0)


def agree(status: int, group) -> int:
    """The worst outcome over every rank, so that all of them take the same next step."""
    if group is None:
        return status
    worst = torch.tensor([status])
    dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)
    return int(worst)


def run_job(pipe, batch: list[dict], jobs: list[Job] | None, group, device: torch.device) -> None:
    """Every rank runs one pipeline call on the requests of `batch`; rank 0 (which holds their `jobs`)
    resolves them. Each request's noise is its own seed's (get_noise(1, ...)), so its image is the one it
    gets alone, up to the rounding of a batched product.

    An ordinary error, raised on every rank at the same point or on one rank after its last collective,
    fails this batch only. An error inside a collective (a timeout, a rank gone) leaves the ranks out of
    step: then every rank raises, and the job ends non-zero. (An ordinary error on one rank while the
    others wait in a collective becomes such a timeout.)"""
    reset_peak_memory(device)
    if jobs:
        pipe.progress = lambda done, total: [job.on_progress(done, total) for job in jobs]
    start, status, problem = time.perf_counter(), OK, ""
    try:
        if batch[0].get("loras") is not None:  # the batch's adapter scales (its requests agree on them), every rank
            pipe.set_lora_scales(dict(batch[0]["loras"]))
        images = pipe(**batch_call(batch, pipe.kind, pipe.parallel.data_degree), output_type="pt")
    except Exception as err:  # noqa: BLE001 - reported to the client as a 500, the traceback to stderr
        traceback.print_exc()
        status = FATAL if isinstance(err, dist.DistError) else FAILED
        problem = ": ".join([type(err).__name__, *str(err).splitlines()[:1]])
    finally:
        pipe.progress = None  # these jobs' progress ends with their call
    total_s = time.perf_counter() - start
    status = agree(status, group)
    for i, job in enumerate(jobs or []):
        answer(job, status, problem, images[i] if status == OK else None, pipe.last_run, total_s, device, len(jobs))
    if status == FATAL:
        raise RuntimeError("a rank failed inside a collective: the ranks are out of step, so the job ends")


def batch_call(batch: list[dict], kind: str, replicas: int = 1) -> dict:
    """The requests of one batch (they agree on all but prompts and seeds, an edit's image included) -> one
    call's keyword arguments, for a transformer of `kind`. The pipeline splits the batch over the data-
    parallel `replicas`; a batch smaller than that is padded with copies of its last request (their images
    are made and dropped) so that every replica has an image to make."""
    batch = batch + [batch[-1]] * (replicas - len(batch))
    first = batch[0]
    noise = torch.cat([get_noise(1, first["height"], first["width"], p["seed"]) for p in batch])
    negatives = [p["negative_prompt"] for p in batch] if first["negative_prompt"] is not None else None
    shared = {k: v for k, v in first.items() if k not in ("prompt", "negative_prompt", "seed", "loras", *EDIT_PARAMS)}
    images = edit_arguments(first, kind) if "image_b64" in first else {}
    return {**shared, **images, "prompt": [p["prompt"] for p in batch], "negative_prompt": negatives,
            "latents": noise}


def answer(job: Job, status: int, problem: str, image, run: dict, total_s: float, device, batch_size: int) -> None:
    if status == FATAL:  # a rank of this replica is gone or out of step
        job.fail(503, f"the generation failed: a rank failed inside a collective ({problem or 'see its log'})")
        return
    if status != OK:
        job.fail(500, f"the generation failed: {problem or 'on another rank (see its log)'}")
        return
    stages = {"queue_s": time.perf_counter() - job.arrived - total_s, "text_encoding_s": run["text_encoding_s"],
              "steps_s": run["steps_s"], "denoise_s": sum(run["steps_s"]), "vae_decode_s": run.get("vae_decode_s"),
              "total_s": total_s}
    params = job.params
    job.finish(image=image, width=params["width"], height=params["height"], seed=params["seed"],
               steps=run["num_steps"], guidance=run["guidance"], max_sequence_length=run["max_sequence_length"],
               stages=stages, peak_memory_bytes=peak_memory_bytes(device), batch_size=batch_size)


def next_message(jobs: JobQueue, heartbeat_s: float) -> tuple[list[Job], dict]:
    """A replica's leader: the next batch's message, a heartbeat after `heartbeat_s` without one, or stop."""
    batch = jobs.take(heartbeat_s) if jobs.accepting else []
    if batch:
        return batch, {"kind": "job", "batch": [job.params for job in batch]}
    if not jobs.accepting:
        jobs.close(503, "the service is shutting down: this request was not started")
        return [], {"kind": "stop"}
    return [], {"kind": "heartbeat"}


def serve_ranks(pipe, jobs, group, device: torch.device, heartbeat_s: float, status: dict | None = None) -> None:
    """Every rank of one replica: act on its leader's messages, in order, until it says stop. `jobs` only on the
    leader: the JobQueue on rank 0, the link to rank 0 elsewhere (replicas.FromRankZero). `status`: the
    replica's /health entry, on rank 0."""
    while True:
        batch, message = next_message(jobs, heartbeat_s) if jobs is not None else ([], None)
        message = broadcast_message(message, group)
        if message["kind"] == "stop":
            return
        if message["kind"] == "job":
            if jobs is not None:
                jobs.current = batch
            if status is not None:
                status["running"] = len(batch)
            run_job(pipe, message["batch"], batch if jobs is not None else None, group, device)
            if jobs is not None:
                jobs.current = []
            if status is not None:
                status.update(running=0, batches=status["batches"] + 1)


def start_http(app, host: str, port: int):
    """uvicorn on a thread of its own (it then leaves the signals to us); returns (server, thread, port)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, name="http", daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.02)
    if not server.started:
        return server, thread, None
    return server, thread, server.servers[0].sockets[0].getsockname()[1]


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        pipe, ctx, device, load_s = build_pipeline(args)
    except CheckpointError as err:  # a file's fault
        print(f"serve.py: error: {err}", file=sys.stderr)
        return 1
    except ValueError as err:  # the command line's fault
        print(f"serve.py: error: {err}", file=sys.stderr)
        return 2
    timeout = datetime.timedelta(seconds=args.timeout)
    # the control messages go over gloo on every backend (NCCL would need a GPU tensor and a sync per message)
    group, links = (control_groups(ctx, timeout) if ctx.is_distributed else (None, {}))
    if ctx.data_degree > 1:
        run_replicas_apart(pipe)  # each replica runs its own batches (flux_parallel/serve/replicas.py)
    if ctx.is_main:
        code = serve_main_rank(args, pipe, ctx, group, links, device, load_s)
    elif dist.get_rank() in links:
        code = serve_other_rank(args, pipe, group, device, FromRankZero(links[dist.get_rank()]))
    else:
        code = serve_other_rank(args, pipe, group, device)
    # now, not at exit, where gloo's threads would abort the interpreter. No barrier of the whole job (a failed
    # replica's ranks are gone): each rank that stopped cleanly has met its peers at finish() already
    close_distributed(wait=False)
    return code


def finish(*groups) -> None:
    """Meet the peers of each group at a barrier after the stop message, so that no rank tears down a group
    under a peer still in its last collective."""
    for group in groups:
        if group is not None:
            dist.barrier(group=group)


def serve_other_rank(args, pipe, group, device: torch.device, leader: FromRankZero | None = None) -> int:
    """A rank other than 0; `leader`: its link to rank 0 when it leads a replica other than the first."""
    # only rank 0 decides when to stop: torchrun forwards a SIGTERM to every rank, and this one waits for rank 0's
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        serve_ranks(pipe, leader, group, device, args.heartbeat)
        finish(leader and leader.link, group)
    except RuntimeError as err:  # rank 0 or a peer is gone, or a collective timed out
        problem = str(err).splitlines()[0]
        under_torchrun = bool(os.environ.get("TORCHELASTIC_RUN_ID"))  # then see wait_for_the_stop
        what = "leaves its failed replica and idles until the job stops" if under_torchrun else "stops"
        print(f"serve.py: error: rank {dist.get_rank()} {what}: {problem}", file=sys.stderr)
        if leader is not None:
            leader.report_down(problem)
        return wait_for_the_stop() if under_torchrun else 1
    return 0


def wait_for_the_stop() -> int:
    """A rank of a failed replica under torchrun: exiting non-zero would make torchrun's agent end every rank,
    the live replicas' too, so it idles until the job is stopped (torchrun forwards SIGTERM and SIGINT to every
    rank), then exits 0. A rank that dies outright still ends the job: that is the agent's, not ours."""
    stopped = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopped.set())
    while not stopped.wait(1.0):
        pass
    return 0


def serve_main_rank(args, pipe, ctx, group, links: dict, device: torch.device, load_s: float) -> int:
    """Rank 0: the HTTP service, the rank loop of the first replica, and a relay thread per other replica."""
    jobs = JobQueue(args.max_queue, args.max_batch, args.batch_window_ms / 1000)
    replicas = replica_status(replica_ranks(ctx))
    info = {"model": args.model, "world_size": ctx.world_size, "data_parallel_degree": ctx.data_degree,
            "ulysses_degree": ctx.ulysses_degree, "ring_degree": ctx.ring_degree,
            "use_parallel_vae": args.use_parallel_vae, "load_s": load_s, "replicas": replicas}
    limits = Limits(args.max_prompt_length, args.max_size, args.max_steps, args.max_images, args.max_body_bytes)
    app = create_app(pipe, jobs, info, (args.height, args.width), limits, args.url_ttl, args.png_level)
    server, thread, port = start_http(app, args.host, args.port)
    if port is None:
        print(f"serve.py: error: cannot listen on {args.host}:{args.port} (see the message above)", file=sys.stderr)
        jobs.accepting = False
        broadcast_message({"kind": "stop"}, group)
        for link in links.values():
            send({"kind": "stop"}, link, 0)
        return 1

    def stop(signum, frame):  # only flags: the replicas finish their running batches, then stop
        jobs.accepting = False
        server.should_exit = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    relays = [threading.Thread(target=relay, args=(jobs, links[status["ranks"][0]], status, replicas, args.heartbeat),
                               name=f"replica {status['replica']}", daemon=True) for status in replicas[1:]]
    for worker in relays:
        worker.start()
    print(f"serve.py: {args.model} (world {ctx.world_size}) on http://{args.host}:{port}", flush=True)
    try:
        serve_ranks(pipe, jobs, group, device, args.heartbeat, replicas[0])
        finish(group)
    except RuntimeError as err:  # a collective of the first replica failed: a rank is gone or timed out
        print(f"serve.py: error: rank 0 stops serving its replica: {str(err).splitlines()[0]}", file=sys.stderr)
        mark_down(replicas[0], replicas, jobs, jobs.current, err)
    for worker in relays:  # each returns after its replica's stop or failure (every wait of it has --timeout)
        worker.join()
    jobs.close(503, "the service stopped: every replica failed (a rank is gone)")  # whoever still waits
    server.should_exit = True
    thread.join(timeout=10)
    return 1 if all(r["state"] == "down" for r in replicas) else 0


if __name__ == "__main__":
    exit_process(main())

"""Spawning real gloo process groups for the multi-process tests.

    run_distributed(check_fn, world_size, *args)

starts `world_size` processes, each joining one gloo group over loopback with one thread, runs
`check_fn(rank, world_size, *args)` in each (a module-level function, so it can be pickled), and
re-raises the first rank's error in the test process. A collective that waits longer than the
group timeout raises, so a failing rank cannot hang the others.
"""

import datetime
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, timeout_s: float, fn, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout_s: float = 60.0) -> None:
    # forkserver with torch preloaded: each spawn then forks a warm interpreter instead of importing
    # torch again in every rank (seconds per rank on 2 cores)
    mp.set_forkserver_preload(["torch", "torch.distributed", "distributed"])
    mp.start_processes(
        _worker, args=(world_size, free_port(), timeout_s, fn, args), nprocs=world_size, join=True,
        start_method="forkserver",
    )

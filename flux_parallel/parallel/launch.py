"""Local gloo process groups on this machine: the multi-process tests, the benchmarks and the planner's probe.

    run_distributed(check_fn, world_size, *args)

starts `world_size` processes, each joining one gloo group over loopback with one thread, runs
`check_fn(rank, world_size, *args)` in each (a module-level function, so it can be pickled), and
raises in the test process if any rank failed.

Three rules keep a run free of races:
- The rendezvous store lives in the test process, not in rank 0: a rank that finishes (or dies)
  early cannot take the store down while another rank still builds its groups with it.
- A rank that succeeds waits at a barrier before it destroys its group, so no rank tears the group
  down while another still uses it.
- When ranks fail, the error reported is the one raised first (each rank records the time of its
  error): a rank that fails on purpose is reported, not the peer whose collective broke because of
  it. A collective that waits longer than the group timeout raises, so no failure hangs the others.
"""

import datetime
import json
import socket
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flux_parallel.parallel.context import close_distributed, exit_process

GRACE_S = 10.0  # after the first failure, how long the other ranks get to report their own error


def _worker(rank: int, world_size: int, port: int, timeout_s: float, error_dir: str, fn, args) -> None:
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)
    try:
        fn(rank, world_size, *args)
        dist.barrier()  # every rank is done with the group before any rank destroys it
    except BaseException:
        error = {"time": time.monotonic(), "traceback": traceback.format_exc()}
        Path(error_dir, f"rank{rank}.json").write_text(json.dumps(error))
        raise
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout_s: float = 60.0) -> None:
    # the store's server runs in this process for the whole run (port 0: the OS picks a free one)
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=timeout_s))
    # forkserver with torch preloaded: each spawn then forks a warm interpreter instead of importing
    # torch again in every rank (seconds per rank on 2 cores)
    mp.set_forkserver_preload(["torch", "torch.distributed", "flux_parallel.parallel.launch"])
    with tempfile.TemporaryDirectory() as error_dir:
        context = mp.start_processes(
            _worker, args=(world_size, store.port, timeout_s, error_dir, fn, args), nprocs=world_size, join=False,
            start_method="forkserver",
        )
        _wait(context.processes, deadline=time.monotonic() + 3 * timeout_s + 60)
        _raise_first_error(context.processes, Path(error_dir))
    del store


def _wait(processes, deadline: float) -> None:
    """Join every rank; once one has failed, the others get GRACE_S before they are terminated."""
    failed_at = None
    while any(p.is_alive() for p in processes):
        now = time.monotonic()
        if failed_at is None and any(p.exitcode not in (None, 0) for p in processes):
            failed_at = now
        if now > deadline or (failed_at is not None and now > failed_at + GRACE_S):
            for p in processes:
                if p.is_alive():
                    p.terminate()
            break
        time.sleep(0.02)
    for p in processes:
        p.join()


def _raise_first_error(processes, error_dir: Path) -> None:
    errors = {int(f.stem[4:]): json.loads(f.read_text()) for f in error_dir.glob("rank*.json")}
    exits = {rank: p.exitcode for rank, p in enumerate(processes) if p.exitcode != 0}
    if not errors and not exits:
        return
    others = ", ".join(f"rank {r} exit code {code}" for r, code in exits.items())
    if not errors:
        raise RuntimeError(f"ranks failed without raising (a signal or a timeout): {others}")
    first = min(errors, key=lambda r: errors[r]["time"])
    raise RuntimeError(f"rank {first} failed first ({others}):\n{errors[first]['traceback']}")


def spawn(worker, nprocs: int, *args) -> None:
    """mp.spawn: `worker(rank, *args)` in `nprocs` fresh processes, which then leave the process group at a
    barrier and end through context.exit_process (a spawned interpreter's teardown sometimes
    lets gloo's threads abort a rank whose work is done). The worker joins the group itself."""
    mp.spawn(_run_then_exit, args=(worker, args), nprocs=nprocs, join=True)


def _run_then_exit(rank: int, worker, args) -> None:
    worker(rank, *args)
    close_distributed()
    exit_process(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

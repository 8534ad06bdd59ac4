"""What several tools share: spawning gloo ranks, a free port, memory reads, random transformer inputs.

The tools import the project as an installed package (`pip install -e .`, as the README sets up)
and each other from this folder, which Python puts first on the path of `python tools/x.py`.
"""

import resource
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

from flux.configs import FluxParams
from flux.sampling import make_img_ids
from parallel.context import close_distributed, exit_process


def spawn(worker, nprocs: int, *args) -> None:
    """mp.spawn: `worker(rank, *args)` in `nprocs` fresh processes, which then leave the process group at a
    barrier and end through parallel/context.exit_process (a spawned interpreter's teardown sometimes
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


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: the allocator's peak. CPU: this process's peak RSS, VmHWM (which reset_peak_memory
    lowers); not ru_maxrss, which a child started by subprocess inherits from its parent."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = _proc_status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # macOS: bytes


def resident_bytes() -> int | None:
    """This process's resident set now (Linux's VmRSS); None where /proc is absent."""
    return _proc_status_bytes("VmRSS")


def _proc_status_bytes(field: str) -> int | None:
    status = Path("/proc/self/status")
    if not status.is_file():
        return None
    return next(int(line.split()[1]) * 1024 for line in status.read_text().splitlines() if line.startswith(field))


def reset_peak_memory(device: torch.device) -> None:
    """Make the next peak a case's own. CPU: Linux's clear_refs 5 resets the RSS high-water mark,
    VmHWM (proc(5)); elsewhere the peak counts from the start of the process."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def flux_inputs(params: FluxParams, grid: tuple[int, int], txt_tokens: int, batch: int = 1,
                seed: int | None = None) -> dict:
    """Random inputs of Flux.forward: a grid[0] x grid[1] grid of image tokens (16 px each),
    txt_tokens text tokens, guidance when the model has the embedding. `seed` fixes the values
    without touching the global generator."""
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    img_ids = make_img_ids(batch, 16 * grid[0], 16 * grid[1])
    return dict(
        img=torch.randn(batch, img_ids.shape[1], params.in_channels, generator=gen),
        img_ids=img_ids,
        txt=torch.randn(batch, txt_tokens, params.context_in_dim, generator=gen),
        txt_ids=torch.zeros(batch, txt_tokens, 3),
        timesteps=torch.rand(batch, generator=gen),
        y=torch.randn(batch, params.vec_in_dim, generator=gen),
        guidance=torch.full((batch,), 3.5) if params.guidance_embed else None,
    )

"""What several tools share: a free port, the peak-memory read and reset, random transformer inputs.

The tools import the project as an installed package (`pip install -e .`, as the README sets up)
and each other from this folder, which Python puts first on the path of `python tools/x.py`.
"""

import resource
import socket
from pathlib import Path

import torch

from flux.configs import FluxParams
from flux.sampling import make_img_ids


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: the allocator's peak. CPU: this process's peak RSS, VmHWM (which reset_peak_memory
    lowers); not ru_maxrss, which a child started by subprocess inherits from its parent."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    status = Path("/proc/self/status")
    if status.is_file():
        return next(int(line.split()[1]) * 1024 for line in status.read_text().splitlines() if line.startswith("VmHWM"))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # macOS reports bytes


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

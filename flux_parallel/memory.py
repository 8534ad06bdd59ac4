"""Memory reads for reports: the peak of a device since the last reset, and this process's resident set."""

import resource
from pathlib import Path

import torch


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

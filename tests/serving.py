"""tools/serve.py's API and rank loop inside the test process, on threads, over loopback."""

import threading
from pathlib import Path

import httpx
import serve
import torch

from flux_parallel.flux.pipeline import FluxPipeline
from flux_parallel.serve.app import JobQueue, create_app
from flux_parallel.serve.request import Limits

ROOT = Path(__file__).resolve().parents[1]


class Service:
    """The API and the rank loop of one process, on threads; the rank loop starts on demand."""

    def __init__(self, pipe: FluxPipeline, size: tuple[int, int], limits: Limits, max_queue: int = 16,
                 max_batch: int = 1, window_s: float = 0.0, loras: dict[str, Path] | None = None):
        for name, path in (loras or {}).items():  # as tools/serve.py --lora NAME=PATH
            pipe.load_lora(path, name)
        self.pipe, self.jobs = pipe, JobQueue(max_queue, max_batch, window_s)
        app = create_app(pipe, self.jobs, {"model": "tiny", "world_size": 1}, size, limits)
        self.server, self.http, port = serve.start_http(app, "127.0.0.1", 0)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
        self.ranks = None

    def start_ranks(self) -> None:
        args = (self.pipe, self.jobs, None, torch.device("cpu"), 0.05)  # no process group: one rank
        self.ranks = threading.Thread(target=serve.serve_ranks, args=args)
        self.ranks.start()

    def close(self) -> None:
        self.jobs.accepting = False
        if self.ranks is not None:
            self.ranks.join(timeout=30)
        self.server.should_exit = True
        self.http.join(timeout=10)
        self.client.close()

"""The real `tools/serve.py` command over loopback: one process, two ranks under torchrun, SIGTERM, a rank dying."""

import io
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import serve
import torch
import torch.distributed as dist
from helpers import rel_err
from PIL import Image

from flux_parallel.flux.pipeline import FluxPipeline
from flux_parallel.flux.sampling import get_noise
from flux_parallel.parallel.context import ParallelContext
from flux_parallel.parallel.launch import free_port, run_distributed
from flux_parallel.serve.app import JobQueue

ROOT = Path(__file__).resolve().parents[1]

SERVE = str(ROOT / "tools" / "serve.py")
TINY = ["--model", "tiny", "--port", "0", "--heartbeat", "0.5", "--timeout", "20"]


class Launched:
    """A started command whose rank 0 prints the address it serves on."""

    def __init__(self, cmd: list[str], tmp_path: Path, name: str = "serve", env: dict | None = None):
        self.out, self.err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=ROOT)
        self.client = None

    def wait_until_serving(self, timeout_s: float = 90) -> httpx.Client:
        deadline = time.monotonic() + timeout_s
        while "http://" not in self.out.read_text():
            assert self.proc.poll() is None, f"exited {self.proc.returncode}: {self.err.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"not serving after {timeout_s} s: {self.err.read_text()[-2000:]}"
            time.sleep(0.1)
        url = next(w for w in self.out.read_text().split() if w.startswith("http://"))
        self.client = httpx.Client(base_url=url, timeout=60)
        return self.client

    def wait(self, timeout_s: float = 30) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"still running {timeout_s} s later: {self.err.read_text()[-2000:]}") from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.client is not None:
            self.client.close()


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png))).astype(int)


def generate(client: httpx.Client, **fields) -> httpx.Response:
    """POST /generate, with the seed as the request's id (X-Request-Id) when there is one."""
    headers = {"X-Request-Id": f"seed {fields['seed']}"} if "seed" in fields else {}
    return client.post("/generate", json={"prompt": "a red fox", **fields}, headers=headers)


def test_one_process_equals_generate_py_and_stops_cleanly_on_sigterm(tmp_path):
    """The PNG equals generate.py's for the same arguments; SIGTERM finishes the running request, answers the
    queued one 503, and exits 0."""
    served = Launched([sys.executable, SERVE, *TINY], tmp_path)
    try:
        client = served.wait_until_serving()
        reply = generate(client, height=64, width=48, steps=2, seed=3, max_sequence_length=16)
        assert reply.status_code == 200, reply.text
        out = tmp_path / "generate.png"
        # as a command too, so both processes run with the same intra-op threads (1 and 2 threads round a
        # pixel of this image differently)
        subprocess.run([sys.executable, str(ROOT / "tools" / "generate.py"), "--model", "tiny", "--prompt", "a red fox",
                        "--height", "64", "--width", "48", "--steps", "2", "--seed", "3", "--max-sequence-length", "16",
                        "--output", str(out)], check=True, capture_output=True, timeout=120)
        assert np.array_equal(pixels(reply.content), pixels(out.read_bytes()))  # serve.py stores them unzipped

        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(generate, client, height=64, width=64, steps=100, max_sequence_length=16)
            wait_for(lambda: client.get("/health").json()["running"])
            queued = pool.submit(generate, client, height=32, width=32, steps=2)
            wait_for(lambda: client.get("/health").json()["queued"] == 1)
            served.proc.send_signal(signal.SIGTERM)
            assert running.result().status_code == 200
            assert queued.result().status_code == 503
            assert "shutting down" in queued.result().json()["error"]
        assert served.wait() == 0, served.err.read_text()[-3000:]
    finally:
        served.close()


def test_two_replicas_run_apart_and_a_failed_replica_leaves_the_other_serving(tmp_path):
    """Four ranks started by hand (torchrun stops every worker once one dies, by design), in torchrun's
    environment: data parallel 2 x Ulysses 2. Both replicas take batches from the one queue, each on its own,
    and every image equals the one-process image of its seed. Then a rank of replica 1 dies during a request:
    that request gets an OpenAI-shaped 503, /health says replica 1 is down, replica 0 goes on answering, the
    replica's other rank idles (it does not exit non-zero, which would make torchrun end every rank), and
    SIGTERM ends every live rank with status 0."""
    ranks = launch_ranks(tmp_path, 4, "--data-parallel-degree", "2", "--ulysses-degree", "2", "--max-batch", "2",
                         "--batch-window-ms", "200", env={"TORCHELASTIC_RUN_ID": "test"})
    try:
        client = ranks[0].wait_until_serving(timeout_s=180)
        with ThreadPoolExecutor(7) as pool:  # a long request keeps one replica busy; six short ones go to the other
            busy = pool.submit(generate, client, height=64, width=64, steps=30, seed=7, max_sequence_length=16)
            wait_for(lambda: sum(running(client)) == 1)
            replies = list(pool.map(lambda s: generate(client, height=32, width=32, steps=2, seed=s,
                                                       max_sequence_length=16), range(6)))
            replies.append(busy.result())
        assert [r.status_code for r in replies] == [200] * 7
        assert max(int(r.headers["x-batch-size"]) for r in replies) == 2
        replicas = client.get("/health").json()["replicas"]
        assert [(r["state"], r["ranks"]) for r in replicas] == [("up", [0, 1]), ("up", [2, 3])]
        assert min(r["batches"] for r in replicas) >= 1  # both made images: checked below
        pipe = FluxPipeline.tiny()
        for seed, reply in [*enumerate(replies[:6]), (7, replies[6])]:
            size, steps = (64, 30) if seed == 7 else (32, 2)
            progress = client.get("/progress", params={"id": f"seed {seed}"}).json()  # steps relayed too
            assert progress == {"state": "done", "step": steps, "steps": steps}
            expected = pipe("a red fox", height=size, width=size, num_steps=steps, seed=seed, max_sequence_length=16,
                            output_type="pt")[0]
            one = (expected * 255).round().permute(1, 2, 0).numpy().astype(int)
            assert np.abs(pixels(reply.content) - one).max() <= 1, f"seed {seed}"  # 8-bit rounding, as below

        long = {"prompt": "a red fox", "size": "64x64", "num_inference_steps": 30, "seed": 1}
        with ThreadPoolExecutor(2) as pool:  # one long request on each replica
            pending = [pool.submit(client.post, "/v1/images/generations", json=long)]
            wait_for(lambda: sum(running(client)) == 1)
            pending.append(pool.submit(client.post, "/v1/images/generations", json=long))
            wait_for(lambda: all(running(client)))
            ranks[3].proc.kill()
            answers = sorted((f.result().status_code, f.result().json()) for f in pending)
        assert [status for status, _ in answers] == [200, 503]
        assert set(answers[1][1]["error"]) == {"message", "type", "param", "code"}
        assert "replica 1 failed" in answers[1][1]["error"]["message"]
        replicas = client.get("/health").json()["replicas"]
        assert [r["state"] for r in replicas] == ["up", "down"]
        wait_for(lambda: "idles until the job stops" in ranks[2].err.read_text())
        assert ranks[2].proc.poll() is None  # the leader saw its peer's death, reported it, and idles
        again = generate(client, height=32, width=32, steps=2, seed=2, max_sequence_length=16)
        assert np.abs(pixels(again.content) - pixels(replies[2].content)).max() <= 1  # alone, or batched before
        for rank in (0, 2):  # as torchrun passes a SIGTERM on to every rank
            ranks[rank].proc.send_signal(signal.SIGTERM)
        for rank in (0, 1, 2):
            assert ranks[rank].wait(30) == 0, ranks[rank].err.read_text()[-3000:]
    finally:
        for launched in ranks:
            launched.close()


def test_two_ranks_serve_concurrent_requests_exactly(tmp_path):
    """torchrun, Ulysses 2 and the parallel VAE: 8 concurrent requests, each equal to the one-process image of its
    seed; a bad request is refused on rank 0; SIGTERM to every rank ends the job with status 0."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", SERVE, *TINY,
           "--ulysses-degree", "2", "--use-parallel-vae"]
    served = Launched(cmd, tmp_path)
    try:
        client = served.wait_until_serving()
        assert client.get("/health").json()["world_size"] == 2
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda s: generate(client, height=48, width=64, steps=2, seed=s,
                                                       max_sequence_length=16), range(8)))
        assert [r.status_code for r in replies] == [200] * 8
        pipe = FluxPipeline.tiny()
        for seed, reply in enumerate(replies):
            expected = pipe("a red fox", height=48, width=64, num_steps=2, seed=seed, max_sequence_length=16,
                            output_type="pt")[0]
            # the float images agree to ~1e-6; 8-bit rounding can move a value sitting on a .5 boundary by one
            one = (expected * 255).round().permute(1, 2, 0).numpy().astype(int)
            assert np.abs(pixels(reply.content) - one).max() <= 1, f"seed {seed}"
        # one image token cannot be split over 2 ranks: the pipeline's own check, run on rank 0 before any broadcast
        bad = generate(client, height=16, width=16)
        assert bad.status_code == 400
        assert bad.json()["error"] == "1 image tokens cannot be split over a sequence-parallel group of 2 ranks"
        assert client.get("/health").json()["status"] == "ok"
        for rank in child_pids(served.proc.pid):  # as torchrun forwards a SIGTERM: to every rank
            os.kill(rank, signal.SIGTERM)
        assert served.wait() == 0, served.err.read_text()[-3000:]
    finally:
        served.close()


@pytest.mark.parametrize("victim", [0, 1])
def test_a_dead_rank_ends_the_job(tmp_path, victim):
    """Two ranks started by hand (no torchrun to clean up): when one is killed, the other notices at its next
    collective (rank 0's heartbeat or broadcast) and exits non-zero within seconds, never a hung service."""
    ranks = launch_ranks(tmp_path, 2, "--ulysses-degree", "2")
    try:
        client = ranks[0].wait_until_serving()
        assert generate(client, height=32, width=32, steps=1).status_code == 200
        ranks[victim].proc.kill()
        survivor = ranks[1 - victim]
        assert survivor.wait(timeout_s=25) != 0
        assert "stops" in survivor.err.read_text()
    finally:
        for launched in ranks:
            launched.close()


def running(client: httpx.Client) -> list[int]:
    """The requests each replica runs now, from /health."""
    return [r["running"] for r in client.get("/health").json()["replicas"]]


def launch_ranks(tmp_path: Path, world: int, *flags: str, env: dict | None = None) -> list[Launched]:
    """serve.py's `world` ranks started by hand, as torchrun would start them but with nothing watching them."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world),
           "LOCAL_WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1", **(env or {})}
    return [Launched([sys.executable, SERVE, *TINY, *flags], tmp_path, f"rank{r}",
                     {**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(world)]


def child_pids(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children]


def wait_for(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)



class Flaky:
    """A pipeline that raises for the seeds in `before` (before any collective) and in `after` (after the
    last one), the way out-of-memory errors and bugs do."""

    def __init__(self, pipe: FluxPipeline, rank: int, before: set, after: set):
        self.pipe, self.rank, self.before, self.after = pipe, rank, before, after

    def __call__(self, **kwargs):
        # the rank loop hands the pipeline each request's seed as its noise (one request per batch here)
        seed = next(s for s in range(3) if torch.equal(kwargs["latents"], get_noise(1, 32, 32, s)))
        if seed in self.before:
            raise RuntimeError(f"boom on rank {self.rank}")
        images = self.pipe(**kwargs)
        if seed in self.after:
            raise RuntimeError(f"boom on rank {self.rank}")
        return images

    last_run = property(lambda self: self.pipe.last_run)
    kind = property(lambda self: self.pipe.kind)
    parallel = property(lambda self: self.pipe.parallel)
    progress = property(lambda self: self.pipe.progress, lambda self, f: setattr(self.pipe, "progress", f))


def _failing_requests(rank: int, world_size: int, expected: torch.Tensor) -> None:
    """Rank loop of two ranks, three requests: seed 0 fails on both ranks, seed 1 on rank 1 only (after the
    last collective), seed 2 succeeds. The ranks agree on each outcome and go on to the next."""
    ctx = ParallelContext(ulysses_degree=2)
    pipe = Flaky(FluxPipeline.tiny(parallel=ctx), rank, before={0}, after={1} if rank == 1 else set())
    group = dist.new_group(backend="gloo")
    if rank != 0:
        serve.serve_ranks(pipe, None, group, torch.device("cpu"), 0.05)
        return
    jobs = JobQueue(4)
    params = [request(seed) for seed in range(3)]
    submitted = [jobs.submit(p, None) for p in params]
    submitted[-1].outcome.add_done_callback(lambda _: setattr(jobs, "accepting", False))
    serve.serve_ranks(pipe, jobs, group, torch.device("cpu"), 0.05)
    outcomes = [job.outcome.result() for job in submitted]
    assert outcomes[0] == {"status": 500, "error": "the generation failed: RuntimeError: boom on rank 0"}
    assert outcomes[1] == {"status": 500, "error": "the generation failed: on another rank (see its log)"}
    assert rel_err(outcomes[2]["image"], expected) <= 1e-5  # fp32 rounding of the sharded attention
    assert (jobs.served, jobs.failed) == (1, 2)


def request(seed: int) -> dict:
    return dict(prompt="a red fox", negative_prompt=None, true_cfg_scale=1.0, height=32, width=32, num_steps=2,
                guidance=None, seed=seed, max_sequence_length=16)


def test_ranks_agree_on_a_failed_request_and_go_on():
    expected = FluxPipeline.tiny()(output_type="pt", **request(2))[0]
    run_distributed(_failing_requests, 2, expected)

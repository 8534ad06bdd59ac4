"""Batching in tools/serve.py: requests that agree on size, steps and guidance run as one pipeline call, and
each image is the one its request gets alone (its own seed's noise)."""

import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from serving import Service, serve

from flux_parallel.flux.pipeline import FluxPipeline
from flux_parallel.serve.app import JobQueue, batch_key
from flux_parallel.serve.request import Limits

PIL = pytest.importorskip("PIL.Image", reason="decoding the PNGs needs Pillow (diffusers brings it)")


@pytest.fixture(scope="module")
def pipe():
    return FluxPipeline.tiny()


def request(seed: int, prompt: str = "a red circle on a blue background", height: int = 32, width: int = 32,
            **extra) -> dict:
    return {**dict(prompt=prompt, negative_prompt=None, true_cfg_scale=1.0, height=height, width=width, num_steps=2,
                   guidance=None, seed=seed, max_sequence_length=16), **extra}


def alone(pipe, params: dict) -> torch.Tensor:
    return pipe(output_type="pt", **params)[0]


def test_a_batch_equals_each_request_alone(pipe):
    jobs = JobQueue(8, max_batch=4)
    prompts = ["a red circle on a blue background", "a green square on a white background"]
    params = [request(seed, prompts[seed % 2]) for seed in (3, 0, 7, 1)]
    jobs.submit_all(params, None)
    batch = jobs.take(0.1)
    assert [job.params["seed"] for job in batch] == [3, 0, 7, 1] and jobs.largest_batch == 4
    serve.run_job(pipe, [job.params for job in batch], batch, None, torch.device("cpu"))
    for job, p in zip(batch, params):
        outcome = job.outcome.result()
        assert outcome["batch_size"] == 4
        # fp32: a batched product rounds differently from a single one, nothing more
        torch.testing.assert_close(outcome["image"], alone(pipe, p), rtol=1e-5, atol=1e-5)


def test_only_compatible_requests_share_a_batch():
    jobs = JobQueue(8, max_batch=3)
    params = [request(0), request(1, height=48), request(2), request(3, negative_prompt="blurry", true_cfg_scale=2.0),
              request(4), request(5)]
    jobs.submit_all(params, None)
    assert [j.params["seed"] for j in jobs.take(0.1)] == [0, 2, 4]  # same size; at most 3
    assert [j.params["seed"] for j in jobs.take(0.1)] == [1]
    assert [j.params["seed"] for j in jobs.take(0.1)] == [3]  # true CFG runs another forward
    assert [j.params["seed"] for j in jobs.take(0.1)] == [5]
    assert batch_key(request(0)) == batch_key(request(9, prompt="other")) != batch_key(request(0, width=48))


def test_replicas_waiting_for_work_share_the_queued_jobs():
    """Two replicas wait in take() when four compatible jobs come at once: each takes two (one batch of four
    would leave the other replica idle). The first takes its share without waiting for company; the last idle
    one waits its window as a lone replica does."""
    jobs = JobQueue(8, max_batch=8, window_s=0.05)
    with ThreadPoolExecutor(2) as pool:
        takers = [pool.submit(jobs.take, 5.0) for _ in range(2)]
        deadline = time.monotonic() + 5
        while jobs._idle < 2 and time.monotonic() < deadline:
            time.sleep(0.001)
        jobs.submit_all([request(seed) for seed in range(4)], None)
        batches = sorted([j.params["seed"] for j in taker.result()] for taker in takers)
    assert batches == [[0, 1], [2, 3]]


def decode(png: bytes) -> torch.Tensor:
    return torch.tensor(list(PIL.open(io.BytesIO(png)).convert("RGB").getdata()), dtype=torch.float32) / 255


def test_sixteen_concurrent_requests_batch_and_each_equals_its_image_alone(pipe):
    service = Service(pipe, (32, 32), Limits(), max_queue=16, max_batch=4, window_s=0.2)
    service.start_ranks()
    sizes = [(32, 32), (48, 32)]
    bodies = [{"prompt": "a red circle on a blue background", "steps": 2, "seed": seed,
               "height": sizes[seed % 2][0], "width": sizes[seed % 2][1]} for seed in range(16)]
    try:
        with ThreadPoolExecutor(16) as pool:
            replies = list(pool.map(lambda b: service.client.post("/generate", content=json.dumps(b).encode()),
                                    bodies))
        health = service.client.get("/health").json()
    finally:
        service.close()
    assert [r.status_code for r in replies] == [200] * 16  # none lost
    batch_sizes = [int(r.headers["x-batch-size"]) for r in replies]
    assert max(batch_sizes) >= 2 and health["largest_batch"] == max(batch_sizes) <= 4
    for body, reply in zip(bodies, replies):
        expected = alone(pipe, request(body["seed"], height=body["height"], width=body["width"]))
        expected = expected.permute(1, 2, 0).reshape(-1, 3)
        # the float images agree to ~1e-6 (test above); 8-bit rounding can move a value on a .5 boundary by one
        assert (decode(reply.content) - (expected * 255).round() / 255).abs().max() <= 1 / 255 + 1e-6, body

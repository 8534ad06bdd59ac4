"""tools/serve.py in-process over loopback: images, concurrency, the queue, every bad request, failures.

uvicorn and the rank loop run on threads of the test process, around one tiny pipeline; the expected
images come from calling that pipeline directly. tests/test_serve_ranks.py starts the real command.
"""

import base64
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serving import Service, serve

from flux_parallel.flux.images import encode_png
from flux_parallel.flux.pipeline import FluxPipeline
from flux_parallel.serve.request import Limits

SIZE = (64, 48)  # (height, width) of requests without one: small, and not square, to catch a swap
LIMITS = Limits(max_prompt_length=100)


@pytest.fixture(scope="module")
def pipe():
    return FluxPipeline.tiny()  # what `--model tiny` loads


@pytest.fixture(scope="module")
def service(pipe):
    running = Service(pipe, SIZE, LIMITS)
    running.start_ranks()
    yield running
    running.close()


def expected_png(pipe, seed: int, prompt: str = "a red fox", steps: int = 2) -> bytes:
    image = pipe(prompt, height=SIZE[0], width=SIZE[1], num_steps=steps, seed=seed, output_type="pt")[0]
    return encode_png(image)


def post(client: httpx.Client, body, request_id: str | None = None, **headers) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    if request_id is not None:
        headers["X-Request-Id"] = request_id
    return client.post("/generate", content=content, headers=headers)


def test_concurrent_requests_each_get_their_own_seed(service, pipe):
    """8 clients at once: every request answered, each with its own seed's image (none lost or swapped)."""
    expected = {seed: expected_png(pipe, seed) for seed in range(8)}
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda s: post(service.client, {"prompt": "a red fox", "steps": 2, "seed": s}),
                                range(8)))
    assert [r.status_code for r in replies] == [200] * 8
    for seed, reply in enumerate(replies):
        assert reply.headers["content-type"] == "image/png"
        assert reply.content == expected[seed], f"seed {seed}"
        assert json.loads(reply.headers["x-report"])["seed"] == seed
    assert len(set(expected.values())) == 8  # the seeds do give different images


def test_json_reply_has_the_image_timings_and_memory(service, pipe):
    reply = post(service.client, {"prompt": "a red fox", "steps": 3, "seed": 5, "height": 32, "width": 80},
                 Accept="application/json")
    assert reply.status_code == 200
    body = reply.json()
    png = base64.b64decode(body["image_png_base64"])
    assert png == encode_png(pipe("a red fox", height=32, width=80, num_steps=3, seed=5, output_type="pt")[0])
    assert (body["width"], body["height"], body["steps"], body["seed"]) == (80, 32, 3, 5)
    stages = body["stages"]
    assert len(stages["steps_s"]) == 3 and stages["queue_s"] >= 0
    assert all(stages[k] > 0 for k in ("text_encoding_s", "denoise_s", "vae_decode_s", "total_s"))
    assert body["peak_memory_bytes"] > 0


LONG = "x" * 101
BAD_REQUESTS = [
    (b'{"prompt": "a fox", ', "the request body is not valid JSON"),
    (b'["a fox"]', "the request body must be a JSON object"),
    ({"steps": 2}, "the field 'prompt' is required"),
    ({"prompt": "a fox", "colour": "red"}, "unknown field 'colour': the fields are prompt, negative_prompt"),
    ({"prompt": "  "}, "'prompt' is empty"),
    ({"prompt": LONG}, "'prompt' has 101 characters, more than the limit of 100 (--max-prompt-length)"),
    ({"prompt": 7}, "'prompt' must be a string, got 7"),
    ({"prompt": "a fox", "height": 100},
     "'height' 100 is not a multiple of 16: the nearest valid sizes are 96 and 112"),
    ({"prompt": "a fox", "width": 0}, "'width' 0 is not a multiple of 16"),
    ({"prompt": "a fox", "width": 4096}, "'width' must be between 16 and 2048 (--max-size), got 4096"),
    ({"prompt": "a fox", "steps": 0}, "'steps' must be between 1 and 100 (--max-steps), got 0"),
    ({"prompt": "a fox", "steps": "4"}, "'steps' must be an integer, got \"4\""),
    ({"prompt": "a fox", "steps": True}, "'steps' must be an integer, got true"),
    ({"prompt": "a fox", "steps": 2.5}, "'steps' must be an integer, got 2.5"),
    ({"prompt": "a fox", "seed": -1}, "'seed' must be between 0 and 9223372036854775807, got -1"),
    (b'{"prompt": "a fox", "guidance": NaN}', "'guidance' must be a number, got NaN"),
    ({"prompt": "a fox", "max_sequence_length": 9999}, "max_sequence_length 9999 is outside 1.."),
    ({"prompt": "a fox", "negative_prompt": 3}, "'negative_prompt' must be a string, got 3"),
    ({"prompt": "a fox", "negative_prompt": LONG}, "'negative_prompt' has 101 characters"),
    ({"prompt": "a fox", "true_cfg_scale": "high"}, "'true_cfg_scale' must be a number, got \"high\""),
    ({"prompt": "a fox", "true_cfg_scale": 0.5}, "'true_cfg_scale' must be at least 1"),
]


@pytest.mark.parametrize("body, sentence", BAD_REQUESTS)
def test_bad_request_gets_400_and_never_reaches_the_ranks(service, body, sentence):
    before = (service.jobs.served, service.jobs.failed)
    reply = post(service.client, body)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert sentence in error and "\n" not in error
    assert (service.jobs.served, service.jobs.failed, service.jobs.waiting) == (*before, 0)


def test_negative_prompt_runs_true_cfg(service, pipe):
    body = {"prompt": "a red fox", "negative_prompt": "blurry", "true_cfg_scale": 2.0, "steps": 2, "seed": 1}
    reply = post(service.client, body)
    assert reply.status_code == 200
    image = pipe("a red fox", negative_prompt="blurry", true_cfg_scale=2.0, height=SIZE[0], width=SIZE[1],
                 num_steps=2, seed=1, output_type="pt")[0]
    assert reply.content == encode_png(image)
    assert reply.content != expected_png(pipe, 1)  # the negative prompt changed the image


def test_failed_generation_gets_500_and_the_service_stays_up(service, pipe, monkeypatch):
    def out_of_memory(latents):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail on a second line")

    monkeypatch.setattr(pipe.vae, "decode", out_of_memory)
    failed_before = service.jobs.failed
    reply = post(service.client, {"prompt": "a red fox", "steps": 1})
    assert reply.status_code == 500
    assert reply.json()["error"] == ("the generation failed: RuntimeError: CUDA out of memory. "
                                     "Tried to allocate 2.00 GiB")
    monkeypatch.undo()
    health = service.client.get("/health").json()
    assert health["status"] == "ok" and health["failed"] == failed_before + 1
    reply = post(service.client, {"prompt": "a red fox", "steps": 2, "seed": 2})
    assert reply.status_code == 200 and reply.content == expected_png(pipe, 2)


def test_full_queue_gets_429_and_requests_run_in_arrival_order(pipe):
    service = Service(pipe, SIZE, LIMITS, max_queue=2)  # its rank loop starts late: the requests wait in the queue
    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(post, service.client, {"prompt": "a red fox", "steps": 2, "seed": 6}, "a")
            wait_for(lambda: service.jobs.waiting == 1)
            second = pool.submit(post, service.client, {"prompt": "a red fox", "steps": 2, "seed": 7}, "b")
            wait_for(lambda: service.jobs.waiting == 2)
            refused = post(service.client, {"prompt": "a red fox", "steps": 2})
            assert refused.status_code == 429
            assert refused.json()["error"] == ("the queue is full (2 requests waiting, --max-queue): "
                                               "try again when one has finished")
            assert service.client.get("/progress", params={"id": "b"}).json() == {"state": "queued", "position": 2}
            # the expected images first: the service's rank loop runs the same pipe object (and its progress hook)
            expected = [expected_png(pipe, 6), expected_png(pipe, 7)]
            service.start_ranks()
            assert [first.result().content, second.result().content] == expected
        done = service.client.get("/progress", params={"id": "b"}).json()
        assert done == {"state": "done", "step": 2, "steps": 2}
        assert service.client.get("/progress", params={"id": "zz"}).status_code == 404
        assert "X-Request-Id" in service.client.get("/progress").json()["error"]
    finally:
        service.close()


def test_page_is_served_without_outside_resources(service):
    page = service.client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for name in ("prompt", "negative_prompt", "width", "height", "steps", "seed", "true_cfg_scale", "generate",
                 "progress", "recent"):
        element = f'id="{name}"'
        assert element in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN: everything comes from the app


def wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--height", "100"], "--height 100 is not a multiple of 16"),
        (["--max-queue", "0"], "--max-queue must be at least 1, got 0"),
        (["--heartbeat", "0"], "--heartbeat must be above 0 and below --timeout (300.0), got 0.0"),
        (["--heartbeat", "400"], "--heartbeat must be above 0 and below --timeout"),
        (["--port", "70000"], "--port must be between 0 and 65535, got 70000"),
        (["--vae-stripes", "0"], "--vae-stripes must be at least 1"),  # generate.py's own checks apply too
        (["--max-batch", "0"], "--max-batch must be at least 1, got 0"),
        (["--max-images", "0"], "--max-images must be at least 1, got 0"),
        (["--batch-window-ms", "-1"], "--batch-window-ms must be between 0 and 10000, got -1.0"),
        (["--url-ttl", "0"], "--url-ttl must be above 0 seconds, got 0.0"),
    ],
)
def test_usage_errors_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        serve.parse_args(["--model", "tiny", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err

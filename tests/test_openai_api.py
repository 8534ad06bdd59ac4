"""The OpenAI Images API of tools/serve.py, driven by the official `openai` client and by hand: images equal
the pipeline's for the same prompt, size and seed; every bad field gets OpenAI's error shape, and the
service answers the next good request."""

import base64
import io
import json

import httpx
import pytest
import torch
from serving import Service

from flux_parallel.flux.images import encode_png
from flux_parallel.flux.pipeline import FluxPipeline
from flux_parallel.serve.request import Limits

openai = pytest.importorskip("openai", reason="needs the openai client: pip install -e '.[test]'")

SIZE = (64, 48)  # (height, width) of requests without a size
LIMITS = Limits(max_prompt_length=100, max_steps=8, max_images=4, max_body_bytes=2**16)
PROMPT = "a large yellow circle in the center on an orange background"


@pytest.fixture(scope="module")
def pipe():
    return FluxPipeline.tiny()


@pytest.fixture(scope="module")
def service(pipe):
    running = Service(pipe, SIZE, LIMITS, max_queue=6)
    running.start_ranks()
    yield running
    running.close()


@pytest.fixture(scope="module")
def client(service):
    return openai.OpenAI(base_url=f"{service.client.base_url}/v1", api_key="unused", max_retries=0)


def expected_png(pipe, seed: int, height: int = 64, width: int = 64, steps: int = 4) -> bytes:
    """What tools/generate.py writes for the same prompt, size, steps and seed (its defaults: 4 steps)."""
    image = pipe(PROMPT, height=height, width=width, num_steps=steps, seed=seed, output_type="pt")[0]
    return encode_png(image)


def test_the_openai_client_generates_b64_json(client, pipe):
    result = client.images.generate(model="tiny", prompt=PROMPT, size="64x64", response_format="b64_json",
                                    extra_body={"seed": 1})
    assert len(result.data) == 1 and result.created > 0
    assert base64.b64decode(result.data[0].b64_json) == expected_png(pipe, 1)


def test_n_images_use_seed_plus_i_and_url_responses_are_served(client, pipe, service):
    result = client.images.generate(model="tiny", prompt=PROMPT, n=3, size="48x64", response_format="url",
                                    extra_body={"seed": 5, "num_inference_steps": 2})
    urls = [d.url for d in result.data]
    assert len(urls) == 3 and all(u.startswith(f"{service.client.base_url}/v1/images/files/") for u in urls)
    for i, url in enumerate(urls):
        png = httpx.get(url).content
        assert png == expected_png(pipe, 5 + i, height=64, width=48, steps=2), f"image {i}"
    assert len(set(urls)) == 3 and httpx.get(urls[0] + "x").status_code == 404


def test_models_lists_the_loaded_model_and_an_omitted_model_means_it(client, service, pipe):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    reply = service.client.post("/v1/images/generations", json={"prompt": PROMPT, "seed": 2})
    assert reply.status_code == 200
    # without a size: the service's default (height 64, width 48)
    assert base64.b64decode(reply.json()["data"][0]["b64_json"]) == expected_png(pipe, 2, 64, 48)


@pytest.mark.parametrize("body, status, param", [
    ({"prompt": PROMPT, "size": "64"}, 400, "size"),
    ({"prompt": PROMPT, "size": "60x64"}, 400, "size"),
    ({"prompt": PROMPT, "n": 0}, 400, "n"),
    ({"prompt": PROMPT, "n": 5}, 400, "n"),
    ({"prompt": PROMPT, "n": "2"}, 400, "n"),
    ({"prompt": PROMPT, "response_format": "png"}, 400, "response_format"),
    ({"prompt": PROMPT, "num_inference_steps": 9}, 400, "num_inference_steps"),
    ({"prompt": PROMPT, "seed": -1}, 400, "seed"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": "x" * 101}, 400, "prompt"),
    ({"size": "64x64"}, 400, "prompt"),
    ({"prompt": PROMPT, "colour": "red"}, 400, "colour"),
    ({"prompt": PROMPT, "model": "dall-e-3"}, 404, "model"),
    ({"prompt": PROMPT, "negative_prompt": "blurry", "true_cfg_scale": 0.5}, 400, "true_cfg_scale"),
])
def test_bad_requests_get_openai_errors_and_the_next_request_is_served(service, body, status, param):
    reply = service.client.post("/v1/images/generations", json=body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error"
    good = service.client.post("/v1/images/generations", json={"prompt": PROMPT, "num_inference_steps": 1})
    assert good.status_code == 200


def test_the_client_raises_on_an_unknown_model(client):
    with pytest.raises(openai.NotFoundError) as error:
        client.images.generate(model="dall-e-3", prompt=PROMPT)
    assert error.value.body["param"] == "model" and "'tiny'" in error.value.body["message"]


def test_an_oversized_body_and_broken_json_are_refused(service):
    reply = service.client.post("/v1/images/generations", content=json.dumps({"prompt": "x" * 70_000}).encode())
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "request_too_large"
    reply = service.client.post("/v1/images/generations", content=b"{not json")
    assert reply.status_code == 400 and "not valid JSON" in reply.json()["error"]["message"]


def test_more_images_than_the_queue_holds_get_429(pipe):
    full = Service(pipe, SIZE, LIMITS, max_queue=2)  # no rank loop: nothing leaves the queue
    try:
        reply = full.client.post("/v1/images/generations", json={"prompt": PROMPT, "n": 3})
        assert reply.status_code == 429 and reply.json()["error"]["code"] == "queue_full"
        assert full.jobs.waiting == 0  # all or nothing: no image of the refused request was queued
    finally:
        full.close()


def png_file(image) -> bytes:
    """[3, H, W] in [0, 1] -> PNG bytes, as a client would upload them."""
    return encode_png(image)


@pytest.fixture(scope="module")
def source(pipe) -> bytes:
    return png_file(pipe(PROMPT, height=64, width=64, num_steps=2, seed=9, output_type="pt")[0])


def decoded(png: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(png)).convert("RGB")


def test_the_openai_client_edits_img2img_and_inpaint(client, pipe, source):
    """A text-to-image checkpoint edits by img2img, or inpaints with a mask; the image equals the pipeline's
    call with the same image, mask, strength and seed."""
    result = client.images.edit(model="tiny", image=("src.png", source, "image/png"), prompt="a red circle on a "
                                "blue background", size="64x64", extra_body={"seed": 3, "strength": 0.7})
    expected = pipe("a red circle on a blue background", image=decoded(source), strength=0.7, height=64, width=64,
                    seed=3, output_type="pt")[0]
    assert base64.b64decode(result.data[0].b64_json) == encode_png(expected)
    mask = torch.zeros(3, 64, 64)
    mask[:, :32] = 1  # repaint the top half
    result = client.images.edit(model="tiny", image=("src.png", source, "image/png"),
                                mask=("mask.png", png_file(mask), "image/png"), prompt="a green square",
                                extra_body={"seed": 4})
    expected = pipe("a green square", image=decoded(source), mask_image=decoded(png_file(mask)).convert("L"),
                    seed=4, output_type="pt")[0]
    assert base64.b64decode(result.data[0].b64_json) == encode_png(expected)


@pytest.mark.parametrize("files, fields, param", [
    ({"image": ("x.png", b"not an image", "image/png")}, {"prompt": "a fox"}, "image"),
    ({}, {"prompt": "a fox"}, "image"),
    ({"image": ("x.png", b"", "image/png"), "mask": ("m.png", b"junk", "image/png")}, {"prompt": "a fox"}, "image"),
    ({"mask": ("m.png", b"junk", "image/png")}, {"prompt": "a fox"}, "image"),
    ("source", {"prompt": "a fox", "strength": "1.5"}, "strength"),
    ("source", {"prompt": "a fox", "strength": "x"}, "strength"),
    ("source", {"prompt": "a fox", "size": "64"}, "size"),
    ("source", {"prompt": "a fox", "unknown": "1"}, "unknown"),
    ("source", {}, "prompt"),
])
def test_bad_edits_get_openai_errors(service, source, files, fields, param):
    files = {"image": ("src.png", source, "image/png")} if files == "source" else files
    reply = service.client.post("/v1/images/edits", files=files, data=fields)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param


def test_a_kontext_checkpoint_edits_through_the_api(source):
    """A Kontext model takes the upload as its reference: the image equals the pipeline's Kontext call."""
    kontext = FluxPipeline.tiny_random(seed=0, variant="kontext")
    running = Service(kontext, (64, 64), LIMITS)
    running.start_ranks()
    try:
        reply = running.client.post("/v1/images/edits", files={"image": ("src.png", source, "image/png")},
                                    data={"prompt": "make the circle red", "seed": "2", "num_inference_steps": "2"})
        assert reply.status_code == 200, reply.text
        expected = kontext("make the circle red", image=decoded(source), seed=2, num_steps=2, output_type="pt")[0]
        assert base64.b64decode(reply.json()["data"][0]["b64_json"]) == encode_png(expected)
        mask = {"mask": ("m.png", source, "image/png")}  # Kontext takes no mask: refused, naming it
        reply = running.client.post("/v1/images/edits", files={"image": ("src.png", source, "image/png"), **mask},
                                    data={"prompt": "make the circle red"})
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "mask"
    finally:
        running.close()


def events_of(response) -> list[tuple[str, dict]]:
    """A text/event-stream body -> its (event, data) pairs."""
    events = []
    for block in response.text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


def test_streamed_progress_then_the_image_and_a_replay(service, pipe):
    body = {"prompt": PROMPT, "size": "64x64", "seed": 6, "num_inference_steps": 3, "stream": True}
    with service.client.stream("POST", "/v1/images/generations", json=body, headers={"X-Request-Id": "r-6"}) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
        reply.read()
    events = events_of(reply)
    assert events[0] == ("queued", {"position": 1})
    assert [data for kind, data in events if kind == "step"] == [{"step": i, "steps": 3} for i in (1, 2, 3)]
    kind, done = events[-1]
    assert kind == "done" and done["created"] > 0
    assert base64.b64decode(done["data"][0]["b64_json"]) == expected_png(pipe, 6, steps=3)
    replay = service.client.get("/v1/images/generations/r-6/events")  # the finished request's events, again
    assert replay.status_code == 200 and events_of(replay) == events
    missing = service.client.get("/v1/images/generations/nobody/events")
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "request_id"
    bad = service.client.post("/v1/images/generations", json={"prompt": PROMPT, "stream": "yes"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "stream"

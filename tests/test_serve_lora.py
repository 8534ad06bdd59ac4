"""LoRA adapters in tools/serve.py: loaded once (--lora NAME=PATH), switched per request by `loras` on
/generate and /v1/images/generations; each image is the pipeline's with the same scales set directly."""

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import save_file
from serving import Service, serve

from flux_parallel.flux.images import encode_png
from flux_parallel.flux.pipeline import FluxPipeline
from flux_parallel.serve.app import JobQueue
from flux_parallel.serve.request import Limits

PIL = pytest.importorskip("PIL.Image", reason="decoding the PNGs needs Pillow (diffusers brings it)")
PROMPT = "a large yellow circle in the center on an orange background"
SIZE = (64, 64)


def random_lora(model, seed: int, path):
    """kohya keys on every linear of the transformer, strong enough to change the image."""
    generator, state = torch.Generator().manual_seed(seed), {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            key = "lora_unet_" + name.replace(".", "_")
            state[f"{key}.lora_down.weight"] = torch.randn(2, module.in_features, generator=generator) / 4
            state[f"{key}.lora_up.weight"] = torch.randn(module.out_features, 2, generator=generator) / 4
    save_file(state, path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root, model = tmp_path_factory.mktemp("loras"), FluxPipeline.tiny().transformer
    return {"a": random_lora(model, 1, root / "a.safetensors"), "b": random_lora(model, 2, root / "b.safetensors")}


def expected(pipe, scales: dict, seed: int) -> torch.Tensor:
    """The pipeline's image with the scales set directly (the others at 0), as a decoded PNG."""
    pipe.set_lora_scales({name: scales.get(name, 0.0) for name in pipe.lora_adapters})
    image = pipe(PROMPT, height=SIZE[0], width=SIZE[1], num_steps=4, seed=seed, output_type="pt")[0]
    return decode(encode_png(image))


def decode(png: bytes) -> torch.Tensor:
    return torch.tensor(list(PIL.open(io.BytesIO(png)).convert("RGB").getdata()), dtype=torch.float32) / 255


CASES = [{}, {"a": 0.7}, {"b": 1.0}, {"a": 0.7, "b": 0.5}, {"a": 0.7}, {"a": 0.3}]


def test_generate_switches_adapters_per_request(files):
    service = Service(FluxPipeline.tiny(), SIZE, Limits(), max_batch=4, window_s=0.3, loras=files)
    service.start_ranks()
    bodies = [{"prompt": PROMPT, "seed": seed, "loras": [{"name": n, "scale": s} for n, s in case.items()]}
              for seed, case in enumerate(CASES)]
    try:
        with ThreadPoolExecutor(len(bodies)) as pool:
            replies = list(pool.map(lambda b: service.client.post("/generate", content=json.dumps(b).encode()),
                                    bodies))
    finally:
        service.close()
    assert [r.status_code for r in replies] == [200] * len(CASES)
    images = [expected(service.pipe, case, seed) for seed, case in enumerate(CASES)]
    for reply, image in zip(replies, images):
        # a batched call rounds differently from a single one: at most one 8-bit step in a rare pixel
        torch.testing.assert_close(decode(reply.content), image, rtol=0, atol=1.01 / 255)
    assert (images[0] - images[1]).abs().max() > 0.1 and (images[1] - images[3]).abs().max() > 0.1  # scales mattered


def test_requests_with_other_adapters_never_share_a_batch():
    jobs = JobQueue(8, max_batch=4)
    loras = [(("a", 0.7), ("b", 0.0)), (("a", 0.0), ("b", 0.0)), (("a", 0.7), ("b", 0.0)), (("a", 0.7), ("b", 0.5))]
    params = [dict(prompt="p", negative_prompt=None, height=64, width=64, num_steps=4, seed=s, loras=lora)
              for s, lora in enumerate(loras)]
    jobs.submit_all(params, None)
    assert [[j.params["seed"] for j in jobs.take(0.1)] for _ in range(3)] == [[0, 2], [1], [3]]


def test_openai_route_takes_loras_and_unknown_names_get_400(files):
    service = Service(FluxPipeline.tiny(), SIZE, Limits(), loras=files)
    service.start_ranks()
    body = {"prompt": PROMPT, "size": "64x64", "seed": 3, "loras": [{"name": "b", "scale": 0.8}]}
    try:
        reply = service.client.post("/v1/images/generations", content=json.dumps(body).encode())
        unknown = service.client.post("/v1/images/generations", content=json.dumps(
            {"prompt": PROMPT, "loras": [{"name": "c", "scale": 1.0}]}).encode())
        bad = [service.client.post("/generate", content=json.dumps({"prompt": PROMPT, "loras": loras}).encode())
               for loras in ([{"name": "c"}], [{"scale": 1.0}], "a", [{"name": "a", "scale": "high"}],
                             [{"name": "a"}, {"name": "a"}])]
    finally:
        service.close()
    assert reply.status_code == 200
    png = base64.b64decode(reply.json()["data"][0]["b64_json"])
    assert torch.equal(decode(png), expected(service.pipe, {"b": 0.8}, 3))
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "loras"
    assert "'c'" in unknown.json()["error"]["message"]
    assert [r.status_code for r in bad] == [400] * 5 and all("'loras'" in r.json()["error"] for r in bad)


def test_serve_loads_named_adapters(files):
    args = serve.parse_args(["--model", "tiny", "--lora", f"a={files['a']}", "--lora", f"b={files['b']}:0.5"])
    assert [(name, str(source), scale) for name, source, scale in args.loras] == [
        ("a", str(files["a"]), 1.0), ("b", str(files["b"]), 0.5)]

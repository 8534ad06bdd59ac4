"""The OpenAI Images API in front of the same job queue: `POST /v1/images/generations`, `GET /v1/models`.

A request is checked here, on rank 0, before anything reaches the ranks, and becomes the keyword
arguments of one pipeline call per image: image i of `n` uses seed + i, so it is the image a request
with that seed and n = 1 gets. Errors take OpenAI's shape, {"error": {"message", "type", "param",
"code"}}, with `param` the request field at fault. Extensions beyond OpenAI's fields, under these
names: `seed`, `negative_prompt`, `num_inference_steps`, `guidance_scale` (FLUX.1-dev's distilled
guidance), `true_cfg_scale`, `loras` (the LoRA adapters' scales, as on /generate).
"""

import json
import re
import secrets
import threading
import time

from fastapi.responses import JSONResponse

from flux_parallel.flux.pipeline import FluxPipeline
from flux_parallel.serve.request import TYPE_NAMES, Limits, check_range, has_type, parse_fields

# field -> JSON type; OpenAI's own fields first (quality, style and user are accepted and change nothing)
GENERATION_FIELDS = {"prompt": str, "model": str, "n": int, "size": str, "response_format": str, "user": str,
                     "quality": str, "style": str, "output_format": str,
                     "seed": int, "negative_prompt": str, "num_inference_steps": int, "guidance_scale": float,
                     "true_cfg_scale": float, "loras": list}
# the /generate field each extension is checked as, and back for error messages
AS_GENERATE = {"num_inference_steps": "steps", "guidance_scale": "guidance"}
RESPONSE_FORMATS = ("b64_json", "url")


class APIError(Exception):
    """A request OpenAI's way refuses: HTTP status, one sentence, the field at fault, a short code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return JSONResponse({"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}},
                            status_code=self.status)


def load_generation(body: bytes, limits: Limits) -> dict:
    """JSON body -> its fields, each of the right JSON type (null: the default)."""
    if len(body) > limits.max_body_bytes:
        raise APIError(413, f"the request body has {len(body)} bytes, more than {limits.max_body_bytes} "
                            "(--max-body-bytes)", code="request_too_large")
    try:
        fields = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise APIError(400, f"the request body is not valid JSON ({err})") from None
    if not isinstance(fields, dict):
        raise APIError(400, 'the request body must be a JSON object such as {"prompt": "a red fox"}')
    for name, value in fields.items():
        if name not in GENERATION_FIELDS:
            raise APIError(400, f"unknown field {name!r}", param=name, code="unknown_parameter")
        if value is not None and not has_type(value, GENERATION_FIELDS[name]):
            raise APIError(400, f"{name!r} must be {TYPE_NAMES[GENERATION_FIELDS[name]]}, got {json.dumps(value)}",
                           param=name, code="invalid_type")
    if fields.get("prompt") is None:
        raise APIError(400, "the field 'prompt' is required", param="prompt", code="missing_required_parameter")
    return {k: v for k, v in fields.items() if v is not None}


def parse_size(size: str) -> tuple[int, int]:
    """"WIDTHxHEIGHT" -> (height, width)."""
    match = re.fullmatch(r"(\d+)x(\d+)", size)
    if match is None:
        raise APIError(400, f"'size' must be WIDTHxHEIGHT in pixels, such as \"1024x1024\", got {size!r}",
                       param="size")
    return int(match[2]), int(match[1])


def parse_generation(body: bytes, pipe: FluxPipeline, model_id: str, size: tuple[int, int],
                     limits: Limits) -> tuple[list[dict], str]:
    """The body of POST /v1/images/generations -> (the pipeline's keyword arguments for each image, the
    response format). `size` is the (height, width) of requests without one."""
    fields = load_generation(body, limits)
    if fields.get("model", model_id) != model_id:
        raise APIError(404, f"the model {fields['model']!r} is not served here: this service runs {model_id!r} "
                            "(GET /v1/models)", param="model", code="model_not_found")
    response_format = fields.get("response_format", "b64_json")
    if response_format not in RESPONSE_FORMATS:
        raise APIError(400, f"'response_format' must be 'b64_json' or 'url', got {response_format!r}",
                       param="response_format")
    if fields.get("output_format", "png") != "png":
        raise APIError(400, f"'output_format' must be 'png', got {fields['output_format']!r}", param="output_format")
    n = fields.get("n", 1)
    try:
        check_range("n", n, 1, limits.max_images, "--max-images")
    except ValueError as err:
        raise APIError(400, str(err), param="n") from None
    height, width = parse_size(fields["size"]) if "size" in fields else size
    generate = {"prompt": fields["prompt"], "height": height, "width": width, "seed": fields.get("seed", 0)}
    for name in ("negative_prompt", "true_cfg_scale", "num_inference_steps", "guidance_scale", "loras"):
        if name in fields:
            generate[AS_GENERATE.get(name, name)] = fields[name]
    try:
        check_range("seed", generate["seed"], 0, 2**63 - n)
        params = parse_fields(generate, pipe, size, limits)
    except ValueError as err:
        raise APIError(400, *openai_names(str(err))) from None
    return [{**params, "seed": params["seed"] + i} for i in range(n)], response_format


def openai_names(message: str) -> tuple[str, str | None]:
    """A /generate field's sentence -> the same sentence with the OpenAI field names, and that field."""
    for ours, theirs in [("height", "size"), ("width", "size"), *((v, k) for k, v in AS_GENERATE.items())]:
        if f"'{ours}'" in message:
            return message.replace(f"'{ours}'", f"'{theirs}' ({ours})" if theirs == "size" else f"'{theirs}'"), theirs
    for name in GENERATION_FIELDS:
        if f"'{name}'" in message:
            return message, name
    return message, None


class ImageFiles:
    """PNGs of `url` responses, served by the service itself for `ttl_s` seconds after they are made."""

    def __init__(self, ttl_s: float):
        self.ttl_s = ttl_s
        self._files: dict[str, tuple[bytes, float]] = {}  # name -> (PNG, expiry on the monotonic clock)
        self._lock = threading.Lock()

    def add(self, png: bytes) -> str:
        name = f"{secrets.token_urlsafe(16)}.png"
        with self._lock:
            self._drop_expired()
            self._files[name] = (png, time.monotonic() + self.ttl_s)
        return name

    def get(self, name: str) -> bytes | None:
        with self._lock:
            self._drop_expired()
            entry = self._files.get(name)
        return None if entry is None else entry[0]

    def _drop_expired(self) -> None:
        now = time.monotonic()
        for name in [n for n, (_, expiry) in self._files.items() if expiry <= now]:
            del self._files[name]


def models_list(model_id: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                        "owned_by": "flux-parallel"}]}

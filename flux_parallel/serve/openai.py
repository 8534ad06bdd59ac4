"""The OpenAI Images API in front of the same job queue: `POST /v1/images/generations`, `POST
/v1/images/edits` (multipart: `image`, optional `mask`) and `GET /v1/models`.

A request is checked here, on rank 0, before anything reaches the ranks, and becomes the keyword
arguments of one pipeline call per image: image i of `n` uses seed + i, so it is the image a request
with that seed and n = 1 gets. Errors take OpenAI's shape, {"error": {"message", "type", "param",
"code"}}, with `param` the request field at fault. Extensions beyond OpenAI's fields, under these
names: `seed`, `negative_prompt`, `num_inference_steps`, `guidance_scale` (FLUX.1-dev's distilled
guidance), `true_cfg_scale`, `loras` (the LoRA adapters' scales, as on /generate).
"""

import base64
import io
import json
import re
import secrets
import threading
import time
from dataclasses import dataclass

from fastapi.responses import JSONResponse

from flux_parallel.flux.image_inputs import ImageArgumentError
from flux_parallel.flux.image_modes import image_request
from flux_parallel.flux.pipeline import FluxPipeline
from flux_parallel.serve.request import TYPE_NAMES, Limits, check_range, has_type, parse_fields

# field -> JSON type; OpenAI's own fields first (quality, style and user are accepted and change nothing)
GENERATION_FIELDS = {"prompt": str, "model": str, "n": int, "size": str, "response_format": str, "user": str,
                     "quality": str, "style": str, "output_format": str, "stream": bool,
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


@dataclass(frozen=True)
class ImagesRequest:
    params: list[dict]  # the pipeline's keyword arguments of each image (JSON-safe: they travel to the ranks)
    response_format: str  # "b64_json" or "url"
    stream: bool  # answer with server-sent events: queued, step, done


def parse_generation(body: bytes, pipe: FluxPipeline, model_id: str, size: tuple[int, int],
                     limits: Limits) -> ImagesRequest:
    """The body of POST /v1/images/generations; `size` is the (height, width) of requests without one."""
    fields = load_generation(body, limits)
    n, response_format = check_common(fields, model_id, limits)
    height, width = parse_size(fields["size"]) if "size" in fields else size
    generate = {"prompt": fields["prompt"], "height": height, "width": width, "seed": fields.get("seed", 0)}
    return ImagesRequest(generation_params(fields, generate, n, pipe, limits), response_format,
                         fields.get("stream", False))


def check_common(fields: dict, model_id: str, limits: Limits) -> tuple[int, str]:
    """The fields every images route checks alike -> (n, response format)."""
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
    return n, response_format


def generation_params(fields: dict, generate: dict, n: int, pipe: FluxPipeline, limits: Limits) -> list[dict]:
    """`generate` (prompt, size, seed as /generate takes them) and the extensions in `fields` -> the checked
    keyword arguments of each of the n images (image i: seed + i)."""
    for name in ("negative_prompt", "true_cfg_scale", "num_inference_steps", "guidance_scale", "loras"):
        if name in fields:
            generate[AS_GENERATE.get(name, name)] = fields[name]
    try:
        check_range("seed", generate["seed"], 0, 2**63 - n)
        params = parse_fields(generate, pipe, (generate["height"], generate["width"]), limits)
    except ValueError as err:
        raise APIError(400, *openai_names(str(err))) from None
    return [{**params, "seed": params["seed"] + i} for i in range(n)]


def openai_names(message: str) -> tuple[str, str | None]:
    """A /generate field's sentence -> the same sentence with the OpenAI field names, and that field."""
    for ours, theirs in [("height", "size"), ("width", "size"), *((v, k) for k, v in AS_GENERATE.items())]:
        if f"'{ours}'" in message:
            return message.replace(f"'{ours}'", f"'{theirs}' ({ours})" if theirs == "size" else f"'{theirs}'"), theirs
    for name in GENERATION_FIELDS:
        if f"'{name}'" in message:
            return message, name
    return message, None


class Expiring:
    """Values kept for `ttl_s` seconds after they are added, by name (thread-safe)."""

    def __init__(self, ttl_s: float):
        self.ttl_s = ttl_s
        self._items: dict[str, tuple[object, float]] = {}  # name -> (value, expiry on the monotonic clock)
        self._lock = threading.Lock()

    def add(self, name: str, value) -> None:
        with self._lock:
            self._drop_expired()
            self._items[name] = (value, time.monotonic() + self.ttl_s)

    def get(self, name: str):
        with self._lock:
            self._drop_expired()
            entry = self._items.get(name)
        return None if entry is None else entry[0]

    def _drop_expired(self) -> None:
        now = time.monotonic()
        for name in [n for n, (_, expiry) in self._items.items() if expiry <= now]:
            del self._items[name]


class ImageFiles(Expiring):
    """PNGs of `url` responses, served by the service itself for `ttl_s` seconds after they are made."""

    def add(self, png: bytes) -> str:
        name = f"{secrets.token_urlsafe(16)}.png"
        super().add(name, png)
        return name


def models_list(model_id: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                        "owned_by": "flux-parallel"}]}


# POST /v1/images/edits: multipart form fields (strings, converted to these types) and files
EDIT_FIELDS = {**{k: v for k, v in GENERATION_FIELDS.items() if k not in ("style",)}, "strength": float}
EDIT_FILES = ("image", "image[]", "mask")
# what an edit adds to a job's params (JSON-safe: the uploads as base64)
EDIT_PARAMS = ("image_b64", "mask_b64", "strength")
# the pipeline's argument a refusal names -> the form field
FORM_NAMES = {"image": "image", "control_image": "image", "mask_image": "mask", "strength": "strength",
              "height": "size", "width": "size"}


def form_fields(form) -> tuple[dict, list[bytes], bytes | None]:
    """A parsed multipart form -> (its text fields, typed; the uploaded images' bytes; the mask's bytes)."""
    fields, images, mask = {}, [], None
    for name, value in form.multi_items():
        if name in EDIT_FILES:
            data = value.file.read() if hasattr(value, "file") else None
            if data is None:
                raise APIError(400, f"{name!r} must be an uploaded file", param="mask" if name == "mask" else "image")
            if name == "mask":
                mask = data
            else:
                images.append(data)
        elif name not in EDIT_FIELDS:
            raise APIError(400, f"unknown field {name!r}", param=name, code="unknown_parameter")
        else:
            fields[name] = typed(name, value)
    if not images:
        raise APIError(400, "the file 'image' is required: the image to edit", param="image",
                       code="missing_required_parameter")
    if len(images) > 1:
        raise APIError(400, f"{len(images)} images were uploaded: this service edits one image per request",
                       param="image")
    if "prompt" not in fields:
        raise APIError(400, "the field 'prompt' is required", param="prompt", code="missing_required_parameter")
    return fields, images, mask


def typed(name: str, text: str):
    kind = EDIT_FIELDS[name]
    if kind is bool:
        if text not in ("true", "false"):
            raise APIError(400, f"{name!r} must be true or false, got {text!r}", param=name, code="invalid_type")
        return text == "true"
    if kind is list:  # a form field holds JSON text: loras='[{"name": "ink", "scale": 0.8}]'
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = None
        if not isinstance(value, list):
            raise APIError(400, f"{name!r} must be a JSON list, got {text!r}", param=name, code="invalid_type")
        return value
    try:
        return text if kind is str else kind(text)
    except ValueError:
        raise APIError(400, f"{name!r} must be {TYPE_NAMES[kind]}, got {text!r}", param=name,
                       code="invalid_type") from None


def decode_upload(data: bytes, field: str):
    """Uploaded bytes -> a PIL image, or 400 naming the field (whatever the loaded model is)."""
    try:
        from PIL import Image
    except ImportError:
        raise APIError(500, "image uploads need Pillow on the server (pip install pillow)") from None
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            return opened
    except (OSError, Image.UnidentifiedImageError, ValueError):
        raise APIError(400, f"the uploaded {field!r} is not an image file", param=field) from None


def edit_arguments(params: dict, kind: str) -> dict:
    """An edit's images, carried as base64 in the job's JSON-safe params -> the pipeline's image arguments
    for a `kind` transformer (Control takes the upload as its control image)."""
    image = decode_upload(base64.b64decode(params["image_b64"]), "image")
    mask = None if params.get("mask_b64") is None else decode_upload(base64.b64decode(params["mask_b64"]), "mask")
    name = "control_image" if kind == "control" else "image"
    return {name: image, "mask_image": mask, "strength": params.get("strength")}


def parse_edit(fields: dict, images: list[bytes], mask: bytes | None, pipe: FluxPipeline, model_id: str,
               limits: Limits) -> ImagesRequest:
    """POST /v1/images/edits (form_fields' parts) -> its images' params. It runs what the
    loaded checkpoint does with an image: Kontext edits, Fill fills the mask, a text-to-image checkpoint
    inpaints (with a mask) or runs img2img, Canny/Depth take the upload as the control image."""
    n, response_format = check_common(fields, model_id, limits)
    height, width = parse_size(fields["size"]) if "size" in fields else (None, None)
    request = {"image_b64": base64.b64encode(images[0]).decode(), "strength": fields.get("strength"),
               "mask_b64": None if mask is None else base64.b64encode(mask).decode()}
    arguments = edit_arguments(request, pipe.kind)
    try:
        checked = image_request(pipe.kind, arguments.get("image"), arguments["mask_image"],
                                arguments.get("control_image"), arguments["strength"], height, width, True)
    except ImageArgumentError as err:
        raise APIError(400, f"{FORM_NAMES.get(err.argument, err.argument)!r} {err.rest}",
                       param=FORM_NAMES.get(err.argument, err.argument)) from None
    generate = {"prompt": fields["prompt"], "height": checked.height, "width": checked.width,
                "seed": fields.get("seed", 0)}
    params = generation_params(fields, generate, n, pipe, limits)
    return ImagesRequest([{**p, **request} for p in params], response_format, fields.get("stream", False))

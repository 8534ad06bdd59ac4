"""The body of `POST /generate`, checked on rank 0 before anything reaches the ranks.

`parse_request` turns the JSON body into the keyword arguments of `FluxPipeline.__call__`, defaults
resolved, or raises ValueError with one sentence naming the field at fault (the service answers 400).
"""

import json
import math
from dataclasses import dataclass

from flux_parallel.flux.pipeline import FluxPipeline, expand_prompts
from flux_parallel.flux.sampling import check_image_size

# field -> the JSON type it takes; every field but the prompt may be left out or null
FIELDS = {"prompt": str, "negative_prompt": str, "true_cfg_scale": float, "height": int, "width": int,
          "steps": int, "guidance": float, "seed": int, "max_sequence_length": int, "loras": list}
TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list"}
LORAS_FORM = '[{"name": "style", "scale": 0.8}, ...]'  # the form of the `loras` field, for messages


@dataclass(frozen=True)
class Limits:
    """What one request may ask for: the service's flags --max-prompt-length, --max-size, --max-steps."""
    max_prompt_length: int = 2000  # characters
    max_size: int = 2048  # pixels per side
    max_steps: int = 100
    max_images: int = 10  # images one OpenAI request may ask for (`n`), as OpenAI's own limit
    max_body_bytes: int = 16 * 2**20  # a larger body is refused with 413 before it is parsed


def load_json_object(body: bytes) -> dict:
    try:
        fields = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"the request body is not valid JSON ({err})") from None
    if not isinstance(fields, dict):
        raise ValueError('the request body must be a JSON object such as {"prompt": "a red fox"}')
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}: the fields are {', '.join(FIELDS)}")
    if "prompt" not in fields:
        raise ValueError("the field 'prompt' is required")
    for name, value in fields.items():
        if not (value is None and name != "prompt" or has_type(value, FIELDS[name])):
            raise ValueError(f"{name!r} must be {TYPE_NAMES[FIELDS[name]]}, got {json.dumps(value)}")
    return fields


def has_type(value, kind: type) -> bool:
    """JSON's view: `true` is not an integer (Python's bool is), NaN and Infinity are not numbers, 3 is a float."""
    if isinstance(value, bool) or kind is bool:
        return isinstance(value, bool) and kind is bool
    if kind is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, kind)


def check_text(name: str, text: str | None, limits: Limits) -> None:
    if text is not None and len(text) > limits.max_prompt_length:
        raise ValueError(f"{name!r} has {len(text)} characters, more than the limit of {limits.max_prompt_length} "
                         "(--max-prompt-length)")


def check_range(name: str, value: int, low: int, high: int, flag: str = "") -> None:
    if not low <= value <= high:
        limit = f" ({flag})" if flag else ""
        raise ValueError(f"{name!r} must be between {low} and {high}{limit}, got {value}")


def parse_request(body: bytes, pipe: FluxPipeline, size: tuple[int, int], limits: Limits) -> dict:
    """JSON body -> keyword arguments of pipe(...); `size` is the (height, width) of requests without one."""
    return parse_fields(load_json_object(body), pipe, size, limits)


def parse_fields(fields: dict, pipe: FluxPipeline, size: tuple[int, int], limits: Limits) -> dict:
    """The fields of a /generate body, types checked (load_json_object) -> keyword arguments of pipe(...)."""

    def get(name: str, default=None):  # null means "the default", as leaving the field out does
        return default if fields.get(name) is None else fields[name]

    prompt, negative = fields["prompt"], get("negative_prompt")
    if not prompt.strip():
        raise ValueError("'prompt' is empty: describe the image to generate")
    check_text("prompt", prompt, limits)
    check_text("negative_prompt", negative, limits)
    height, width = get("height", size[0]), get("width", size[1])
    for name, value in (("height", height), ("width", width)):
        check_image_size(repr(name), value)
        check_range(name, value, 16, limits.max_size, "--max-size")
    has_guidance = pipe.transformer.params.guidance_embed  # FluxPipeline's defaults, resolved for check_call
    steps = get("steps", 28 if has_guidance else 4)
    check_range("steps", steps, 1, limits.max_steps, "--max-steps")
    seed = get("seed", 0)
    check_range("seed", seed, 0, 2**63 - 1)
    max_len = get("max_sequence_length", min(512 if has_guidance else 256, pipe.text.model_max_length))
    cfg_scale = get("true_cfg_scale", 1.0)
    if cfg_scale < 1:
        raise ValueError(f"'true_cfg_scale' must be at least 1 (1 turns true CFG off), got {cfg_scale}")
    loras = parse_loras(get("loras", []), pipe.lora_adapters)
    # checked as the rank loop will run it: in a batch padded to a request per data-parallel replica
    prompts, negatives = expand_prompts(prompt, negative, cfg_scale, pipe.parallel.data_degree)
    pipe.check_call(prompts, negatives, height, width, steps, max_len, None)  # the model's limits, e.g. T5's
    return {"prompt": prompt, "negative_prompt": negative, "true_cfg_scale": cfg_scale, "height": height,
            "width": width, "num_steps": steps, "guidance": get("guidance"), "seed": seed,
            "max_sequence_length": max_len, "loras": loras}


def parse_loras(entries: list, loaded: dict) -> tuple[tuple[str, float], ...]:
    """The `loras` field -> the scale of every loaded adapter, (name, scale) sorted by name: the adapters the
    request leaves out at 0. A tuple, so that requests with other adapters never share a batch (app.batch_key)."""
    scales = dict.fromkeys(loaded, 0.0)
    named = set()
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or set(entry) - {"name", "scale"}:
            raise ValueError(f"'loras' must be a list of {{name, scale}} objects such as {LORAS_FORM}, "
                             f"got {json.dumps(entry)}")
        name, scale = entry["name"], entry.get("scale", 1.0)
        if name not in scales:
            raise ValueError(f"'loras' names the adapter {name!r}, which this service has not loaded (its adapters: "
                             f"{', '.join(sorted(loaded)) or 'none'}; --lora NAME=PATH)")
        if name in named or not has_type(scale, float):
            raise ValueError(f"'loras' gives {name!r} twice or a scale that is not a finite number: "
                             f"{json.dumps(entry)}")
        named.add(name)
        scales[name] = float(scale)
    return tuple(sorted(scales.items()))

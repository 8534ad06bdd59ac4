"""The one loader behind every model that ships in two layouts: the black-forest-labs single file
(our parameter names: it loads as it is) and a diffusers component folder (`config.json` and
`diffusion_pytorch_model*.safetensors`, renamed by the model's `diffusers_to_bfl`).

Each model describes its checkpoints once, as a `CheckpointFormat`, and its loader is one call of
`load_checkpoint`. Names mean the same in every model: `fields_from_*` return a dict of the params
dataclass's fields, `params_from_*` the dataclass itself.
"""

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flux_parallel.weights.files import (
    DIFFUSERS_STEM,
    CheckpointError,
    read_json,
    read_safetensors,
    safetensors_keys,
    weight_files,
)
from flux_parallel.weights.modules import build_params, check_device, check_dtype, load_strict


@dataclass(frozen=True)
class CheckpointFormat:
    """What `load_checkpoint` needs to know about one model's checkpoints."""

    name: str  # the model, in messages
    locate: Callable[[str | Path], tuple[str, Path]]  # source -> ("bfl", file) or ("diffusers", folder)
    fields_from_bfl_keys: Callable[[dict[str, list[int]], str], dict]  # (header shapes, source) -> fields
    fields_from_config: Callable[[dict, str], dict]  # (config.json, source) -> fields
    make_params: Callable[..., Any]  # fields as keywords -> the params dataclass
    diffusers_to_bfl: Callable[[dict[str, Tensor], Any], dict[str, Tensor]]  # (state, params) -> our names
    build: Callable[[Any], nn.Module]  # params -> the module (called on the meta device)
    bfl_hint: str = ""  # ends a params error for a single file, whose shapes do not say everything


def block_count(shapes: dict[str, list[int]], pattern: str) -> int:
    """1 + the largest index that `pattern`'s group matches in the keys; a ValueError if none does."""
    return 1 + max(int(m.group(1)) for key in shapes if (m := re.match(pattern, key)))


def single_file_fields(file: Path, fmt: CheckpointFormat) -> dict:
    """Fields for a black-forest-labs single file: what its header's shapes imply, overridden by a
    `config.json` beside it."""
    if file.suffix != ".safetensors":
        raise CheckpointError(f"{file} is not a .safetensors file; pickle checkpoints are never loaded")
    fields = fmt.fields_from_bfl_keys(safetensors_keys(file), str(file))
    beside = file.parent / "config.json"
    if beside.is_file():
        fields.update(fmt.fields_from_config(read_json(beside), str(beside)))
    return fields


def load_checkpoint(
    fmt: CheckpointFormat, src: str | Path, dtype: torch.dtype, device: torch.device | str, overrides=None,
    select=None,
) -> nn.Module:
    """The model of format `fmt` from `src`, in eight steps: check the dtype and device; find the files;
    read the fields; apply `overrides` (a params dataclass or a dict of its fields); build the params;
    read the tensors, cast one by one; rename diffusers keys to ours; assign them strictly.

    select(params, kind) -> (keep_file_key, keep_our_key), optional: load only part of the model (a
    pipeline stage). Tensors the first rejects are never read; the model's parameters the second
    rejects stay on the meta device."""
    dtype, device = check_dtype(dtype), check_device(device)
    kind, path = fmt.locate(src)
    if kind == "bfl":
        files, fields = [path], single_file_fields(path, fmt)
    else:
        files = weight_files(path, DIFFUSERS_STEM)  # first: a pickle-only folder is refused before its config
        fields = fmt.fields_from_config(read_json(path / "config.json"), str(path / "config.json"))
    if overrides is not None:
        fields.update(dataclasses.asdict(overrides) if dataclasses.is_dataclass(overrides) else overrides)
    params = build_params(fmt.make_params, fields, str(path), fmt.bfl_hint if kind == "bfl" else "")
    keep_file_key, keep = select(params, kind) if select is not None else (None, None)
    state = read_safetensors(files, dtype, device, keep_file_key)
    if kind == "diffusers":
        state = fmt.diffusers_to_bfl(state, params)
    if keep is not None:
        state = {k: v for k, v in state.items() if keep(k)}
    return load_strict(lambda: fmt.build(params), state, str(path), keep)

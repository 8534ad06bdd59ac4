"""Finding and reading checkpoint files, with one clear sentence per bad input.

Never unpickles: a folder that holds only `.bin` / `.pt` / `.ckpt` weights is refused.
"""

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DIFFUSERS_STEM = "diffusion_pytorch_model"  # a diffusers component's weight files
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says what is wrong and with which file."""


def resolve(src: str | Path, allow_patterns: list[str] | None = None) -> Path:
    """A local file or folder as it is; a Hugging Face repo id through huggingface_hub's cache.

    The hub honours HF_HUB_OFFLINE (then only the cache is used) and HF_HOME.
    """
    path = Path(src).expanduser()
    if path.exists():
        return path
    if not _REPO_ID.match(str(src)) or str(src).startswith((".", "/", "~")):
        raise CheckpointError(f"no such file or folder: {src}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(src), allow_patterns=allow_patterns))
    except Exception as err:  # the hub raises a dozen kinds; all mean the same thing to a user
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{src} is neither a local path nor a Hugging Face repo that could be fetched or found in the cache "
            f"({reason})"
        ) from None


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from None


def weight_files(folder: Path, stem: str) -> list[Path]:
    """The safetensors files of a component folder: `{stem}.safetensors` or the shards its index names."""
    single = folder / f"{stem}.safetensors"
    index = folder / f"{stem}.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if not shards or missing:
            raise CheckpointError(f"{index} names shards that are not in {folder}: {missing[:3] or 'none listed'}")
        return [folder / s for s in shards]
    pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise CheckpointError(
            f"{folder} holds only pickle weights ({', '.join(pickles[:3])}); they are never unpickled here: "
            "convert them to safetensors"
        )
    raise CheckpointError(f"{folder} has no {stem}.safetensors nor {stem}.safetensors.index.json")


def read_safetensors(files: list[Path], dtype: torch.dtype, device: torch.device, keep=None,
                     part=None) -> dict[str, Tensor]:
    """All tensors of `files` (those whose name `keep` accepts, when given: the others are never read), each
    cast to `dtype` (floating point only) and moved to `device` one by one, so that peak memory is the
    converted state dict, not an fp32 copy of it. part(name, lazy_slice) -> the piece of that tensor to
    keep, read by slicing lazy_slice (safetensors' get_slice), or None for the whole tensor: a tensor-
    parallel rank reads only its slices. With `part`, the file is mapped anew for each tensor: the pages a
    slice touched (a column slice: every row's) then leave the process with the mapping, so that the
    resident peak while loading is the rank's share, not the file (`part` must return copies)."""
    state = {}
    for file in files:
        if file.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(
                f"{file} is a pickle checkpoint; it is never unpickled here: convert it to safetensors"
            )
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                keys = [k for k in handle.keys() if keep is None or keep(k)]
                if part is None:
                    state |= {key: _cast(handle.get_tensor(key), dtype, device) for key in keys}
            for key in keys if part is not None else ():
                with safe_open(str(file), framework="pt", device="cpu") as handle:
                    piece = part(key, handle.get_slice(key))
                    state[key] = _cast(handle.get_tensor(key) if piece is None else piece, dtype, device)
        except (SafetensorError, OSError, RuntimeError) as err:
            raise CheckpointError(f"{file} is not a readable safetensors file (truncated or corrupt?): {err}") from None
    return state


def _cast(tensor: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """tensor in dtype (floating point only) on device."""
    return tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)


def safetensors_keys(file: Path) -> dict[str, list[int]]:
    """Key -> shape, read from the header only."""
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            return {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CheckpointError(f"{file} is not a readable safetensors file (truncated or corrupt?): {err}") from None

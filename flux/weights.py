"""Reading safetensors checkpoints strictly, with one clear sentence per bad input; and the seeded
random weights of the offline `tiny` models.

Shared by every loader (transformer, text encoders, VAE). Never unpickles: a folder that
holds only `.bin` / `.pt` / `.ckpt` weights is refused.
"""

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DIFFUSERS_STEM = "diffusion_pytorch_model"  # a diffusers component's weight files
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says what is wrong and with which file."""


def check_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None) if dtype in ("float32", "float16", "bfloat16") else dtype
    if dtype not in SUPPORTED_DTYPES:
        raise CheckpointError(f"unsupported dtype {dtype!r}: use one of float32, float16, bfloat16")
    return dtype


def check_device(device: torch.device | str) -> torch.device:
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise CheckpointError(f"{device!r} is not a device: {err}") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise CheckpointError(f"device {device} does not exist on this machine ({torch.cuda.device_count()} CUDA devices)")
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise CheckpointError(f"device {device} is not supported: use cpu or cuda")
    return device


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
            f"{src} is neither a local path nor a Hugging Face repo that could be fetched or found in the cache ({reason})"
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


def read_safetensors(files: list[Path], dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
    """All tensors of `files`, each cast to `dtype` (floating point only) and moved to `device` one by one,
    so that peak memory is the converted state dict, not an fp32 copy of it."""
    state = {}
    for file in files:
        if file.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(f"{file} is a pickle checkpoint; it is never unpickled here: convert it to safetensors")
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for key in handle.keys():
                    tensor = handle.get_tensor(key)
                    cast = dtype if tensor.is_floating_point() else tensor.dtype
                    state[key] = tensor.to(device=device, dtype=cast)
        except (SafetensorError, OSError, RuntimeError) as err:
            raise CheckpointError(f"{file} is not a readable safetensors file (truncated or corrupt?): {err}") from None
    return state


def safetensors_keys(file: Path) -> dict[str, list[int]]:
    """Key -> shape, read from the header only."""
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            return {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CheckpointError(f"{file} is not a readable safetensors file (truncated or corrupt?): {err}") from None


def single_file_fields(file: Path, from_shapes: Callable[[dict, str], dict], from_config: Callable[[dict, str], dict]) -> dict:
    """Model fields for a black-forest-labs single file: what its header's shapes imply
    (`from_shapes(shapes, source)`), overridden by a `config.json` beside it (`from_config(config, source)`)."""
    if file.suffix != ".safetensors":
        raise CheckpointError(f"{file} is not a .safetensors file; pickle checkpoints are never loaded")
    fields = from_shapes(safetensors_keys(file), str(file))
    beside = file.parent / "config.json"
    if beside.is_file():
        fields.update(from_config(read_json(beside), str(beside)))
    return fields


def module_or_load(override, expected: type, name: str, load: Callable[[str | Path], nn.Module], default_src) -> nn.Module:
    """A component override: a loaded module of the `expected` class as it is, else `load(override or
    default_src)`. A module of another class (say diffusers' own) is refused with one sentence."""
    if isinstance(override, nn.Module):
        if not isinstance(override, expected):
            raise ValueError(f"{name} must be a {expected.__name__} or a checkpoint source, got a {type(override).__name__}")
        return override
    return load(override or default_src)


def _few(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")


def load_strict(build: Callable[[], nn.Module], state: dict[str, Tensor], source: str) -> nn.Module:
    """Build the module on the meta device and assign `state` to it: every key must match, shapes too."""
    with torch.device("meta"):
        model = build()
    expected = model.state_dict()
    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    if missing:
        raise CheckpointError(f"{source} is missing {len(missing)} weights the model needs: {_few(missing)}")
    if unexpected:
        raise CheckpointError(f"{source} has {len(unexpected)} weights the model does not know: {_few(unexpected)}")
    for key, param in expected.items():
        if param.shape != state[key].shape:
            raise CheckpointError(
                f"{source}: {key} has shape {list(state[key].shape)}, the config expects {list(param.shape)}"
            )
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def seeded_init(module: nn.Module, seed: int) -> nn.Module:
    """Random weights that depend only on `seed` and the device type (not on the global RNG), drawn
    in place on the parameters' device and dtype: biases 0, norm scales 1, weight tensors
    N(0, 1/fan_in) with fan_in the inputs of one output unit. Fast enough for 12B parameters on a GPU."""
    generators: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim > 1:
                if param.device not in generators:
                    generators[param.device] = torch.Generator(param.device).manual_seed(seed)
                param.normal_(0.0, param[0].numel() ** -0.5, generator=generators[param.device])
            else:
                param.fill_(0.0 if name.endswith("bias") else 1.0)
    return module.eval().requires_grad_(False)

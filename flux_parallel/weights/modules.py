"""Turning what a checkpoint says into a module: the target dtype and device, the params dataclass,
the strict assignment of the tensors; and the seeded random weights of the offline `tiny` models."""

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor, nn

from flux_parallel.weights.files import CheckpointError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # by the names flags use
SUPPORTED_DTYPES = tuple(DTYPES.values())


def check_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """The dtype (or its name) if weights can be loaded in it; a ValueError, the caller's fault, if not."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None) if dtype in ("float32", "float16", "bfloat16") else dtype
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}: use one of float32, float16, bfloat16")
    return dtype


def check_device(device: torch.device | str) -> torch.device:
    """The device if it exists on this machine; a ValueError, the caller's fault, if not."""
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"{device!r} is not a device: {err}") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device {device} does not exist on this machine ({torch.cuda.device_count()} CUDA devices)")
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ValueError(f"device {device} is not supported: use cpu or cuda")
    return device


def known_fields(params_type: type, config: dict) -> dict:
    """The entries of `config` named like fields of the dataclass `params_type` (JSON lists as tuples);
    the others (a config.json's bookkeeping, settings the model does not have) are ignored."""
    names = {f.name for f in dataclasses.fields(params_type)}
    return {key: tuple(value) if isinstance(value, list) else value for key, value in config.items() if key in names}


def build_params(make: Callable, fields: dict, source: str, hint: str = ""):
    """`make(**fields)` (a params dataclass, or a function that fills defaults first); its TypeError or
    ValueError becomes one CheckpointError naming `source`, then `hint` (where to fix it)."""
    try:
        return make(**fields)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: {err}{hint}") from None


def _few(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")


def load_strict(build: Callable[[], nn.Module], state: dict[str, Tensor], source: str, keep=None) -> nn.Module:
    """Build the module on the meta device and assign `state` to it: every key must match, shapes too.
    With `keep`, only the names it accepts are expected; the other parameters stay on the meta device."""
    with torch.device("meta"):
        model = build()
    expected = {k: v for k, v in model.state_dict().items() if keep is None or keep(k)}
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
    model.load_state_dict(state, strict=keep is None, assign=True)  # with keep: checked above
    return model.eval().requires_grad_(False)


def module_or_load(override, expected: type, name: str, load: Callable, default_src) -> nn.Module:
    """A component override: a loaded module of the `expected` class as it is, else `load(override or
    default_src)`. A module of another class (say diffusers' own) is refused with one sentence."""
    if isinstance(override, nn.Module):
        if not isinstance(override, expected):
            raise ValueError(
                f"{name} must be a {expected.__name__} or a checkpoint source, got a {type(override).__name__}"
            )
        return override
    return load(override or default_src)


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

"""What a diffusers pipeline folder says beyond its component models: its sampling schedule
(`scheduler/scheduler_config.json`)."""

from pathlib import Path

from flux.sampling import Schedule
from weights import CheckpointError, build_params, known_fields, read_json

# FlowMatchEulerDiscreteScheduler options that change the sigmas in ways Schedule does not implement
UNSUPPORTED_SCHEDULER_OPTIONS = {"shift_terminal": None, "use_karras_sigmas": False, "use_exponential_sigmas": False,
                                 "use_beta_sigmas": False, "invert_sigmas": False, "stochastic_sampling": False,
                                 "time_shift_type": "exponential"}


def load_schedule(root: Path | None, guidance_embed: bool) -> Schedule:
    """From `scheduler/scheduler_config.json` when the folder has one, else FLUX's defaults."""
    config_path = root / "scheduler" / "scheduler_config.json" if root is not None and root.is_dir() else None
    if config_path is None or not config_path.is_file():
        return Schedule(use_dynamic_shifting=guidance_embed)
    config = read_json(config_path)
    for option, default in UNSUPPORTED_SCHEDULER_OPTIONS.items():
        if config.get(option, default) != default:
            raise CheckpointError(f"{config_path}: {option} {config[option]!r} is not supported (only {default!r})")
    return build_params(Schedule, known_fields(Schedule, config), str(config_path))

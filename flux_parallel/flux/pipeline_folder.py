"""What a diffusers pipeline folder says beyond its component models: which pipeline it is
(`model_index.json`) and its sampling schedule (`scheduler/scheduler_config.json`).

`FluxPipeline` runs FLUX.1 text to image only. The FLUX.1 variants that condition on an image
ship as folders of the same shape, so a folder is refused by its `_class_name`, or by its
transformer's input channels when it has no `model_index.json` (a BFL file beside the others).
"""

from pathlib import Path

from torch import nn

from flux_parallel.flux.checkpoint import transformer_in_channels
from flux_parallel.flux.model import Flux
from flux_parallel.flux.sampling import Schedule
from flux_parallel.weights import CheckpointError, build_params, known_fields, read_json

PIPELINE_CLASS = "FluxPipeline"
LATENT_CHANNELS = 64  # 16 VAE channels x a 2x2 patch: what text to image feeds the transformer

# diffusers' FLUX pipelines other than text to image (diffusers/pipelines/flux/), and what they do
VARIANTS = {
    "FluxFillPipeline": "FLUX.1 Fill: inpainting and outpainting",
    "FluxControlPipeline": "FLUX.1 Canny or Depth: structural conditioning",
    "FluxKontextPipeline": "FLUX.1 Kontext: image editing",
    "FluxPriorReduxPipeline": "FLUX.1 Redux: image variation",
    "FluxImg2ImgPipeline": "image to image",
    "FluxInpaintPipeline": "inpainting",
    "FluxControlNetPipeline": "ControlNet conditioning",
}
# input channels of the transformers that take more than the noise: Fill adds the masked image's
# latents and the 8x8-packed mask (64 + 64 + 256), Canny and Depth the control image's latents (64 + 64)
CHANNEL_VARIANTS = {384: "FLUX.1 Fill (FluxFillPipeline)", 128: "FLUX.1 Canny or Depth (FluxControlPipeline)"}

# FlowMatchEulerDiscreteScheduler options that change the sigmas in ways Schedule does not implement
UNSUPPORTED_SCHEDULER_OPTIONS = {"shift_terminal": None, "use_karras_sigmas": False, "use_exponential_sigmas": False,
                                 "use_beta_sigmas": False, "invert_sigmas": False, "stochastic_sampling": False,
                                 "time_shift_type": "exponential"}


def check_model_index(index: Path) -> None:
    """One sentence naming the file if `model_index.json` is corrupt or names a pipeline other than FluxPipeline."""
    config = read_json(index)  # not JSON: "cannot read <file>: ..."
    if not isinstance(config, dict):
        raise CheckpointError(f"{index} is not a JSON object (a model_index.json maps the pipeline's parts)")
    name = config.get("_class_name")
    if not isinstance(name, str):
        raise CheckpointError(f"{index} has no _class_name string, so it does not say which pipeline the folder holds")
    if name != PIPELINE_CLASS:
        variant = f"{name} ({VARIANTS[name]})" if name in VARIANTS else name
        raise CheckpointError(f"{index} describes a {variant}; only FLUX.1 text to image ({PIPELINE_CLASS}) runs here")


def check_transformer_channels(transformer: str | Path | nn.Module) -> None:
    """Refuse a transformer that takes more than the packed noise latents, from its header or config only."""
    if isinstance(transformer, Flux):
        channels, source = transformer.params.in_channels, "the transformer given"
    elif isinstance(transformer, nn.Module):
        return  # not a Flux: module_or_load refuses it with its own sentence
    else:
        channels, source = transformer_in_channels(transformer)
    if channels is not None and channels != LATENT_CHANNELS:
        variant = CHANNEL_VARIANTS.get(channels, "a FLUX variant that conditions on an image")
        raise CheckpointError(
            f"{source}: the transformer takes {channels} input channels, not {LATENT_CHANNELS}: it is {variant}, "
            "which this text-to-image pipeline does not run"
        )


def check_pipeline_folder(root: Path, transformer: str | Path | nn.Module | None = None) -> None:
    """Before any weight is read: `root`'s model_index.json, when it has one, and the input channels of
    the transformer that will be loaded (the `transformer` override, else root's own)."""
    if root.is_dir() and (root / "model_index.json").is_file():
        check_model_index(root / "model_index.json")
    check_transformer_channels(root if transformer is None else transformer)


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

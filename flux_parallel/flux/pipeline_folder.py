"""What a diffusers pipeline folder says beyond its component models: which pipeline it is
(`model_index.json`) and its sampling schedule (`scheduler/scheduler_config.json`).

`FluxPipeline` runs FLUX.1 text to image, img2img and inpainting (schnell, dev), Kontext, Fill and
Canny/Depth. The transformer's kind ("text", "kontext", "fill", "control") comes from an explicit
`variant`, else the folder's `_class_name`, else a BFL file's name ("kontext" in it), else the
transformer's input channels (384 Fill, 128 Canny/Depth); they must agree with those channels.
"""

from pathlib import Path

from torch import nn

from flux_parallel.flux.checkpoint import transformer_in_channels
from flux_parallel.flux.model import Flux
from flux_parallel.flux.sampling import Schedule
from flux_parallel.weights import CheckpointError, build_params, known_fields, read_json

# --variant / variant=: the kind of transformer each FLUX.1 checkpoint is
VARIANT_KINDS = {"schnell": "text", "dev": "text", "kontext": "kontext", "fill": "fill", "canny": "control",
                 "depth": "control"}
# the input channels of each kind: Fill adds the masked image's latents and the 8x8-packed mask
# (64 + 64 + 256), Canny and Depth the control image's latents (64 + 64)
KIND_CHANNELS = {"text": 64, "kontext": 64, "fill": 384, "control": 128}
CHANNEL_KINDS = {64: "text", 384: "fill", 128: "control"}

# diffusers' FLUX pipelines (diffusers/pipelines/flux/): the kind of the ones that run here, what the others do
PIPELINE_KINDS = {"FluxPipeline": "text", "FluxImg2ImgPipeline": "text", "FluxInpaintPipeline": "text",
                  "FluxKontextPipeline": "kontext", "FluxFillPipeline": "fill", "FluxControlPipeline": "control"}
OTHER_PIPELINES = {
    "FluxPriorReduxPipeline": "FLUX.1 Redux: image variation",
    "FluxControlNetPipeline": "ControlNet conditioning",
    "FluxKontextInpaintPipeline": "Kontext inpainting",
}

# FlowMatchEulerDiscreteScheduler options that change the sigmas in ways Schedule does not implement
UNSUPPORTED_SCHEDULER_OPTIONS = {"shift_terminal": None, "use_karras_sigmas": False, "use_exponential_sigmas": False,
                                 "use_beta_sigmas": False, "invert_sigmas": False, "stochastic_sampling": False,
                                 "time_shift_type": "exponential"}


def model_index_kind(index: Path) -> str:
    """The kind of the pipeline `model_index.json` names; one sentence naming the file if it is corrupt or
    names a pipeline that does not run here."""
    config = read_json(index)  # not JSON: "cannot read <file>: ..."
    if not isinstance(config, dict):
        raise CheckpointError(f"{index} is not a JSON object (a model_index.json maps the pipeline's parts)")
    name = config.get("_class_name")
    if not isinstance(name, str):
        raise CheckpointError(f"{index} has no _class_name string, so it does not say which pipeline the folder holds")
    if name not in PIPELINE_KINDS:
        variant = f"{name} ({OTHER_PIPELINES[name]})" if name in OTHER_PIPELINES else name
        raise CheckpointError(f"{index} describes a {variant}; the FLUX.1 pipelines that run here are "
                              f"{', '.join(PIPELINE_KINDS)}")
    return PIPELINE_KINDS[name]


def check_variant(variant: str | None) -> None:
    if variant is not None and variant not in VARIANT_KINDS:
        raise ValueError(f"variant must be one of {', '.join(VARIANT_KINDS)}, got {variant!r}")


def transformer_kind(channels: int, source: str, claimed: str | None = None, claimed_by: str = "") -> str:
    """The kind of a transformer with `channels` inputs: `claimed` (by `claimed_by`, e.g. "variant kontext")
    when given and consistent with the channels, else the channels' own kind."""
    if channels not in CHANNEL_KINDS:
        raise CheckpointError(f"{source}: the transformer takes {channels} input channels: it is a FLUX variant this "
                              "pipeline does not run (64: text to image or Kontext, 128: Canny or Depth, 384: Fill)")
    if claimed is not None and KIND_CHANNELS[claimed] != channels:
        raise CheckpointError(f"{source}: {claimed_by} needs a transformer with {KIND_CHANNELS[claimed]} input "
                              f"channels, this one takes {channels}")
    return claimed or CHANNEL_KINDS[channels]


def _source_channels(transformer: str | Path | nn.Module) -> tuple[int | None, str, bool]:
    """(input channels or None, the source named in messages, whether a BFL file's name says Kontext)."""
    if isinstance(transformer, Flux):
        return transformer.params.in_channels, "the transformer given", False
    channels, path = transformer_in_channels(transformer)  # path: a diffusers config.json or a BFL file
    return channels, str(path), path.name != "config.json" and "kontext" in path.name.lower()


def pipeline_kind(root: Path, transformer: str | Path | nn.Module | None = None, variant: str | None = None) -> str:
    """Before any weight is read: the kind of transformer a pipeline from `root` (with the `transformer`
    override) runs, from `variant`, root's model_index.json, a BFL file's name, then the input channels."""
    check_variant(variant)
    claimed, claimed_by = (VARIANT_KINDS[variant], f"variant {variant}") if variant else (None, "")
    if root.is_dir() and (root / "model_index.json").is_file():
        index_kind = model_index_kind(root / "model_index.json")
        if claimed is None and index_kind != "text":
            claimed, claimed_by = index_kind, f"{root / 'model_index.json'}'s pipeline"
    source = root if transformer is None else transformer
    if isinstance(source, nn.Module) and not isinstance(source, Flux):
        return claimed or "text"  # not a Flux: module_or_load refuses it with its own sentence
    channels, name, kontext_file = _source_channels(source)
    if claimed is None and kontext_file:
        claimed, claimed_by = "kontext", "a file named kontext"
    if channels is None:
        return claimed or "text"  # the loader reports what is wrong with the file
    return transformer_kind(channels, name, claimed, claimed_by)


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

"""FLUX.1 in plain PyTorch: the MMDiT, its text encoders, the sampler and the pipeline."""

from flux.checkpoint import load_transformer
from flux.configs import CONFIGS, FluxParams
from flux.model import Flux
from flux.text_encoders import TextConditioner, load_clip, load_t5
from flux.tokenizers import load_clip_tokenizer, load_t5_tokenizer

__all__ = ["CONFIGS", "Flux", "FluxParams", "load_transformer"]
__all__ += ["TextConditioner", "load_clip", "load_clip_tokenizer", "load_t5", "load_t5_tokenizer"]
from flux.pipeline import FluxPipeline  # noqa: E402  (after the loaders it builds on)

__all__ += ["FluxPipeline"]

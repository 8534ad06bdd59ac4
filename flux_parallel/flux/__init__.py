"""FLUX.1 in plain PyTorch: the MMDiT, its text encoders, the sampler and the pipeline."""

from flux_parallel.flux.checkpoint import load_transformer
from flux_parallel.flux.configs import CONFIGS, FluxParams
from flux_parallel.flux.model import Flux
from flux_parallel.flux.pipeline import FluxPipeline
from flux_parallel.flux.text_encoders import TextConditioner, load_clip, load_t5
from flux_parallel.flux.tokenizers import load_clip_tokenizer, load_t5_tokenizer

__all__ = ["CONFIGS", "Flux", "FluxParams", "load_transformer"]
__all__ += ["TextConditioner", "load_clip", "load_clip_tokenizer", "load_t5", "load_t5_tokenizer"]
__all__ += ["FluxPipeline"]

"""FLUX.1 in plain PyTorch: the MMDiT, its text encoders, the sampler and the pipeline."""

from flux.configs import CONFIGS, FluxParams
from flux.model import Flux
from flux.checkpoint import load_transformer

__all__ = ["CONFIGS", "Flux", "FluxParams", "load_transformer"]

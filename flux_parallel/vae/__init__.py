"""The FLUX.1 autoencoder: model (`autoencoder.py`) and checkpoint loading (`checkpoint.py`)."""

from flux_parallel.vae.autoencoder import VAE_CONFIGS, AutoEncoder, AutoEncoderParams
from flux_parallel.vae.checkpoint import load_autoencoder

__all__ = ["VAE_CONFIGS", "AutoEncoder", "AutoEncoderParams", "load_autoencoder"]

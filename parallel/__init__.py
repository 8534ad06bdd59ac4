"""Parallel strategies for FLUX.1 inference, composed through one ParallelContext."""

from parallel.context import ParallelContext, init_distributed
from parallel.apply import parallelize_flux
from parallel.vae import decode_in_stripes, decode_parallel

__all__ = ["ParallelContext", "decode_in_stripes", "decode_parallel", "init_distributed", "parallelize_flux"]

"""Parallel strategies for FLUX.1 inference, composed through one ParallelContext."""

from parallel.apply import parallelize_flux, sync_gradients
from parallel.comm import count_comm
from parallel.context import ParallelContext, close_distributed, init_distributed
from parallel.runtime import (
    Conditioning,
    ParallelDenoiser,
    batch_slice,
    check_decode,
    decode,
    gather_batch,
    parallelize,
)
from parallel.stages import release_other_stages, stage_filter
from parallel.stripes import decode_in_stripes
from parallel.vae import decode_parallel

__all__ = [
    "Conditioning",
    "ParallelContext",
    "ParallelDenoiser",
    "batch_slice",
    "check_decode",
    "close_distributed",
    "count_comm",
    "decode",
    "decode_in_stripes",
    "decode_parallel",
    "gather_batch",
    "init_distributed",
    "parallelize",
    "parallelize_flux",
    "release_other_stages",
    "stage_filter",
    "sync_gradients",
]

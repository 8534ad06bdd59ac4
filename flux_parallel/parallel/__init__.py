"""Parallel strategies for FLUX.1 inference, composed through one ParallelContext."""

from flux_parallel.parallel.apply import parallelize_flux, sync_gradients
from flux_parallel.parallel.comm import count_comm
from flux_parallel.parallel.context import ParallelContext, close_distributed, init_distributed
from flux_parallel.parallel.runtime import (
    Conditioning,
    ImageCond,
    ParallelDenoiser,
    batch_slice,
    check_decode,
    decode,
    gather_batch,
    parallelize,
)
from flux_parallel.parallel.stages import release_other_stages, stage_filter
from flux_parallel.parallel.stripes import decode_in_stripes
from flux_parallel.parallel.vae import decode_parallel, encode_parallel

__all__ = [
    "Conditioning",
    "ImageCond",
    "ParallelContext",
    "ParallelDenoiser",
    "batch_slice",
    "check_decode",
    "close_distributed",
    "count_comm",
    "decode",
    "decode_in_stripes",
    "decode_parallel",
    "encode_parallel",
    "gather_batch",
    "init_distributed",
    "parallelize",
    "parallelize_flux",
    "release_other_stages",
    "stage_filter",
    "sync_gradients",
]

"""Loading checkpoints strictly, shared by every model of the project (transformer, text encoders,
VAE) and owned by none of them: `flux/` and `vae/` both build on it, never on each other.

files.py finds and reads safetensors files (never pickles); modules.py turns what was read into a
module (dtype and device, params, strict assignment, seeded random weights); loader.py is the one
loader of the models that ship as a black-forest-labs single file or a diffusers folder.
"""

from flux_parallel.weights.files import (
    DIFFUSERS_STEM,
    PICKLE_SUFFIXES,
    CheckpointError,
    read_json,
    read_safetensors,
    resolve,
    safetensors_keys,
    weight_files,
)
from flux_parallel.weights.loader import CheckpointFormat, block_count, load_checkpoint, single_file_fields
from flux_parallel.weights.modules import (
    DTYPES,
    SUPPORTED_DTYPES,
    build_params,
    check_device,
    check_dtype,
    known_fields,
    load_strict,
    module_or_load,
    seeded_init,
)

__all__ = [
    "DIFFUSERS_STEM", "PICKLE_SUFFIXES", "CheckpointError", "read_json", "read_safetensors", "resolve",
    "safetensors_keys", "weight_files", "CheckpointFormat", "block_count", "load_checkpoint", "single_file_fields",
    "DTYPES", "SUPPORTED_DTYPES", "build_params", "check_device", "check_dtype", "known_fields", "load_strict",
    "module_or_load", "seeded_init",
]

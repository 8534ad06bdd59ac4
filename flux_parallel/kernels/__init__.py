"""Hot operations, each with a plain math reference used by the tests."""

from flux_parallel.kernels.attention import (
    BACKENDS,
    attend,
    attention,
    attention_for,
    attention_reference,
    attention_with_lse,
    attention_with_lse_reference,
    available_backends,
    check_backend,
    default_backend,
)
from flux_parallel.kernels.norm import rms_norm, rms_norm_reference
from flux_parallel.kernels.rope import apply_rope, apply_rope_reference, rope_table

__all__ = [
    "BACKENDS",
    "attend",
    "attention_for",
    "available_backends",
    "check_backend",
    "default_backend",
    "attention",
    "attention_reference",
    "attention_with_lse",
    "attention_with_lse_reference",
    "apply_rope",
    "apply_rope_reference",
    "rope_table",
    "rms_norm",
    "rms_norm_reference",
]

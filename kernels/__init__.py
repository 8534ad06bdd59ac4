"""Hot operations, each with a plain math reference used by the tests."""

from kernels.attention import attention, attention_reference, attention_with_lse, attention_with_lse_reference
from kernels.norm import rms_norm, rms_norm_reference
from kernels.rope import apply_rope, apply_rope_reference, rope_table

__all__ = [
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

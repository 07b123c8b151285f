"""JAX/Pallas twins of the lepton-kernels ops (importing this never imports torch).

Same arguments and semantics as the torch API, on ``jax.Array`` s and usable under ``jax.jit``:
Mosaic TPU kernels where one exists, plain-jnp references everywhere else. Every op takes
``backend="auto" | "tpu" | "gpu" | "interpret" | "reference"`` (see
``lepton_kernels.jax._dispatch``). Kernels, wrappers and references live in
``lepton_kernels.jax.ops.<op>``.
"""
from ._dispatch import BACKENDS, BackendUnavailableError
from .ops.flash_attention import FlashBlockSizes, flash_attention, flash_attention_reference
from .ops.paged_attention import paged_attention, paged_attention_reference
from .ops.paged_kv_write import paged_kv_write, paged_kv_write_reference
from .ops.quant_matmul import (
    QuantBlockSizes,
    QuantizedWeight,
    dequantize_weight,
    quant_matmul,
    quant_matmul_reference,
    quantize_weight,
)
from .ops.ragged_paged_attention import PagedBlockSizes

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "FlashBlockSizes",
    "PagedBlockSizes",
    "QuantBlockSizes",
    "QuantizedWeight",
    "dequantize_weight",
    "flash_attention",
    "flash_attention_reference",
    "paged_attention",
    "paged_attention_reference",
    "paged_kv_write",
    "paged_kv_write_reference",
    "quant_matmul",
    "quant_matmul_reference",
    "quantize_weight",
]

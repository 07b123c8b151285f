"""Quantized weights for linear layers: quantize, import GPTQ/AWQ checkpoints, run ``QuantLinear``.

See :mod:`lepton_kernels.quant.weight` for the schemes and the storage layouts, and
:func:`lepton_kernels.ops.quant_matmul.quant_matmul` for the matmul.
"""
from .importers import from_awq, from_gptq
from .linear import QuantLinear
from .weight import SCHEMES, QuantizedWeight, quantize_weight

__all__ = ["SCHEMES", "QuantLinear", "QuantizedWeight", "from_awq", "from_gptq", "quantize_weight"]

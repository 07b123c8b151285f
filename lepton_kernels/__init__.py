"""lepton-kernels: GPU kernels for LLM inference behind one dispatching API.

Every op takes ``backend="auto" | "cuda" | "triton" | "torch"``; see ``lepton_kernels._backends``.

The torch API loads on first use, so ``import lepton_kernels.jax`` works without torch.
"""
import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_API = {
    "BACKENDS": "._backends",
    "BackendUnavailableError": "._backends",
    "BlockAllocator": ".cache",
    "OutOfBlocksError": ".cache",
    "PagedKVCache": ".cache",
    "flash_attention": ".ops.flash_attention",
    "paged_attention": ".ops.paged_attention",
    "paged_kv_write": ".ops.paged_kv_write",
    "quant_matmul": ".ops.quant_matmul",
    "QuantizedWeight": ".quant.weight",
    "quantize_weight": ".quant.weight",
    "QuantLinear": ".quant.linear",
}

__all__ = sorted(_API)


def __getattr__(name):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'lepton_kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))

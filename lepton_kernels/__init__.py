"""lepton-kernels: GPU kernels for LLM inference behind one dispatching API.

Every op takes ``backend="auto" | "cuda" | "triton" | "torch"``; see ``lepton_kernels._backends``.
"""
from ._backends import BACKENDS, BackendUnavailableError
from .ops.paged_kv_write import paged_kv_write

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "paged_kv_write",
]

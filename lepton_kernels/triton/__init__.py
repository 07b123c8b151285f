"""Triton kernels. Importing this package never fails; ``unavailable_reason`` says why the
Triton backend cannot run (not installed, or CPU tensors without ``TRITON_INTERPRET=1``)."""
from __future__ import annotations

import os
from typing import Optional

import torch

from .._backends import trace_as_constant

try:
    import triton  # noqa: F401

    _IMPORT_ERROR: Optional[str] = None
except ImportError as exc:
    triton = None
    _IMPORT_ERROR = f"triton is not installed ({exc}); pip install 'lepton-kernels[triton]'"


def interpreting() -> bool:
    """Triton's interpreter runs kernels on the CPU with numpy (tests only: slow)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@trace_as_constant
def unavailable_reason(device: torch.device, allow_interpreter: bool = True, needs_fp8: bool = False) -> Optional[str]:
    """``None`` when Triton kernels can run on ``device``; otherwise a sentence saying why.

    ``needs_fp8``: the kernel converts to float8 e4m3, which Triton lowers only on sm_89+.
    """
    if triton is None:
        return _IMPORT_ERROR
    if device.type == "cuda":
        if torch.version.hip is not None:
            return None
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 0):
            return "the Triton kernels need compute capability 8.0 or newer"
        if needs_fp8 and capability < (8, 9):
            return "Triton converts to float8 e4m3 only on compute capability 8.9 or newer"
        return None
    if device.type == "cpu" and interpreting():
        return None if allow_interpreter else "TRITON_INTERPRET=1 is for tests, auto skips it"
    return f"inputs are on {device.type}; Triton needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU)"

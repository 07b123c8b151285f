"""Triton kernels. Importing this package never fails; ``unavailable_reason`` says why the
Triton backend cannot run (not installed, or CPU tensors without ``TRITON_INTERPRET=1``)."""
from __future__ import annotations

import os
from typing import Optional

import torch

try:
    import triton  # noqa: F401

    _IMPORT_ERROR: Optional[str] = None
except ImportError as exc:
    triton = None
    _IMPORT_ERROR = f"triton is not installed ({exc}); pip install 'lepton-kernels[triton]'"


def interpreting() -> bool:
    """Triton's interpreter runs kernels on the CPU with numpy (tests only: slow)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason(device: torch.device, *, allow_interpreter: bool = True) -> Optional[str]:
    if triton is None:
        return _IMPORT_ERROR
    if device.type == "cuda":
        if torch.version.hip is None and torch.cuda.get_device_capability(device)[0] < 8:
            return "the Triton kernels need compute capability 8.0 or newer"
        return None
    if device.type == "cpu" and interpreting():
        return None if allow_interpreter else "TRITON_INTERPRET=1 is for tests, auto skips it"
    return f"inputs are on {device.type}; Triton needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU)"

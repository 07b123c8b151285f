"""Thin wrappers around the compiled module ``lepton_kernels._C``.

The extension links no libtorch: wrappers here hand it data pointers, sizes, strides and the
current stream. Importing this package never fails; ``unavailable_reason`` says why the
compiled backend cannot run (no extension, built without nvcc, arch not compiled in, no GPU).
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

from .._backends import trace_as_constant

try:
    from .. import _C  # type: ignore[attr-defined]

    _IMPORT_ERROR: Optional[str] = None
except ImportError as exc:  # a source tree without a build, or a broken install
    _C = None
    _IMPORT_ERROR = f"the compiled extension lepton_kernels._C could not be imported ({exc})"

DTYPE_CODES = {
    torch.float16: 0,
    torch.bfloat16: 1,
    torch.float32: 2,
    torch.float8_e4m3fn: 3,
}


def build_info() -> dict:
    if _C is None:
        return {"cuda": False, "reason": _IMPORT_ERROR}
    return dict(_C.build_info())


def compiled_archs() -> Tuple[str, ...]:
    info = build_info()
    if not info.get("cuda"):
        return ()
    return tuple(a for a in info["cuda_archs"].replace(";", ",").split(",") if a)


def _arch_number(arch: str) -> int:
    return int("".join(ch for ch in arch if ch.isdigit()))


@functools.lru_cache(maxsize=None)
def _device_reason(index: int) -> Optional[str]:
    info = build_info()
    if not info.get("cuda"):
        return info.get("reason", "the extension has no CUDA kernels")
    major, minor = torch.cuda.get_device_capability(index)
    cc = major * 10 + minor
    archs = [_arch_number(a) for a in compiled_archs()]
    # Machine code for this exact arch, or PTX of the newest arch that the driver can JIT.
    if cc in archs or cc >= max(archs):
        return None
    return f"the extension was compiled for sm_{'/'.join(compiled_archs())}, not for this GPU's sm_{cc}"


@trace_as_constant
def unavailable_reason(device: torch.device) -> Optional[str]:
    """``None`` when compiled kernels can run on ``device``; otherwise a sentence saying why."""
    if device.type != "cuda":
        return f"inputs are on {device.type}, compiled kernels need CUDA tensors"
    if torch.version.hip is not None:
        return "ROCm GPUs are not supported by the compiled kernels"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _device_reason(index)


_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def current_stream(device: torch.device) -> int:
    """The current CUDA stream of ``device`` as an integer handle (cheap: no Stream object)."""
    if _raw_stream is not None:
        return _raw_stream(device.index if device.index is not None else torch.cuda.current_device())
    return torch.cuda.current_stream(device).cuda_stream

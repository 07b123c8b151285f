"""Argument checks shared by the public ops.

Every check raises at the Python boundary with the argument's name, what was expected and
what arrived, so a bad call never reaches a kernel (no asserts: they vanish under ``-O``).
"""
from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence, Union

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def debug_checks_enabled() -> bool:
    """Data-dependent checks (index ranges) cost a device sync; run them only on request."""
    return os.environ.get("LEPTON_KERNELS_DEBUG", "0") not in ("", "0", "false", "False")


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    name: str,
    x: object,
    *,
    ndim: Union[int, Sequence[int], None] = None,
    dtypes: Optional[Sequence[torch.dtype]] = None,
    device: Optional[torch.device] = None,
    last_dim_contiguous: bool = False,
) -> torch.Tensor:
    """Check the type, rank, dtype, device and innermost stride of one tensor argument."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.dim() not in allowed:
            want = " or ".join(str(n) for n in allowed)
            raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in ({_dtype_names(dtypes)}), got {x.dtype}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} must be on {device} (where the other inputs are), got {x.device}")
    if last_dim_contiguous and x.dim() > 0 and x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(
            f"{name} must be contiguous in its last dimension (stride 1), got strides {tuple(x.stride())}"
        )
    return x


def check_shape(name: str, x: torch.Tensor, expected: Sequence[Optional[int]], what: str = "") -> None:
    """Compare a shape against an expected one; ``None`` entries match any size."""
    shape = x.shape
    ok = len(shape) == len(expected)
    if ok:
        for size, want in zip(shape, expected):
            if want is not None and size != want:
                ok = False
                break
    if not ok:
        items = ["*" if e is None else str(e) for e in expected]
        want = "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
        suffix = f" {what}" if what else ""
        raise ValueError(f"{name} must have shape {want}{suffix}, got {tuple(x.shape)}")


def check_same_dtype(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} must have the same dtype as {ref_name} ({ref.dtype}), got {x.dtype}")


def check_scale(name: str, scale: object, num_heads: int, device: torch.device) -> Optional[torch.Tensor]:
    """A dequantization scale: float32, one value (shape () or (1,)) or one per kv head."""
    if scale is None:
        return None
    check_tensor(name, scale, dtypes=(torch.float32,), device=device)
    if scale.numel() != 1 and tuple(scale.shape) != (num_heads,):
        raise ValueError(
            f"{name} must hold one value (per tensor) or have shape ({num_heads},) (per kv head), "
            f"got shape {tuple(scale.shape)}"
        )
    return scale


def check_index_range(name: str, index: torch.Tensor, upper: int, what: str) -> None:
    """Indices must be < ``upper`` (negative ones mean "skip"). Reads the data: syncs the device."""
    too_big = index >= upper
    if bool(too_big.any()):
        i = int(too_big.nonzero()[0, 0])
        raise ValueError(f"{name}[{i}] = {int(index[i])} is out of range for {what} (max {upper - 1})")

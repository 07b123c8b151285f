"""Checks of the scalar attention options, shared by the torch and the JAX APIs.

Framework-free on purpose: ``lepton_kernels.jax`` must not import torch, and the torch API must
not import jax, yet both must accept and reject exactly the same options.
"""
from __future__ import annotations

import math
import numbers
from typing import Tuple


def is_int(x: object) -> bool:
    """A Python or NumPy integer, or torch's symbolic ``SymInt`` (sizes under torch.compile),
    recognized by name so that this module never imports torch. Not a bool."""
    if type(x) is int:  # the common case, before the slower abstract-class check
        return True
    if isinstance(x, bool):
        return False
    return isinstance(x, numbers.Integral) or type(x).__name__ == "SymInt"


def check_mask_options(causal: object, window: object, softcap: object) -> Tuple[bool, int, int, float]:
    """Validate causal/window/softcap; return the normalized (causal, left, right, softcap).

    ``window = (left, right)``, -1 = unbounded. ``causal=True`` means a right window of 0 (and
    conflicts with ``right > 0``); a right window of 0 is causal.
    """
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError(f"window must be a (left, right) pair of ints, got {window!r}")
    left, right = window
    for name, value in (("window[0] (left)", left), ("window[1] (right)", right)):
        if not is_int(value):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < -1:
            raise ValueError(f"{name} must be -1 (unbounded) or >= 0, got {value}")
    if causal and right > 0:
        raise ValueError(
            f"causal=True conflicts with window={tuple(window)}: causal means a right window of 0; "
            f"pass causal=False to look {right} keys ahead"
        )
    causal = causal or right == 0
    right = 0 if causal else right
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap must be a float, got {type(softcap).__name__}")
    if not softcap >= 0:  # also rejects NaN
        raise ValueError(f"softcap must be >= 0 (0 turns it off), got {softcap}")
    return causal, int(left), int(right), float(softcap)


def check_softmax_scale(softmax_scale: object, head_dim: int) -> float:
    """The score scale: a finite Python number, default ``1/sqrt(head_dim)``."""
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    if not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
    return float(softmax_scale)


def check_max_seqlen(name: str, value: object, default):
    """A static upper bound of sequence lengths (it sizes kernel grids without reading data)."""
    if value is None:
        return default
    if not is_int(value):
        raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    # Plain and NumPy ints become Python ints; a SymInt stays symbolic (int() would specialize it).
    return int(value) if isinstance(value, numbers.Integral) else value

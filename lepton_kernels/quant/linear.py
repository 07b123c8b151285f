"""``QuantLinear``: a drop-in ``nn.Linear`` replacement whose weight is a :class:`QuantizedWeight`."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops import quant_matmul as _quant_matmul_op  # the module: its function is defined after this import runs
from .weight import QuantizedWeight, quantize_weight

_WEIGHT_PREFIX = "weight."


def _same_dtype(fn, t: torch.Tensor) -> torch.Tensor:
    """Apply a Module._apply conversion to a quantized tensor but keep its dtype.

    ``model.half()`` or ``model.to(torch.bfloat16)`` must not turn fp8 weights or the scales
    into another dtype (the format fixes them); only the device follows.
    """
    out = fn(t)
    return out if out.dtype == t.dtype else t.to(out.device)


class QuantLinear(nn.Module):
    """``y = x @ W^T + b`` with ``W`` quantized; runs :func:`lepton_kernels.quant_matmul`.

    Moves with the model (``.to(device)``, ``.cuda()``); dtype casts of the model cast only the
    bias. ``state_dict()`` holds the weight's tensors under ``weight.<key>`` (see
    :meth:`QuantizedWeight.state_dict`) and ``bias``.

    Args:
        weight: the quantized ``[out_features, in_features]`` weight.
        bias: ``[out_features]`` floating tensor or None; ``forward`` casts it to ``x``'s dtype.
        backend: passed to ``quant_matmul`` on every call.
    """

    def __init__(self, weight: QuantizedWeight, bias: Optional[torch.Tensor] = None, *, backend: str = "auto"):
        super().__init__()
        if not isinstance(weight, QuantizedWeight):
            raise TypeError(f"weight must be a QuantizedWeight, got {type(weight).__name__}")
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
                got = bias.dtype if isinstance(bias, torch.Tensor) else type(bias).__name__
                raise TypeError(f"bias must be a floating torch.Tensor or None, got {got}")
            if tuple(bias.shape) != (weight.n,):
                raise ValueError(f"bias must have shape ({weight.n},) (out_features), got {tuple(bias.shape)}")
            if bias.device != weight.device:
                raise ValueError(f"bias must be on {weight.device} (where weight is), got {bias.device}")
        self.weight = weight
        self.register_buffer("bias", bias)
        self.backend = backend

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str, *, backend: str = "auto", **kw) -> "QuantLinear":
        """Quantize an ``nn.Linear``; ``kw`` (group_size, symmetric) go to :func:`quantize_weight`."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        qw = quantize_weight(linear.weight.detach(), scheme, **kw)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(qw, bias, backend=backend)

    @property
    def in_features(self) -> int:
        return self.weight.k

    @property
    def out_features(self) -> int:
        return self.weight.n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias
        if bias is not None and isinstance(x, torch.Tensor) and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return _quant_matmul_op.quant_matmul(x, self.weight, bias, backend=self.backend)

    def extra_repr(self) -> str:
        w = self.weight
        group = "per-channel" if w.group_size == -1 else str(w.group_size)
        return (f"in_features={w.k}, out_features={w.n}, scheme={w.scheme}, group_size={group}, "
                f"symmetric={w.symmetric}, bias={self.bias is not None}")

    # -- moving and (de)serializing the non-Parameter weight ------------------------------------
    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self.weight = self.weight.map_tensors(lambda t: _same_dtype(fn, t))
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, t in self.weight.state_dict().items():
            destination[prefix + _WEIGHT_PREFIX + key] = t

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        head = prefix + _WEIGHT_PREFIX
        unexpected_keys[:] = [key for key in unexpected_keys if not key.startswith(head)]
        sub = {key[len(head):]: t for key, t in state_dict.items() if key.startswith(head)}
        if not sub:
            if strict:
                missing_keys.extend(head + key for key in self.weight.state_dict())
            return
        try:
            weight = QuantizedWeight.from_state_dict(sub)
        except (TypeError, ValueError) as err:
            error_msgs.append(f"{head[:-1]}: {err}")
            return
        if weight.shape != self.weight.shape:
            error_msgs.append(f"{head[:-1]}: shape {tuple(weight.shape)} in the checkpoint, "
                              f"{tuple(self.weight.shape)} in the model")
            return
        self.weight = weight.to(self.weight.device)

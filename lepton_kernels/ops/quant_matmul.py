"""``quant_matmul``: ``y = x @ W^T (+ bias)`` with ``W`` a :class:`~lepton_kernels.quant.QuantizedWeight`.

Backends see the weight as its tensors plus metadata (a Python object cannot cross a
torch.library op), with ``x`` flattened to 2-D. Every implementation, its ``supports``
function and the registered example take the same positional arguments::

    (x [M, K], packed, scales, zeros, perm, bias, scheme, layout, group_size, n, k)

and return ``[M, N]`` in ``x``'s dtype (M >= 1: the public function answers M = 0 itself).
A backend that does not know a ``layout`` must say so from ``supports``.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _backends, _validate
from .. import cuda as _cuda
from .. import triton as _triton
from .._library import define_op, lazy
from ..quant.weight import QuantizedWeight, quantize_weight

OP = "quant_matmul"
SCHEMA = (
    "(Tensor x, Tensor packed, Tensor scales, Tensor? zeros, Tensor? perm, Tensor? bias,"
    " str scheme, str layout, int group_size, int n, int k) -> Tensor"
)


def fake(x, packed, scales, zeros, perm, bias, scheme, layout, group_size, n, k) -> torch.Tensor:
    return x.new_empty((x.shape[0], n))


_torch_impl = lazy("lepton_kernels.reference.quant_matmul", "quant_matmul")
_torch_op = define_op(f"{OP}_torch", SCHEMA, _torch_impl, fake, "CompositeExplicitAutograd")
_backends.register(OP, "torch", eager=_torch_impl)(_torch_op)

_triton_impl = lazy("lepton_kernels.triton.quant_matmul", "quant_matmul")
_triton_kernel_supports = lazy("lepton_kernels.triton.quant_matmul", "supports")


def _triton_supports(x, *args) -> Optional[str]:
    # Checked first so a missing triton is a reason, not an ImportError from the kernel module.
    reason = _triton.unavailable_reason(x.device)
    return reason if reason is not None else _triton_kernel_supports(x, *args)


_triton_op = define_op(f"{OP}_triton", SCHEMA, _triton_impl, fake, "CompositeExplicitAutograd")
_backends.register(OP, "triton", _triton_supports, eager=_triton_impl)(_triton_op)

# The compiled kernel serves every scheme for up to 16 tokens (decode; w8a8 and fp8 quantize the
# activations per token in a small kernel first, fp8 on sm_89+); it declines the rest, which
# "auto" hands to Triton.
_cuda_impl = lazy("lepton_kernels.cuda.quant_matmul", "quant_matmul")
_cuda_kernel_supports = lazy("lepton_kernels.cuda.quant_matmul", "supports")


def _cuda_supports(x, *args) -> Optional[str]:
    reason = _cuda.unavailable_reason(x.device)
    return reason if reason is not None else _cuda_kernel_supports(x, *args)


# Above this many tokens the Triton w8a16 kernel matched or beat the CUDA one on an H200.
# (w8a8 and fp8 take the CUDA kernel up to its 16 tokens.)
CUDA_W8A16_AUTO_MAX_M = 8


def _cuda_auto_supports(x, packed, scales, zeros, perm, bias, scheme, *args) -> Optional[str]:
    if scheme == "w8a16" and x.shape[0] > CUDA_W8A16_AUTO_MAX_M and \
            _triton_supports(x, packed, scales, zeros, perm, bias, scheme, *args) is None:
        return f"w8a16 with more than {CUDA_W8A16_AUTO_MAX_M} tokens: the Triton kernel is as fast or faster"
    return None


_cuda_op = define_op(f"{OP}_cuda", SCHEMA, _cuda_impl, fake, "CUDA")
_backends.register(OP, "cuda", _cuda_supports, eager=_cuda_impl, auto_supports=_cuda_auto_supports)(_cuda_op)


def quant_matmul(
    x: torch.Tensor,
    qw: QuantizedWeight,
    bias: Optional[torch.Tensor] = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Multiply activations by a quantized weight: ``x @ W^T + bias``.

    Args:
        x: ``[..., K]`` float16 or bfloat16 (float32 too on the torch backend), on ``qw``'s
            device.
        qw: the quantized ``[N, K]`` weight. For "w8a8" and "fp8" weights, ``x`` is quantized
            per token on the fly (see ``lepton_kernels.reference.quant_matmul``).
        bias: ``[N]`` in ``x``'s dtype, or None.
        backend: "auto" (default; ``LEPTON_KERNELS_BACKEND`` overrides), "cuda", "triton" or
            "torch".

    Returns:
        ``[..., N]`` in ``x``'s dtype.
    """
    _check_args(x, qw, bias)
    n, k = qw.n, qw.k
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.shape[0] == 0:
        return x.new_empty((*lead, n))
    args = (x2, qw.packed, qw.scales, qw.zeros, qw.perm, bias, qw.scheme, qw.layout, qw.group_size, n, k)
    impl = _backends.select(OP, backend, *args)
    return impl(*args).reshape(*lead, n)


def _check_args(x, qw, bias) -> None:
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"qw must be a QuantizedWeight (see lepton_kernels.quant.quantize_weight), "
                        f"got {type(qw).__name__}")
    if isinstance(x, torch.Tensor) and x.device != qw.device:
        raise ValueError(f"x must be on the device of qw ({qw.device}), got {x.device}")
    _validate.check_tensor("x", x, dtypes=_validate.FLOAT_DTYPES)
    if x.dim() == 0:
        raise ValueError(f"x must have shape (..., K={qw.k}), got a 0-d tensor")
    if x.shape[-1] != qw.k:
        raise ValueError(f"x must have shape (..., K={qw.k}) (K = input channels of qw), got {tuple(x.shape)}")
    if bias is not None:
        _validate.check_tensor("bias", bias, ndim=1, device=x.device)
        _validate.check_same_dtype("bias", bias, "x", x)
        _validate.check_shape("bias", bias, (qw.n,), "(one value per output channel of qw)")


@_backends.register_example(OP)
def _example(device: torch.device):
    x = torch.randn(5, 256, device=device, dtype=torch.float16)
    qw = quantize_weight(torch.randn(96, 256, device=device, dtype=torch.float16), "w4a16", group_size=64)
    bias = torch.randn(96, device=device, dtype=torch.float16)
    return (x, qw, bias), {}

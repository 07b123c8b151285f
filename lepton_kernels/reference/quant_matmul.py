"""Reference quantized matmul: ``y = x @ W^T (+ bias)`` with ``W`` stored quantized.

Weight-only schemes (w4a16, w8a16) dequantize ``W`` to float32 (exactly) and multiply in
float32. w8a8 and fp8 emulate the kernels' dynamic per-token activation quantization
bit-for-bit (formulas in :func:`quantize_rows_int8` / :func:`quantize_rows_fp8`), then:

* w8a8: the int8 dot products are summed exactly (in float64, exact for K < 2**37), and the sum
  is scaled by ``s_x[m] * s_w[n]`` in float64.
* fp8: e4m3 x e4m3 products are exact in float32 and are summed in float32 (as the tensor
  cores do), then scaled by ``s_x[m] * s_w[n]`` in float32.

The result (plus bias, added in float32 or float64) is cast to ``x``'s dtype.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..quant.weight import FP8_E4M3_MAX, INT8_MAX, dequantize_packed

_FP32_TINY = torch.finfo(torch.float32).tiny


def quantize_rows_int8(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8: ``s = max(max|x_row| / 127, tiny)``, ``q = clamp(round(x / s), ±127)``.

    Computed in float32 (division, round half to even). Returns ``(q int8 [M, K], s fp32 [M, 1])``.
    """
    x32 = x.to(torch.float32)
    # Divide in float64 and round once: CUDA torch turns division by a Python number into a
    # multiply by its reciprocal, which can be an ulp off the IEEE quotient the kernels use.
    scale = (x32.abs().amax(dim=-1, keepdim=True).double() / INT8_MAX).float().clamp_min(_FP32_TINY)
    q = torch.round(x32 / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def quantize_rows_fp8(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row e4m3: ``s = max(max|x_row| / 448, tiny)``, ``q = e4m3(clamp(x / s, ±448))``.

    Computed in float32, rounded to nearest even by the conversion. Returns
    ``(q float8_e4m3fn [M, K], s fp32 [M, 1])``.
    """
    x32 = x.to(torch.float32)
    scale = (x32.abs().amax(dim=-1, keepdim=True).double() / FP8_E4M3_MAX).float().clamp_min(_FP32_TINY)
    q = (x32 / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def quant_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    perm: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    scheme: str,
    layout: str,
    group_size: int,
    n: int,
    k: int,
) -> torch.Tensor:
    """x: ``[M, K]``; the weight's stored tensors (see ``lepton_kernels.quant.weight``) -> ``[M, N]``."""
    if perm is not None:  # stored channel j is original channel perm[j]
        x = x.index_select(1, perm.long())

    if scheme in ("w4a16", "w8a16"):
        w = dequantize_packed(packed, scales, zeros, scheme, layout, group_size, n, k)
        out = x.to(torch.float32) @ w.t()
        if bias is not None:
            out = out + bias.to(torch.float32)
    elif scheme == "w8a8":
        q_x, s_x = quantize_rows_int8(x)
        exact = q_x.to(torch.float64) @ packed.to(torch.float64).t()
        out = exact * s_x.to(torch.float64) * scales.to(torch.float64).t()
        if bias is not None:
            out = out + bias.to(torch.float64)
    elif scheme == "fp8":
        q_x, s_x = quantize_rows_fp8(x)
        out = (q_x.to(torch.float32) @ packed.to(torch.float32).t()) * s_x * scales.t()
        if bias is not None:
            out = out + bias.to(torch.float32)
    else:
        raise ValueError(f"unknown scheme {scheme!r}")
    return out.to(x.dtype)

"""Packing 4-bit values into int32 words, and back.

A word holds eight 4-bit fields; field ``j`` occupies bits ``4j .. 4j+3`` (field 0 is the least
significant nibble). Which logical index lands in which field is the caller's choice, given as
``order``: field ``j`` of word ``w`` holds element ``8 * w + order[j]`` along the packed
dimension. The identity order is what GPTQ and this package's own layout use; AWQ interleaves.

Everything here works on any device with integer torch ops only, so it is exact.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

FIELDS_PER_WORD = 8  # 4-bit fields in one int32
IDENTITY_ORDER = (0, 1, 2, 3, 4, 5, 6, 7)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # field j holds column 8*w + AWQ_ORDER[j]


def _check_order(order: Sequence[int]) -> tuple:
    order = tuple(int(i) for i in order)
    if sorted(order) != list(range(FIELDS_PER_WORD)):
        raise ValueError(f"order must be a permutation of 0..7, got {order}")
    return order


def to_int32_wrapping(words: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2**32) -> int32 with the same 32 bits (two's complement)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_int4(values: torch.Tensor, dim: int = -1, order: Sequence[int] = IDENTITY_ORDER) -> torch.Tensor:
    """Pack integers in [0, 15] into int32 words along ``dim`` (its size must divide by 8).

    Returns a tensor with ``dim`` shrunk 8x: field ``j`` of word ``w`` holds
    ``values[..., 8 * w + order[j], ...]``.
    """
    order = _check_order(order)
    if values.dtype.is_floating_point or values.dtype == torch.bool:
        raise TypeError(f"values must have an integer dtype, got {values.dtype}")
    dim = dim % values.dim()
    size = values.shape[dim]
    if size % FIELDS_PER_WORD:
        raise ValueError(f"the packed dimension must be a multiple of 8, got size {size} (dim {dim})")
    v = values.movedim(dim, -1).to(torch.int64)
    v = v.reshape(*v.shape[:-1], size // FIELDS_PER_WORD, FIELDS_PER_WORD)
    v = v[..., list(order)]  # field j takes element order[j] of its group of eight
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=v.device)
    words = ((v & 0xF) << shifts).sum(dim=-1)  # disjoint bits: the sum is an OR
    return to_int32_wrapping(words).movedim(-1, dim).contiguous()


def unpack_int4(
    words: torch.Tensor, dim: int = -1, order: Sequence[int] = IDENTITY_ORDER, dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int32 words -> values in [0, 15] (uint8 unless ``dtype``)."""
    order = _check_order(order)
    if words.dtype != torch.int32:
        raise TypeError(f"words must be int32, got {words.dtype}")
    dim = dim % words.dim()
    w = words.movedim(dim, -1)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=w.device)
    # Arithmetic shift of a negative word fills with ones; the mask keeps only the field.
    fields = (w.unsqueeze(-1) >> shifts) & 0xF  # [..., W, 8]: fields[..., j] = element order[j]
    inverse = [order.index(i) for i in range(FIELDS_PER_WORD)]
    values = fields[..., inverse].reshape(*w.shape[:-1], w.shape[-1] * FIELDS_PER_WORD)
    return values.to(dtype or torch.uint8).movedim(-1, dim).contiguous()

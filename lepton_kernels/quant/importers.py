"""Exact imports of GPTQ and AWQ 4-bit checkpoints into :class:`QuantizedWeight` (w4a16).

Both formats are asymmetric: ``w[n, k] = (q[k, n] - zero[group(k), n]) * scale[group(k), n]``.
The import only rearranges bits, so ``dequantize()`` reproduces exactly what the checkpoint's
own dequantization computes.

GPTQ (v1, as written by AutoGPTQ / GPTQModel "gptq" format):
    ``qweight`` int32 ``[K * bits / 32, N]``, packed along K: value ``i`` of a word sits in
    bits ``i*bits ..``. ``qzeros`` int32 ``[G, N * bits / 32]``, packed along N the same way;
    v1 stores ``zero - 1``, so the real zero point is the stored field + 1 (a stored 15 gives
    16, which is why zero points are kept in uint8). ``scales`` ``[G, N]``. ``g_idx`` int32
    ``[K]`` (optional) maps input channel ``k`` to its group; without it ``group(k) = k // g``.

    Act-order checkpoints have an unsorted ``g_idx``. The import sorts the input channels by
    group once (stable), stores the sorted weight, and records the sort as ``perm``:
    ``quant_matmul`` then gathers the columns of ``x`` (cheap, ``[M, K]``) instead of the
    weight. Every group must then hold exactly ``K / G`` channels, as GPTQ produces.

AWQ (GEMM format, as written by AutoAWQ):
    ``qweight`` int32 ``[K, N / 8]``, packed along N with the field order
    ``[0, 2, 4, 6, 1, 3, 5, 7]``: field ``j`` (bits ``4j ..``) of word ``w`` holds output
    channel ``8w + order[j]``. ``qzeros`` int32 ``[G, N / 8]`` in the same order, stored as
    is (no offset). ``scales`` ``[G, N]``. Groups are contiguous: ``group(k) = k // g``.

Only 4-bit checkpoints are supported; the group size ``K / G`` must be 32, 64 or 128, or
``G == 1`` (one scale per output channel).
"""
from __future__ import annotations

from typing import Optional

import torch

from .packing import AWQ_ORDER, pack_int4, unpack_int4
from .weight import FLOAT_DTYPES, W4_GROUP_SIZES, QuantizedWeight

_SCALE_DTYPES = FLOAT_DTYPES


def _check_int32(name: str, t: object, ndim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be int32 (packed 4-bit values), got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    return t


def _check_scales(scales: object, device: torch.device) -> torch.Tensor:
    if not isinstance(scales, torch.Tensor):
        raise TypeError(f"scales must be a torch.Tensor, got {type(scales).__name__}")
    if scales.dtype not in _SCALE_DTYPES:
        raise TypeError(f"scales must have dtype in (float16, bfloat16, float32), got {scales.dtype}")
    if scales.dim() != 2:
        raise ValueError(f"scales must be 2-D [groups, N], got shape {tuple(scales.shape)}")
    if scales.device != device:
        raise ValueError(f"scales must be on {device} (where qweight is), got {scales.device}")
    return scales


def _group_size(k: int, groups: int, fmt: str) -> int:
    if groups < 1 or k % groups:
        raise ValueError(f"{fmt}: scales has {groups} groups, which does not divide K={k}")
    if groups == 1:
        return -1
    g = k // groups
    if g not in W4_GROUP_SIZES:
        raise ValueError(f"{fmt}: group size K/groups = {k}/{groups} = {g} is not supported "
                         f"(supported: 32, 64, 128, or one group)")
    return g


def _build(q_nk: torch.Tensor, zeros_gn: torch.Tensor, scales_gn: torch.Tensor, group_size: int,
           perm: Optional[torch.Tensor]) -> QuantizedWeight:
    """q ``[N, K]`` (stored channel order), zeros/scales ``[G, N]`` -> QuantizedWeight."""
    n, k = q_nk.shape
    packed = pack_int4(q_nk, dim=1)
    return QuantizedWeight(packed, scales_gn.t().contiguous(), zeros_gn.t().contiguous().to(torch.uint8),
                           scheme="w4a16", group_size=group_size, shape=(n, k), dtype=scales_gn.dtype,
                           perm=perm)


def from_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: Optional[torch.Tensor] = None,
    *,
    bits: int = 4,
) -> QuantizedWeight:
    """Import a GPTQ v1 layer (see the module docstring for the format).

    Args:
        qweight: int32 ``[K / 8, N]``. qzeros: int32 ``[G, N / 8]``. scales: ``[G, N]``
            (float16, bfloat16 or float32; becomes the weight's dtype).
        g_idx: int32 (or int64) ``[K]``, optional; unsorted for act-order checkpoints.
        bits: must be 4.
    """
    if bits != 4:
        raise ValueError(f"bits={bits} is not supported; only 4-bit GPTQ checkpoints can be imported")
    _check_int32("qweight", qweight, 2)
    device = qweight.device
    _check_int32("qzeros", qzeros, 2)
    _check_scales(scales, device)
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    groups = scales.shape[0]
    if scales.shape[1] != n:
        raise ValueError(f"scales must have shape (groups, N={n}) (N from qweight [K/8, N]), "
                         f"got {tuple(scales.shape)}")
    if n % 8:
        raise ValueError(f"N = qweight.shape[1] = {n} must be a multiple of 8 (qzeros packs 8 per word)")
    if tuple(qzeros.shape) != (groups, n // 8):
        raise ValueError(f"qzeros must have shape ({groups}, {n // 8}) (groups from scales, N/8 from qweight), "
                         f"got {tuple(qzeros.shape)}")
    if qzeros.device != device:
        raise ValueError(f"qzeros must be on {device} (where qweight is), got {qzeros.device}")
    group_size = _group_size(k, groups, "GPTQ")

    q = unpack_int4(qweight, dim=0).t()  # [N, K]
    zeros = unpack_int4(qzeros, dim=1, dtype=torch.int32) + 1  # v1 stores zero - 1
    perm = None
    if g_idx is not None:
        perm = _act_order_perm(g_idx, k, groups, device)
        if perm is not None:
            q = q[:, perm.long()]
    return _build(q, zeros, scales, group_size, perm)


def _act_order_perm(g_idx: object, k: int, groups: int, device: torch.device) -> Optional[torch.Tensor]:
    """The stable sort of channels by group, or None when ``g_idx`` is already ``k // g``."""
    if not isinstance(g_idx, torch.Tensor):
        raise TypeError(f"g_idx must be a torch.Tensor, got {type(g_idx).__name__}")
    if g_idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"g_idx must be int32 or int64, got {g_idx.dtype}")
    if tuple(g_idx.shape) != (k,):
        raise ValueError(f"g_idx must have shape ({k},) (K = 8 * qweight.shape[0]), got {tuple(g_idx.shape)}")
    if g_idx.device != device:
        raise ValueError(f"g_idx must be on {device} (where qweight is), got {g_idx.device}")
    g_idx = g_idx.long()
    contiguous = torch.arange(k, device=device) // (k // groups)
    if torch.equal(g_idx, contiguous):
        return None
    perm = torch.sort(g_idx, stable=True).indices
    if not torch.equal(g_idx[perm], contiguous):
        raise ValueError(f"g_idx must assign exactly K/groups = {k // groups} channels to each of the "
                         f"{groups} groups")
    return perm.to(torch.int32)


def from_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> QuantizedWeight:
    """Import an AWQ GEMM layer (see the module docstring for the format).

    Args:
        qweight: int32 ``[K, N / 8]``. qzeros: int32 ``[G, N / 8]``. scales: ``[G, N]``
            (float16, bfloat16 or float32; becomes the weight's dtype).
    """
    _check_int32("qweight", qweight, 2)
    device = qweight.device
    _check_int32("qzeros", qzeros, 2)
    _check_scales(scales, device)
    k, n = qweight.shape[0], qweight.shape[1] * 8
    groups = scales.shape[0]
    if scales.shape[1] != n:
        raise ValueError(f"scales must have shape (groups, N={n}) (N = 8 * qweight.shape[1]), "
                         f"got {tuple(scales.shape)}")
    if tuple(qzeros.shape) != (groups, n // 8):
        raise ValueError(f"qzeros must have shape ({groups}, {n // 8}) (groups from scales, N/8 from qweight), "
                         f"got {tuple(qzeros.shape)}")
    if qzeros.device != device:
        raise ValueError(f"qzeros must be on {device} (where qweight is), got {qzeros.device}")
    group_size = _group_size(k, groups, "AWQ")

    q = unpack_int4(qweight, dim=1, order=AWQ_ORDER).t()  # [N, K]
    zeros = unpack_int4(qzeros, dim=1, order=AWQ_ORDER)
    return _build(q, zeros, scales, group_size, None)

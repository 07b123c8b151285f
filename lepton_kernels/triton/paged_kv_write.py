"""Triton paged-KV write: one program per token moves all of its heads for K and V."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

FP8_E4M3_MAX = tl.constexpr(448.0)


@triton.jit
def _paged_kv_write_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, k_scale_ptr, v_scale_ptr,
    stride_k_t, stride_k_h, stride_v_t, stride_v_h,
    stride_kc_b, stride_kc_o, stride_kc_h,
    stride_vc_b, stride_vc_o, stride_vc_h,
    block_size, num_heads, head_dim,
    HAS_SCALE: tl.constexpr, SCALE_PER_HEAD: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token)
    block = slot // block_size
    offset = slot % block_size

    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    # A negative slot is a padding token: nothing is read or written.
    mask = (h < num_heads) & (d < head_dim) & (slot >= 0)

    k = tl.load(k_ptr + token * stride_k_t + h * stride_k_h + d, mask=mask, eviction_policy="evict_first")
    v = tl.load(v_ptr + token * stride_v_t + h * stride_v_h + d, mask=mask, eviction_policy="evict_first")
    if HAS_SCALE:
        if SCALE_PER_HEAD:
            k_scale = tl.load(k_scale_ptr + h, mask=h < num_heads, other=1.0)
            v_scale = tl.load(v_scale_ptr + h, mask=h < num_heads, other=1.0)
        else:
            k_scale = tl.load(k_scale_ptr)
            v_scale = tl.load(v_scale_ptr)
        k = tl.clamp(k.to(tl.float32) / k_scale, -FP8_E4M3_MAX, FP8_E4M3_MAX)
        v = tl.clamp(v.to(tl.float32) / v_scale, -FP8_E4M3_MAX, FP8_E4M3_MAX)

    kc = k_cache_ptr + block * stride_kc_b + offset * stride_kc_o + h * stride_kc_h + d
    vc = v_cache_ptr + block * stride_vc_b + offset * stride_vc_o + h * stride_vc_h + d
    tl.store(kc, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(vc, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def paged_kv_write(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
) -> None:
    num_tokens, num_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    block_h = triton.next_power_of_2(num_heads)
    block_d = triton.next_power_of_2(head_dim)
    has_scale = k_scale is not None
    dummy = slot_mapping  # any pointer; never read when HAS_SCALE is False
    # Enough warps to give each thread ~8 elements of K and of V.
    num_warps = max(1, min(8, block_h * block_d // 256))
    _paged_kv_write_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k_scale if has_scale else dummy, v_scale if has_scale else dummy,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        k_cache.shape[1], num_heads, head_dim,
        HAS_SCALE=has_scale, SCALE_PER_HEAD=has_scale and k_scale.numel() > 1,
        BLOCK_H=block_h, BLOCK_D=block_d, num_warps=num_warps,
    )

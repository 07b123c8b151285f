from __future__ import annotations

from typing import Optional

import torch

from .._validate import check_index_range

FP8_E4M3_MAX = 448.0


def to_cache_dtype(x: torch.Tensor, cache_dtype: torch.dtype, scale: Optional[torch.Tensor]) -> torch.Tensor:
    """Convert new keys/values [T, H, D] to the cache's dtype.

    fp8 caches store ``x / scale`` saturated to the e4m3 range (as the kernels' conversion
    instructions do), with one scale per tensor or per kv head.
    """
    if cache_dtype != torch.float8_e4m3fn:
        return x.to(cache_dtype)
    scale = scale.reshape(-1, 1) if scale.numel() > 1 else scale.reshape(1, 1)
    scaled = x.float() / scale
    return scaled.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(cache_dtype)


def paged_kv_write(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
) -> None:
    """k, v: [T, H, D]; caches: [num_blocks, block_size, H, D]; slot_mapping: int64 [T]."""
    num_blocks, block_size = k_cache.shape[:2]
    check_index_range("slot_mapping", slot_mapping, num_blocks * block_size,
                      f"a cache of {num_blocks} blocks x {block_size} slots")
    keep = slot_mapping >= 0  # negative slots mark padding tokens
    slots = slot_mapping[keep]
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = to_cache_dtype(k[keep], k_cache.dtype, k_scale)
    v_cache[blocks, offsets] = to_cache_dtype(v[keep], v_cache.dtype, v_scale)

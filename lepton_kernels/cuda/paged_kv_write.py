"""Launch the compiled paged-KV write on the current stream."""
from __future__ import annotations

from typing import Optional

import torch

from . import DTYPE_CODES, _C, current_stream


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
    has_scale = k_scale is not None
    _C.paged_kv_write(
        k.data_ptr(), v.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), slot_mapping.data_ptr(),
        k_scale.data_ptr() if has_scale else 0, v_scale.data_ptr() if has_scale else 0,
        1 if has_scale and k_scale.numel() > 1 else 0,
        num_tokens, num_heads, head_dim, k_cache.shape[1],
        k.stride()[:2], v.stride()[:2], k_cache.stride()[:3], v_cache.stride()[:3],
        DTYPE_CODES[k.dtype], DTYPE_CODES[k_cache.dtype], current_stream(k.device),
    )

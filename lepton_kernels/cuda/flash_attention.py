"""Launch the compiled attention forward (``csrc/attention``) on the current stream."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._backends import trace_as_constant
from .._splits import current_capability
from . import DTYPE_CODES, _C, current_stream

HEAD_DIMS = (64, 80, 96, 128, 192, 256)
DTYPES = (torch.float16, torch.bfloat16)
# "auto" runs the sm_90a kernel (TMA + wgmma) where it can run, the mma.sync one elsewhere.
KERNELS = {"auto": 0, "mma_sync": 1, "sm90": 2}
SM90_HEAD_DIMS = (64, 128, 256)


def sm90_unsupported(head_dim: int, dtype: torch.dtype, device: torch.device) -> Optional[str]:
    """Why the sm_90a kernel cannot run this head dim and dtype on ``device`` (None if it can)."""
    if not has_kernel() or not hasattr(_C, "flash_fwd_sm90_unsupported"):
        return "the extension has no sm_90a attention kernel"
    with torch.cuda.device(device):
        return _C.flash_fwd_sm90_unsupported(head_dim, DTYPE_CODES[dtype]) or None


@trace_as_constant
def has_kernel() -> bool:
    """Whether the compiled extension was built with this kernel (older builds lack it)."""
    return _C is not None and hasattr(_C, "flash_fwd")


def _tile_ready(x: torch.Tensor) -> torch.Tensor:
    # The kernel moves 16-byte chunks: it needs a 16-byte aligned base and every stride but the
    # last a multiple of 8 elements. Other views (rare: odd slices) are copied once.
    if x.data_ptr() % 16 == 0 and all(s % 8 == 0 for s in x.stride()[:-1]):
        return x
    return torch.empty_like(x, memory_format=torch.contiguous_format).copy_(x)


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    cu_seqlens_q: Optional[torch.Tensor],
    cu_seqlens_k: Optional[torch.Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    kv_lens: Optional[torch.Tensor],
    kernel: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention forward on validated inputs (same meaning as the ``flash_attention`` op).

    ``kernel`` picks the compiled kernel: "auto", "mma_sync" or "sm90" (see ``KERNELS``).
    """
    varlen = cu_seqlens_q is not None
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if varlen:
        batch = cu_seqlens_q.numel() - 1
        num_heads_q, head_dim, num_heads_k = q.shape[1], q.shape[2], k.shape[1]
        lse = torch.empty((num_heads_q, q.shape[0]), dtype=torch.float32, device=q.device)
    else:
        batch, max_seqlen_q, num_heads_q, head_dim = q.shape
        max_seqlen_k, num_heads_k = k.shape[1], k.shape[2]
        lse = torch.empty((batch, num_heads_q, max_seqlen_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or batch == 0 or max_seqlen_q == 0:
        if lse.numel():
            lse.fill_(float("-inf"))
        return out, lse

    # Windows wider than any sequence are unbounded; this also keeps the kernel's int32
    # position arithmetic (row + diag + window) from overflowing.
    if causal:
        window_right = 0
    if window_left >= max_seqlen_k:
        window_left = -1
    if window_right >= max_seqlen_q:
        window_right = -1

    # Causal and windowed calls on the sm_90a kernel count work tiles in a zeroed int32 (its
    # CTAs take the next tile when they free up); other calls need none.
    tile_counter = None
    if (window_left >= 0 or window_right >= 0) and kernel != "mma_sync" and current_capability(q.device) == (9, 0):
        tile_counter = torch.zeros(1, dtype=torch.int32, device=q.device)

    q, k, v = _tile_ready(q), _tile_ready(k), _tile_ready(v)
    if varlen:
        strides = [[0, *x.stride()[:2]] for x in (q, k, v, out)]
        lse_strides = [0, lse.stride(0), lse.stride(1)]
    else:
        strides = [list(x.stride()[:3]) for x in (q, k, v, out)]
        lse_strides = list(lse.stride())
    args = (
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(),
        cu_seqlens_q.data_ptr() if varlen else 0, cu_seqlens_k.data_ptr() if varlen else 0,
        kv_lens.data_ptr() if kv_lens is not None else 0,
        tile_counter.data_ptr() if tile_counter is not None else 0,
        *strides, lse_strides,
        batch, num_heads_q, num_heads_k, head_dim, max_seqlen_q, max_seqlen_k,
        q.shape[0] if varlen else 0, k.shape[0] if varlen else 0,  # rows of the packed tensors
        float(softmax_scale), float(softcap), int(window_left), int(window_right),
        DTYPE_CODES[q.dtype], KERNELS[kernel],
    )
    index = q.device.index
    if index is None or index == torch.cuda.current_device():
        _C.flash_fwd(*args, current_stream(q.device))
    else:
        with torch.cuda.device(index):  # the kernel's smem opt-in and launch use the current device
            _C.flash_fwd(*args, current_stream(q.device))
    return out, lse

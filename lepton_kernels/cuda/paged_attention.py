"""Compiled paged attention for decode (one query per sequence): plan, workspace, launch.

The split count comes from shapes and the device only (batch x kv heads, the SM count, the
kernel's resident CTAs per SM and the block table's width), never from ``seq_lens``: a call
reads no device data on the host, so it can be captured in a CUDA graph and replayed with new
lengths and block tables. Splits past a sequence's end write ``lse = -inf`` partials that the
combine kernel skips.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .._backends import is_compiling, trace_as_constant
from .._splits import MAX_SPLITS, sm_count, splits_for_slots
from . import DTYPE_CODES, _C, current_stream

FP8_DTYPE = torch.float8_e4m3fn
HEAD_DIMS = (64, 96, 128, 256)
MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = 8, 256

# Kernel geometry (csrc/paged/paged_attention_decode.cuh): 4 warps, each folding 16-key tiles.
WARPS = 4
TILE_KEYS = 16
ROWS = 16  # query heads per CTA
STEP_KEYS = TILE_KEYS * WARPS  # keys one CTA step folds: the split heuristic's tile


@functools.lru_cache(maxsize=None)
def _ctas_per_sm(device_index: int, head_dim: int, cache_dtype: torch.dtype) -> int:
    with torch.cuda.device(device_index):
        return max(1, int(_C.paged_attention_decode_ctas_per_sm(head_dim, DTYPE_CODES[cache_dtype])))


@trace_as_constant  # outermost, on a plain function: dynamo traces into lru_cache objects
def _device_reason(device: torch.device, head_dim: int, cache_dtype: torch.dtype) -> Optional[str]:
    """Why the compiled kernel cannot run here: an extension built without it, or a GPU that
    cannot hold one CTA's shared memory (sm_86/sm_89 parts allow ~99 KB). None when it can."""
    return _cached_device_reason(device, head_dim, cache_dtype)


@functools.lru_cache(maxsize=None)
def _cached_device_reason(device: torch.device, head_dim: int, cache_dtype: torch.dtype) -> Optional[str]:
    if _C is None or not _C.build_info().get("cuda"):
        return None  # no compiled kernels at all: unavailable_reason says why
    if not hasattr(_C, "paged_attention_decode_smem_bytes"):
        return "the compiled extension predates the paged_attention decode kernel (rebuild the package)"
    device_index = device.index if device.index is not None else torch.cuda.current_device()
    need = _C.paged_attention_decode_smem_bytes(head_dim, DTYPE_CODES[cache_dtype])
    have = _C.device_info(device_index)["max_shared_per_block_optin"]
    if need > have:
        return (f"the CUDA kernel needs {need} bytes of shared memory per CTA at head dim {head_dim} with a "
                f"{cache_dtype} cache; this GPU allows {have}")
    return None


def choose_num_splits(ctas: int, max_keys: int, slots: int) -> int:
    """Key ranges per (sequence, kv head, head group) CTA: ``ctas`` CTAs without splitting,
    ``max_keys`` the most keys one can see (block table capacity, or the window), ``slots``
    resident CTAs the GPU holds (the Triton kernels' heuristic, in CTA steps)."""
    return splits_for_slots(ctas, -(-max_keys // STEP_KEYS), slots)


@dataclass(frozen=True)
class DecodePlan:
    num_splits: int
    ctas: int  # CTAs per split: batch x kv heads x head groups
    slots: int  # resident CTAs on the device


def _ctas_and_slots(index: int, batch: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
                    cache_dtype: torch.dtype) -> Tuple[int, int]:
    ctas = batch * num_kv_heads * -(-(num_q_heads // num_kv_heads) // ROWS)
    return ctas, sm_count(index) * _ctas_per_sm(index, head_dim, cache_dtype)


def _max_keys(capacity: int, window_left: int) -> int:
    return capacity if window_left < 0 else min(capacity, window_left + TILE_KEYS)  # + the partial first tile


def plan(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor, window_left: int,
         num_splits: Optional[int] = None) -> DecodePlan:
    """The split plan of a decode call with these tensors (``num_splits`` overrides it)."""
    batch, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    ctas, slots = _ctas_and_slots(index, batch, num_q_heads, num_kv_heads, head_dim, k_cache.dtype)
    if num_splits is None:
        num_splits = choose_num_splits(ctas, _max_keys(block_table.shape[1] * block_size, window_left), slots)
    return DecodePlan(max(1, min(int(num_splits), MAX_SPLITS)), ctas, slots)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: Optional[torch.Tensor],
    max_seqlen_q: int,
    softmax_scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    k_scale: Optional[torch.Tensor],
    v_scale: Optional[torch.Tensor],
    *,
    _num_splits: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Decode paged attention on validated inputs (the op schema's arguments; ``cu_seqlens_q``
    must be None). ``window_right`` and ``causal`` never hide a key from the last position.
    ``_num_splits`` overrides the split heuristic (tests, benchmarks)."""
    batch, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    device = q.device
    out = torch.empty(q.shape, dtype=q.dtype, device=device)
    lse = torch.empty((batch, num_q_heads), dtype=torch.float32, device=device)
    if batch == 0 or num_q_heads == 0:
        return out, lse

    num_splits = plan(q, k_cache, block_table, window_left, _num_splits).num_splits
    if num_splits > 1:
        ws_out = torch.empty((batch, num_q_heads, num_splits, head_dim), dtype=torch.float32, device=device)
        ws_lse = torch.empty((batch, num_q_heads, num_splits), dtype=torch.float32, device=device)
        ws_ptrs = (ws_out.data_ptr(), ws_lse.data_ptr())
    else:
        ws_ptrs = (0, 0)
    fp8 = k_cache.dtype == FP8_DTYPE
    if fp8:
        k_scale = k_scale.reshape(-1).contiguous()
        v_scale = v_scale.reshape(-1).contiguous()
    seq_lens = seq_lens.contiguous()
    _C.paged_attention_decode(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_table.data_ptr(), seq_lens.data_ptr(),
        k_scale.data_ptr() if fp8 else 0, v_scale.data_ptr() if fp8 else 0,
        1 if fp8 and k_scale.numel() > 1 else 0,
        out.data_ptr(), lse.data_ptr(), *ws_ptrs,
        [batch, num_q_heads, num_kv_heads, head_dim, block_size], num_splits,
        q.stride()[:2], out.stride()[:2], lse.stride(), k_cache.stride()[:3], v_cache.stride()[:3],
        block_table.stride(), float(softmax_scale), float(softcap), int(window_left),
        DTYPE_CODES[q.dtype], DTYPE_CODES[k_cache.dtype], current_stream(device),
    )
    return out, lse


def supports(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: Optional[torch.Tensor],
    max_seqlen_q: int,
    softmax_scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    k_scale: Optional[torch.Tensor],
    v_scale: Optional[torch.Tensor],
) -> Optional[str]:
    """None when the compiled decode kernel can serve this (validated) call, else the reason.

    Device availability is checked by the caller (``lepton_kernels.cuda.unavailable_reason``)."""
    if cu_seqlens_q is not None:
        return "the CUDA kernel serves decode (one query per sequence, no cu_seqlens_q); varlen calls go to Triton"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"the CUDA kernel takes float16 or bfloat16 queries, got {q.dtype}"
    head_dim = q.shape[-1]
    if head_dim not in HEAD_DIMS:
        return f"the CUDA kernel takes head dims {', '.join(map(str, HEAD_DIMS))}, got {head_dim}"
    block_size = k_cache.shape[1]
    if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE or block_size & (block_size - 1):
        return (f"the CUDA kernel takes block sizes that are powers of two from {MIN_BLOCK_SIZE} to "
                f"{MAX_BLOCK_SIZE}, got {block_size}")
    batch, num_q_heads = q.shape[0], q.shape[1]
    num_kv_heads = k_cache.shape[2]
    if batch > 65535 or num_kv_heads * -(-(num_q_heads // num_kv_heads) // ROWS) > 65535:
        return f"the CUDA kernel's grid holds at most 65535 sequences and head groups, got batch {batch}"
    item = k_cache.element_size()
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        # The storage offset, not data_ptr(): fake tensors have no data (allocations are
        # 256-byte aligned). Dynamo cannot trace storage_offset() either: under torch.compile
        # only the launcher's own pointer check remains.
        offset = 0 if is_compiling() else cache.storage_offset()
        if offset * item % 16 or any(s * item % 16 for s in cache.stride()[:3]):
            return f"the CUDA kernel needs {name} 16-byte aligned with strides of multiples of 16 bytes"
        if cache.stride(1) * item >= 2 ** 31 // 16:
            return f"the CUDA kernel needs {name}'s token stride below 2^27 bytes"
    if q.device.type != "cuda":
        return f"inputs are on {q.device.type}, the CUDA kernel needs CUDA tensors"
    return _device_reason(q.device, head_dim, k_cache.dtype)

"""``paged_attention``: attention of new queries over a paged KV cache (decode and chunked prefill).

Every backend implements the op schema ``_SCHEMA`` below and is called with arguments already
validated and normalized by ``_prepare`` (``causal``/``window``/``softcap``/``softmax_scale`` as
in ``flash_attention``; ``max_seqlen_q`` is 1 for decode and an upper bound of the query
lengths for varlen calls). A backend's ``supports`` function takes the same positional
arguments as its implementation.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .. import _backends, _validate
from .. import cuda as _cuda
from .. import triton as _triton
from .._library import define_op, lazy
from .flash_attention import (
    ATTENTION_DTYPES,
    check_cu_seqlens,
    check_cu_seqlens_data,
    check_heads,
    check_mask_options,
    check_max_seqlen,
    check_max_seqlen_data,
    check_softmax_scale,
)

OP = "paged_attention"
FP8_DTYPE = torch.float8_e4m3fn

_SCHEMA = (
    "(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor seq_lens,"
    " Tensor? cu_seqlens_q, int max_seqlen_q, float softmax_scale, bool causal, int window_left,"
    " int window_right, float softcap, Tensor? k_scale, Tensor? v_scale) -> (Tensor out, Tensor lse)"
)


def _fake(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, softmax_scale, causal,
          window_left, window_right, softcap, k_scale, v_scale):
    out = q.new_empty(q.shape)
    if cu_seqlens_q is None:  # decode: lse [B, Hq]
        lse = q.new_empty((q.shape[0], q.shape[1]), dtype=torch.float32)
    else:  # varlen: lse [Hq, Tq]
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    return out, lse


_torch_impl = lazy("lepton_kernels.reference.paged_attention", "paged_attention")
_torch_op = define_op(f"{OP}_torch", _SCHEMA, _torch_impl, _fake, "CompositeExplicitAutograd")

# The reference serves any block size, head dim and cache dtype that passes validation.
_backends.register(OP, "torch", eager=_torch_impl)(_torch_op)

_triton_impl = lazy("lepton_kernels.triton.paged_attention", "paged_attention")


def _triton_supports(q, k_cache, *args) -> Optional[str]:
    # Checked first so a missing triton is a reason, not an ImportError from the kernel module.
    reason = _triton.unavailable_reason(q.device, True, k_cache.dtype == FP8_DTYPE)
    if reason is not None:
        return reason
    # An import statement, not lazy(): torch.compile traces selection, and dynamo runs import
    # statements but refuses importlib.import_module (a first call under compile would fail).
    from ..triton.paged_attention import supports

    return supports(q, k_cache, *args)


_triton_op = define_op(f"{OP}_triton", _SCHEMA, _triton_impl, _fake, "CompositeExplicitAutograd")
_backends.register(OP, "triton", _triton_supports, eager=_triton_impl)(_triton_op)

_cuda_impl = lazy("lepton_kernels.cuda.paged_attention", "paged_attention")


def _cuda_supports(q, k_cache, *args) -> Optional[str]:
    # Decode only: varlen / chunked prefill calls fall through to Triton.
    from ..cuda.paged_attention import supports

    reason = supports(q, k_cache, *args)
    if reason is not None:
        return reason
    return _cuda.unavailable_reason(q.device)


def _cuda_auto_supports(q, k_cache, v_cache, block_table, *args) -> Optional[str]:
    """"auto" leaves every call the Triton kernel serves to it: on an H100 it was as fast or
    faster on every decode shape measured, 16-bit caches (B=64, L=4k: 361 vs 378 us) and fp8
    (195 vs 237 us) alike (benchmarks/results/paged_attention-h100.md)."""
    if _triton_supports(q, k_cache, v_cache, block_table, *args) is not None:
        return None  # nothing better to go to
    return "the Triton kernel serves this call and was as fast or faster on every decode shape measured"


_cuda_op = define_op(f"{OP}_cuda", _SCHEMA, _cuda_impl, _fake, "CUDA")
_backends.register(OP, "cuda", _cuda_supports, eager=_cuda_impl, auto_supports=_cuda_auto_supports)(_cuda_op)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    softmax_scale: Optional[float] = None,
    causal: bool = True,
    window: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Attention of new queries over keys and values stored in a paged cache.

    Args:
        q: decode: ``[B, Hq, D]``, one new token per sequence. Chunked prefill / mixed batch:
            ``[Tq, Hq, D]`` packed, with ``cu_seqlens_q``. float16, bfloat16 or float32 (float64
            on the torch backend); any strides with the last dimension contiguous.
        k_cache, v_cache: ``[num_blocks, block_size, Hkv, D]`` with ``Hq % Hkv == 0``; q's
            dtype, or ``torch.float8_e4m3fn`` holding ``value / scale``. The new tokens must
            already be written (see ``paged_kv_write``).
        block_table: int32 ``[B, max_blocks]``: sequence ``b``'s token ``t`` lives in block
            ``block_table[b, t // block_size]`` at offset ``t % block_size``.
        seq_lens: int32 ``[B]``: cached tokens of each sequence, new ones included. A sequence
            of length 0 gets ``out = 0`` and ``lse = -inf``.
        cu_seqlens_q: int32 ``[B+1]`` prefix sums of the query counts. Sequence ``b``'s queries
            are its last ``cu_seqlens_q[b+1] - cu_seqlens_q[b]`` positions (at most
            ``seq_lens[b]``); decode and prefill sequences can share one call.
        max_seqlen_q: with ``cu_seqlens_q``: an upper bound of the query counts, which lets
            kernels size their grids without reading the device. Default ``Tq``.
        softmax_scale: default ``1 / sqrt(D)``.
        causal: each query sees keys up to its own position (bottom-right aligned, as in
            ``flash_attention``); with False every query sees all ``seq_lens[b]`` keys.
        window, softcap: as in ``flash_attention``.
        k_scale, v_scale: float32 dequantization scales of an fp8 cache, one value or one per
            kv head (``[Hkv]``), both of the same kind. Required for fp8 caches, rejected
            otherwise.
        return_lse: also return the float32 natural-log log-sum-exp.
        backend: "auto" (default; ``LEPTON_KERNELS_BACKEND`` overrides), "cuda" (decode only:
            one query per sequence, float16/bfloat16 queries, head dims 64/96/128/256, block
            sizes 8..256; "auto" takes it only where Triton cannot run), "triton" or "torch".

    Returns:
        ``out`` with q's shape and dtype, or ``(out, lse)`` with ``lse`` float32 ``[B, Hq]``
        (decode) or ``[Hq, Tq]`` (varlen).

    Data-dependent checks (block ids in range, ``seq_lens`` within the block table, query counts
    at most ``seq_lens``, ``cu_seqlens_q`` well formed) run only with ``LEPTON_KERNELS_DEBUG=1``.
    """
    args = _prepare(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, softmax_scale,
                    causal, window, softcap, k_scale, v_scale)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    impl = _backends.select(OP, backend, *args)
    out, lse = impl(*args)
    return (out, lse) if return_lse else out


def _prepare(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, softmax_scale, causal,
             window, softcap, k_scale, v_scale) -> tuple:
    """Validate the public arguments; return the op schema's arguments."""
    check = _validate.check_tensor
    check("q", q, ndim=3, dtypes=ATTENTION_DTYPES, last_dim_contiguous=True)
    device = q.device
    check("k_cache", k_cache, ndim=4, dtypes=(q.dtype, FP8_DTYPE), device=device, last_dim_contiguous=True)
    check("v_cache", v_cache, ndim=4, device=device, last_dim_contiguous=True)
    _validate.check_same_dtype("v_cache", v_cache, "k_cache", k_cache)
    _validate.check_shape("v_cache", v_cache, tuple(k_cache.shape), "(the shape of k_cache)")
    check_heads(q, 1, "k_cache", k_cache, 2)
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[1] < 1:
        raise ValueError(f"k_cache's block size (dim 1) must be >= 1, got shape {tuple(k_cache.shape)}")

    check("block_table", block_table, ndim=2, dtypes=(torch.int32,), device=device)
    batch = block_table.shape[0]
    check("seq_lens", seq_lens, ndim=1, dtypes=(torch.int32,), device=device)
    _validate.check_shape("seq_lens", seq_lens, (batch,), "(one length per row of block_table)")
    if cu_seqlens_q is None:
        if q.shape[0] != batch:
            raise ValueError(f"decode q (no cu_seqlens_q) must have one token per sequence: q.shape[0] "
                             f"({q.shape[0]}) must equal block_table.shape[0] ({batch})")
        if check_max_seqlen("max_seqlen_q", max_seqlen_q, 1) != 1:
            raise ValueError(f"max_seqlen_q applies only to calls with cu_seqlens_q; decode has 1 query "
                             f"per sequence, got {max_seqlen_q}")
        max_seqlen_q = 1
    else:
        check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, device)
        _validate.check_shape("cu_seqlens_q", cu_seqlens_q, (batch + 1,),
                              "(batch size of block_table + 1)")
        max_seqlen_q = check_max_seqlen("max_seqlen_q", max_seqlen_q, q.shape[0])

    if k_cache.dtype == FP8_DTYPE:
        if k_scale is None or v_scale is None:
            raise ValueError("k_scale and v_scale are required when the cache is float8_e4m3fn")
        _validate.check_scale("k_scale", k_scale, num_kv_heads, device)
        _validate.check_scale("v_scale", v_scale, num_kv_heads, device)
        if k_scale.numel() != v_scale.numel():
            raise ValueError(f"k_scale and v_scale must both be per tensor or both per kv head, got shapes "
                             f"{tuple(k_scale.shape)} and {tuple(v_scale.shape)}")
    elif k_scale is not None or v_scale is not None:
        raise ValueError(f"k_scale/v_scale apply only to float8_e4m3fn caches; the cache is {k_cache.dtype}")

    causal, window_left, window_right, softcap = check_mask_options(causal, window, softcap)
    softmax_scale = check_softmax_scale(softmax_scale, q.shape[-1])

    if _validate.debug_checks_enabled():
        _check_data(q, k_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q)
    return (q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, softmax_scale, causal,
            window_left, window_right, softcap, k_scale, v_scale)


def _check_data(q, k_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q) -> None:
    """Debug mode: the checks that read tensor data (a device sync each)."""
    num_blocks, block_size = k_cache.shape[:2]
    capacity = block_table.shape[1] * block_size
    bad = (seq_lens < 0) | (seq_lens > capacity)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"seq_lens[{i}] = {int(seq_lens[i])} must be in [0, {capacity}] (block_table has "
                         f"{block_table.shape[1]} blocks of {block_size} tokens per sequence)")
    # Only the blocks a sequence uses must be valid; the rest of its row may hold anything.
    blocks_used = (seq_lens.to(torch.int64) + block_size - 1) // block_size
    used = torch.arange(block_table.shape[1], device=q.device) < blocks_used[:, None]
    bad = used & ((block_table < 0) | (block_table >= num_blocks))
    if bool(bad.any()):
        b, j = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"block_table[{b}, {j}] = {int(block_table[b, j])} is out of range for a cache of "
                         f"{num_blocks} blocks (sequence {b} uses its first {int(blocks_used[b])} blocks)")
    if cu_seqlens_q is not None:
        lengths = check_cu_seqlens_data("cu_seqlens_q", cu_seqlens_q, q.shape[0], "Tq = q.shape[0]")
        check_max_seqlen_data("max_seqlen_q", max_seqlen_q, lengths, "query sequence")
        too_long = lengths > seq_lens.to(torch.int64)
        if bool(too_long.any()):
            i = int(too_long.nonzero()[0, 0])
            raise ValueError(f"sequence {i} has {int(lengths[i])} queries (from cu_seqlens_q) but only "
                             f"seq_lens[{i}] = {int(seq_lens[i])} cached tokens; its queries must be among them")


@_backends.register_example(OP)
def _example(device: torch.device):
    num_blocks, block_size, num_kv_heads, head_dim = 8, 16, 2, 64
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, device=device, dtype=torch.float16)
    v_cache = torch.randn_like(k_cache)
    block_table = torch.randperm(num_blocks, device=device).to(torch.int32).view(2, 4)
    seq_lens = torch.tensor([5, 50], dtype=torch.int32, device=device)
    q = torch.randn(2, 4, head_dim, device=device, dtype=torch.float16)
    return (q, k_cache, v_cache, block_table, seq_lens), {}

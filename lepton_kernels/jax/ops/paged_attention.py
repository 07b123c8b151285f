"""``paged_attention`` for JAX: attention of decode or ragged queries over a paged KV cache.

This module holds the jnp reference and the public function; the Mosaic TPU kernel is in
:mod:`lepton_kernels.jax.ops.ragged_paged_attention`.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from .. import _dispatch
from .. import _validate as V
from ..gpu import paged_attention as gpu_paged
from . import ragged_paged_attention as rpa
from .flash_attention import _attend_reference, _segments, visible

OP = "paged_attention"


def gather_pages(cache, block_table, scale):
    """``[B, max_blocks*block_size, Hkv, D]`` float32: each sequence's pages in order, dequantized."""
    batch, max_blocks = block_table.shape
    block_size, num_heads, head_dim = cache.shape[1:]
    pages = cache[block_table].astype(jnp.float32)  # [B, max_blocks, block_size, Hkv, D]
    if scale is not None:
        pages = pages * V.per_head(scale, num_heads)[:, None]
    return pages.reshape(batch, max_blocks * block_size, num_heads, head_dim)


def paged_attention_reference(q, k_cache, v_cache, block_table, seq_lens, *, cu_seqlens_q=None, softmax_scale=None,
                              causal=True, window=(-1, -1), softcap=0.0, k_scale=None, v_scale=None,
                              return_lse=False):
    """Plain jnp paged attention with the semantics of :func:`paged_attention` (f32 math).

    Gathers every sequence's pages into a contiguous ``[B, L, Hkv, D]`` copy and gives each
    query the keys of its own sequence, so it costs ``Tq*L`` scores: for tests.
    """
    num_tokens = q.shape[0]
    left, right = window
    right = 0 if causal else right
    scale = float(q.shape[-1]) ** -0.5 if softmax_scale is None else softmax_scale
    decode = cu_seqlens_q is None
    if decode:  # one query per sequence, at its last position
        cu_seqlens_q = jnp.arange(num_tokens + 1, dtype=jnp.int32)
    seg, pos, q_len, valid = _segments(cu_seqlens_q, num_tokens)
    keys = gather_pages(k_cache, block_table, k_scale)
    values = gather_pages(v_cache, block_table, v_scale)
    kpos = jnp.arange(keys.shape[1])
    mask = valid[:, None] & visible(pos[:, None], kpos[None, :], q_len[:, None], seq_lens[seg][:, None],
                                    causal=causal, left=left, right=right)
    # Every query is its own batch entry of length 1, over its sequence's keys.
    out, lse = _attend_reference(q[:, None].astype(jnp.float32), keys[seg], values[seg], mask[:, None],
                                 scale, softcap)
    out, lse = out[:, 0].astype(q.dtype), lse[:, :, 0]  # [Tq, Hq, D], [Tq, Hq]
    if not return_lse:
        return out
    return out, (lse if decode else lse.T)


def _tpu_unavailable_reason(q, k_cache) -> Optional[str]:
    return rpa.unavailable_reason(q, k_cache)


@functools.partial(jax.jit, static_argnames=("impl", "scale", "causal", "window", "softcap", "return_lse",
                                             "max_seqlen_q", "block_sizes"))
def _run(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, k_scale, v_scale, *, impl, scale, causal, window,
         softcap, return_lse, max_seqlen_q, block_sizes):
    if impl == "reference":
        return paged_attention_reference(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q=cu_seqlens_q,
                                         softmax_scale=scale, causal=causal, window=window, softcap=softcap,
                                         k_scale=k_scale, v_scale=v_scale, return_lse=return_lse)
    if impl == "gpu" and cu_seqlens_q is not None:
        return gpu_paged.paged_prefill_gpu(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, k_scale, v_scale,
                                           scale=scale, causal=causal, window=window, softcap=softcap,
                                           return_lse=return_lse)
    if impl == "gpu":
        return gpu_paged.paged_attention_gpu(q, k_cache, v_cache, block_table, seq_lens, k_scale, v_scale,
                                             scale=scale, window=window, softcap=softcap, return_lse=return_lse)
    interpret = _dispatch.interpret_params() if impl == "interpret" else False
    return rpa.ragged_paged_attention_tpu(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, k_scale,
                                          v_scale, scale=scale, causal=causal, window=window, softcap=softcap,
                                          return_lse=return_lse, max_seqlen_q=max_seqlen_q,
                                          block_sizes=block_sizes, interpret=interpret)


def paged_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    block_table: jax.Array,
    seq_lens: jax.Array,
    *,
    cu_seqlens_q: Optional[jax.Array] = None,
    max_seqlen_q: Optional[int] = None,
    softmax_scale: Optional[float] = None,
    causal: bool = True,
    window: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    k_scale: Optional[jax.Array] = None,
    v_scale: Optional[jax.Array] = None,
    return_lse: bool = False,
    block_sizes=None,
    backend: str = "auto",
):
    """Attention of new queries over keys and values stored in a paged cache.

    Args:
        q: decode: ``[B, Hq, D]``, one new token per sequence. Chunked prefill / mixed batch:
            ``[Tq, Hq, D]`` packed, with ``cu_seqlens_q``. float16, bfloat16 or float32.
        k_cache, v_cache: ``[num_blocks, block_size, Hkv, D]`` with ``Hq % Hkv == 0``; q's
            dtype, or ``float8_e4m3fn`` holding ``value / scale``. The new tokens must already
            be written (see :func:`paged_kv_write`).
        block_table: int32 ``[B, max_blocks]``: sequence ``b``'s token ``t`` lives in block
            ``block_table[b, t // block_size]`` at offset ``t % block_size``. Entries past a
            sequence's length are not read by the TPU kernel.
        seq_lens: int32 ``[B]``: cached tokens of each sequence, new ones included. A sequence
            of length 0 gets ``out = 0`` and ``lse = -inf``.
        cu_seqlens_q: int32 ``[B+1]`` prefix sums of the query counts. Sequence ``b``'s queries
            are its last ``cu_seqlens_q[b+1] - cu_seqlens_q[b]`` positions (at most
            ``seq_lens[b]``). Queries outside ``[cu[0], cu[B])`` get 0.
        max_seqlen_q: with ``cu_seqlens_q``: a static upper bound of the query counts
            (default ``Tq``); accepted for API parity (the TPU kernel walks the packed tokens
            and does not need it).
        softmax_scale: default ``1 / sqrt(D)``.
        causal: each query sees keys up to its own position (bottom-right aligned); with False
            every query sees all ``seq_lens[b]`` keys.
        window, softcap: as in :func:`~lepton_kernels.jax.flash_attention`.
        k_scale, v_scale: float32 dequantization scales of an fp8 cache (real = stored *
            scale), one value or one per kv head, both of the same kind.
        return_lse: also return the float32 log-sum-exp, ``[B, Hq]`` (decode) or ``[Hq, Tq]``.
        block_sizes: :class:`~lepton_kernels.jax.PagedBlockSizes`
            for the TPU kernel; default per TPU generation.
        backend: "auto" (default), "tpu", "interpret", "gpu" or "reference".

    Returns:
        ``out`` with q's shape and dtype, or ``(out, lse)``.
    """
    q = V.check_array("q", q, ndim=3, dtypes=V.FLOAT_DTYPES)
    num_tokens, num_heads, head_dim = q.shape
    k_cache = V.check_array("k_cache", k_cache, ndim=4, dtypes=(q.dtype, V.FP8))
    V.check_shape("k_cache", k_cache, (None, None, None, head_dim),
                  "([num_blocks, block_size, Hkv, D] with the D of q)")
    v_cache = V.check_array("v_cache", v_cache, ndim=4)
    V.check_same_dtype("v_cache", v_cache, "k_cache", k_cache)
    V.check_shape("v_cache", v_cache, tuple(k_cache.shape), "(the shape of k_cache)")
    num_kv_heads = k_cache.shape[2]
    V.check_heads(num_heads, "k_cache", num_kv_heads)
    if k_cache.shape[1] < 1:
        raise ValueError(f"k_cache's block size (dim 1) must be >= 1, got shape {tuple(k_cache.shape)}")
    block_table = V.check_array("block_table", block_table, ndim=2, dtypes=V.INDEX_DTYPES)
    batch = block_table.shape[0]
    seq_lens = V.check_array("seq_lens", seq_lens, ndim=1, dtypes=V.INDEX_DTYPES)
    V.check_shape("seq_lens", seq_lens, (batch,), "(one length per row of block_table)")
    if cu_seqlens_q is None:
        if num_tokens != batch:
            raise ValueError(f"decode q (no cu_seqlens_q) must have one token per sequence: q.shape[0] "
                             f"({num_tokens}) must equal block_table.shape[0] ({batch})")
        if V.check_max_seqlen("max_seqlen_q", max_seqlen_q, 1) != 1:
            raise ValueError(f"max_seqlen_q applies only to calls with cu_seqlens_q; decode has 1 query "
                             f"per sequence, got {max_seqlen_q}")
        max_seqlen_q = 1
    else:
        cu_seqlens_q = V.check_array("cu_seqlens_q", cu_seqlens_q, ndim=1, dtypes=V.INDEX_DTYPES)
        V.check_shape("cu_seqlens_q", cu_seqlens_q, (batch + 1,), "(batch size of block_table + 1)")
        max_seqlen_q = V.check_max_seqlen("max_seqlen_q", max_seqlen_q, num_tokens)
    k_scale, v_scale = V.check_cache_scales(k_cache.dtype, k_scale, v_scale, num_kv_heads)
    causal, left, right, softcap = V.check_mask_options(causal, window, softcap)
    softmax_scale = V.check_softmax_scale(softmax_scale, head_dim)
    V.check_bool("return_lse", return_lse)
    if block_sizes is not None:
        if not isinstance(block_sizes, rpa.PagedBlockSizes):
            raise TypeError(f"block_sizes must be a PagedBlockSizes or None, got {type(block_sizes).__name__}")
        if block_sizes.block_kv % k_cache.shape[1]:
            raise ValueError(f"block_sizes.block_kv ({block_sizes.block_kv}) must be a multiple of the cache "
                             f"block size ({k_cache.shape[1]})")

    gpu_reason = functools.partial(gpu_paged.unavailable_reason, q, k_cache, block_table, cu_seqlens_q=cu_seqlens_q)
    impl = _dispatch.select(OP, backend, _tpu_unavailable_reason(q, k_cache), gpu_reason)
    return _run(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, k_scale, v_scale, impl=impl,
                scale=softmax_scale, causal=causal, window=(left, right), softcap=softcap, return_lse=return_lse,
                max_seqlen_q=max_seqlen_q, block_sizes=block_sizes)

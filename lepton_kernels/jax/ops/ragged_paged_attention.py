"""Mosaic TPU kernel for :func:`lepton_kernels.jax.paged_attention` (decode and ragged batches).

Layout: the grid walks blocks of ``block_q`` packed query tokens (``cu_seqlens_q`` order; a
block may hold tokens of several sequences, e.g. ``block_q`` decode sequences). q is
transposed to ``[Hkv, G, Tq, D]`` (G = Hq/Hkv) so a kv head's ``G*block_q`` query rows are one
MXU operand: grouped-query heads share every K/V tile they read.

Per grid step, for each sequence with queries in the block (its range comes from two
scalar-prefetched arrays computed in the wrapper), the kernel walks the KV blocks that its
causal/window mask leaves visible. A KV block is ``pages_per_block`` cache pages, copied by
manual DMA from HBM (the caches stay in ``pl.ANY``) into a double buffer: the copies of the
*next* (sequence, KV block) item are started before the current one is waited for, across
sequence boundaries. Pages past a sequence's length are not copied (their block-table entries
may be anything). The block table, ``cu_seqlens_q`` and ``seq_lens`` are scalar-prefetched to
SMEM. A page ``[block_size, Hkv, D]`` is viewed as ``[block_size, Hkv*D]`` (a free reshape of
the contiguous cache), so kv head ``h`` is the lane-aligned column slice ``h*D:(h+1)*D``; this
is why the kernel needs ``D % 128 == 0``. Online softmax state (m, l, acc) lives in VMEM
scratch per kv head; fp8 pages are widened in VMEM, ``k_scale`` folds into the score scale
and ``v_scale`` into the final normalization.

On TPU, the ``[nb, bs, Hkv, D] -> [nb, bs, Hkv*D]`` view is free only when XLA's tiled layout
of the cache allows it; keep caches in a layout where it is (e.g. allocate them as
``[nb, bs, Hkv*D]`` and reshape), or XLA copies the cache on every call.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .. import _dispatch
from .. import _validate as V
from .flash_attention import visible

NUM_LANES = 128


@dataclasses.dataclass(frozen=True)
class PagedBlockSizes:
    """Query tokens per grid step (``block_q``) and KV tokens per DMA block (``block_kv``).

    Roofline (bf16 cache, per kv head and KV block): the block reads ``2*block_kv*D*2`` bytes
    of K/V and multiplies them by ``G*block_q`` query rows (``4*G*block_q*block_kv*D`` FLOPs).
    A prefill chunk uses all rows, so its intensity is ``G*block_q`` FLOP/byte; decode uses
    ``G`` rows per sequence and the others (queries of the other sequences of the block) are
    masked work. That waste is cheap on the MXU but not on the VPU, which spends ~10 ops per
    score on scale/mask/exp/sums: at ``G*block_q = 64`` rows and ``block_kv = 256`` the
    softmax of one KV block is ~1.6e5 element-ops per head, against the block's 128 KiB DMA
    (0.16 us per head at 819 GB/s). Hence the smallest legal ``block_q`` (16, the bf16
    sublane tiling) by default: decode stays HBM-bound; prefill-heavy batches are better
    served by ``flash_attention`` or a larger ``block_q``. ``block_kv`` sets the DMA size:
    256 tokens x Hkv 8 x D 128 x 2 bytes = 512 KiB per K or V buffer on v5e (0.64 us at
    819 GB/s, above the ~0.35 us per-step overhead); v6e's 1.64 TB/s wants 512 tokens for the
    same time. VMEM: 2 slots x (K + V) page buffers + f32 ``acc/m/l`` of ``Hkv*G*block_q``
    rows: ~3 MiB (v5e), ~5 MiB (v6e) at Hq=32, Hkv=8, D=128.

    ``block_q`` must be a multiple of 16; ``block_kv`` a multiple of the cache's page size.
    """

    block_q: int
    block_kv: int

    def __post_init__(self):
        if self.block_q <= 0 or self.block_q % 16:
            raise ValueError(f"block_q must be a positive multiple of 16, got {self.block_q}")
        if self.block_kv <= 0:
            raise ValueError(f"block_kv must be positive, got {self.block_kv}")


DEFAULT_BLOCK_SIZES = {
    "v5e": PagedBlockSizes(block_q=16, block_kv=256),
    "v6e": PagedBlockSizes(block_q=16, block_kv=512),
}


def unavailable_reason(q, k_cache) -> Optional[str]:
    """None when the kernel can serve these shapes/dtypes, else why not."""
    head_dim, block_size = q.shape[-1], k_cache.shape[1]
    if jnp.dtype(q.dtype) == jnp.float16:
        return "TPUs have no float16 matmul path; use bfloat16"
    if head_dim % 128:
        return f"the TPU paged kernel needs head_dim % 128 == 0 (lane-aligned heads), got {head_dim}"
    if block_size % 16:
        return f"the TPU paged kernel needs a cache block size that is a multiple of 16, got {block_size}"
    return None


def _pick_block_kv(preferred: int, block_size: int, max_blocks: int) -> int:
    """Pages per KV block: as many as fit ``preferred`` tokens, at least 1, at most a sequence."""
    return max(1, min(preferred // block_size, max_blocks))


def _paged_kernel(
    # scalar prefetch (SMEM)
    cu_ref, lens_ref, table_ref, seq_lo_ref, seq_hi_ref,
    # inputs
    q_ref, k_hbm, v_hbm, k_scale_ref, v_scale_ref,
    # outputs (lse only when asked for) and scratch
    *refs,
    scale, softcap, causal, left, right, block_q, pages_per_block, block_size, max_blocks,
    num_kv_heads, group, head_dim, precision, has_lse,
):
    if has_lse:
        o_ref, lse_ref, k_buf, v_buf, sems, m_scr, l_scr, acc_scr = refs
    else:
        (o_ref, k_buf, v_buf, sems, m_scr, l_scr, acc_scr), lse_ref = refs, None
    qb = pl.program_id(0)
    t0 = qb * block_q
    block_kv = pages_per_block * block_size
    rows = group * block_q

    m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    def kv_range(b):
        """(first, last) KV block of sequence b that its rows in this q block can see; empty if last < first."""
        q_start, q_end, sk = cu_ref[b], cu_ref[b + 1], lens_ref[b]
        shift = sk - (q_end - q_start)  # a query's key position = its index in the sequence + shift
        p_min = jnp.maximum(t0, q_start) - q_start + shift
        p_max = jnp.minimum(t0 + block_q, q_end) - 1 - q_start + shift
        hi = sk - 1
        if causal:
            hi = jnp.minimum(hi, p_max)
        elif right >= 0:
            hi = jnp.minimum(hi, p_max + right)
        lo = jnp.int32(0)
        if left >= 0:
            lo = jnp.maximum(lo, p_min - left)
        has_rows = jnp.maximum(t0, q_start) < jnp.minimum(t0 + block_q, q_end)
        first = lax.div(lo, block_kv)
        last = jnp.where(has_rows & (hi >= lo), lax.div(jnp.maximum(hi, 0), block_kv), first - 1)
        return first, last

    def find_item(b):
        """The first (sequence >= b, its first visible KV block) with work, and whether one exists."""
        hi_b = seq_hi_ref[qb]

        def cond(carry):
            b, first, last = carry
            return (b <= hi_b) & (last < first)

        def body(carry):
            b = carry[0] + 1
            first, last = kv_range(jnp.maximum(jnp.minimum(b, hi_b), 0))
            return b, first, last

        first, last = kv_range(jnp.maximum(jnp.minimum(b, hi_b), 0))
        b, first, last = lax.while_loop(cond, body, (b, first, last))
        return b, first, b <= hi_b

    def copies(b, kvb, slot):
        """One DMA per page of KV block ``kvb`` of sequence ``b`` (pages past its length: none)."""
        num_pages = lax.div(lens_ref[b] + block_size - 1, block_size)
        out = []
        for i in range(pages_per_block):
            page_pos = kvb * pages_per_block + i
            page = table_ref[b * max_blocks + jnp.minimum(page_pos, max_blocks - 1)]
            for j, (hbm, buf) in enumerate(((k_hbm, k_buf), (v_hbm, v_buf))):
                out.append((page_pos < num_pages,
                            pltpu.make_async_copy(hbm.at[page], buf.at[slot, i], sems.at[slot, j])))
        return out

    def start(b, kvb, slot):
        for needed, copy in copies(b, kvb, slot):
            pl.when(needed)(copy.start)

    def wait(b, kvb, slot):
        for needed, copy in copies(b, kvb, slot):
            pl.when(needed)(copy.wait)

    def compute(b, kvb, slot):
        q_start, q_end, sk = cu_ref[b], cu_ref[b + 1], lens_ref[b]
        shape3 = (group, block_q, block_kv)
        token = t0 + lax.broadcasted_iota(jnp.int32, shape3, 1).reshape(rows, block_kv)
        kpos = kvb * block_kv + lax.broadcasted_iota(jnp.int32, (rows, block_kv), 1)
        mask = ((token >= q_start) & (token < q_end)
                & visible(token - q_start, kpos, q_end - q_start, sk, causal=causal, left=left, right=right))
        key_ok = (kvb * block_kv + lax.broadcasted_iota(jnp.int32, (block_kv, head_dim), 0)) < sk
        for h in range(num_kv_heads):
            cols = pl.ds(h * head_dim, head_dim)
            q = q_ref[h].reshape(rows, head_dim)
            # [pages, block_size, D] -> [block_kv, D]; fp8 pages are widened first (exact in
            # bf16), so the merge of page and row dims happens at 16-bit/32-bit tiling.
            k = k_buf[slot, :, :, cols].astype(q.dtype).reshape(block_kv, head_dim)
            v = v_buf[slot, :, :, cols].astype(q.dtype).reshape(block_kv, head_dim)
            v = jnp.where(key_ok, v, jnp.zeros_like(v))  # stale or never-copied rows past sk
            s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                                precision=precision) * (scale * k_scale_ref[h])
            if softcap:
                s = softcap * jnp.tanh(s / softcap)
            s = jnp.where(mask, s, -jnp.inf)
            m_prev, l_prev = m_scr[h], l_scr[h]
            m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            alpha = jnp.exp(m_prev - m_safe)
            p = jnp.exp(s - m_safe[:, :1])
            l_scr[h] = alpha * l_prev + p.sum(axis=1, keepdims=True)
            m_scr[h] = m_new
            pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32, precision=precision)
            acc_scr[h] = acc_scr[h] * alpha[:, :1] + pv

    b0, kvb0, valid0 = find_item(seq_lo_ref[qb])
    pl.when(valid0)(lambda: start(b0, kvb0, 0))

    def step(carry):
        b, kvb, slot, _ = carry
        _, last = kv_range(b)
        same_seq = kvb < last
        nb, nkvb, nvalid = lax.cond(same_seq, lambda: (b, kvb + 1, jnp.bool_(True)), lambda: find_item(b + 1))
        pl.when(nvalid)(lambda: start(nb, nkvb, 1 - slot))
        wait(b, kvb, slot)
        compute(b, kvb, slot)
        return nb, nkvb, 1 - slot, nvalid

    lax.while_loop(lambda carry: carry[3], step, (b0, kvb0, jnp.int32(0), valid0))

    for h in range(num_kv_heads):
        l = l_scr[h]
        safe_l = jnp.where(l > 0, l, 1.0)
        out = jnp.where(l[:, :1] > 0, acc_scr[h] * (v_scale_ref[h] / safe_l[:, :1]), 0.0)
        o_ref[h] = out.reshape(group, block_q, head_dim).astype(o_ref.dtype)
        if lse_ref is not None:
            lse = jnp.where(l > 0, m_scr[h] + jnp.log(safe_l), -jnp.inf)
            lse_ref[h] = lse.reshape(group, block_q, NUM_LANES)


def ragged_paged_attention_tpu(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, k_scale, v_scale, *,
                               scale: float, causal: bool, window, softcap: float, return_lse: bool,
                               max_seqlen_q: int, block_sizes: Optional[PagedBlockSizes] = None, interpret=False):
    """The ``pallas_call`` wrapper; arguments as :func:`~lepton_kernels.jax.paged_attention`."""
    num_tokens, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    batch, max_blocks = block_table.shape
    group = num_heads // num_kv_heads
    left, right = window
    block_sizes = block_sizes or DEFAULT_BLOCK_SIZES[_dispatch.tpu_generation()]
    if block_sizes.block_kv % block_size:
        raise ValueError(f"block_kv ({block_sizes.block_kv}) must be a multiple of the cache block size ({block_size})")
    block_q = block_sizes.block_q
    pages_per_block = _pick_block_kv(block_sizes.block_kv, block_size, max_blocks)
    decode = cu_seqlens_q is None
    if decode:
        cu_seqlens_q = jnp.arange(batch + 1, dtype=jnp.int32)
    num_q_blocks = pl.cdiv(num_tokens, block_q)
    padded = num_q_blocks * block_q

    # Which sequences have queries in each q block: [seq_lo, seq_hi] (empty when lo > hi).
    starts = jnp.arange(num_q_blocks, dtype=jnp.int32) * block_q
    seq_lo = jnp.searchsorted(cu_seqlens_q[1:], starts, side="right").astype(jnp.int32)
    seq_hi = jnp.searchsorted(cu_seqlens_q[:-1], starts + block_q, side="left").astype(jnp.int32) - 1
    seq_lo, seq_hi = jnp.clip(seq_lo, 0, batch - 1), jnp.clip(seq_hi, -1, batch - 1)

    qt = jnp.pad(q, ((0, padded - num_tokens), (0, 0), (0, 0)))
    qt = qt.reshape(padded, num_kv_heads, group, head_dim).transpose(1, 2, 0, 3)  # [Hkv, G, Tq, D]
    pages_k = k_cache.reshape(num_blocks, block_size, num_kv_heads * head_dim)
    pages_v = v_cache.reshape(num_blocks, block_size, num_kv_heads * head_dim)
    ones = jnp.ones((num_kv_heads,), jnp.float32)
    k_scale = ones if k_scale is None else V.per_head(k_scale, num_kv_heads)
    v_scale = ones if v_scale is None else V.per_head(v_scale, num_kv_heads)

    q_spec = pl.BlockSpec((num_kv_heads, group, block_q, head_dim), lambda qb, *_: (0, 0, qb, 0))
    lse_spec = pl.BlockSpec((num_kv_heads, group, block_q, NUM_LANES), lambda qb, *_: (0, 0, qb, 0))
    smem = pl.BlockSpec(memory_space=pltpu.SMEM)
    rows = group * block_q
    kernel = functools.partial(
        _paged_kernel, scale=scale, softcap=softcap, causal=causal, left=left, right=right, block_q=block_q,
        pages_per_block=pages_per_block, block_size=block_size, max_blocks=max_blocks, num_kv_heads=num_kv_heads,
        group=group, head_dim=head_dim, precision=lax.Precision.HIGHEST if q.dtype == jnp.float32 else None,
        has_lse=return_lse)
    # Upper bounds (the real work depends on seq_lens): every sequence reads its whole table row.
    max_keys = batch * max_blocks * block_size
    kv_bytes = 2 * max_keys * num_kv_heads * head_dim * jnp.dtype(k_cache.dtype).itemsize
    out_specs, out_shape = [q_spec], [jax.ShapeDtypeStruct(qt.shape, q.dtype)]
    if return_lse:  # lane-broadcast rows: as many bytes as a 128-wide f32 output, so only on request
        out_specs.append(lse_spec)
        out_shape.append(jax.ShapeDtypeStruct((num_kv_heads, group, padded, NUM_LANES), jnp.float32))
    results = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(num_q_blocks,),
            in_specs=[q_spec, pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY), smem, smem],
            out_specs=out_specs,
            scratch_shapes=[
                pltpu.VMEM((2, pages_per_block, block_size, num_kv_heads * head_dim), k_cache.dtype),
                pltpu.VMEM((2, pages_per_block, block_size, num_kv_heads * head_dim), v_cache.dtype),
                pltpu.SemaphoreType.DMA((2, 2)),
                pltpu.VMEM((num_kv_heads, rows, NUM_LANES), jnp.float32),
                pltpu.VMEM((num_kv_heads, rows, NUM_LANES), jnp.float32),
                pltpu.VMEM((num_kv_heads, rows, head_dim), jnp.float32),
            ]),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        cost_estimate=pl.CostEstimate(flops=4 * num_heads * num_tokens * max_blocks * block_size * head_dim,
                                      transcendentals=num_heads * num_tokens * max_blocks * block_size,
                                      bytes_accessed=kv_bytes + 2 * q.size * jnp.dtype(q.dtype).itemsize),
        interpret=interpret,
    )(cu_seqlens_q, seq_lens, block_table.reshape(-1), seq_lo, seq_hi, qt, pages_k, pages_v, k_scale, v_scale)

    out = results[0].transpose(2, 0, 1, 3).reshape(padded, num_heads, head_dim)[:num_tokens]
    if not return_lse:
        return out
    lse = results[1][..., 0].reshape(num_heads, padded)[:, :num_tokens]  # [Hq, Tq]
    return out, (lse.T if decode else lse)

"""Triton fused attention forward (FlashAttention-2 style).

One program owns a block of query rows of one (batch, head) and walks the key/value blocks that
block can see, keeping the softmax online: running row max ``m`` and sum ``l`` in fp32, base-2
exponentials with ``softmax_scale * log2(e)`` folded into one multiply. The key range of each
query block is computed up front from causal/window bounds, and split in up to three phases:
masked blocks on the window's left edge, unmasked blocks in the middle (the bulk, no mask
arithmetic), masked blocks on the right edge (causal diagonal, window, sequence tail).

GQA is served without repeating K/V: for short query blocks (decode) the query heads sharing a
KV head are packed into the rows of one program (``PACK`` > 1), so each K/V tile is read once
for the whole group; otherwise each program maps its head to ``head // group``.

K/V tiles arrive by pointer loads (cp.async pipelining; runs on sm_80+) or, where it measured
faster on Hopper (D=256), through per-sequence TMA tensor descriptors.

Layouts follow FlashAttention: q ``[B, Sq, Hq, D]``, k/v ``[B, Sk, Hkv, D]`` with any strides
(last dim contiguous), or packed varlen ``[T, H, D]`` with int32 ``cu_seqlens``. The output
has q's shape and dtype; lse is float32 ``[B, Hq, Sq]`` (or ``[Hq, Tq]``), natural log.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import interpreting, unavailable_reason
from .flash_attention_configs import AttentionTiles, attention_tiles, decode_tiles, shared_memory_budget
from .._splits import MAX_SPLITS, choose_num_splits, current_capability, sm_count

OP = "flash_attention"
MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634


@triton.jit
def online_softmax_step(qk, m_i, l_i, acc, scale, MASKED: tl.constexpr):
    """One key tile of the online softmax (base 2; ``scale`` includes log2(e)).

    Returns the tile's probabilities ``p``, the new running max, and the running sum and
    output accumulator rescaled to it; the caller adds ``p @ v`` and keeps the new max.
    """
    m_new = tl.maximum(m_i, tl.max(qk, 1) * scale)
    if MASKED:
        # A row with nothing visible so far keeps m = -inf; subtract 0 instead so that
        # exp2(-inf - -inf) never makes a NaN (p and alpha come out 0).
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_sub = m_new
    p = tl.math.exp2(qk * scale - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    return p, m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None]


@triton.jit
def _tanh(x):
    # tanh through exp2: libdevice's tanh is unavailable under the interpreter. Saturates
    # correctly at both ends (exp2 -> inf gives 1, exp2 -> 0 gives -1).
    return 1.0 - 2.0 / (tl.math.exp2(x * 2.8853900817779268) + 1.0)  # 2.885... = 2 * log2(e)


@triton.jit
def score_tile(qk, offs_n, query_pos, num_keys, window_left, window_right, qk_scale, softcap_scale,
               SOFTCAP: tl.constexpr, MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Softcap and mask one tile of raw scores ``q @ k^T``.

    ``query_pos`` is each row's key position (bottom-right aligned); keys ``offs_n`` past
    ``num_keys`` or outside the window become -inf. Returns the scores and the scale that
    ``online_softmax_step`` must still apply (1 when the softcap already applied it).
    """
    if SOFTCAP:
        # softcap * tanh(s * scale / softcap), already in log2 units (softcap_scale has log2e)
        qk = softcap_scale * _tanh(qk * qk_scale)
        scale = 1.0
    else:
        scale = qk_scale
    if MASKED:
        cols = offs_n[None, :]
        visible = cols < num_keys
        if HAS_RIGHT:
            visible = visible & (cols <= query_pos[:, None] + window_right)
        if HAS_LEFT:
            visible = visible & (cols >= query_pos[:, None] - window_left)
        qk = tl.where(visible, qk, float("-inf"))
    return qk, scale


@triton.jit
def _attn_blocks(
    acc, l_i, m_i, q,
    k_base, v_base, k_desc, v_desc, stride_ks, stride_vs,
    offs_n_blk, offs_d, rows, lo, hi, seqlen_k, diag,
    window_left, window_right, qk_scale, softcap_scale,
    MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr, EVEN_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, INT64_ROWS: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    """Fold key blocks [lo, hi) into the running (acc, l, m). MASKED applies the sequence
    tail, causal and window masks; unmasked phases must only be given blocks where every
    (row, key) pair is visible."""
    d_ok = offs_d[None, :] < HEAD_DIM
    # Addresses are rebuilt from the block start each step: loop-carried pointer tiles would
    # hold two 64-bit registers per element for the whole loop.
    k_offs = offs_n_blk[:, None] * stride_ks + offs_d[None, :]
    v_offs = offs_n_blk[:, None] * stride_vs + offs_d[None, :]
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n_blk
        if INT64_ROWS:
            k_ptrs = k_base + start_n.to(tl.int64) * stride_ks + k_offs
            v_ptrs = v_base + start_n.to(tl.int64) * stride_vs + v_offs
        else:
            k_ptrs = k_base + start_n * stride_ks + k_offs
            v_ptrs = v_base + start_n * stride_vs + v_offs
        kv_mask = offs_n[:, None] < seqlen_k
        if not EVEN_D:
            kv_mask = kv_mask & d_ok
        if USE_TMA:
            # Rows past the sequence and columns past HEAD_DIM come back as zeros.
            k = k_desc.load([start_n, 0])
        elif MASKED:
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        elif EVEN_D:
            k = tl.load(k_ptrs)
        else:
            k = tl.load(k_ptrs, mask=d_ok, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        qk, scale = score_tile(qk, offs_n, rows + diag, seqlen_k, window_left, window_right, qk_scale,
                               softcap_scale, SOFTCAP, MASKED, HAS_LEFT, HAS_RIGHT)
        p, m_new, l_i, acc = online_softmax_step(qk, m_i, l_i, acc, scale, MASKED)
        if USE_TMA:
            v = v_desc.load([start_n, 0])
        elif MASKED:
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        elif EVEN_D:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=d_ok, other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


# Sequence lengths and windows vary per call: no recompile for each value class (1, multiples of 16).
@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "window_left", "window_right", "group", "num_splits"])
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, ws_o_ptr, ws_lse_ptr,
    cu_q_ptr, cu_k_ptr, kv_lens_ptr,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh, stride_ls,
    seqlen_q, seqlen_k,
    qk_scale, softcap_scale,
    window_left, window_right, group, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PACK: tl.constexpr, EVEN_D: tl.constexpr, SPLIT: tl.constexpr,
    VARLEN: tl.constexpr, HAS_KV_LENS: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, INT64_ROWS: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)  # query head, or kv head when packing (PACK > 1)
    batch = tl.program_id(2)
    if SPLIT:  # one query block per sequence; axis 0 walks its key ranges (see _split_range)
        split = pid_m
        pid_m = 0

    if VARLEN:
        q_start = tl.load(cu_q_ptr + batch)
        seqlen_q = tl.load(cu_q_ptr + batch + 1) - q_start
        k_start = tl.load(cu_k_ptr + batch)
        seqlen_k = tl.load(cu_k_ptr + batch + 1) - k_start
        k_row0 = k_start.to(tl.int64)
    else:
        q_start = 0
        k_row0 = 0
    if HAS_KV_LENS:
        seqlen_k = tl.minimum(seqlen_k, tl.load(kv_lens_ptr + batch))

    # Rows of this program: query positions, or (position, head-in-group) pairs when packing.
    num_m_blocks = tl.cdiv(seqlen_q * PACK, BLOCK_M)
    if pid_m >= num_m_blocks:
        return  # grid is sized for the longest sequence
    # Last blocks first: under causal masks they carry the most keys, so the tail of the
    # grid is made of short programs.
    start_m = (num_m_blocks - 1 - pid_m) * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n_blk = tl.arange(0, BLOCK_N)
    if PACK > 1:
        rows = offs_m // PACK
        heads = pid_h * PACK + offs_m % PACK
        kv_head = pid_h
    else:
        rows = offs_m
        heads = pid_h + offs_m * 0
        kv_head = pid_h // group
    row_ok = rows < seqlen_q
    d_ok = offs_d < HEAD_DIM

    q_rows = (q_start + rows).to(tl.int64)
    q_ptrs = (q_ptr + batch.to(tl.int64) * stride_qb + q_rows[:, None] * stride_qs
              + heads[:, None].to(tl.int64) * stride_qh + offs_d[None, :])
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = (k_ptr + batch.to(tl.int64) * stride_kb + k_row0 * stride_ks
              + kv_head.to(tl.int64) * stride_kh)
    v_base = (v_ptr + batch.to(tl.int64) * stride_vb + k_row0 * stride_vs
              + kv_head.to(tl.int64) * stride_vh)

    if USE_TMA:
        # Per-program descriptors over this (sequence, kv head)'s [seqlen_k, HEAD_DIM] rows:
        # the copy engine fetches K/V tiles and zero-fills past the sequence end.
        k_desc = tl.make_tensor_descriptor(k_base, shape=[seqlen_k, HEAD_DIM], strides=[stride_ks, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[seqlen_k, HEAD_DIM], strides=[stride_vs, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
    else:
        k_desc = k_base
        v_desc = v_base

    # Key range visible to any row of the block, and the part visible to every row.
    # Query i sees key j iff i + diag - left <= j <= i + diag + right (bottom-right aligned).
    diag = seqlen_k - seqlen_q
    first_row = start_m // PACK
    last_row = tl.minimum((start_m + BLOCK_M - 1) // PACK, seqlen_q - 1)
    lo = 0
    hi = seqlen_k
    full_lo = 0
    full_hi = seqlen_k
    if HAS_LEFT:
        lo = tl.maximum(first_row + diag - window_left, 0) // BLOCK_N * BLOCK_N
        full_lo = tl.maximum(last_row + diag - window_left, 0)
    if HAS_RIGHT:
        hi = tl.minimum(hi, last_row + diag + window_right + 1)
        full_hi = tl.maximum(tl.minimum(full_hi, first_row + diag + window_right + 1), 0)
    mid_lo = tl.minimum(tl.maximum(lo, tl.cdiv(full_lo, BLOCK_N) * BLOCK_N), hi)
    mid_hi = tl.maximum(mid_lo, tl.minimum(full_hi // BLOCK_N * BLOCK_N, hi))
    if SPLIT:
        # This program's share of [lo, hi): whole key blocks from lo (itself block-aligned), so
        # clamping the three phases to it keeps the unmasked phase on full blocks.
        per_split = tl.cdiv(tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_N), num_splits) * BLOCK_N
        split_lo = lo + split * per_split
        split_hi = tl.minimum(split_lo + per_split, hi)
        lo = tl.minimum(tl.maximum(lo, split_lo), split_hi)
        mid_lo = tl.minimum(tl.maximum(mid_lo, split_lo), split_hi)
        mid_hi = tl.minimum(tl.maximum(mid_hi, split_lo), split_hi)
        hi = tl.minimum(tl.maximum(hi, split_lo), split_hi)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    if HAS_LEFT:
        acc, l_i, m_i = _attn_blocks(
            acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, stride_ks, stride_vs,
            offs_n_blk, offs_d, rows, lo, mid_lo, seqlen_k, diag,
            window_left, window_right, qk_scale, softcap_scale,
            True, HAS_LEFT, HAS_RIGHT, SOFTCAP, EVEN_D, HEAD_DIM, BLOCK_N, UPCAST, DOT_PRECISION, INT64_ROWS, USE_TMA)
    acc, l_i, m_i = _attn_blocks(
        acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, stride_ks, stride_vs,
        offs_n_blk, offs_d, rows, mid_lo, mid_hi, seqlen_k, diag,
        window_left, window_right, qk_scale, softcap_scale,
        False, HAS_LEFT, HAS_RIGHT, SOFTCAP, EVEN_D, HEAD_DIM, BLOCK_N, UPCAST, DOT_PRECISION, INT64_ROWS, USE_TMA)
    acc, l_i, m_i = _attn_blocks(
        acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, stride_ks, stride_vs,
        offs_n_blk, offs_d, rows, mid_hi, hi, seqlen_k, diag,
        window_left, window_right, qk_scale, softcap_scale,
        True, HAS_LEFT, HAS_RIGHT, SOFTCAP, EVEN_D, HEAD_DIM, BLOCK_N, UPCAST, DOT_PRECISION, INT64_ROWS, USE_TMA)

    # Rows that saw no key: output 0, lse -inf.
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)  # ln 2
    if SPLIT:
        # Partials of this (sequence, head program, split), rows in program order; padding rows
        # too (the combine drops them). Workspace: [B, head programs, splits, BLOCK_M(, BLOCK_D)].
        ws_row = ((batch * tl.num_programs(1) + pid_h) * num_splits + split).to(tl.int64) * BLOCK_M + offs_m
        tl.store(ws_o_ptr + ws_row[:, None] * BLOCK_D + offs_d[None, :], out)
        tl.store(ws_lse_ptr + ws_row, lse)
        return

    o_ptrs = (o_ptr + batch.to(tl.int64) * stride_ob + q_rows[:, None] * stride_os
              + heads[:, None].to(tl.int64) * stride_oh + offs_d[None, :])
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    lse_ptrs = lse_ptr + batch.to(tl.int64) * stride_lb + heads.to(tl.int64) * stride_lh + q_rows * stride_ls
    tl.store(lse_ptrs, lse, mask=row_ok)


@triton.jit
def _attn_combine_kernel(
    ws_o_ptr, ws_lse_ptr, o_ptr, lse_ptr, cu_q_ptr,
    stride_ob, stride_os, stride_oh, stride_lb, stride_lh, stride_ls,
    seqlen_q, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, PACK: tl.constexpr,
    VARLEN: tl.constexpr,
):
    """Merge the split partials of one (sequence, head program): lse = log sum_s exp(lse_s),
    out = sum_s exp(lse_s - lse) out_s; rows are mapped to (query, head) as in the forward."""
    pid_h = tl.program_id(0)
    batch = tl.program_id(1)
    if VARLEN:
        q_start = tl.load(cu_q_ptr + batch)
        seqlen_q = tl.load(cu_q_ptr + batch + 1) - q_start
    else:
        q_start = 0
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    base = (batch * tl.num_programs(0) + pid_h).to(tl.int64) * num_splits * BLOCK_M
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for s in range(0, num_splits):
        m = tl.maximum(m, tl.load(ws_lse_ptr + base + s * BLOCK_M + offs_m))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    denom = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for s in range(0, num_splits):
        row = base + s * BLOCK_M + offs_m
        w = tl.exp(tl.load(ws_lse_ptr + row) - m_safe)  # 0 for splits that saw no key
        part = tl.load(ws_o_ptr + row[:, None] * BLOCK_D + offs_d[None, :])
        acc += w[:, None] * tl.where(w[:, None] > 0.0, part, 0.0)
        denom += w
    empty = denom == 0.0
    denom_safe = tl.where(empty, 1.0, denom)
    out = acc / denom_safe[:, None]
    lse = tl.where(empty, float("-inf"), m_safe + tl.log(denom_safe))

    if PACK > 1:
        rows = offs_m // PACK
        heads = pid_h * PACK + offs_m % PACK
    else:
        rows = offs_m
        heads = pid_h + offs_m * 0
    row_ok = rows < seqlen_q
    q_rows = (q_start + rows).to(tl.int64)
    o_ptrs = (o_ptr + batch.to(tl.int64) * stride_ob + q_rows[:, None] * stride_os
              + heads[:, None].to(tl.int64) * stride_oh + offs_d[None, :])
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    lse_ptrs = lse_ptr + batch.to(tl.int64) * stride_lb + heads.to(tl.int64) * stride_lh + q_rows * stride_ls
    tl.store(lse_ptrs, lse, mask=row_ok)


_HAS_DEVICE_DESCRIPTORS = hasattr(tl, "make_tensor_descriptor")  # triton >= 3.4
_allocator_set = False


def _tma_ok(k: torch.Tensor, v: torch.Tensor) -> bool:
    """TMA needs 16-byte aligned bases and every stride but the last a multiple of 16 bytes."""
    for x in (k, v):
        if x.data_ptr() % 16 or any((s * x.element_size()) % 16 for s in x.stride()[:-1]):
            return False
    return True


def _ensure_descriptor_allocator() -> None:
    # Device-side descriptors live in a small global scratch buffer that Triton asks the
    # registered allocator for at launch (graph-capturable: it comes from torch's allocator).
    global _allocator_set
    if not _allocator_set:
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
        _allocator_set = True


def _use_pack_gqa(group: int, max_seqlen_q: int) -> bool:
    # Packing pays when a query block would otherwise be mostly padding (decode, short
    # chunks): it multiplies the useful rows per K/V tile by the group size.
    return group > 1 and max_seqlen_q * group <= 128 and max_seqlen_q <= 64


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
    *,
    pack_gqa: Optional[bool] = None,
    tiles=None,
    use_tma: Optional[bool] = None,
    num_splits: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention forward on validated inputs (same meaning as the ``flash_attention`` op).

    ``pack_gqa``, ``tiles`` (an ``AttentionTiles``), ``use_tma`` (K/V through tensor
    descriptors) and ``num_splits`` (key ranges per query block; needs one query block per
    sequence) override the heuristics; for tests and benchmarks.
    """
    varlen = cu_seqlens_q is not None
    if varlen:
        total_q, num_heads_q, head_dim = q.shape
        num_heads_k = k.shape[1]
        batch = cu_seqlens_q.numel() - 1
        seqlen_q, seqlen_k = max_seqlen_q, max_seqlen_k
        out = torch.empty((total_q, num_heads_q, head_dim), dtype=q.dtype, device=q.device)
        lse = torch.empty((num_heads_q, total_q), dtype=torch.float32, device=q.device)
        stride_qb = stride_kb = stride_vb = stride_ob = stride_lb = 0
        stride_qs, stride_qh = q.stride(0), q.stride(1)
        stride_ks, stride_kh = k.stride(0), k.stride(1)
        stride_vs, stride_vh = v.stride(0), v.stride(1)
        stride_os, stride_oh = out.stride(0), out.stride(1)
        stride_lh, stride_ls = lse.stride(0), lse.stride(1)
    else:
        batch, seqlen_q, num_heads_q, head_dim = q.shape
        seqlen_k, num_heads_k = k.shape[1], k.shape[2]
        out = torch.empty((batch, seqlen_q, num_heads_q, head_dim), dtype=q.dtype, device=q.device)
        lse = torch.empty((batch, num_heads_q, seqlen_q), dtype=torch.float32, device=q.device)
        stride_qb, stride_qs, stride_qh = q.stride(0), q.stride(1), q.stride(2)
        stride_kb, stride_ks, stride_kh = k.stride(0), k.stride(1), k.stride(2)
        stride_vb, stride_vs, stride_vh = v.stride(0), v.stride(1), v.stride(2)
        stride_ob, stride_os, stride_oh = out.stride(0), out.stride(1), out.stride(2)
        stride_lb, stride_lh, stride_ls = lse.stride(0), lse.stride(1), lse.stride(2)
    if out.numel() == 0 or batch == 0 or seqlen_q == 0:
        if lse.numel():
            lse.fill_(float("-inf"))
        return out, lse

    group = num_heads_q // num_heads_k
    if pack_gqa is None:
        pack_gqa = _use_pack_gqa(group, seqlen_q)
    pack = group if pack_gqa else 1
    block_d = max(16, triton.next_power_of_2(head_dim))
    interp = interpreting() or q.device.type != "cuda"
    # Causal is a right window of 0; a wider right window under causal changes nothing.
    if causal:
        window_right = 0 if window_right < 0 else min(window_right, 0)
    has_left, has_right = window_left >= 0, window_right >= 0

    cap = (0, 0) if interp else current_capability(q.device)
    if tiles is None:
        tiles = attention_tiles(block_d, q.dtype, cap, seqlen_q * pack, interp, masked=has_left or has_right)
        if tiles.block_m <= 64 and seqlen_q * pack <= tiles.block_m and not interp:
            tiles = _decode_tiles(block_d, tiles.block_m, q.dtype, cap)
    if use_tma is None:
        # Measured on an H200: descriptors win only at D=256 (causal 470 vs 422 TFLOP/s); at
        # D <= 128 the cp.async pointer path is 2-10% faster.
        use_tma = cap >= (9, 0) and q.dtype != torch.float32 and block_d >= 256
    use_tma = bool(use_tma) and _HAS_DEVICE_DESCRIPTORS and k.shape[-3] > 0 and _tma_ok(k, v)
    if use_tma and not interp:
        _ensure_descriptor_allocator()
    use_softcap = softcap > 0.0
    if use_softcap:
        qk_scale, softcap_scale = softmax_scale / softcap, softcap * LOG2E
    else:
        qk_scale, softcap_scale = softmax_scale * LOG2E, 1.0

    one_block = seqlen_q * pack <= tiles.block_m
    if num_splits is None:
        num_splits = 1 if interp or not one_block else _num_splits(
            batch * (num_heads_q // pack), seqlen_k, seqlen_q, tiles, window_left, window_right,
            sm_count(q.device.index if q.device.index is not None else torch.cuda.current_device()))
    elif num_splits > 1 and not one_block:
        raise ValueError(f"num_splits > 1 needs one query block per sequence ({seqlen_q} queries x {pack} "
                         f"packed heads > BLOCK_M = {tiles.block_m})")
    num_splits = max(1, min(int(num_splits), MAX_SPLITS))
    split = num_splits > 1
    num_head_programs = num_heads_q // pack
    if split:
        ws_o = torch.empty((batch, num_head_programs, num_splits, tiles.block_m, block_d), dtype=torch.float32,
                           device=q.device)
        ws_lse = torch.empty((batch, num_head_programs, num_splits, tiles.block_m), dtype=torch.float32,
                             device=q.device)
    else:
        ws_o = ws_lse = lse  # never touched

    dummy = lse  # stands in for absent optional pointers; never read
    grid = (num_splits if split else triton.cdiv(seqlen_q * pack, tiles.block_m), num_head_programs, batch)
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, ws_o, ws_lse,
        cu_seqlens_q if varlen else dummy, cu_seqlens_k if varlen else dummy,
        kv_lens if kv_lens is not None else dummy,
        stride_qb, stride_qs, stride_qh,
        stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh,
        stride_ob, stride_os, stride_oh,
        stride_lb, stride_lh, stride_ls,
        seqlen_q, seqlen_k,
        qk_scale, softcap_scale,
        max(window_left, 0), max(window_right, 0), group, num_splits,
        HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
        PACK=pack, EVEN_D=head_dim == block_d, SPLIT=split,
        VARLEN=varlen, HAS_KV_LENS=kv_lens is not None,
        HAS_LEFT=has_left, HAS_RIGHT=has_right, SOFTCAP=use_softcap,
        UPCAST=interp and q.dtype != torch.float32,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        INT64_ROWS=not interp and seqlen_k * max(abs(stride_ks), abs(stride_vs)) >= 2**31,
        USE_TMA=use_tma,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    if split:
        _attn_combine_kernel[(num_head_programs, batch)](
            ws_o, ws_lse, out, lse, cu_seqlens_q if varlen else dummy,
            stride_ob, stride_os, stride_oh, stride_lb, stride_lh, stride_ls,
            seqlen_q, num_splits,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=tiles.block_m, PACK=pack, VARLEN=varlen,
            num_warps=4,
        )
    return out, lse


def _num_splits(programs: int, seqlen_k: int, seqlen_q: int, tiles, window_left: int, window_right: int,
                sms: int) -> int:
    """Split-KV for decode-shaped calls (one query block per sequence): too few programs to
    fill the GPU otherwise. Shapes only (max lengths), never data: CUDA-graph safe."""
    keys = seqlen_k
    if window_left >= 0:  # a window bounds the keys one query block can see
        keys = min(keys, window_left + seqlen_q + max(window_right, 0) + tiles.block_n)
    # Decode tiles take a whole SM's shared memory (see _decode_tiles): split only up to one wave.
    return choose_num_splits(programs, triton.cdiv(keys, tiles.block_n), sms, decode=False)


def _decode_tiles(block_d: int, block_m: int, dtype: torch.dtype, capability: Tuple[int, int]):
    """Tiles of decode-shaped calls (one short query block per sequence): bandwidth-bound, so
    long key tiles, 16K elements of K per step (128 keys at D=128), three stages. Swept on an
    H200 (bf16, Hq 32 / Hkv 8, B=1/16/64, GPU time): 1.3-1.8x the prefill table's tiles. Parts
    with less shared memory take the paged decode's smaller tiles."""
    elem = 4 if dtype == torch.float32 else 2
    block_n = max(16, min(128, 16384 // block_d))
    if 3 * 2 * block_n * block_d * elem + 16 * 1024 <= shared_memory_budget(capability):
        return AttentionTiles(block_m, block_n, 4, 3)
    return decode_tiles(block_d, block_m, dtype, dtype, capability, False)


def supports(
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
) -> Optional[str]:
    """None when the Triton kernel can serve this (validated) call, else the reason."""
    reason = unavailable_reason(q.device, allow_interpreter=True)
    if reason is not None:
        return reason
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the Triton kernel takes float16, bfloat16 or float32, got {q.dtype}"
    head_dim = q.shape[-1]
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        return f"the Triton kernel takes head dims 1..{MAX_HEAD_DIM}, got {head_dim}"
    return None


_TRITON_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def compile_for_target(
    capability: Tuple[int, int] = (9, 0),
    dtype: torch.dtype = torch.bfloat16,
    head_dim: int = 128,
    *,
    causal: bool = False,
    tiles=None,
    use_tma: bool = False,
):
    """Compile the forward kernel ahead of time for a GPU that need not be present.

    For checking what the kernel lowers to (``.asm["ptx"]`` holds ``wgmma`` on sm_90) without
    a GPU. Pointers and strides are declared 16-divisible, as the launcher sees them for
    ordinary contiguous or transposed inputs. Not available under ``TRITON_INTERPRET=1``.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = _attn_fwd_kernel
    if not isinstance(kernel, triton.runtime.JITFunction):
        raise RuntimeError("compile_for_target needs TRITON_INTERPRET unset before triton is imported")
    block_d = max(16, triton.next_power_of_2(head_dim))
    if tiles is None:
        tiles = attention_tiles(block_d, dtype, capability, 1 << 20, False, masked=causal)
    elem = _TRITON_DTYPES[dtype]
    int_ptrs = ("cu_q_ptr", "cu_k_ptr", "kv_lens_ptr")
    constexprs = dict(
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, PACK=1,
        EVEN_D=head_dim == block_d, VARLEN=False, HAS_KV_LENS=False, HAS_LEFT=False, HAS_RIGHT=causal,
        SOFTCAP=False, UPCAST=False, DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
        INT64_ROWS=False, USE_TMA=use_tma, SPLIT=False, stride_ls=1,
    )
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = ("*i32" if name in int_ptrs else "*fp32" if name in ("lse_ptr", "ws_o_ptr", "ws_lse_ptr")
                               else f"*{elem}")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("qk_scale", "softcap_scale"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name.startswith("stride"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", capability[0] * 10 + capability[1], 32)
    return triton.compile(source, target=target,
                          options={"num_warps": tiles.num_warps, "num_stages": tiles.num_stages})

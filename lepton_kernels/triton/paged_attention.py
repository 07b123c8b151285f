"""Triton paged attention: decode and chunked prefill over a paged KV cache, one kernel family.

One program owns a tile of query rows of one sequence that share one KV head: the query
heads of a GQA group are packed into the rows (``HPP`` heads per program), so every K/V tile
read from the cache serves the whole group. Decode tiles hold one query (the group's heads,
padded to the 16 rows ``tl.dot`` needs); prefill tiles hold ``BLOCK_Q`` queries x ``HPP``
heads. K/V rows are gathered through the block table: a tile of ``BLOCK_N`` keys spans part of
a page or several pages, each row's page looked up from the table.

Flash-decoding split-KV: with too few (sequence, query block, head group) programs to fill the
GPU, a third grid axis splits each program's key range into up to ``num_splits`` contiguous
ranges. Each split writes a normalized partial output (fp32) and its log-sum-exp to a
workspace; a small combine kernel merges them by log-sum-exp. The split count and workspace
size depend only on shapes and the SM count, and the key range of each split is computed on
the device from ``seq_lens``, so a call is CUDA-graph capturable and replays correctly when
``seq_lens`` and ``block_table`` change.

Mixed batches (``cu_seqlens_q``): the grid has a fixed upper bound of query blocks
(``Tq // BLOCK_Q + B``, from shapes); each program finds its sequence by counting the
sequences that start at or before it (a vectorized search over ``cu_seqlens_q``) and exits if
it has no queries. Causal / window bounds limit the key range of each query block; key tiles
fully visible to every row run without mask arithmetic.

fp8 (e4m3) caches are converted to float16 after loading and both products run in float16
(the query scaled by a power of two into its range); the K scale is folded into the score
scale and the V scale into the output (both per tensor or per KV head).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import interpreting, unavailable_reason
from .flash_attention import LOG2E, online_softmax_step, score_tile
from .flash_attention_configs import AttentionTiles, attention_tiles, decode_programs_per_sm, decode_tiles
from .._splits import MAX_SPLITS, MIN_TILES_PER_SPLIT, capability, choose_num_splits, sm_count

OP = "paged_attention"
MAX_HEAD_DIM = 256
FP8_DTYPE = torch.float8_e4m3fn

SEARCH_CHUNK = 256  # sequences examined per step when a program looks up its sequence
# Row budget of one program's fp32 accumulator (BLOCK_M x BLOCK_D elements).
MAX_ACC_ELEMENTS = 128 * 128


@triton.jit
def _fold_tiles(
    acc, l_i, m_i, q,
    k_base, v_base, bt_row, stride_bt_j,
    stride_kb, stride_kt, stride_vb, stride_vt,
    offs_n_blk, offs_d, pos, lo, hi, seq_len,
    window_left, window_right, qk_scale, softcap_scale,
    MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
    EVEN_D: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, SINGLE_PAGE: tl.constexpr, FP8: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, INT64_PAGES: tl.constexpr,
):
    """Fold key tiles [lo, hi) (lo a multiple of BLOCK_N) into the running (acc, l, m).

    MASKED applies the sequence end, causal and window masks; unmasked calls must only get
    tiles where every (row, key) pair is visible."""
    d_ok = offs_d[None, :] < HEAD_DIM
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n_blk
        if SINGLE_PAGE:
            # The tile lies inside one page: one table entry (start_n < seq_len, so it is valid).
            page = tl.load(bt_row + (start_n // BLOCK_SIZE) * stride_bt_j)
            if INT64_PAGES:
                page = page.to(tl.int64)
            slot = (start_n % BLOCK_SIZE) + offs_n_blk
            k_rows = page * stride_kb + slot * stride_kt
            v_rows = page * stride_vb + slot * stride_vt
        else:
            # Each row finds its page; table entries past the sequence may hold anything.
            if MASKED:
                pages = tl.load(bt_row + (offs_n // BLOCK_SIZE) * stride_bt_j, mask=offs_n < seq_len, other=0)
            else:
                pages = tl.load(bt_row + (offs_n // BLOCK_SIZE) * stride_bt_j)
            if INT64_PAGES:
                pages = pages.to(tl.int64)
            slot = offs_n % BLOCK_SIZE
            k_rows = pages * stride_kb + slot * stride_kt
            v_rows = pages * stride_vb + slot * stride_vt
        k_ptrs = k_base + k_rows[:, None] + offs_d[None, :]
        v_ptrs = v_base + v_rows[:, None] + offs_d[None, :]
        if MASKED:
            kv_mask = offs_n[:, None] < seq_len
            if not EVEN_D:
                kv_mask = kv_mask & d_ok
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0, eviction_policy="evict_first")
        elif EVEN_D:
            k = tl.load(k_ptrs, eviction_policy="evict_first")
        else:
            k = tl.load(k_ptrs, mask=d_ok, other=0.0, eviction_policy="evict_first")
        if FP8 or UPCAST:
            k = k.to(q.dtype)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        qk, scale = score_tile(qk, offs_n, pos, seq_len, window_left, window_right, qk_scale,
                               softcap_scale, SOFTCAP, MASKED, HAS_LEFT, HAS_RIGHT)
        p, m_new, l_i, acc = online_softmax_step(qk, m_i, l_i, acc, scale, MASKED)
        if MASKED:
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0, eviction_policy="evict_first")
        elif EVEN_D:
            v = tl.load(v_ptrs, eviction_policy="evict_first")
        else:
            v = tl.load(v_ptrs, mask=d_ok, other=0.0, eviction_policy="evict_first")
        if FP8 or UPCAST:
            v = v.to(q.dtype)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


# Lengths, windows and counts vary per call: no recompiles for each value class (1, multiples of 16).
@triton.jit(do_not_specialize=["batch", "num_splits", "q_blocks_per_seq", "window_left", "window_right"])
def _paged_attn_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, ws_o_ptr, ws_lse_ptr,
    bt_ptr, seq_lens_ptr, cu_q_ptr, k_scale_ptr, v_scale_ptr,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ot, stride_oh, stride_lt, stride_lh,
    stride_bt_b, stride_bt_j,
    batch, num_q_heads, num_splits, q_blocks_per_seq,
    qk_scale, softcap_scale, window_left, window_right,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_Q: tl.constexpr, HPP: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, SINGLE_PAGE: tl.constexpr,
    VARLEN: tl.constexpr, SEARCH: tl.constexpr, SEARCH_CHUNK: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
    FP8: tl.constexpr, SCALE_PER_HEAD: tl.constexpr,
    SPLIT: tl.constexpr, MIN_TILES: tl.constexpr,
    EVEN_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, INT64_PAGES: tl.constexpr,
):
    pid_q = tl.program_id(0)
    pid_h = tl.program_id(1)  # group of HPP query heads (all reading one kv head)
    split = tl.program_id(2)

    # -- which sequence and which of its query blocks ------------------------------------------
    if VARLEN:
        if SEARCH:
            # Sequence b owns the program slots [cu[b] // BLOCK_Q + b, cu[b+1] // BLOCK_Q + b + 1),
            # enough for its ceil(q_len / BLOCK_Q) blocks; the first slots are strictly increasing,
            # so b + 1 = the number of sequences whose first slot is <= pid_q.
            count = tl.zeros([], dtype=tl.int32)
            for start in range(0, batch, SEARCH_CHUNK):
                idx = start + tl.arange(0, SEARCH_CHUNK)
                starts = tl.load(cu_q_ptr + idx, mask=idx < batch, other=1 << 30)
                first_slot = starts // BLOCK_Q + idx
                count += tl.sum((first_slot <= pid_q).to(tl.int32), 0)
            b = count - 1
            q_start = tl.load(cu_q_ptr + b)
            slot = pid_q - (q_start // BLOCK_Q + b)
        else:
            b = pid_q // q_blocks_per_seq
            slot = pid_q % q_blocks_per_seq
            q_start = tl.load(cu_q_ptr + b)
        q_len = tl.load(cu_q_ptr + b + 1) - q_start
        num_q_blocks = tl.cdiv(q_len, BLOCK_Q)
        if slot >= num_q_blocks:
            return  # the grid is sized for the worst case
        # Last query blocks first: under a causal mask they see the most keys, so the tail of
        # the grid is made of short programs.
        q_block = num_q_blocks - 1 - slot
    else:
        b = pid_q
        q_block = 0
        q_start = pid_q
        q_len = 1
    seq_len = tl.load(seq_lens_ptr + b)

    # -- rows: (query, head) pairs --------------------------------------------------------------
    rows = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n_blk = tl.arange(0, BLOCK_N)
    q_local = q_block * BLOCK_Q + rows // HPP
    heads = pid_h * HPP + rows % HPP
    row_ok = (rows < BLOCK_Q * HPP) & (q_local < q_len)
    kv_head = (pid_h * HPP) // GROUP
    pos = q_local + seq_len - q_len  # key position of each row's query (bottom-right aligned)
    tokens = (q_start + q_local).to(tl.int64)
    d_ok = offs_d < HEAD_DIM

    q_ptrs = q_ptr + tokens[:, None] * stride_qt + heads[:, None].to(tl.int64) * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    if FP8:
        if SCALE_PER_HEAD:
            k_scale = tl.load(k_scale_ptr + kv_head)
            v_scale = tl.load(v_scale_ptr + kv_head)
        else:
            k_scale = tl.load(k_scale_ptr)
            v_scale = tl.load(v_scale_ptr)
        qk_scale = qk_scale * k_scale
        if q.dtype != tl.float32:
            # e4m3 becomes float16 in one instruction per pair (bfloat16 takes one more per
            # element, which bounded the loop), and e4m3 values are exact in float16: both dots
            # run in float16. q enters float16's range scaled by the power of two 2^-e that puts
            # its largest magnitude in [1, 2); the score scale takes 2^e back.
            q32 = q.to(tl.float32)
            q_exp = (tl.max(tl.max(tl.abs(q32), 1), 0).to(tl.int32, bitcast=True) >> 23) & 0xFF
            q = (q32 * ((254 - q_exp) << 23).to(tl.float32, bitcast=True)).to(tl.float16)
            qk_scale = qk_scale * (q_exp << 23).to(tl.float32, bitcast=True)

    # -- key range: visible to some row [lo, hi), to every row [full_lo, full_hi) -------------------
    if VARLEN:
        last_q = tl.minimum(q_block * BLOCK_Q + BLOCK_Q - 1, q_len - 1)
    else:
        last_q = 0
    first_pos = q_block * BLOCK_Q + seq_len - q_len
    last_pos = last_q + seq_len - q_len
    zero = seq_len * 0
    lo = zero
    hi = seq_len
    full_lo = zero
    full_hi = seq_len
    if HAS_LEFT:
        lo = tl.maximum(first_pos - window_left, 0) // BLOCK_N * BLOCK_N
        full_lo = tl.maximum(last_pos - window_left, 0)
    if HAS_RIGHT:
        hi = tl.minimum(hi, last_pos + window_right + 1)
        full_hi = tl.maximum(tl.minimum(full_hi, first_pos + window_right + 1), 0)
    hi = tl.maximum(hi, lo)
    if SPLIT:
        # This split's share of the tiles; computed here from seq_lens, so the grid stays fixed.
        lo_tile = lo // BLOCK_N
        num_tiles = tl.cdiv(hi, BLOCK_N) - lo_tile
        per_split = tl.maximum(tl.cdiv(num_tiles, num_splits), MIN_TILES)
        range_lo = tl.minimum((lo_tile + split * per_split) * BLOCK_N, hi)
        range_hi = tl.minimum(range_lo + per_split * BLOCK_N, hi)
    else:
        range_lo = lo
        range_hi = hi
    mid_lo = tl.minimum(tl.maximum(range_lo, tl.cdiv(full_lo, BLOCK_N) * BLOCK_N), range_hi)
    mid_hi = tl.maximum(mid_lo, tl.minimum(full_hi // BLOCK_N * BLOCK_N, range_hi))

    bt_row = bt_ptr + b.to(tl.int64) * stride_bt_b
    k_base = k_ptr + kv_head.to(tl.int64) * stride_kh
    v_base = v_ptr + kv_head.to(tl.int64) * stride_vh

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    if HAS_LEFT:
        acc, l_i, m_i = _fold_tiles(
            acc, l_i, m_i, q, k_base, v_base, bt_row, stride_bt_j, stride_kb, stride_kt, stride_vb, stride_vt,
            offs_n_blk, offs_d, pos, range_lo, mid_lo, seq_len, window_left, window_right, qk_scale, softcap_scale,
            True, HAS_LEFT, HAS_RIGHT, SOFTCAP, EVEN_D, HEAD_DIM, BLOCK_N, BLOCK_SIZE, SINGLE_PAGE, FP8,
            UPCAST, DOT_PRECISION, INT64_PAGES)
    acc, l_i, m_i = _fold_tiles(
        acc, l_i, m_i, q, k_base, v_base, bt_row, stride_bt_j, stride_kb, stride_kt, stride_vb, stride_vt,
        offs_n_blk, offs_d, pos, mid_lo, mid_hi, seq_len, window_left, window_right, qk_scale, softcap_scale,
        False, HAS_LEFT, HAS_RIGHT, SOFTCAP, EVEN_D, HEAD_DIM, BLOCK_N, BLOCK_SIZE, SINGLE_PAGE, FP8,
        UPCAST, DOT_PRECISION, INT64_PAGES)
    acc, l_i, m_i = _fold_tiles(
        acc, l_i, m_i, q, k_base, v_base, bt_row, stride_bt_j, stride_kb, stride_kt, stride_vb, stride_vt,
        offs_n_blk, offs_d, pos, mid_hi, range_hi, seq_len, window_left, window_right, qk_scale, softcap_scale,
        True, HAS_LEFT, HAS_RIGHT, SOFTCAP, EVEN_D, HEAD_DIM, BLOCK_N, BLOCK_SIZE, SINGLE_PAGE, FP8,
        UPCAST, DOT_PRECISION, INT64_PAGES)

    # -- epilogue: rows that saw no key give out 0, lse -inf ------------------------------------------
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    if FP8:
        out = out * v_scale
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)  # ln 2
    if SPLIT:
        # workspace [Tq, Hq, num_splits, HEAD_DIM] (fp32) and [Tq, Hq, num_splits]
        ws_rows = (tokens * num_q_heads + heads) * num_splits + split
        tl.store(ws_o_ptr + ws_rows[:, None] * HEAD_DIM + offs_d[None, :], out,
                 mask=row_ok[:, None] & d_ok[None, :])
        tl.store(ws_lse_ptr + ws_rows, lse, mask=row_ok)
    else:
        o_ptrs = out_ptr + tokens[:, None] * stride_ot + heads[:, None].to(tl.int64) * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        tl.store(lse_ptr + tokens * stride_lt + heads.to(tl.int64) * stride_lh, lse, mask=row_ok)


@triton.jit(do_not_specialize=["num_splits"])
def _combine_kernel(
    ws_o_ptr, ws_lse_ptr, out_ptr, lse_ptr,
    num_q_heads, num_splits,
    stride_ot, stride_oh, stride_lt, stride_lh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, CHUNK_S: tl.constexpr,
):
    """Merge one (token, head)'s split partials: lse = log sum_s exp(lse_s), out = sum_s
    exp(lse_s - lse) out_s. Splits that saw no key (lse_s = -inf) are never read."""
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    row = (token * num_q_heads + head) * num_splits
    offs_s = tl.arange(0, BLOCK_S)
    lse_s = tl.load(ws_lse_ptr + row + offs_s, mask=offs_s < num_splits, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    denom = tl.sum(tl.exp(lse_s - m_safe), 0)

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(0, num_splits, CHUNK_S):
        offs_c = s0 + tl.arange(0, CHUNK_S)
        lse_c = tl.load(ws_lse_ptr + row + offs_c, mask=offs_c < num_splits, other=float("-inf"))
        seen = lse_c > float("-inf")
        part = tl.load(ws_o_ptr + (row + offs_c)[:, None] * HEAD_DIM + offs_d[None, :],
                       mask=seen[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(tl.exp(lse_c - m_safe)[:, None] * part, 0)

    empty = denom == 0.0
    denom_safe = tl.where(empty, 1.0, denom)
    out = acc / denom_safe
    lse = tl.where(empty, float("-inf"), m_safe + tl.log(denom_safe))
    tl.store(out_ptr + token * stride_ot + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_ok)
    tl.store(lse_ptr + token * stride_lt + head * stride_lh, lse)


# -- heuristics (shapes and device properties only: never the data) -------------------------------

def _heads_per_program(group: int, max_rows: int) -> int:
    """The largest divisor of the GQA group that fits ``max_rows`` rows (the whole group when it does)."""
    for hpp in range(min(group, max_rows), 0, -1):
        if group % hpp == 0:
            return hpp
    return 1


def prefill_tiles(block_d: int, rows: int, cache_dtype: torch.dtype, q_dtype: torch.dtype,
                  capability: Tuple[int, int], interp: bool) -> AttentionTiles:
    """Tiles for query blocks: flash_attention's table, with extra stages because the page
    lookup feeding each K/V address takes a pipeline stage of its own. Checked in the sm_90
    IR (Triton 3.6): +2 stages give flash_attention's buffering (three K/V buffers at D <= 128,
    ~130 KB), +1 at D=256 (two buffers, ~197 KB; +2 would not fit); tiles of fewer than 64
    rows (mma.sync) and fp8 caches (converted in registers) need +2 for two buffers."""
    tiles = attention_tiles(block_d, q_dtype, capability, rows, interp, masked=True)
    if interp:
        return tiles
    extra = 1 if block_d > 128 and cache_dtype != FP8_DTYPE and tiles.block_m >= 64 else 2
    return AttentionTiles(tiles.block_m, tiles.block_n, tiles.num_warps, tiles.num_stages + extra)


@dataclass(frozen=True)
class LaunchPlan:
    """How one call is laid out: everything here comes from shapes and the device, never data."""

    tiles: AttentionTiles
    block_d: int  # head dim padded to a power of two
    hpp: int  # query heads per program (a divisor of the GQA group)
    block_q: int  # queries per program (1 for decode tiles)
    num_q_blocks: int  # grid axis 0: query-block slots (an upper bound)
    search: bool  # programs find their sequence by searching cu_seqlens_q
    q_blocks_per_seq: int  # without search: slots per sequence
    num_splits: int  # grid axis 2: key ranges per program


@functools.lru_cache(maxsize=1024)  # decode loops call with the same shapes every step
def plan(*, num_tokens: int, num_q_heads: int, num_kv_heads: int, head_dim: int, block_size: int, batch: int,
         max_blocks: int, varlen: bool, max_seqlen_q: int, q_dtype: torch.dtype, cache_dtype: torch.dtype,
         window_left: int, window_right: int, capability: Tuple[int, int], sm_count: int, interp: bool,
         tiles: Optional[AttentionTiles] = None, num_splits: Optional[int] = None) -> LaunchPlan:
    """Tiles, grid and split count of one call (``tiles``/``num_splits`` override the heuristics)."""
    group = num_q_heads // num_kv_heads
    block_d = max(16, triton.next_power_of_2(head_dim))
    max_q = max(int(max_seqlen_q), 1) if varlen else 1
    # Decode programs hold one query x the head group (at least the 16 rows tl.dot needs);
    # query-block programs take flash_attention's tiles (query rows x packed heads).
    if max_q == 1:
        hpp = _heads_per_program(group, min(max(16, MAX_ACC_ELEMENTS // block_d), 128))
        block_m = max(16, triton.next_power_of_2(hpp))
        tiles = tiles or decode_tiles(block_d, block_m, cache_dtype, q_dtype, capability, interp)
        block_q = 1
    else:
        hpp = _heads_per_program(group, 128)
        tiles = tiles or prefill_tiles(block_d, max_q * hpp, cache_dtype, q_dtype, capability, interp)
        if tiles.block_m < hpp:
            tiles = AttentionTiles(triton.next_power_of_2(hpp), tiles.block_n, tiles.num_warps, tiles.num_stages)
        block_q = tiles.block_m // hpp
    if tiles.block_m < max(16, hpp * block_q):
        raise ValueError(f"tiles.block_m ({tiles.block_m}) must be >= 16 and hold {hpp} heads x {block_q} queries")

    search, q_blocks_per_seq, num_q_blocks = False, 1, batch
    if varlen:
        # Sequence b needs ceil(q_len_b / block_q) slots: at most Tq // block_q + B in all, or
        # B x ceil(max_seqlen_q / block_q) with a fixed number per sequence (no search).
        q_blocks_per_seq = triton.cdiv(max_q, block_q)
        direct, bound = batch * q_blocks_per_seq, num_tokens // block_q + batch
        search = bound < direct
        num_q_blocks = bound if search else direct

    if num_splits is None:
        if interp:
            num_splits = 1
        else:
            capacity = max_blocks * block_size
            if window_left >= 0:  # a window bounds the keys one query block can see
                capacity = min(capacity, window_left + block_q + max(window_right, 0) + tiles.block_n)
            max_tiles = triton.cdiv(capacity, tiles.block_n)
            per_sm = decode_programs_per_sm(tiles, block_d, cache_dtype, q_dtype, capability)
            num_splits = choose_num_splits(num_q_blocks * (num_q_heads // hpp), max_tiles, sm_count, max_q == 1,
                                           per_sm)
    num_splits = max(1, min(int(num_splits), MAX_SPLITS))
    return LaunchPlan(tiles, block_d, hpp, block_q, num_q_blocks, search, q_blocks_per_seq, num_splits)


def launch_plan(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor,
                cu_seqlens_q: Optional[torch.Tensor], max_seqlen_q: int, window_left: int, window_right: int,
                *, tiles: Optional[AttentionTiles] = None, num_splits: Optional[int] = None) -> LaunchPlan:
    """The plan ``paged_attention`` uses for a call with these tensors (``window_right`` is 0
    for causal calls)."""
    device = q.device
    interp = interpreting() or device.type != "cuda"
    index = device.index if device.index is not None else (0 if interp else torch.cuda.current_device())
    _, block_size, num_kv_heads, _ = k_cache.shape
    return plan(num_tokens=q.shape[0], num_q_heads=q.shape[1], num_kv_heads=num_kv_heads, head_dim=q.shape[2],
                block_size=block_size, batch=block_table.shape[0], max_blocks=block_table.shape[1],
                varlen=cu_seqlens_q is not None, max_seqlen_q=max_seqlen_q, q_dtype=q.dtype,
                cache_dtype=k_cache.dtype, window_left=window_left, window_right=window_right,
                capability=(0, 0) if interp else capability(index), sm_count=1 if interp else sm_count(index),
                interp=interp, tiles=tiles, num_splits=num_splits)


@functools.lru_cache(maxsize=256)
def _max_offset(shape: Tuple[int, ...], strides: Tuple[int, ...]) -> int:
    return sum((size - 1) * abs(stride) for size, stride in zip(shape, strides) if size > 0)


# -- the backend ---------------------------------------------------------------------------------------

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
    _tiles: Optional[AttentionTiles] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Paged attention on validated inputs (same meaning as the ``paged_attention`` op schema).

    Returns ``out`` like q and float32 ``lse``: ``[B, Hq]`` (decode) or ``[Hq, Tq]`` (varlen).
    ``_num_splits`` (split-KV count) and ``_tiles`` override the heuristics (tests, benchmarks).
    """
    varlen = cu_seqlens_q is not None
    num_tokens, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    batch = block_table.shape[0]
    device = q.device
    out = torch.empty(q.shape, dtype=q.dtype, device=device)
    if varlen:
        lse = torch.empty((num_q_heads, num_tokens), dtype=torch.float32, device=device)
        stride_lt, stride_lh = lse.stride(1), lse.stride(0)
    else:
        lse = torch.empty((num_tokens, num_q_heads), dtype=torch.float32, device=device)
        stride_lt, stride_lh = lse.stride(0), lse.stride(1)
    if num_tokens == 0 or num_q_heads == 0:
        return out, lse
    if batch == 0:  # no sequence owns these tokens (invalid, unchecked): the reference's 0 / -inf
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse

    fp8 = k_cache.dtype == FP8_DTYPE
    interp = interpreting() or device.type != "cuda"
    if causal:
        window_right = 0
    has_left, has_right = window_left >= 0, window_right >= 0
    p = launch_plan(q, k_cache, block_table, cu_seqlens_q, max_seqlen_q, window_left, window_right,
                    tiles=_tiles, num_splits=_num_splits)
    tiles, num_splits = p.tiles, p.num_splits
    split = num_splits > 1
    if split:
        ws_o = torch.empty((num_tokens, num_q_heads, num_splits, head_dim), dtype=torch.float32, device=device)
        ws_lse = torch.empty((num_tokens, num_q_heads, num_splits), dtype=torch.float32, device=device)
    else:
        ws_o = ws_lse = lse  # never touched

    if softcap > 0.0:
        qk_scale, softcap_scale = softmax_scale / softcap, softcap * LOG2E
    else:
        qk_scale, softcap_scale = softmax_scale * LOG2E, 1.0
    dummy = seq_lens  # stands in for absent optional pointers; never read
    scale_per_head = fp8 and k_scale.numel() > 1
    if fp8:
        k_scale = k_scale.reshape(-1).contiguous()
        v_scale = v_scale.reshape(-1).contiguous()
    seq_lens = seq_lens.contiguous()
    if varlen:
        cu_seqlens_q = cu_seqlens_q.contiguous()
    int64_pages = not interp and max(_max_offset(k_cache.shape, k_cache.stride()),
                                      _max_offset(v_cache.shape, v_cache.stride())) >= 2 ** 31

    grid = (p.num_q_blocks, num_q_heads // p.hpp, num_splits)
    _paged_attn_kernel[grid](
        q, k_cache, v_cache, out, lse, ws_o, ws_lse,
        block_table, seq_lens, cu_seqlens_q if varlen else dummy,
        k_scale if fp8 else dummy, v_scale if fp8 else dummy,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1), stride_lt, stride_lh,
        block_table.stride(0), block_table.stride(1),
        batch, num_q_heads, num_splits, p.q_blocks_per_seq,
        qk_scale, softcap_scale, max(window_left, 0), max(window_right, 0),
        HEAD_DIM=head_dim, BLOCK_D=p.block_d, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
        BLOCK_Q=p.block_q, HPP=p.hpp, GROUP=num_q_heads // num_kv_heads,
        BLOCK_SIZE=block_size, SINGLE_PAGE=block_size % tiles.block_n == 0,
        VARLEN=varlen, SEARCH=p.search, SEARCH_CHUNK=SEARCH_CHUNK,
        HAS_LEFT=has_left, HAS_RIGHT=has_right, SOFTCAP=softcap > 0.0,
        FP8=fp8, SCALE_PER_HEAD=scale_per_head,
        SPLIT=split, MIN_TILES=MIN_TILES_PER_SPLIT,
        EVEN_D=head_dim == p.block_d, UPCAST=interp and q.dtype != torch.float32,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        INT64_PAGES=int64_pages,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    if split:
        block_s = triton.next_power_of_2(num_splits)
        _combine_kernel[(num_tokens, num_q_heads)](
            ws_o, ws_lse, out, lse, num_q_heads, num_splits,
            out.stride(0), out.stride(1), stride_lt, stride_lh,
            HEAD_DIM=head_dim, BLOCK_D=p.block_d, BLOCK_S=block_s, CHUNK_S=min(block_s, max(1, 2048 // p.block_d)),
            num_warps=4,
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
    """None when the Triton kernels can serve this (validated) call, else the reason."""
    fp8 = k_cache.dtype == FP8_DTYPE
    reason = unavailable_reason(q.device, allow_interpreter=True, needs_fp8=fp8)
    if reason is not None:
        return reason
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the Triton kernel takes float16, bfloat16 or float32 queries, got {q.dtype}"
    head_dim = q.shape[-1]
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        return f"the Triton kernel takes head dims 1..{MAX_HEAD_DIM}, got {head_dim}"
    return None


_TRITON_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", FP8_DTYPE: "fp8e4nv"}


def compile_for_target(
    capability: Tuple[int, int] = (9, 0),
    dtype: torch.dtype = torch.bfloat16,
    head_dim: int = 128,
    *,
    cache_dtype: Optional[torch.dtype] = None,
    group: int = 4,
    block_size: int = 16,
    max_seqlen_q: int = 1,
    causal: bool = True,
    window_left: int = -1,
    softcap: bool = False,
    split: bool = False,
    combine: bool = False,
):
    """Compile the attention kernel (or, with ``combine``, the split combine kernel) ahead of
    time for a GPU that need not be present, with the tiles a call of this kind would get.

    For checking what the kernels lower to (``.asm["ptx"]``, ``.n_spills``, shared memory in
    ``.metadata.shared``) without a GPU. Not available under ``TRITON_INTERPRET=1``.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = _combine_kernel if combine else _paged_attn_kernel
    if not isinstance(kernel, triton.runtime.JITFunction):
        raise RuntimeError("compile_for_target needs TRITON_INTERPRET unset before triton is imported")
    cache_dtype = cache_dtype or dtype
    block_d = max(16, triton.next_power_of_2(head_dim))
    target = GPUTarget("cuda", capability[0] * 10 + capability[1], 32)
    if combine:
        constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=64, CHUNK_S=min(64, 2048 // block_d))
        signature = {"ws_o_ptr": "*fp32", "ws_lse_ptr": "*fp32", "out_ptr": f"*{_TRITON_DTYPES[dtype]}",
                     "lse_ptr": "*fp32"}
        for name in kernel.arg_names:
            if name not in signature:
                signature[name] = "constexpr" if name in constexprs else "i32"
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        return triton.compile(source, target=target, options={"num_warps": 4})

    varlen = max_seqlen_q > 1
    p = plan(num_tokens=4096, num_q_heads=8 * group, num_kv_heads=8, head_dim=head_dim, block_size=block_size,
             batch=8, max_blocks=256, varlen=varlen, max_seqlen_q=max_seqlen_q, q_dtype=dtype,
             cache_dtype=cache_dtype, window_left=window_left, window_right=0 if causal else -1,
             capability=capability, sm_count=132, interp=False, num_splits=2 if split else 1)
    tiles = p.tiles
    fp8 = cache_dtype == FP8_DTYPE
    constexprs = dict(
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_Q=p.block_q,
        HPP=p.hpp, GROUP=group, BLOCK_SIZE=block_size, SINGLE_PAGE=block_size % tiles.block_n == 0,
        VARLEN=varlen, SEARCH=varlen, SEARCH_CHUNK=SEARCH_CHUNK, HAS_LEFT=window_left >= 0, HAS_RIGHT=causal,
        SOFTCAP=softcap, FP8=fp8, SCALE_PER_HEAD=fp8, SPLIT=split, MIN_TILES=MIN_TILES_PER_SPLIT,
        EVEN_D=head_dim == block_d, UPCAST=False, DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
        INT64_PAGES=False, stride_bt_j=1,
    )
    pointer_types = {
        "q_ptr": _TRITON_DTYPES[dtype], "out_ptr": _TRITON_DTYPES[dtype], "k_ptr": _TRITON_DTYPES[cache_dtype],
        "v_ptr": _TRITON_DTYPES[cache_dtype], "bt_ptr": "i32", "seq_lens_ptr": "i32", "cu_q_ptr": "i32",
    }
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + pointer_types.get(name, "fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("qk_scale", "softcap_scale"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name.startswith("stride") and name not in ("stride_qh", "stride_oh", "stride_lt", "stride_lh"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=target,
                          options={"num_warps": tiles.num_warps, "num_stages": tiles.num_stages})

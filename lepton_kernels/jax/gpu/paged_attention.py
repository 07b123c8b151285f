"""``paged_attention`` for Hopper GPUs: Pallas Mosaic GPU kernels for decode and for chunked
prefill / mixed batches (``cu_seqlens_q``), and their wrappers.

The decode kernel is described here; the mixed-batch kernel (:func:`paged_prefill_gpu`) shares
its pipeline (producer warpgroup, page walk, fp8 widening, V-tail zeroing) over tiles of 64
(query, head) rows of one sequence, without split-KV.

Kernel outline (one CUDA block per ``(batch, KV split, kv head)``, two warpgroups):

* GQA packing: the ``G = Hq/Hkv`` query heads of a kv head are the rows of one 64-row wgmma
  M tile (zero-padded past ``G``; ``G`` a multiple of 64 takes ``G/64`` blocks), so every
  K/V byte is read once per sequence. Decode is bound by HBM bandwidth: the padded rows
  cost tensor-core time, which is spare.
* warpgroup 1 is the producer: it walks the block's KV stages (``block_kv`` keys each),
  reads the pages' numbers from the block table (GMEM scalar loads) and TMA-copies each page
  (or, for pages larger than a stage, the stage's rows of one page) of its kv head into a
  ``num_stages`` ring in shared memory. A stage's ready barrier expects one arrival per
  copy, so it completes only when all of its pages have landed.
* warpgroup 0 is the consumer: ``S = Q K^T`` with wgmma, online softmax in base 2 in f32
  (scale and ``log2(e)`` folded into one multiply; ``softcap`` as ``c * tanh(s / c)``),
  ``O += P V`` with P from registers, releasing each slot as soon as its last reader is done.
  Only the first and last stages of a block are masked: keys at or past ``seq_len`` and,
  with a left window, keys before it. Block-table entries past a sequence's last page are
  never read (that page is copied again in their place), and cache rows past ``seq_len`` may
  hold anything (NaN included), so the last stage's V rows past it are zeroed in shared
  memory before ``P V``.
* fp8 (e4m3) caches travel as bytes and are widened to q's dtype in shared memory by the
  consumer (exact: e4m3 fits float16 and bfloat16); ``k_scale`` folds into the score scale,
  ``v_scale`` into the final normalization.

Split-KV (flash-decoding): with few ``(batch, kv head)`` programs for the GPU, each
sequence's visible KV stages are shared out among ``num_splits`` blocks. The count is static
(from the shapes and the SM count, so the launch is fixed for ``jax.jit`` and CUDA graphs);
the share follows each sequence's own length, read in the kernel. Each block writes its
normalized partial output (f32) and log-sum-exp; a small jnp step merges them. One split
writes the output in q's dtype directly.

Q and O move through an unswizzled staging tile, because TMA boxes of ``G < 8`` rows cannot
target the 8-row tiles of the swizzled wgmma operand; for the same reason a page must be a
multiple of 8 tokens, and a stage a whole number of pages or a page a whole number of stages.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .. import _validate as V
from . import _mosaic

HEAD_DIMS = (64, 128, 256)
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
FP8 = jnp.dtype(jnp.float8_e4m3fn)
ROWS = 64  # wgmma M tile: query heads of one kv head, zero-padded
OUT_COLS = 64  # f32 partial outputs leave shared memory in column chunks of this width
SMEM_BYTES = 227 * 1024  # opt-in shared memory per block on H100/H200
SMEM_RESERVE = 8192  # barriers, lse staging, alignment and Mosaic's own scratch (~3 KiB)
DEFAULT_NUM_SMS = 132  # H100 SXM / H200, when there is no GPU to ask (export)
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)

# Split-KV cost model (in KV stages): a block's fixed cost (Q load, first TMA round trip,
# epilogue) and the merge of the partials; a split gets at least MIN_STAGES_PER_SPLIT stages.
PROGRAM_OVERHEAD_STAGES = 2
COMBINE_OVERHEAD_STAGES = 1
MIN_STAGES_PER_SPLIT = 2
MAX_SPLITS = 64


@dataclasses.dataclass(frozen=True)
class GpuPagedConfig:
    """Tile sizes of the Mosaic GPU paged-decode kernel.

    ``block_kv`` keys per pipeline stage (a multiple of 64: the wgmma-layout tiles of the
    V-tail zeroing and fp8 widening), ``num_stages`` K/V slots in flight, ``num_splits`` KV
    ranges per sequence (None: chosen from the shapes and the SM count). Shared memory holds
    ``2*num_stages*block_kv*D`` cache elements, the 64-row Q tile and its staging copy, the
    f32 output chunk and, for fp8 caches, one widened K and V tile.
    """

    block_kv: int = 64
    num_stages: int = 4
    num_splits: Optional[int] = None

    def __post_init__(self):
        if self.block_kv <= 0 or self.block_kv % 64:
            raise ValueError(f"block_kv must be a positive multiple of 64, got {self.block_kv}")
        if self.num_stages < 2:
            raise ValueError(f"num_stages must be at least 2, got {self.num_stages}")
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"num_splits must be None or >= 1, got {self.num_splits}")

    def smem_bytes(self, head_dim: int, cache_itemsize: int = 2, itemsize: int = 2) -> int:
        ring = 2 * self.num_stages * self.block_kv * head_dim * cache_itemsize
        widened = 2 * self.block_kv * head_dim * itemsize if cache_itemsize != itemsize else 0
        q_tiles = 2 * ROWS * head_dim * itemsize
        return ring + widened + q_tiles + ROWS * OUT_COLS * 4 + SMEM_RESERVE


# 16-bit caches: a 128 KiB K/V ring at every head dim (one block per SM: the consumer's 232
# registers); fp8 caches get more, half-size stages where shared memory allows.
DEFAULT_CONFIGS = {
    64: GpuPagedConfig(block_kv=128, num_stages=4),
    128: GpuPagedConfig(block_kv=64, num_stages=4),
    256: GpuPagedConfig(block_kv=64, num_stages=2),
}


def default_config(head_dim: int, cache_dtype) -> GpuPagedConfig:
    config = DEFAULT_CONFIGS[head_dim]
    if jnp.dtype(cache_dtype) == FP8 and head_dim < 256:  # fp8 stages are half the bytes
        config = dataclasses.replace(config, num_stages=6)
    return config


def unavailable_reason(q, k_cache, block_table, *, cu_seqlens_q=None, config: Optional[GpuPagedConfig] = None,
                       check_device: bool = True) -> Optional[str]:
    """None when :func:`paged_attention_gpu` serves this call, else a sentence saying why not."""
    dtype, cache_dtype = jnp.dtype(q.dtype), jnp.dtype(k_cache.dtype)
    if dtype not in DTYPES:
        return f"the Mosaic GPU paged kernel takes float16/bfloat16 queries (wgmma), got {dtype.name}"
    if cache_dtype not in (dtype, FP8):
        return f"the Mosaic GPU paged kernel takes caches of q's dtype or float8_e4m3fn, got {cache_dtype.name}"
    head_dim = q.shape[-1]
    if head_dim not in HEAD_DIMS:
        return f"the Mosaic GPU paged kernel takes head dims {HEAD_DIMS}, got {head_dim}"
    num_heads, (_, block_size, num_kv_heads, _) = q.shape[1], k_cache.shape
    group = num_heads // num_kv_heads
    if group > ROWS and group % ROWS:
        return (f"the Mosaic GPU paged kernel packs up to {ROWS} query heads per kv head, or a multiple of "
                f"{ROWS}; got Hq/Hkv = {group}")
    config = config or default_config(head_dim, cache_dtype)
    block_kv = config.block_kv
    if block_size % 8 or (block_kv % block_size and block_size % block_kv):
        return (f"the Mosaic GPU paged kernel needs a cache block size that is a multiple of 8 and divides "
                f"{block_kv} or is a multiple of it (TMA boxes land on 8-row tiles), got {block_size}")
    if q.shape[0] == 0 or num_heads == 0 or block_table.shape[0] == 0 or block_table.shape[1] == 0:
        return "empty batch, heads or block table"
    smem = config.smem_bytes(head_dim, cache_dtype.itemsize, dtype.itemsize)
    if smem > SMEM_BYTES:
        return f"{config} needs {smem} bytes of shared memory at D={head_dim}; the limit is {SMEM_BYTES}"
    reason = _mosaic.device_reason() if check_device else _mosaic.bindings_reason()
    return reason or _mosaic.masked_kernel_reason()


@functools.lru_cache(maxsize=None)
def num_sms() -> int:
    """SMs of the first GPU, or an H100's count where jax sees none (lowering for export)."""
    try:
        return int(jax.devices("gpu")[0].core_count)
    except Exception:  # no GPU backend, or a device without core_count
        return DEFAULT_NUM_SMS


@functools.lru_cache(maxsize=4096)
def choose_num_splits(programs: int, max_stages: int, sms: int) -> int:
    """KV splits per sequence for ``programs`` blocks of up to ``max_stages`` stages, one block
    per SM: none when they fill most SMs already; otherwise the count minimizing (waves of
    blocks) x (stages per split + a block's overhead), + the merge, fewer splits on ties."""
    if programs <= 0 or max_stages < 2 * MIN_STAGES_PER_SPLIT or 5 * programs >= 4 * sms:
        return 1
    best, best_cost = 1, None
    for splits in range(1, min(MAX_SPLITS, max_stages // MIN_STAGES_PER_SPLIT) + 1):
        waves = -(-programs * splits // sms)
        cost = waves * (-(-max_stages // splits) + PROGRAM_OVERHEAD_STAGES)
        cost += COMBINE_OVERHEAD_STAGES if splits > 1 else 0
        if best_cost is None or cost < best_cost:
            best, best_cost = splits, cost
    return best


def _stage_range(seq_len, split, *, left, capacity, block_kv, num_splits):
    """(first stage, number of stages, kv_len, lo) of one block; identical in both warpgroups.

    Keys ``[lo, kv_len)`` are visible to the decode query (at position ``seq_len - 1``);
    ``capacity`` (the block table's tokens) bounds them. Stage ``t`` holds keys
    ``[t*block_kv, (t+1)*block_kv)``. The stages holding a visible key are shared out evenly
    among the splits (at least MIN_STAGES_PER_SPLIT each), by the sequence's own length: a
    short sequence in a table sized for long ones still spreads over the split blocks.
    """
    seq_len = jnp.maximum(seq_len, 0)
    kv_len = jnp.minimum(seq_len, capacity)
    lo = jnp.maximum(seq_len - 1 - left, 0) if left >= 0 else jnp.int32(0)
    bkv = jnp.int32(block_kv)
    first = lax.div(lo, bkv)
    end = jnp.where(lo < kv_len, lax.div(kv_len + bkv - 1, bkv), first)
    if num_splits == 1:
        return first, end - first, kv_len, lo
    per_split = jnp.maximum(lax.div(end - first + (num_splits - 1), jnp.int32(num_splits)), MIN_STAGES_PER_SPLIT)
    start = first + split * per_split
    return start, jnp.clip(end - start, 0, per_split), kv_len, lo


def _empty_state(plgpu, layout, head_dim):
    """The online softmax's starting (acc, m, l) in the wgmma register layouts."""
    return (
        layout(jnp.full((ROWS, head_dim), 0.0, jnp.float32), plgpu.Layout.WGMMA),
        layout(jnp.full((ROWS,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
        layout(jnp.full((ROWS,), 0.0, jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
    )


def _finish(m, l, v_scale):
    """1 / l (times the fp8 V scale) and the natural-log lse; rows that saw no key: 0 and -inf."""
    valid = l > 0.0
    inv_l = jnp.where(valid, 1.0 / jnp.where(valid, l, 1.0), 0.0)
    if v_scale is not None:
        inv_l = inv_l * v_scale
    return inv_l, jnp.where(valid, m * LN2 + jnp.log(jnp.where(valid, l, 1.0)), -jnp.inf)


def _stage_step(*, plgpu, compiled, iota, dtype, fp8, block_kv, num_stages, kv_len, pre, post, softcap,
                q_smem, k_smem, v_smem, k_wide, v_wide, k_ready, v_ready, k_free, v_free, first_stage, mask,
                guard_empty_rows):
    """The consumer's work on one KV stage, shared by the decode and prefill kernels:
    ``step(i, (acc, m, l), masked=...)`` folds stage ``first_stage + i`` into the online softmax.

    ``mask(s, stage)`` hides the keys some rows of a masked stage must not see (scores in base 2);
    ``guard_empty_rows``: a row may have seen no key yet (m = -inf), whose exponentials must stay
    0, not NaN. fp8 slots are widened to q's dtype in shared memory first (exact; bfloat16 via
    f16 and f32, as Hopper converts e4m3 to f16 only).
    """
    bkv = jnp.int32(block_kv)

    def widen(src, dst, stage, *, zero_tail):
        x = src[...].astype(jnp.float16)
        if dtype != jnp.float16:
            x = x.astype(jnp.float32)
        if zero_tail:
            x = jnp.where(iota(x.shape, 0) + stage * bkv < kv_len, x, 0.0)
        dst[...] = x.astype(dtype)
        plgpu.commit_smem()

    def zero_v_tail(v_tile, stage):
        """Zero V rows at or past kv_len in place: NaN there would survive P = 0."""
        @pl.when((stage + 1) * bkv > kv_len)
        def _():
            v = v_tile[...]
            v_tile[...] = jnp.where(iota(v.shape, 0) + stage * bkv < kv_len, v, jnp.zeros_like(v))
            plgpu.commit_smem()

    def step(i, carry, *, masked):
        acc, m, l = carry
        slot = lax.rem(i, jnp.int32(num_stages))
        stage = first_stage + i
        plgpu.barrier_wait(k_ready.at[slot])
        if fp8:
            widen(k_smem.at[slot], k_wide, stage, zero_tail=False)
            plgpu.barrier_arrive(k_free.at[slot])
            k_tile = k_wide
        else:
            k_tile = k_smem.at[slot]

        def qk(acc_ref):
            plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_tile, (1, 0)))
            return acc_ref[...]

        if compiled:
            s = pl.run_scoped(qk, plgpu.ACC((ROWS, block_kv), jnp.float32))
        else:  # the interpreter cannot transpose a wgmma operand
            s = lax.dot_general(q_smem[...], k_tile[...], (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32)
        if not fp8:
            plgpu.barrier_arrive(k_free.at[slot])
        s = jnp.tanh(s * pre) * post if softcap else s * pre
        if masked:
            s = mask(s, stage)
        m_new = jnp.maximum(m, s.max(axis=1))
        if masked and guard_empty_rows:
            m_new = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        l = l * alpha + p.sum(axis=1)
        p16 = p.astype(dtype)
        plgpu.barrier_wait(v_ready.at[slot])
        if fp8:
            widen(v_smem.at[slot], v_wide, stage, zero_tail=masked)
            plgpu.barrier_arrive(v_free.at[slot])
            v_tile = v_wide
        else:
            v_tile = v_smem.at[slot]
            if masked:
                zero_v_tail(v_tile, stage)

        def pv(acc_ref):
            plgpu.wgmma(acc_ref, p16, v_tile)

        if compiled:
            acc = pl.run_state(pv)(plgpu.ACC.init(acc))
        else:  # the interpreter has no run_state nor register wgmma operands
            acc = acc + lax.dot_general(p16, v_tile[...], (((1,), (0,)), ((), ())),
                                        preferred_element_type=jnp.float32)
        if not fp8:
            plgpu.barrier_arrive(v_free.at[slot])
        return acc, m_new, l

    return step


def _produce_stages(*, plgpu, page_of, kv_len, kv_head, block_size, block_kv, num_stages, first_stage, steps,
                    k_ref, v_ref, k_smem, v_smem, k_ready, v_ready, k_free, v_free):
    """The producer warpgroup of both kernels: stages ``first_stage .. + steps`` of one sequence
    (``page_of(j)``: its block-table entry j, a scalar read from global memory) TMA-copied page by page into the K/V rings, each slot
    refilled once the consumer released it, then the last releases waited for (every barrier
    phase observed)."""
    bkv = jnp.int32(block_kv)
    num_pages = lax.div(kv_len + jnp.int32(block_size - 1), jnp.int32(block_size))

    def pieces(stage):
        """(page, rows of the page, destination rows of the slot) of each copy of a stage."""
        if block_size >= block_kv:  # a stage is a row range of one page
            first_key = stage * bkv
            page = page_of(lax.div(first_key, jnp.int32(block_size)))
            return [(page, pl.ds(lax.rem(first_key, jnp.int32(block_size)), block_kv), slice(None))]
        per_stage = block_kv // block_size
        # Pages past the sequence's last re-read the last one (their table entries may be
        # anything); those keys are masked and their V rows zeroed.
        return [(page_of(jnp.minimum(stage * per_stage + j, num_pages - 1)), slice(None),
                 pl.ds(j * block_size, block_size)) for j in range(per_stage)]

    def issue(cache, ring, ready, slot, parts):
        for page, src_rows, dst_rows in parts:
            plgpu.copy_gmem_to_smem(cache.at[page, src_rows, kv_head], ring.at[slot, dst_rows], ready.at[slot])

    @pl.loop(0, steps)
    def _fill(i):
        slot = lax.rem(i, jnp.int32(num_stages))
        parts = pieces(first_stage + i)  # the page numbers load before the waits
        pl.when(i >= num_stages)(lambda: plgpu.barrier_wait(k_free.at[slot]))
        issue(k_ref, k_smem, k_ready, slot, parts)
        pl.when(i >= num_stages)(lambda: plgpu.barrier_wait(v_free.at[slot]))
        issue(v_ref, v_smem, v_ready, slot, parts)

    @pl.loop(jnp.maximum(steps - num_stages, 0), steps)
    def _drain(i):
        slot = lax.rem(i, jnp.int32(num_stages))
        plgpu.barrier_wait(k_free.at[slot])
        plgpu.barrier_wait(v_free.at[slot])


def _paged_decode_kernel(q_ref, k_ref, v_ref, table_ref, lens_ref, *refs, plgpu, scale, softcap, left, group,
                         rows, head_tiles, block_size, block_kv, num_stages, num_splits, fp8, compiled):
    if fp8:
        k_scale_ref, v_scale_ref, *refs = refs
    out_ref, lse_ref, *scratch = refs
    (q_smem, q_stage, o_stage, k_smem, v_smem, k_wide, v_wide, lse_smem,
     q_ready, k_ready, v_ready, k_free, v_free) = scratch
    dtype = q_ref.dtype
    head_dim = q_ref.shape[-1]
    max_blocks = table_ref.shape[1]
    batch = lax.axis_index("batch")
    split = lax.axis_index("split")
    tile = lax.axis_index("head_tile")
    kv_head = lax.div(tile, jnp.int32(head_tiles))
    q_head0 = kv_head * group + lax.rem(tile, jnp.int32(head_tiles)) * rows
    wg = lax.axis_index("wg")
    start, steps, kv_len, lo = _stage_range(
        lens_ref[batch], split, left=left, capacity=max_blocks * block_size, block_kv=block_kv,
        num_splits=num_splits)
    bkv = jnp.int32(block_kv)

    def layout(x, kind):  # register layouts only matter to the compiler; the interpreter lacks them
        return plgpu.layout_cast(x, kind) if compiled else x

    def iota(shape, dim):
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA if compiled else None)

    @pl.when(wg == 0)
    def _consumer():
        if compiled:
            plgpu.set_max_registers(232, action="increase")
        plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(q_head0, rows)], q_stage.at[pl.ds(0, rows)], q_ready)
        plgpu.barrier_wait(q_ready)
        q = plgpu.load(q_stage, (), layout=plgpu.Layout.WGMMA, optimized=False) if compiled else q_stage[...]
        q_smem[...] = jnp.where(iota(q.shape, 0) < rows, q, jnp.zeros_like(q))  # rows past G: zeros
        plgpu.commit_smem()  # the wgmmas read q_smem through the async proxy

        # Scores in base 2: s * pre, or with softcap c: tanh(s * pre) * post (pre = scale / c).
        pre = scale * (k_scale_ref[kv_head] if fp8 else 1.0) * (1.0 / softcap if softcap else LOG2E)
        post = softcap * LOG2E
        cols0 = iota((ROWS, block_kv), 1)

        def mask(s, stage):
            cols = cols0 + stage * bkv
            return jnp.where((cols < kv_len) & (cols >= lo), s, -jnp.inf)

        # Every stage holds a visible key, so m is finite from the first one on.
        step = _stage_step(plgpu=plgpu, compiled=compiled, iota=iota, dtype=dtype, fp8=fp8, block_kv=block_kv,
                           num_stages=num_stages, kv_len=kv_len, pre=pre, post=post, softcap=softcap,
                           q_smem=q_smem, k_smem=k_smem, v_smem=v_smem, k_wide=k_wide, v_wide=v_wide,
                           k_ready=k_ready, v_ready=v_ready, k_free=k_free, v_free=v_free, first_stage=start,
                           mask=mask, guard_empty_rows=False)

        carry = _empty_state(plgpu, layout, head_dim)
        # Only a block's first stage (window start) and last (end of the keys) need the mask.
        carry = lax.fori_loop(0, jnp.minimum(steps, 1), functools.partial(step, masked=True), carry)
        carry = lax.fori_loop(1, steps - 1, functools.partial(step, masked=False), carry)
        carry = lax.fori_loop(jnp.maximum(steps - 1, 1), steps, functools.partial(step, masked=True), carry)
        acc, m, l = carry

        inv_l, lse = _finish(m, l, v_scale_ref[kv_head] if fp8 else None)
        out = acc * lax.broadcast_in_dim(inv_l, acc.shape, [0])
        lse_smem[...] = lse
        rows_out = out_ref.at[batch, split, pl.ds(q_head0, rows)]
        if out_ref.dtype == dtype:  # one split: the final output, through the Q staging tile
            q_stage[...] = out.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_stage.at[pl.ds(0, rows)], rows_out)
        else:  # f32 partials, a column chunk at a time
            for c in range(head_dim // OUT_COLS):
                if c:
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                o_stage[...] = out[:, c * OUT_COLS:(c + 1) * OUT_COLS]
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_stage.at[pl.ds(0, rows)], rows_out.at[:, pl.ds(c * OUT_COLS, OUT_COLS)])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[batch, split, tile])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 1)
    def _producer():
        if compiled:
            plgpu.set_max_registers(40, action="decrease")
        _produce_stages(plgpu=plgpu, page_of=lambda j: table_ref[batch, j], kv_len=kv_len, kv_head=kv_head,
                        block_size=block_size, block_kv=block_kv, num_stages=num_stages, first_stage=start,
                        steps=steps, k_ref=k_ref, v_ref=v_ref, k_smem=k_smem, v_smem=v_smem, k_ready=k_ready,
                        v_ready=v_ready, k_free=k_free, v_free=v_free)


def _merge_splits(out, lse):
    """out ``[B, S, Hq, D]`` f32 normalized partials, lse ``[B, S, Hq]`` -> ``[B, Hq, D]``, ``[B, Hq]``.

    Reductions over S only (no dot), so XLA fuses the weights into them: a few small kernels.
    """
    m = lse.max(axis=1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lse - m)  # empty splits: exp(-inf) = 0
    total = w.sum(axis=1)
    merged = (out * w[..., None]).sum(axis=1)
    ok = total > 0
    safe = jnp.where(ok, total, 1.0)
    merged = jnp.where(ok[..., None], merged / safe[..., None], 0.0)
    return merged, jnp.where(ok, m[:, 0] + jnp.log(safe), -jnp.inf)


def paged_attention_gpu(q, k_cache, v_cache, block_table, seq_lens, k_scale=None, v_scale=None, *, scale: float,
                        window=(-1, -1), softcap: float = 0.0, return_lse: bool = False,
                        config: Optional[GpuPagedConfig] = None, interpret=None):
    """Decode: q ``[B, Hq, D]`` over a paged cache -> out ``[B, Hq, D]`` (and lse ``[B, Hq]``).

    Arguments as :func:`~lepton_kernels.jax.paged_attention` (decode rows see every cached key;
    only the left window and softcap apply). The caller checks :func:`unavailable_reason`
    first; this only traces the kernel. ``interpret``: Pallas' Mosaic GPU interpreter
    parameters, to run on a CPU (slow; tests).
    """
    plgpu = _mosaic.plgpu()
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    max_blocks = block_table.shape[1]
    group = num_heads // num_kv_heads
    rows = min(group, ROWS)
    head_tiles = group // rows
    fp8 = jnp.dtype(k_cache.dtype) == FP8
    config = config or default_config(head_dim, k_cache.dtype)
    block_kv, left = config.block_kv, window[0]
    smem = config.smem_bytes(head_dim, jnp.dtype(k_cache.dtype).itemsize, jnp.dtype(q.dtype).itemsize)
    if smem > SMEM_BYTES:
        raise ValueError(f"{config} needs {smem} bytes of shared memory at D={head_dim}; the limit is {SMEM_BYTES}")

    max_stages = pl.cdiv(max_blocks * block_size, block_kv)
    if left >= 0:  # the window's keys span at most this many stages
        max_stages = min(max_stages, pl.cdiv(left + 1, block_kv) + 1)
    programs = batch * num_kv_heads * head_tiles
    splits = config.num_splits or choose_num_splits(programs, max_stages, num_sms())
    splits = max(1, min(splits, max_stages // MIN_STAGES_PER_SPLIT))
    # The most stages a block can run bounds the ring.
    num_stages = max(2, min(config.num_stages, max(pl.cdiv(max_stages, splits), MIN_STAGES_PER_SPLIT)))

    def tiles(dtype):  # the wgmma operand layout: rows of D elements, swizzled
        bits = jnp.dtype(dtype).itemsize * 8
        swizzle = plgpu.find_swizzle(head_dim * bits)
        return plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle)

    ring = plgpu.SMEM((num_stages, block_kv, head_dim), k_cache.dtype, transforms=tiles(k_cache.dtype))
    wide = plgpu.SMEM((block_kv, head_dim), q.dtype, transforms=tiles(q.dtype)) if fp8 else None
    out_dtype = q.dtype if splits == 1 else jnp.float32
    scratch = (
        plgpu.SMEM((ROWS, head_dim), q.dtype, transforms=tiles(q.dtype)),  # q_smem: the wgmma operand
        plgpu.SMEM((ROWS, head_dim), q.dtype),  # q_stage: G rows in by TMA (and the output, one split)
        plgpu.SMEM((ROWS, OUT_COLS), jnp.float32) if splits > 1 else None,  # o_stage: f32 partials out
        ring, ring, wide, wide,
        plgpu.SMEM((ROWS,), jnp.float32),  # lse
        plgpu.Barrier(),  # q_ready
        plgpu.Barrier(num_arrivals=max(1, block_kv // block_size), num_barriers=num_stages),  # k_ready
        plgpu.Barrier(num_arrivals=max(1, block_kv // block_size), num_barriers=num_stages),  # v_ready
        plgpu.Barrier(num_barriers=num_stages),  # k_free
        plgpu.Barrier(num_barriers=num_stages),  # v_free
    )
    out_type = (jax.ShapeDtypeStruct((batch, splits, num_heads, head_dim), out_dtype),
                jax.ShapeDtypeStruct((batch, splits, num_kv_heads * head_tiles, ROWS), jnp.float32))
    inputs = [q, k_cache, v_cache, block_table, seq_lens]
    if fp8:
        inputs += [V.per_head(k_scale, num_kv_heads), V.per_head(v_scale, num_kv_heads)]
    body = functools.partial(
        _paged_decode_kernel, plgpu=plgpu, scale=scale, softcap=softcap, left=left, group=group, rows=rows,
        head_tiles=head_tiles, block_size=block_size, block_kv=block_kv, num_stages=num_stages,
        num_splits=splits, fp8=fp8, compiled=interpret is None)
    out, lse = plgpu.kernel(
        body,
        out_type=out_type,
        scratch_types=scratch,
        grid=(batch, splits, num_kv_heads * head_tiles),
        grid_names=("batch", "split", "head_tile"),
        num_threads=2,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **({} if interpret is None else dict(interpret=interpret)),
    )(*inputs)
    lse = lse[..., :rows].reshape(batch, splits, num_heads)
    if splits == 1:
        out, lse = out[:, 0], lse[:, 0]
    else:
        out, lse = _merge_splits(out, lse)
        out = out.astype(q.dtype)
    return (out, lse) if return_lse else out



# --------------------------------------------------------------------------------------------
# Chunked prefill / mixed batches (cu_seqlens_q)
# --------------------------------------------------------------------------------------------

def _prefill_stage_bounds(pos0, nq, kv_len, *, causal, left, right, block_kv):
    """Stages ``[first, end)`` holding a key some row of a tile sees, and the stages
    ``[mid_lo, mid_hi)`` every row of the tile sees whole (those skip the mask).

    The tile's queries sit at positions ``[pos0, pos0 + nq)``; a query at ``p`` sees keys
    ``[p - left, p + right]`` (right 0 when causal; unbounded sides where negative) below
    ``kv_len``. An empty tile (``nq == 0``) runs no stage.
    """
    bkv = jnp.int32(block_kv)
    last = pos0 + nq - 1
    reach = 0 if causal else right  # keys past a query's position it sees
    if reach >= 0:
        hi, hi_all = jnp.minimum(kv_len, last + 1 + reach), jnp.minimum(kv_len, pos0 + 1 + reach)
    else:
        hi = hi_all = kv_len
    if left >= 0:
        lo, lo_all = jnp.maximum(pos0 - left, 0), jnp.maximum(last - left, 0)
    else:
        lo = lo_all = jnp.int32(0)
    first = lax.div(lo, bkv)
    end = jnp.where((nq > 0) & (lo < hi), lax.div(hi + bkv - 1, bkv), first)
    mid_lo = jnp.clip(lax.div(lo_all + bkv - 1, bkv), first, end)
    mid_hi = jnp.clip(lax.div(jnp.maximum(hi_all, 0), bkv), mid_lo, end)
    return first, end, mid_lo, mid_hi


def _paged_prefill_kernel(q_ref, k_ref, v_ref, table_ref, lens_ref, tiles_ref, *refs, plgpu, scale, softcap,
                          causal, left, right, row_heads, head_tiles, block_size, block_kv, num_stages, fp8,
                          compiled):
    if fp8:
        k_scale_ref, v_scale_ref, *refs = refs
    out_ref, lse_ref, *scratch = refs
    (q_smem, k_smem, v_smem, k_wide, v_wide, lse_smem, q_ready, k_ready, v_ready, k_free, v_free) = scratch
    dtype = q_ref.dtype
    head_dim = q_ref.shape[-1]
    max_blocks = table_ref.shape[1]
    tile = lax.axis_index("tile")
    head_tile = lax.axis_index("head_tile")
    kv_head = lax.div(head_tile, jnp.int32(head_tiles))
    seq, pos0, nq = tiles_ref[0, tile], tiles_ref[1, tile], tiles_ref[2, tile]
    kv_len = jnp.minimum(jnp.maximum(lens_ref[seq], 0), max_blocks * block_size)
    first, end, mid_lo, mid_hi = _prefill_stage_bounds(pos0, nq, kv_len, causal=causal, left=left, right=right,
                                                       block_kv=block_kv)
    steps = end - first
    bkv = jnp.int32(block_kv)
    wg = lax.axis_index("wg")

    def layout(x, kind):
        return plgpu.layout_cast(x, kind) if compiled else x

    def iota(shape, dim):
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA if compiled else None)

    @pl.when(wg == 0)
    def _consumer():
        if compiled:
            plgpu.set_max_registers(232, action="increase")
        plgpu.copy_gmem_to_smem(q_ref.at[tile, head_tile], q_smem, q_ready)
        pre = scale * (k_scale_ref[kv_head] if fp8 else 1.0) * (1.0 / softcap if softcap else LOG2E)
        post = softcap * LOG2E
        reach = 0 if causal else right

        def mask(s, stage):  # (recomputed per masked stage: held across the loop, these would take 64 registers)
            cols = iota(s.shape, 1) + stage * bkv
            qpos = lax.div(iota(s.shape, 0), jnp.int32(row_heads)) + pos0  # row r: query r // row_heads
            ok = cols < kv_len
            if reach >= 0:
                ok &= cols <= qpos + reach
            if left >= 0:
                ok &= cols >= qpos - left
            return jnp.where(ok, s, -jnp.inf)

        step = _stage_step(plgpu=plgpu, compiled=compiled, iota=iota, dtype=dtype, fp8=fp8, block_kv=block_kv,
                           num_stages=num_stages, kv_len=kv_len, pre=pre, post=post, softcap=softcap,
                           q_smem=q_smem, k_smem=k_smem, v_smem=v_smem, k_wide=k_wide, v_wide=v_wide,
                           k_ready=k_ready, v_ready=v_ready, k_free=k_free, v_free=v_free, first_stage=first,
                           mask=mask, guard_empty_rows=True)

        carry = _empty_state(plgpu, layout, head_dim)
        plgpu.barrier_wait(q_ready)
        carry = lax.fori_loop(0, mid_lo - first, functools.partial(step, masked=True), carry)
        carry = lax.fori_loop(mid_lo - first, mid_hi - first, functools.partial(step, masked=False), carry)
        carry = lax.fori_loop(mid_hi - first, steps, functools.partial(step, masked=True), carry)
        acc, m, l = carry

        inv_l, lse = _finish(m, l, v_scale_ref[kv_head] if fp8 else None)
        q_smem[...] = (acc * lax.broadcast_in_dim(inv_l, acc.shape, [0])).astype(dtype)
        lse_smem[...] = lse
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, out_ref.at[tile, head_tile])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[tile, head_tile])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 1)
    def _producer():
        if compiled:
            plgpu.set_max_registers(40, action="decrease")
        _produce_stages(plgpu=plgpu, page_of=lambda j: table_ref[seq, j], kv_len=kv_len, kv_head=kv_head,
                        block_size=block_size, block_kv=block_kv, num_stages=num_stages, first_stage=first,
                        steps=steps, k_ref=k_ref, v_ref=v_ref, k_smem=k_smem, v_smem=v_smem, k_ready=k_ready,
                        v_ready=v_ready, k_free=k_free, v_free=v_free)


def prefill_tiles(cu_seqlens_q, seq_lens, *, tokens_per_tile, num_tiles):
    """Tile tables for packed queries: ``[3, num_tiles]`` int32 rows (sequence, position of the
    tile's first query, queries in the tile: 0 past the last tile), and each tile's first
    packed token. A tile holds up to ``tokens_per_tile`` queries of one sequence."""
    batch = seq_lens.shape[0]
    q_lens = jnp.maximum(cu_seqlens_q[1:] - cu_seqlens_q[:-1], 0)
    counts = lax.div(q_lens + (tokens_per_tile - 1), jnp.int32(tokens_per_tile))
    ends = jnp.cumsum(counts)
    j = jnp.arange(num_tiles, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(ends, j, side="right").astype(jnp.int32), 0, batch - 1)
    q0 = (j - (ends - counts)[seq]) * tokens_per_tile
    nq = jnp.where(j < ends[-1], jnp.clip(q_lens[seq] - q0, 0, tokens_per_tile), 0)
    pos0 = seq_lens[seq] - q_lens[seq] + q0
    return jnp.stack([seq, pos0, nq]).astype(jnp.int32), cu_seqlens_q[seq] + q0, ends - counts


def paged_prefill_gpu(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, k_scale=None, v_scale=None, *,
                      scale: float, causal: bool = True, window=(-1, -1), softcap: float = 0.0,
                      return_lse: bool = False, config: Optional[GpuPagedConfig] = None, interpret=None):
    """Chunked prefill / mixed batch: packed q ``[Tq, Hq, D]`` with ``cu_seqlens_q`` -> out
    ``[Tq, Hq, D]`` (and lse ``[Hq, Tq]``), semantics of :func:`~lepton_kernels.jax.paged_attention`.

    One block per (query tile, kv head): a tile's 64 rows are ``64 // G`` queries of one
    sequence times the ``G`` heads of a kv head (or 64 heads of one query when ``G`` is a
    multiple of 64), so decode rows and prefill chunks share one launch. A jnp pre-pass lays
    q out in tiles and tabulates each tile's sequence and first position (a static count, at
    most ``cdiv(Tq, queries per tile) + B``: unused tiles run no stage); a post-pass puts the
    tiles' rows back in token order. Each block walks the KV stages its rows can see (up to the last
    query's position when causal), masking only stages some row sees in part.
    """
    plgpu = _mosaic.plgpu()
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    batch = block_table.shape[0]
    group = num_heads // num_kv_heads
    row_heads = min(group, ROWS)
    head_tiles = group // row_heads
    tokens_per_tile = ROWS // row_heads
    fp8 = jnp.dtype(k_cache.dtype) == FP8
    config = config or default_config(head_dim, k_cache.dtype)
    block_kv = config.block_kv
    smem = config.smem_bytes(head_dim, jnp.dtype(k_cache.dtype).itemsize, jnp.dtype(q.dtype).itemsize)
    if smem > SMEM_BYTES:
        raise ValueError(f"{config} needs {smem} bytes of shared memory at D={head_dim}; the limit is {SMEM_BYTES}")
    # Sequence b takes cdiv(n_b, tokens_per_tile) tiles, with sum(n_b) <= Tq.
    num_tiles = max(1, min(pl.cdiv(num_tokens, tokens_per_tile) + min(batch, num_tokens),
                           (num_tokens + batch * (tokens_per_tile - 1)) // tokens_per_tile))
    max_stages = pl.cdiv(block_table.shape[1] * block_size, block_kv)
    num_stages = max(2, min(config.num_stages, max_stages))
    cu_seqlens_q = cu_seqlens_q.astype(jnp.int32)
    seq_lens = seq_lens.astype(jnp.int32)
    tiles, first_token, tile_starts = prefill_tiles(cu_seqlens_q, seq_lens, tokens_per_tile=tokens_per_tile,
                                                    num_tiles=num_tiles)

    # q in tiles: [num_tiles, Hkv * head_tiles, 64, D], rows (query, head in the row block).
    k_in_tile = jnp.arange(tokens_per_tile, dtype=jnp.int32)
    src = first_token[:, None] + k_in_tile
    src = jnp.where(k_in_tile < tiles[2][:, None], src, num_tokens).reshape(-1)  # past the end: zeros
    qt = jnp.take(q, src, axis=0, mode="fill", fill_value=0)
    qt = qt.reshape(num_tiles, tokens_per_tile, num_kv_heads * head_tiles, row_heads, head_dim)
    qt = qt.transpose(0, 2, 1, 3, 4).reshape(num_tiles, num_kv_heads * head_tiles, -1, head_dim)
    used_rows = tokens_per_tile * row_heads
    if used_rows < ROWS:
        qt = jnp.pad(qt, ((0, 0), (0, 0), (0, ROWS - used_rows), (0, 0)))

    def tiles_of(dtype):
        bits = jnp.dtype(dtype).itemsize * 8
        swizzle = plgpu.find_swizzle(head_dim * bits)
        return plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle)

    ring = plgpu.SMEM((num_stages, block_kv, head_dim), k_cache.dtype, transforms=tiles_of(k_cache.dtype))
    wide = plgpu.SMEM((block_kv, head_dim), q.dtype, transforms=tiles_of(q.dtype)) if fp8 else None
    scratch = (
        plgpu.SMEM((ROWS, head_dim), q.dtype, transforms=tiles_of(q.dtype)),  # q in, out out
        ring, ring, wide, wide,
        plgpu.SMEM((ROWS,), jnp.float32),  # lse
        plgpu.Barrier(),  # q_ready
        plgpu.Barrier(num_arrivals=max(1, block_kv // block_size), num_barriers=num_stages),  # k_ready
        plgpu.Barrier(num_arrivals=max(1, block_kv // block_size), num_barriers=num_stages),  # v_ready
        plgpu.Barrier(num_barriers=num_stages),  # k_free
        plgpu.Barrier(num_barriers=num_stages),  # v_free
    )
    out_type = (jax.ShapeDtypeStruct(qt.shape, q.dtype),
                jax.ShapeDtypeStruct(qt.shape[:-1], jnp.float32))
    inputs = [qt, k_cache, v_cache, block_table, seq_lens, tiles]
    if fp8:
        inputs += [V.per_head(k_scale, num_kv_heads), V.per_head(v_scale, num_kv_heads)]
    left, right = window
    body = functools.partial(
        _paged_prefill_kernel, plgpu=plgpu, scale=scale, softcap=softcap, causal=causal, left=left, right=right,
        row_heads=row_heads, head_tiles=head_tiles, block_size=block_size, block_kv=block_kv,
        num_stages=num_stages, fp8=fp8, compiled=interpret is None)
    out, lse = plgpu.kernel(
        body,
        out_type=out_type,
        scratch_types=scratch,
        grid=(num_tiles, num_kv_heads * head_tiles),
        grid_names=("tile", "head_tile"),
        num_threads=2,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **({} if interpret is None else dict(interpret=interpret)),
    )(*inputs)

    # Tiles back to token order: [num_tiles * tokens_per_tile, Hq, ...].
    def untile(x):
        x = x[:, :, :used_rows].reshape(num_tiles, num_kv_heads * head_tiles, tokens_per_tile, row_heads,
                                        *x.shape[3:])
        return jnp.moveaxis(x, 2, 1).reshape(num_tiles * tokens_per_tile, num_heads, *x.shape[4:])

    t = jnp.arange(num_tokens, dtype=jnp.int32)
    seg = jnp.clip(jnp.searchsorted(cu_seqlens_q, t, side="right").astype(jnp.int32) - 1, 0, batch - 1)
    local = t - cu_seqlens_q[seg]
    valid = (t >= cu_seqlens_q[0]) & (t < cu_seqlens_q[-1])
    row = (tile_starts[seg] + lax.div(local, jnp.int32(tokens_per_tile))) * tokens_per_tile + lax.rem(
        local, jnp.int32(tokens_per_tile))
    row = jnp.where(valid, row, num_tiles * tokens_per_tile)
    out = jnp.take(untile(out), row, axis=0, mode="fill", fill_value=0)
    if not return_lse:
        return out
    lse = jnp.take(untile(lse), row, axis=0, mode="fill", fill_value=-jnp.inf)
    return out, lse.T

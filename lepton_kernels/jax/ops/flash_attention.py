"""``flash_attention`` for JAX: a Mosaic TPU kernel, its ``pallas_call`` wrapper, the public
function and the jnp reference, in one module.

Kernel outline (grid ``(B, Hq, Sq/block_q, Sk/block_k)``, the last axis sequential): each step
computes ``S = Q_blk K_blk^T`` for one q head, applies scale, softcap and the mask, and folds the
block into running row statistics ``m`` (max) and ``l`` (sum of exponentials) and an f32
accumulator, all in VMEM scratch; the last KV step divides by ``l`` and writes the output (and
``lse``). GQA maps q head ``h`` to kv head ``h // (Hq/Hkv)`` in the K/V index maps, so K/V are
never repeated in memory. Per q block, only the KV blocks that causal/window/``kv_lens`` leave
visible are computed: the others are skipped with ``pl.when``, and the K/V index maps clamp to
the visible range so a skipped step re-uses the block already in VMEM (no DMA). ``kv_lens`` is
scalar-prefetched into SMEM, where both the index maps and the kernel read it. Blocks that
are entirely visible skip the mask arithmetic.

Layouts: with ``D % 128 == 0`` q/k/v are viewed (for free) as ``[B, S, H*D]`` and a head is a
``D``-wide column block; other head dims are transposed to ``[B, H, S, D]`` first (one extra
HBM round trip of q/k/v/out).

Varlen (``cu_seqlens_q``/``cu_seqlens_k``) gathers each sequence into a padded
``[B, max_seqlen, H, D]`` slot and runs the same kernel with per-sequence ``q_lens`` and
``kv_lens`` (both scalar-prefetched; each is its sequence's Sq/Sk for the alignment), so it
needs the static ``max_seqlen_q``/``max_seqlen_k``; without them it runs on the jnp reference,
as does ``float16`` (TPUs have no float16 MXU path; use bfloat16).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .. import _dispatch
from .. import _validate as V
from ..gpu import flash_attention as gpu_flash

OP = "flash_attention"
NUM_LANES = 128  # m and l are kept lane-broadcast, one vreg row per query


@dataclasses.dataclass(frozen=True)
class FlashBlockSizes:
    """Query and key rows per grid step.

    Roofline (bf16, per q head and KV step): the step streams ``2*block_k*D*2`` bytes of K/V
    and does ``4*block_q*block_k*D`` FLOPs, so its arithmetic intensity is ``block_q``
    FLOP/byte whatever ``block_k`` and ``D`` are. To be MXU-bound rather than HBM-bound it must
    pass the chip's ridge point: v5e 197 TFLOP/s / 819 GB/s = 240 FLOP/byte, v6e 918 TFLOP/s /
    1640 GB/s = 560 FLOP/byte. Hence ``block_q`` 512 on v5e and 1024 on v6e (about 2x margin).
    ``block_k`` sets the f32 score tile ``block_q*block_k*4`` bytes (1 MiB on v5e, 2 MiB on
    v6e) that, with the exp/mask temporaries (a few times that), must fit the default scoped
    VMEM (16 MiB on v5e, 32 MiB on v6e); 512 keeps the 128-lane (v5e) and 256-lane (v6e) MXU
    full and the per-step overhead (~0.35 us) small against the ~2.7 us (v5e) of MXU work.

    ``block_q`` must be a multiple of 16 (bf16 sublane tiling) and ``block_k`` of 128 (the
    score tile's lanes); a sequence shorter than its block uses one block of its full length.
    """

    block_q: int
    block_k: int

    def __post_init__(self):
        if self.block_q <= 0 or self.block_q % 16:
            raise ValueError(f"block_q must be a positive multiple of 16, got {self.block_q}")
        if self.block_k <= 0 or self.block_k % 128:
            raise ValueError(f"block_k must be a positive multiple of 128, got {self.block_k}")


DEFAULT_BLOCK_SIZES = {
    "v5e": FlashBlockSizes(block_q=512, block_k=512),
    "v6e": FlashBlockSizes(block_q=1024, block_k=512),
}


# --------------------------------------------------------------------------------------------
# Masking rule, shared by the kernel and the reference
# --------------------------------------------------------------------------------------------

def visible(qpos, kpos, sq, sk, *, causal: bool, left: int, right: int):
    """Whether query ``qpos`` may attend to key ``kpos`` (broadcasting int arrays).

    Bottom-right aligned: query ``i`` sits at key position ``i + sk - sq``. Causal caps the
    right side of the window at 0; keys at or past ``sk`` are never visible.
    """
    diag = qpos + (sk - sq)
    ok = kpos < sk
    if causal:
        ok = ok & (kpos <= diag)
    elif right >= 0:
        ok = ok & (kpos <= diag + right)
    if left >= 0:
        ok = ok & (kpos >= diag - left)
    return ok


# --------------------------------------------------------------------------------------------
# jnp reference
# --------------------------------------------------------------------------------------------

def _attend_reference(q, k, v, mask, scale, softcap):
    """q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D], mask bool [B, Sq, Sk] -> out, lse [B, Hq, Sq]."""
    batch, sq, hq, d = q.shape
    hkv = k.shape[2]
    acc = jnp.promote_types(q.dtype, jnp.float32)
    hi = lax.Precision.HIGHEST
    qg = q.astype(acc).reshape(batch, sq, hkv, hq // hkv, d)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k.astype(acc), precision=hi) * scale
    if softcap:
        s = softcap * jnp.tanh(s / softcap)
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    m = s.max(axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # fully masked rows: keep exp() at 0, not NaN
    p = jnp.exp(s - m)
    l = p.sum(axis=-1, keepdims=True)
    # Keys no query sees may be padding holding anything (NaN * 0 would still be NaN).
    v = jnp.where(mask.any(axis=1)[:, :, None, None], v.astype(acc), 0.0)
    o = jnp.einsum("bhgqk,bkhd->bhgqd", p, v, precision=hi)
    o = jnp.where(l > 0, o / jnp.where(l > 0, l, 1.0), 0.0)
    lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)[..., 0]
    out = o.reshape(batch, hq, sq, d).transpose(0, 2, 1, 3).astype(q.dtype)
    return out, lse.reshape(batch, hq, sq).astype(jnp.float32)


def _segments(cu, total):
    """For each of ``total`` packed rows: (sequence index, position in it, sequence length, valid)."""
    t = jnp.arange(total, dtype=jnp.int32)
    seg = jnp.clip(jnp.searchsorted(cu, t, side="right").astype(jnp.int32) - 1, 0, cu.shape[0] - 2)
    valid = (t >= cu[0]) & (t < cu[-1])
    return seg, t - cu[seg], cu[seg + 1] - cu[seg], valid


def flash_attention_reference(q, k, v, *, causal=False, softmax_scale=None, window=(-1, -1), softcap=0.0,
                              kv_lens=None, cu_seqlens_q=None, cu_seqlens_k=None, return_lse=False):
    """Plain jnp attention with the semantics of :func:`flash_attention` (f32 accumulation).

    Inputs are assumed valid (see :func:`flash_attention` for shapes). Materializes the full
    score matrix: for tests and small problems.
    """
    left, right = window
    right = 0 if causal else right
    scale = float(q.shape[-1]) ** -0.5 if softmax_scale is None else softmax_scale
    if cu_seqlens_q is not None:
        seg_q, pos_q, len_q, ok_q = _segments(cu_seqlens_q, q.shape[0])
        seg_k, pos_k, _, ok_k = _segments(cu_seqlens_k, k.shape[0])
        len_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1])[seg_q]  # keys of the query's sequence
        mask = (ok_q[:, None] & ok_k[None, :] & (seg_q[:, None] == seg_k[None, :])
                & visible(pos_q[:, None], pos_k[None, :], len_q[:, None], len_k[:, None],
                          causal=causal, left=left, right=right))
        out, lse = _attend_reference(q[None], k[None], v[None], mask[None], scale, softcap)
        out, lse = out[0], lse[0]
    else:
        batch, sq, sk = q.shape[0], q.shape[1], k.shape[1]
        lens = jnp.full((batch,), sk, jnp.int32) if kv_lens is None else jnp.clip(kv_lens, 0, sk)
        qpos = jnp.arange(sq)[None, :, None]
        kpos = jnp.arange(sk)[None, None, :]
        mask = visible(qpos, kpos, sq, lens[:, None, None], causal=causal, left=left, right=right)
        out, lse = _attend_reference(q, k, v, mask, scale, softcap)
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------------------------
# Mosaic TPU kernel
# --------------------------------------------------------------------------------------------

def _kv_block_range(qi, sq, sk, *, block_q, block_k, causal, left, right):
    """First and last KV block that some query of q block ``qi`` can see (last < first: none).

    ``sq``/``sk`` are this batch entry's query and key counts (traced scalars).
    """
    q0 = qi * block_q
    q1 = jnp.minimum(q0 + block_q, sq) - 1
    off = sk - sq
    hi = sk - 1
    if causal:
        hi = jnp.minimum(hi, q1 + off)
    elif right >= 0:
        hi = jnp.minimum(hi, q1 + off + right)
    lo = jnp.int32(0)
    if left >= 0:
        lo = jnp.maximum(lo, q0 + off - left)
    # Operands are >= 0 where the result is used, so truncating division is exact (jnp's floor
    # division would add sign fix-ups to the kernel and the index maps).
    last = jnp.where((q0 < sq) & (hi >= lo), lax.div(jnp.maximum(hi, 0), block_k), -1)
    return lax.div(lo, block_k), last


def _block_fully_visible(qi, ki, sq, sk, *, block_q, block_k, causal, left, right):
    """Whether every real query of q block ``qi`` sees every key of KV block ``ki``."""
    q0, k0 = qi * block_q, ki * block_k
    q1 = jnp.minimum(q0 + block_q, sq) - 1
    k1 = k0 + block_k - 1
    off = sk - sq
    full = k1 < sk
    if causal:
        full = full & (k1 <= q0 + off)
    elif right >= 0:
        full = full & (k1 <= q0 + off + right)
    if left >= 0:
        full = full & (k0 >= q1 + off - left)
    return full


def _flash_kernel(q_lens_ref, kv_lens_ref, q_ref, k_ref, v_ref, *refs, scale, softcap, causal, left, right,
                  sq_static, sk_static, block_q, block_k, num_k_blocks, has_lse, precision):
    if has_lse:
        o_ref, lse_ref, m_scr, l_scr, acc_scr = refs
    else:
        (o_ref, m_scr, l_scr, acc_scr), lse_ref = refs, None
    b, qi, ki = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    sq = jnp.clip(q_lens_ref[b], 0, sq_static)
    sk = jnp.clip(kv_lens_ref[b], 0, sk_static)
    geometry = dict(block_q=block_q, block_k=block_k, causal=causal, left=left, right=right)
    first, last = _kv_block_range(qi, sq, sk, **geometry)

    @pl.when(ki == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    def step(apply_mask: bool):
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                            precision=precision) * scale
        if softcap:
            s = softcap * jnp.tanh(s / softcap)
        if apply_mask:
            rows = qi * block_q + lax.broadcasted_iota(jnp.int32, s.shape, 0)
            cols = ki * block_k + lax.broadcasted_iota(jnp.int32, s.shape, 1)
            s = jnp.where(visible(rows, cols, sq, sk, causal=causal, left=left, right=right), s, -jnp.inf)
            # Keys past sk may be padding or out-of-bounds garbage (NaN): 0 * NaN would leak.
            key_rows = ki * block_k + lax.broadcasted_iota(jnp.int32, v.shape, 0)
            v = jnp.where(key_rows < sk, v, jnp.zeros_like(v))
        m_prev, l_prev = m_scr[...], l_scr[...]
        m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows with nothing visible yet
        alpha = jnp.exp(m_prev - m_safe)
        p = jnp.exp(s - m_safe[:, :1])
        l_scr[...] = alpha * l_prev + p.sum(axis=1, keepdims=True)
        m_scr[...] = m_new
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32, precision=precision)
        acc_scr[...] = acc_scr[...] * alpha[:, :1] + pv

    needed = (ki >= first) & (ki <= last)
    full = _block_fully_visible(qi, ki, sq, sk, **geometry)
    pl.when(needed & full)(lambda: step(False))
    pl.when(needed & jnp.logical_not(full))(lambda: step(True))

    @pl.when(ki == num_k_blocks - 1)
    def _finish():
        l = l_scr[...]
        safe_l = jnp.where(l > 0, l, 1.0)
        o_ref[...] = jnp.where(l[:, :1] > 0, acc_scr[...] / safe_l[:, :1], 0.0).astype(o_ref.dtype)
        if lse_ref is not None:
            lse_ref[...] = jnp.where(l > 0, m_scr[...] + jnp.log(safe_l), -jnp.inf)


def flash_attention_tpu(q, k, v, kv_lens, *, scale: float, softcap: float, causal: bool,
                        window: Tuple[int, int], return_lse: bool, q_lens=None,
                        block_sizes: Optional[FlashBlockSizes] = None, interpret=False):
    """The ``pallas_call`` wrapper: q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D].

    ``kv_lens`` / ``q_lens`` (int32 [B] or None): batch entry ``b`` has only its first
    ``q_lens[b]`` queries and ``kv_lens[b]`` keys (the rest is padding; its output rows are
    unspecified), and they are its Sq and Sk for the bottom-right alignment.
    """
    batch, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    block_sizes = block_sizes or DEFAULT_BLOCK_SIZES[_dispatch.tpu_generation()]
    block_q = sq if sq <= block_sizes.block_q else block_sizes.block_q
    block_k = sk if sk <= block_sizes.block_k else block_sizes.block_k
    num_q_blocks, num_k_blocks = pl.cdiv(sq, block_q), pl.cdiv(sk, block_k)
    left, right = window
    geometry = dict(block_q=block_q, block_k=block_k, causal=causal, left=left, right=right)
    if kv_lens is None:
        kv_lens = jnp.full((batch,), sk, jnp.int32)
    if q_lens is None:
        q_lens = jnp.full((batch,), sq, jnp.int32)

    def kv_block(b, qi, ki, q_lens, kv_lens):
        first, last = _kv_block_range(qi, jnp.clip(q_lens[b], 0, sq), jnp.clip(kv_lens[b], 0, sk), **geometry)
        # Skipped steps keep pointing at a visible block, so the pipeline issues no DMA for them.
        return jnp.clip(jnp.minimum(jnp.maximum(ki, first), last), 0, num_k_blocks - 1)

    folded = d % 128 == 0  # a head is a lane-aligned column block of [B, S, H*D]: no transpose
    if folded:
        qx, kx, vx = q.reshape(batch, sq, hq * d), k.reshape(batch, sk, hkv * d), v.reshape(batch, sk, hkv * d)
        q_spec = pl.BlockSpec((None, block_q, d), lambda b, h, qi, ki, *lens: (b, qi, h))
        kv_spec = pl.BlockSpec((None, block_k, d),
                               lambda b, h, qi, ki, *lens: (b, kv_block(b, qi, ki, *lens), lax.div(h, group)))
        o_struct = jax.ShapeDtypeStruct((batch, sq, hq * d), q.dtype)
    else:
        qx, kx, vx = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
        q_spec = pl.BlockSpec((None, None, block_q, d), lambda b, h, qi, ki, *lens: (b, h, qi, 0))
        kv_spec = pl.BlockSpec((None, None, block_k, d),
                               lambda b, h, qi, ki, *lens: (b, lax.div(h, group), kv_block(b, qi, ki, *lens), 0))
        o_struct = jax.ShapeDtypeStruct((batch, hq, sq, d), q.dtype)
    out_specs, out_shape = [q_spec], [o_struct]
    if return_lse:
        out_specs.append(pl.BlockSpec((None, None, block_q, NUM_LANES), lambda b, h, qi, ki, *lens: (b, h, qi, 0)))
        out_shape.append(jax.ShapeDtypeStruct((batch, hq, sq, NUM_LANES), jnp.float32))

    kernel = functools.partial(
        _flash_kernel, scale=scale, softcap=softcap, sq_static=sq, sk_static=sk, num_k_blocks=num_k_blocks,
        has_lse=return_lse, precision=lax.Precision.HIGHEST if q.dtype == jnp.float32 else None, **geometry)
    itemsize = jnp.dtype(q.dtype).itemsize
    cost = pl.CostEstimate(
        flops=4 * batch * hq * sq * sk * d,
        transcendentals=batch * hq * sq * sk,
        bytes_accessed=itemsize * (2 * q.size + hq * num_q_blocks * batch * 2 * sk * d))
    results = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(batch, hq, num_q_blocks, num_k_blocks),
            in_specs=[q_spec, kv_spec, kv_spec],
            out_specs=out_specs,
            scratch_shapes=[pltpu.VMEM((block_q, NUM_LANES), jnp.float32),
                            pltpu.VMEM((block_q, NUM_LANES), jnp.float32),
                            pltpu.VMEM((block_q, d), jnp.float32)]),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=cost,
        interpret=interpret,
    )(q_lens, kv_lens, qx, kx, vx)
    out = results[0]
    out = out.reshape(batch, sq, hq, d) if folded else out.transpose(0, 2, 1, 3)
    if return_lse:
        return out, results[1][..., 0]
    return out


def flash_attention_varlen_tpu(q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q: int, max_seqlen_k: int,
                               return_lse: bool, **kwargs):
    """Varlen on the padded kernel: gather each sequence into a ``[B, max_seqlen, H, D]`` slot,
    run :func:`flash_attention_tpu` with per-sequence ``q_lens``/``kv_lens``, gather back.

    Costs one extra HBM copy of q, k, v and out, and ``B * max_seqlen`` rows of grid, so it
    pays off when the lengths are similar; sequences longer than ``max_seqlen_*`` are cut.
    """
    num_tokens = q.shape[0]
    batch = cu_seqlens_q.shape[0] - 1

    def pad(x, cu, max_len):  # [T, H, D] -> [B, max_len, H, D]; rows past a sequence are junk
        rows = cu[:-1, None] + jnp.arange(max_len, dtype=jnp.int32)[None, :]
        return x[jnp.clip(rows, 0, x.shape[0] - 1)]

    q_lens = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    kv_lens = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
    results = flash_attention_tpu(pad(q, cu_seqlens_q, max_seqlen_q), pad(k, cu_seqlens_k, max_seqlen_k),
                                  pad(v, cu_seqlens_k, max_seqlen_k), kv_lens, q_lens=q_lens,
                                  return_lse=return_lse, **kwargs)
    out_padded, lse_padded = results if return_lse else (results, None)
    seg, pos, _, valid = _segments(cu_seqlens_q, num_tokens)
    valid = valid & (pos < max_seqlen_q) & (batch > 0)
    pos = jnp.clip(pos, 0, max_seqlen_q - 1)
    out = jnp.where(valid[:, None, None], out_padded[seg, pos], jnp.zeros((), q.dtype))
    if not return_lse:
        return out
    lse = jnp.where(valid[None, :], lse_padded[seg, :, pos].T, -jnp.inf)  # [Hq, Tq]
    return out, lse


# --------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------

def _tpu_unavailable_reason(q, varlen: bool, max_seqlens_given: bool) -> Optional[str]:
    if varlen and not max_seqlens_given:
        return ("varlen on TPU pads every sequence to max_seqlen_q/max_seqlen_k: pass both (the "
                "defaults, Tq and Tk, would pad B-fold)")
    if jnp.dtype(q.dtype) == jnp.float16:
        return "TPUs have no float16 matmul path; use bfloat16"
    return None


@functools.partial(jax.jit, static_argnames=("impl", "scale", "softcap", "causal", "window",
                                             "return_lse", "max_seqlen_q", "max_seqlen_k", "block_sizes"))
def _run(q, k, v, kv_lens, cu_seqlens_q, cu_seqlens_k, *, impl, scale, softcap, causal, window,
         return_lse, max_seqlen_q, max_seqlen_k, block_sizes):
    if impl == "reference":
        return flash_attention_reference(q, k, v, causal=causal, window=window, softcap=softcap, softmax_scale=scale,
                                         kv_lens=kv_lens, cu_seqlens_q=cu_seqlens_q,
                                         cu_seqlens_k=cu_seqlens_k, return_lse=return_lse)
    if impl == "gpu":
        return gpu_flash.flash_attention_gpu(q, k, v, kv_lens, scale=scale, causal=causal, window=window,
                                             softcap=softcap, return_lse=return_lse)
    options = dict(scale=scale, softcap=softcap, causal=causal, window=window, return_lse=return_lse,
                   block_sizes=block_sizes, interpret=_dispatch.interpret_params() if impl == "interpret" else False)
    if cu_seqlens_q is not None:
        return flash_attention_varlen_tpu(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                                          max_seqlen_k=max_seqlen_k, **options)
    return flash_attention_tpu(q, k, v, kv_lens, **options)


def flash_attention(q, k, v, *, causal: bool = False, softmax_scale: Optional[float] = None,
                    window: Tuple[int, int] = (-1, -1), softcap: float = 0.0,
                    cu_seqlens_q: Optional[jax.Array] = None, cu_seqlens_k: Optional[jax.Array] = None,
                    max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None,
                    kv_lens: Optional[jax.Array] = None, return_lse: bool = False,
                    block_sizes: Optional[FlashBlockSizes] = None, backend: str = "auto"):
    """Softmax attention with FlashAttention layouts and semantics (those of the torch API).

    Args:
        q: ``[B, Sq, Hq, D]`` (padded batch) or ``[Tq, Hq, D]`` (varlen, packed sequences);
            float16, bfloat16 or float32.
        k, v: ``[B, Sk, Hkv, D]`` or ``[Tk, Hkv, D]``, q's dtype, ``Hq % Hkv == 0`` (GQA/MQA:
            query head ``h`` reads kv head ``h // (Hq // Hkv)``; K/V are never repeated).
        causal: query ``i`` sees key ``j`` iff ``j <= i + Sk - Sq`` (bottom-right aligned).
        softmax_scale: multiplies ``q @ k^T``; default ``1 / sqrt(D)``.
        window: ``(left, right)``, -1 = unbounded: key ``j`` is visible to query ``i`` iff
            ``i + Sk - Sq - left <= j <= i + Sk - Sq + right``. ``causal=True`` sets
            ``right = 0`` and conflicts with ``right > 0``.
        softcap: when > 0, the scaled scores ``s`` become ``softcap * tanh(s / softcap)``
            before masking and softmax.
        cu_seqlens_q, cu_seqlens_k: int32 ``[B+1]`` prefix sums of the sequence lengths of a
            varlen call (both or neither). Rows outside ``[cu[0], cu[B])`` get 0 / lse -inf.
        max_seqlen_q, max_seqlen_k: varlen only: static upper bounds of the sequence lengths.
            The TPU kernel pads each sequence to them (longer sequences would be cut), and
            runs varlen only when both are given; the reference ignores them.
        kv_lens: int32 ``[B]``: sequence ``b`` uses only its first ``kv_lens[b]`` keys; this is
            also its ``Sk`` for the causal/window alignment (values are clipped to [0, Sk]).
        return_lse: also return the float32 natural-log log-sum-exp of the scaled scores,
            ``[B, Hq, Sq]`` (padded) or ``[Hq, Tq]`` (varlen).
        block_sizes: :class:`FlashBlockSizes` for the TPU kernel; default per TPU generation.
        backend: "auto" (default), "tpu", "interpret", "gpu" or "reference"; see
            ``lepton_kernels.jax._dispatch``. The Mosaic GPU kernel (Hopper) serves the padded
            layout in float16/bfloat16 with head dims 64/128/256: causal or not, windows,
            softcap, ``kv_lens``, GQA and lse; varlen runs on the reference there.

    Returns:
        out with q's shape and dtype, or ``(out, lse)``. A query that sees no key gets
        ``out = 0`` and ``lse = -inf``.
    """
    q = V.check_array("q", q, ndim=(3, 4), dtypes=V.FLOAT_DTYPES)
    varlen = q.ndim == 3
    k = V.check_array("k", k, ndim=q.ndim)
    v = V.check_array("v", v, ndim=q.ndim)
    V.check_same_dtype("k", k, "q", q)
    V.check_same_dtype("v", v, "q", q)
    head_dim, num_heads = q.shape[-1], q.shape[-2]
    layout = "[Tk, Hkv, D]" if varlen else "[B, Sk, Hkv, D]"
    lead = (None,) if varlen else (q.shape[0], None)
    V.check_shape("k", k, lead + (None, head_dim), f"({layout} with the B and D of q)")
    V.check_shape("v", v, tuple(k.shape), "(the shape of k)")
    V.check_heads(num_heads, "k", k.shape[-2])
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("cu_seqlens_q and cu_seqlens_k must be given together")
    if varlen:
        if cu_seqlens_q is None:
            raise ValueError(f"q of shape {tuple(q.shape)} is packed ([Tq, Hq, D]): cu_seqlens_q and "
                             "cu_seqlens_k are required (or pass q as [B, Sq, Hq, D])")
        cu_seqlens_q = V.check_array("cu_seqlens_q", cu_seqlens_q, ndim=1, dtypes=V.INDEX_DTYPES)
        cu_seqlens_k = V.check_array("cu_seqlens_k", cu_seqlens_k, ndim=1, dtypes=V.INDEX_DTYPES)
        if cu_seqlens_q.shape[0] < 2:
            raise ValueError(f"cu_seqlens_q must have shape (B+1,) with B >= 1, got {tuple(cu_seqlens_q.shape)}")
        V.check_shape("cu_seqlens_k", cu_seqlens_k, tuple(cu_seqlens_q.shape), "(the shape of cu_seqlens_q)")
        if kv_lens is not None:
            raise ValueError("kv_lens applies to the padded layout; with cu_seqlens_k the lengths come from it")
        max_seqlens_given = max_seqlen_q is not None and max_seqlen_k is not None
        max_seqlen_q = max(1, V.check_max_seqlen("max_seqlen_q", max_seqlen_q, q.shape[0]))
        max_seqlen_k = max(1, V.check_max_seqlen("max_seqlen_k", max_seqlen_k, k.shape[0]))
    else:
        if cu_seqlens_q is not None:
            raise ValueError(f"cu_seqlens_q/cu_seqlens_k need packed q [Tq, Hq, D], got q of shape {tuple(q.shape)}")
        if max_seqlen_q is not None or max_seqlen_k is not None:
            raise ValueError("max_seqlen_q/max_seqlen_k apply only to varlen calls (with cu_seqlens_q/k)")
        max_seqlens_given = False
    if kv_lens is not None:
        kv_lens = V.check_array("kv_lens", kv_lens, ndim=1, dtypes=V.INDEX_DTYPES)
        V.check_shape("kv_lens", kv_lens, (q.shape[0],), "(one length per batch entry of q)")
    causal, left, right, softcap = V.check_mask_options(causal, window, softcap)
    softmax_scale = V.check_softmax_scale(softmax_scale, head_dim)
    V.check_bool("return_lse", return_lse)
    if block_sizes is not None and not isinstance(block_sizes, FlashBlockSizes):
        raise TypeError(f"block_sizes must be a FlashBlockSizes or None, got {type(block_sizes).__name__}")

    gpu_reason = functools.partial(gpu_flash.unavailable_reason, q, k, causal=causal, window=(left, right),
                                   softcap=softcap, scale=softmax_scale, kv_lens=kv_lens, varlen=varlen)
    impl = _dispatch.select(OP, backend, _tpu_unavailable_reason(q, varlen, max_seqlens_given), gpu_reason)
    return _run(q, k, v, kv_lens, cu_seqlens_q, cu_seqlens_k, impl=impl, scale=softmax_scale, softcap=softcap,
                causal=causal, window=(left, right), return_lse=return_lse, max_seqlen_q=max_seqlen_q,
                max_seqlen_k=max_seqlen_k, block_sizes=block_sizes)

"""Triton quantized matmul: ``y = x @ W^T (+ bias)`` for every scheme of ``QuantizedWeight``.

Weight-only schemes (w4a16 ``int4_k8``, w8a16 ``rowmajor``) dequantize in registers inside the
K loop. The product is computed transposed, ``C^T [N, M] = W [N, K] @ x^T``: the weight tile is
the dot's left operand (on Hopper the register operand of ``wgmma``), and a decode batch of one
to sixteen tokens is a 16-wide right operand instead of a 64-row left one.

* Dequantization avoids int-to-float conversions (a slow pipe). On NVIDIA GPUs inline PTX does
  it two weights per instruction: ``(w >> 4k) & 0x000F000F | 0x64006400`` is the fp16 pair
  ``1024 + u`` (bf16: ``128 + u`` under 0x4300), and one ``fma`` leaves ``u - zero``
  (FasterTransformer's trick). A register then holds channels ``8j + k`` and ``8j + 4 + k``,
  so the weight tile keeps that order and the kernel gathers ``x``'s channels to match
  (``_asm_channel``), which costs a few loads instead of a byte shuffle per weight pair. int8
  goes under the same exponents with ``prmt``. The portable path (interpreter, other GPUs)
  ORs each nibble, masked in place, under float32's 2**23 and subtracts with one FMA.
* ``u - zero`` is a small integer, exact in float16 and bfloat16. With group scales and few
  tokens the scale multiplies each group's fp32 dot result (``BLOCK_K`` never crosses a group);
  with many tokens it multiplies the weights before the dot (cheaper than scaling the larger
  accumulator); per-channel scales apply once, in the epilogue.
* Small M: split-K. Each of the ``SPLIT_K`` programs of an output tile stores its fp32 partial
  in a workspace and bumps the tile's counter; the last one adds the partials in split order
  (deterministic), adds the bias and writes the output, then resets the counter. The counters
  live in a per-(device, stream) buffer that the kernels keep at zero, so a call is one launch
  and CUDA-graph safe; calls running concurrently must be on different streams.
* Large M (from ``DEQUANT_MIN_M`` tokens): the weight is dequantized once into ``x``'s dtype
  and cuBLAS multiplies; the dequantization then costs a few percent of the matmul.

w8a8 and fp8 quantize ``x`` per token with a small kernel (``s = max(max|x| / qmax, tiny)``,
``q = round(x / s)`` with IEEE division and round-half-even, bit-exact with the reference),
then multiply int8 x int8 -> int32 (exact) or e4m3 x e4m3 -> fp32 on the tensor cores and
scale by ``s_x * s_w`` in fp32. Under Triton's interpreter the fp8 activations are quantized
by torch, because the interpreter's float8 casts round differently (``triton-lang/triton#8322``).

Act-order weights (``perm``) gather the activation columns once per call before the kernel.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from .._splits import current_sm_count
from . import interpreting, unavailable_reason

OP = "quant_matmul"
# From this many tokens on, weight-only schemes dequantize once and call cuBLAS.
DEQUANT_MIN_M = 512
MAGIC_BITS = 0x4B000000  # float32 bits of 2**23: a mantissa's low bits are then an integer
FP32_TINY = tl.constexpr(1.1754943508222875e-38)  # smallest normal float32: the scale floor
ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: (v + it) - it rounds |v| < 2**22 half to even
INT8_MAX = tl.constexpr(127.0)
FP8_E4M3_MAX = tl.constexpr(448.0)
QUANTIZE_WHOLE_ROW_MAX = 8192  # activation rows up to this many channels are quantized in one pass
# The interpreter knows no SM count: pretend a small GPU so split-K paths run in tests.
INTERPRETER_SM_COUNT = 1
COUNTERS_MIN = 1 << 14
INT32_ELEMENTS = 2**31 - 1  # offsets inside the kernels are int32


# --------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _to(v, DT: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 -> ``DT``, rounding to nearest even. The interpreter truncates to bfloat16, so there
    the rounding is done on the bits."""
    if INTERPRET and DT == tl.bfloat16:
        bits = v.to(tl.int32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    return v.to(DT)


@triton.jit
def _nibble(w, MASK: tl.constexpr, MUL: tl.constexpr, c, magic, s, APPLY_SCALE: tl.constexpr,
            DT: tl.constexpr, INTERPRET: tl.constexpr):
    """The nibble under ``MASK`` (at bit 4j, j <= 4) minus the zero point, from
    ``c = 2**(23-4j) + zero``: ``(2**23 + u * 16**j) * 16**-j - c = u - zero`` exactly
    (``MUL = 16**-j``; every intermediate is an exact float32)."""
    f = ((w & MASK) | magic).to(tl.float32, bitcast=True)  # one LOP3: magic is in a register
    v = f * MUL - c
    if APPLY_SCALE:
        v = v * s
    return _to(v, DT, INTERPRET)


@triton.jit
def _dequant_int4(w, zero, magic, s, APPLY_SCALE: tl.constexpr, DT: tl.constexpr, INTERPRET: tl.constexpr):
    """int32 words ``[R, C]`` (nibble i of word j = channel 8j+i) -> ``[R, 8C]`` in ``DT`` holding
    ``u - zero`` (times ``s`` when ``APPLY_SCALE``), in channel order."""
    # The float32 mantissa holds bits 0..22: nibbles 0..4 are read in place, 5..7 after a shift.
    hi = w >> 12  # nibbles 5..7 to bits 8..19 (sign bits above them are masked off)
    q0 = _nibble(w, 0xF, 1.0, 8388608.0 + zero, magic, s, APPLY_SCALE, DT, INTERPRET)
    q1 = _nibble(w, 0xF0, 0.0625, 524288.0 + zero, magic, s, APPLY_SCALE, DT, INTERPRET)
    q2 = _nibble(w, 0xF00, 0.00390625, 32768.0 + zero, magic, s, APPLY_SCALE, DT, INTERPRET)
    q3 = _nibble(w, 0xF000, 0.000244140625, 2048.0 + zero, magic, s, APPLY_SCALE, DT, INTERPRET)
    q4 = _nibble(w, 0xF0000, 0.0000152587890625, 128.0 + zero, magic, s, APPLY_SCALE, DT, INTERPRET)
    q5 = _nibble(hi, 0xF00, 0.00390625, 32768.0 + zero, magic, s, APPLY_SCALE, DT, INTERPRET)
    q6 = _nibble(hi, 0xF000, 0.000244140625, 2048.0 + zero, magic, s, APPLY_SCALE, DT, INTERPRET)
    q7 = _nibble(hi, 0xF0000, 0.0000152587890625, 128.0 + zero, magic, s, APPLY_SCALE, DT, INTERPRET)
    # join adds a trailing axis; three levels give [R, C, 2, 2, 2] with nibble i at
    # (i // 4, (i // 2) % 2, i % 2), so the reshape puts nibble i of word j at 8j + i.
    even = tl.join(tl.join(q0, q4), tl.join(q2, q6))
    odd = tl.join(tl.join(q1, q5), tl.join(q3, q7))
    v = tl.join(even, odd)
    return tl.reshape(v, (w.shape[0], w.shape[1] * 8))


# Per int32 word (two int16 halves, the asm's packed input): output k holds nibble k of each half
# as a 16-bit float pair, minus the zero point: (w >> 4k) & 0x000F000F | 1024.0 (fp16) or
# 128.0 (bf16) in each half is 1024 + u (128 + u) exactly, and one fma with -(1024 + zero)
# leaves u - zero. 11 instructions per 8 weights, no conversion (the FasterTransformer trick).
_INT4_ASM = """{
.reg .b32 t<4>, one;
mov.b32 one, ONE;
shr.u32 t1, $4, 4;
shr.u32 t2, $4, 8;
shr.u32 t3, $4, 12;
lop3.b32 t0, $4, 0x000F000F, MAGIC, 0xEA;
lop3.b32 t1, t1, 0x000F000F, MAGIC, 0xEA;
lop3.b32 t2, t2, 0x000F000F, MAGIC, 0xEA;
lop3.b32 t3, t3, 0x000F000F, MAGIC, 0xEA;
fma.rn.TYPE $0, t0, one, $5;
fma.rn.TYPE $1, t1, one, $5;
fma.rn.TYPE $2, t2, one, $5;
fma.rn.TYPE $3, t3, one, $5;
}"""
INT4_ASM_FP16 = tl.constexpr(_INT4_ASM.replace("ONE", "0x3C003C00").replace("MAGIC", "0x64006400")
                             .replace("TYPE", "f16x2"))
INT4_ASM_BF16 = tl.constexpr(_INT4_ASM.replace("ONE", "0x3F803F80").replace("MAGIC", "0x43004300")
                             .replace("TYPE", "bf16x2"))


@triton.jit
def _dequant_int4_asm(w16, zero, HAS_ZEROS: tl.constexpr, DT: tl.constexpr, INTERPRET: tl.constexpr):
    """int16 halves of the packed words ``[R, C]`` (half e = channels 4e..4e+3) -> ``[R, 4C]`` in
    ``DT`` holding ``u - zero`` (``zero``: fp32 ``[R, 1]``, or 8 when not ``HAS_ZEROS``), with
    channels in ``_asm_channel`` order. Inline PTX; the interpreter (tests of the channel order)
    computes the same four values with plain operations."""
    if INTERPRET:
        q0 = _to((w16 & 0xF).to(tl.float32) - zero, DT, INTERPRET)
        q1 = _to(((w16 >> 4) & 0xF).to(tl.float32) - zero, DT, INTERPRET)
        q2 = _to(((w16 >> 8) & 0xF).to(tl.float32) - zero, DT, INTERPRET)
        q3 = _to(((w16 >> 12) & 0xF).to(tl.float32) - zero, DT, INTERPRET)
    elif DT == tl.float16:
        if HAS_ZEROS:
            neg = tl.broadcast_to((-1024.0 - zero).to(DT), w16.shape)
        else:
            neg = tl.full(w16.shape, -1032.0, DT)
        q0, q1, q2, q3 = tl.inline_asm_elementwise(INT4_ASM_FP16, "=r,=r,=r,=r,r,r", [w16, neg],
                                                   dtype=(tl.float16,) * 4, is_pure=True, pack=2)
    else:
        if HAS_ZEROS:
            neg = tl.broadcast_to((-128.0 - zero).to(DT), w16.shape)
        else:
            neg = tl.full(w16.shape, -136.0, DT)
        q0, q1, q2, q3 = tl.inline_asm_elementwise(INT4_ASM_BF16, "=r,=r,=r,=r,r,r", [w16, neg],
                                                   dtype=(tl.bfloat16,) * 4, is_pure=True, pack=2)
    # Keep each register's pair side by side (no byte shuffles): word j's eight values go to
    # positions 8j + 2k + h in the order (j, k, h), i.e. position p holds channel
    # 8j + 4h + k = asm_channel(p); the caller gathers x's channels in the same order.
    rows: tl.constexpr = w16.shape[0]
    words: tl.constexpr = w16.shape[1] // 2
    lo = tl.join(tl.reshape(q0, (rows, words, 2)), tl.reshape(q1, (rows, words, 2)))
    hi = tl.join(tl.reshape(q2, (rows, words, 2)), tl.reshape(q3, (rows, words, 2)))
    v = tl.permute(tl.join(lo, hi), (0, 1, 4, 3, 2))  # (j, h, b, a) -> (j, a, b, h), k = 2a + b
    return tl.reshape(v, (rows, words * 8))


@triton.jit
def _asm_channel(p):
    """The input channel at position ``p`` of a tile from ``_dequant_int4_asm``."""
    return (p // 8) * 8 + (p % 2) * 4 + (p % 8) // 2


# int8 -> 16-bit, two neighbouring channels per register (the asm's packed input, in its low
# half; the output pair). fp16: the biased byte q + 128 under 0x64 is 1024 + 128 + q exactly,
# minus 1152. bf16 cannot hold 128 + q exactly at that exponent, so each byte goes under
# float32's 2**23 instead and the exact integer is packed to bf16 by cvt.
INT8_ASM_FP16 = tl.constexpr("""{
.reg .b32 t, hi, c;
xor.b32 t, $1, 0x80808080;
mov.b32 hi, 0x64646464;
mov.b32 c, 0x64806480;
prmt.b32 $0, t, hi, 0x4140;
sub.f16x2 $0, $0, c;
}""")
INT8_ASM_BF16 = tl.constexpr("""{
.reg .b32 t, m, c, f0, f1;
xor.b32 t, $1, 0x80808080;
mov.b32 m, 0x4B000000;
mov.b32 c, 0x4B000080;
prmt.b32 f0, t, m, 0x7650;
prmt.b32 f1, t, m, 0x7651;
sub.f32 f0, f0, c;
sub.f32 f1, f1, c;
cvt.rn.bf16x2.f32 $0, f1, f0;
}""")


@triton.jit
def _dequant_int8_asm(q, DT: tl.constexpr, INTERPRET: tl.constexpr):
    """int8 ``q`` -> the same values in ``DT`` (exact). Inline PTX (plain operations under the
    interpreter)."""
    if INTERPRET:
        return _to(q.to(tl.float32), DT, INTERPRET)
    elif DT == tl.float16:
        return tl.inline_asm_elementwise(INT8_ASM_FP16, "=r,r", [q], dtype=tl.float16, is_pure=True, pack=2)
    else:
        return tl.inline_asm_elementwise(INT8_ASM_BF16, "=r,r", [q], dtype=tl.bfloat16, is_pure=True, pack=2)


@triton.jit
def _dequant_int8(q, magic128, s, APPLY_SCALE: tl.constexpr, DT: tl.constexpr, INTERPRET: tl.constexpr):
    """int8 ``q`` -> ``q`` (times ``s``) in ``DT``: ``2**23 + 128 + q`` by an integer add."""
    v = (q.to(tl.int32) + magic128).to(tl.float32, bitcast=True) - 8388736.0
    if APPLY_SCALE:
        v = v * s
    return _to(v, DT, INTERPRET)


@triton.jit
def _store_out(acc, offs_n, offs_m, N, M, out_ptr, stride_om, bias_ptr, row_scale_ptr, col_scale_ptr,
               stride_cs, HAS_BIAS: tl.constexpr, ROW_SCALE: tl.constexpr, COL_SCALE: tl.constexpr,
               INTERPRET: tl.constexpr):
    """``out[m, n] = acc[n, m] * row_scale[m] * col_scale[n] + bias[n]`` in fp32, then cast."""
    n_ok = offs_n < N
    m_ok = offs_m < M
    val = acc.to(tl.float32)
    if ROW_SCALE:
        val = val * tl.load(row_scale_ptr + offs_m, mask=m_ok, other=0.0)[None, :]
    if COL_SCALE:
        val = val * tl.load(col_scale_ptr + offs_n * stride_cs, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    if HAS_BIAS:
        val = val + tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]
    tl.store(ptrs, _to(val, out_ptr.dtype.element_ty, INTERPRET), mask=n_ok[:, None] & m_ok[None, :])


@triton.jit
def _finish_tile(acc, pid_k, pid_m, tile, offs_n, offs_m, N, M, out_ptr, stride_om, ws_ptr, cnt_ptr, bias_ptr,
                 row_scale_ptr, col_scale_ptr, stride_cs,
                 SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, ROW_SCALE: tl.constexpr,
                 COL_SCALE: tl.constexpr, INT_ACC: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_M: tl.constexpr, INTERPRET: tl.constexpr):
    """Write ``acc [BLOCK_N, BLOCK_M]`` (= C^T) to ``out [M, N]``, reducing split-K partials.

    With ``SPLIT_K > 1`` every program stores its partial (the int32 bits, for integer
    accumulators) in ``ws [SPLIT_K, M, N]``; the last to arrive at the tile's counter sums them
    in split order, applies the scales and the bias, stores, and resets the counter.
    """
    if SPLIT_K > 1:
        mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
        tile_offs = offs_m[None, :] * N + offs_n[:, None]
        if INT_ACC:
            tl.store(ws_ptr + pid_k * M * N + tile_offs, acc.to(tl.float32, bitcast=True), mask=mask)
        else:
            tl.store(ws_ptr + pid_k * M * N + tile_offs, acc, mask=mask)
        # All threads' partials are written before one thread publishes the arrival (release);
        # the last program reads after its acquire (the CUTLASS semaphore pattern).
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            # Every partial, its own included, comes back from memory in split order, so the
            # sum does not depend on which program came last; column blocks of SUB_M keep the
            # registers this needs small.
            SUB_M: tl.constexpr = 16 if BLOCK_M > 16 else BLOCK_M
            for c in range(0, BLOCK_M, SUB_M):
                sub_m = pid_m * BLOCK_M + c + tl.arange(0, SUB_M)
                sub_offs = sub_m[None, :] * N + offs_n[:, None]
                sub_mask = (offs_n[:, None] < N) & (sub_m[None, :] < M)
                if INT_ACC:
                    total = tl.zeros((BLOCK_N, SUB_M), tl.int32)
                else:
                    total = tl.zeros((BLOCK_N, SUB_M), tl.float32)
                for s in range(SPLIT_K):
                    # .cg reads L2, where the other programs' partials are (no stale L1 line).
                    part = tl.load(ws_ptr + s * M * N + sub_offs, mask=sub_mask, other=0.0, cache_modifier=".cg")
                    if INT_ACC:
                        total += part.to(tl.int32, bitcast=True)
                    else:
                        total += part
                _store_out(total, offs_n, sub_m, N, M, out_ptr, stride_om, bias_ptr, row_scale_ptr,
                           col_scale_ptr, stride_cs, HAS_BIAS, ROW_SCALE, COL_SCALE, INTERPRET)
            tl.atomic_xchg(cnt_ptr + tile, 0)  # the next launch finds the counter at zero
    else:
        _store_out(acc, offs_n, offs_m, N, M, out_ptr, stride_om, bias_ptr, row_scale_ptr, col_scale_ptr,
                   stride_cs, HAS_BIAS, ROW_SCALE, COL_SCALE, INTERPRET)


@triton.jit
def _weight_only_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_xm, stride_wn, stride_sn, stride_om, iters_per_split, magic,
    W4: tl.constexpr, GROUPED: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr,
    SCALE_BEFORE_DOT: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ASM: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """C^T tile ``[BLOCK_N, BLOCK_M]`` over K iterations ``[pid_k * iters_per_split, ...)``.

    W4: ``w [N, K/8]`` int32 (``int4_k8``), or its int16 view ``[N, K/4]`` with ``ASM`` (the PTX
    dequantizer; not with SCALE_BEFORE_DOT); W8: ``w [N, K]`` int8 (``ASM``: PTX conversion).
    ``s``/``z``: ``[N, G]`` scales and uint8 zero points (``GROUPED``: G = K / GROUP_SIZE with
    BLOCK_K | GROUP_SIZE; otherwise G = 1 and the scale applies in the epilogue).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    DT: tl.constexpr = x_ptr.dtype.element_ty
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows past N (weights) and M (tokens) re-read the last row instead of being masked: the K
    # loop's loads stay unpredicated and vectorized; the epilogue drops those results.
    row_n = tl.minimum(offs_n, N - 1)
    row_m = tl.minimum(offs_m, M - 1)

    it_lo = pid_k * iters_per_split
    it_hi = tl.minimum(it_lo + iters_per_split, tl.cdiv(K, BLOCK_K))
    k_lo = it_lo * BLOCK_K
    if W4 and ASM:
        offs_k = _asm_channel(offs_k)  # the weight tile's channel order (K % 8 == 0: masks unchanged)
    x_ptrs = x_ptr + row_m[None, :] * stride_xm + (k_lo + offs_k)[:, None]  # x^T tile [BLOCK_K, BLOCK_M]
    if W4:
        PER_ELEM: tl.constexpr = 4 if ASM else 8  # input channels per packed element
        offs_w = tl.arange(0, BLOCK_K // PER_ELEM)
        w_ptrs = w_ptr + row_n.to(tl.int64)[:, None] * stride_wn + (k_lo // PER_ELEM + offs_w)[None, :]
    else:
        w_ptrs = w_ptr + row_n.to(tl.int64)[:, None] * stride_wn + (k_lo + offs_k)[None, :]
    s_ptrs = s_ptr + row_n * stride_sn
    z_ptrs = z_ptr + row_n * stride_sn
    magic128 = magic + 128

    if HAS_ZEROS and not GROUPED:
        zero = tl.load(z_ptrs).to(tl.float32)[:, None]
    elif not HAS_ZEROS:
        zero = 8.0  # symmetric int4: stored nibble = value + 8
    if not GROUPED:
        scale = 1.0  # per-channel scales apply in the epilogue

    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    for it in range(it_lo, it_hi):
        k0 = it * BLOCK_K
        if EVEN_K:
            x_t = tl.load(x_ptrs)
        else:
            x_t = tl.load(x_ptrs, mask=((k0 + offs_k) < K)[:, None], other=0.0)
        if GROUPED:
            group = k0 // GROUP_SIZE
            scale = tl.load(s_ptrs + group).to(tl.float32)[:, None]
            if HAS_ZEROS:
                zero = tl.load(z_ptrs + group).to(tl.float32)[:, None]
        if W4:
            if EVEN_K:
                w = tl.load(w_ptrs)
            else:
                w = tl.load(w_ptrs, mask=((k0 // PER_ELEM + offs_w) < K // PER_ELEM)[None, :], other=0)
            if ASM:
                w_t = _dequant_int4_asm(w, zero, HAS_ZEROS, DT, INTERPRET)
            else:
                w_t = _dequant_int4(w, zero, magic, scale, SCALE_BEFORE_DOT, DT, INTERPRET)
            w_ptrs += BLOCK_K // PER_ELEM
        else:
            if EVEN_K:
                w = tl.load(w_ptrs)
            else:
                w = tl.load(w_ptrs, mask=((k0 + offs_k) < K)[None, :], other=0)
            if ASM:
                w_t = _dequant_int8_asm(w, DT, INTERPRET)
            else:
                w_t = _dequant_int8(w, magic128, scale, False, DT, INTERPRET)
            w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        if INTERPRET and DT == tl.bfloat16:  # the interpreter multiplies bf16 bit patterns
            w_t = w_t.to(tl.float32)
            x_t = x_t.to(tl.float32)
        if GROUPED and not SCALE_BEFORE_DOT:
            acc += tl.dot(w_t, x_t) * scale
        else:
            acc = tl.dot(w_t, x_t, acc)

    tile = pid_n * tl.num_programs(0) + pid_m
    _finish_tile(acc, pid_k, pid_m, tile, offs_n, offs_m, N, M, out_ptr, stride_om, ws_ptr, cnt_ptr, bias_ptr,
                 s_ptr, s_ptr, stride_sn, SPLIT_K, HAS_BIAS, False, not GROUPED, False, BLOCK_N, BLOCK_M,
                 INTERPRET)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm,
                          FP8: tl.constexpr, BLOCK_K: tl.constexpr, WHOLE_ROW: tl.constexpr):
    """Per-token activation quantization, one program per row, as the reference does it:
    ``s = max(max|x| / qmax, tiny)``, ``q = clamp(x / s, +-qmax)`` rounded half to even
    (int8) or cast to e4m3 (fp8); IEEE division so the result matches bit for bit.
    WHOLE_ROW: the row fits one block and is read once, kept in registers between the max
    and the division (otherwise it is read a second time, from L2)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    if FP8:
        QMAX: tl.constexpr = FP8_E4M3_MAX
    else:
        QMAX: tl.constexpr = INT8_MAX
    if WHOLE_ROW:
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(x), axis=0), QMAX), FP32_TINY)
        tl.store(q_row + offs, _quantize(x, scale, QMAX, FP8, q_ptr), mask=offs < K)
    else:
        amax = tl.zeros((BLOCK_K,), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.maximum(tl.math.div_rn(tl.max(amax, axis=0), QMAX), FP32_TINY)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            tl.store(q_row + k0 + offs, _quantize(x, scale, QMAX, FP8, q_ptr), mask=k0 + offs < K)
    tl.store(s_ptr + row, scale)


@triton.jit
def _quantize(x, scale, QMAX: tl.constexpr, FP8: tl.constexpr, q_ptr):
    v = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -QMAX), QMAX)
    if FP8:
        q = v.to(q_ptr.dtype.element_ty)
    else:
        q = ((v + ROUND_MAGIC) - ROUND_MAGIC).to(tl.int8)  # round half to even, then exact
    return q


@triton.jit
def _w8a8_kernel(
    xq_ptr, xs_ptr, w_ptr, ws_scale_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_xm, stride_wn, stride_om, iters_per_split,
    FP8: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRET: tl.constexpr,
):
    """C^T tile of ``w [N, K] @ xq^T`` (int8 -> int32, or e4m3 -> fp32), scaled by
    ``xs[m] * ws_scale[n]`` in the epilogue."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    row_n = tl.minimum(offs_n, N - 1)  # out-of-range rows re-read the last one (see above)
    row_m = tl.minimum(offs_m, M - 1)
    it_lo = pid_k * iters_per_split
    it_hi = tl.minimum(it_lo + iters_per_split, tl.cdiv(K, BLOCK_K))
    k_lo = it_lo * BLOCK_K
    x_ptrs = xq_ptr + row_m[None, :] * stride_xm + (k_lo + offs_k)[:, None]
    w_ptrs = w_ptr + row_n.to(tl.int64)[:, None] * stride_wn + (k_lo + offs_k)[None, :]
    if FP8:
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        ZERO: tl.constexpr = 0.0
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.int32)
        ZERO: tl.constexpr = 0
    for it in range(it_lo, it_hi):
        if EVEN_K:
            x_t = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_ok = (it * BLOCK_K + offs_k) < K
            x_t = tl.load(x_ptrs, mask=k_ok[:, None], other=ZERO)
            w = tl.load(w_ptrs, mask=k_ok[None, :], other=ZERO)
        if FP8:
            # Hopper's fp8 MMA accumulates with reduced precision; adding each BLOCK_K step into
            # the fp32 accumulator separately bounds that error (torch._scaled_mm's default too).
            acc = tl.dot(w, x_t, acc, max_num_imprecise_acc=BLOCK_K)
        else:
            acc = tl.dot(w, x_t, acc, out_dtype=tl.int32)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    tile = pid_n * tl.num_programs(0) + pid_m
    _finish_tile(acc, pid_k, pid_m, tile, offs_n, offs_m, N, M, out_ptr, stride_om, ws_ptr, cnt_ptr, bias_ptr,
                 xs_ptr, ws_scale_ptr, 1, SPLIT_K, HAS_BIAS, True, True, not FP8, BLOCK_N, BLOCK_M, INTERPRET)


@triton.jit
def _dequantize_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_wn, stride_sn, stride_on, magic,
                       W4: tl.constexpr, GROUPED: tl.constexpr, GROUP_SIZE: tl.constexpr,
                       HAS_ZEROS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       INTERPRET: tl.constexpr):
    """``out [N, K]`` (x's dtype) = the dequantized weight, tile ``[BLOCK_N, BLOCK_K]`` per program."""
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    DT: tl.constexpr = out_ptr.dtype.element_ty
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    row = offs_n.to(tl.int64)
    group = 0
    if GROUPED:
        group = (pid_k * BLOCK_K) // GROUP_SIZE
    scale = tl.load(s_ptr + offs_n * stride_sn + group, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    if HAS_ZEROS:
        zero = tl.load(z_ptr + offs_n * stride_sn + group, mask=n_ok, other=0).to(tl.float32)[:, None]
    else:
        zero = 8.0
    if W4:
        offs_w = pid_k * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
        w = tl.load(w_ptr + row[:, None] * stride_wn + offs_w[None, :],
                    mask=n_ok[:, None] & (offs_w < K // 8)[None, :], other=0)
        v = _dequant_int4(w, zero, magic, scale, True, DT, INTERPRET)
    else:
        q = tl.load(w_ptr + row[:, None] * stride_wn + offs_k[None, :],
                    mask=n_ok[:, None] & (offs_k < K)[None, :], other=0)
        v = _dequant_int8(q, magic + 128, scale, True, DT, INTERPRET)
    tl.store(out_ptr + row[:, None] * stride_on + offs_k[None, :], v, mask=n_ok[:, None] & (offs_k < K)[None, :])


# --------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass(frozen=True)
class Config:
    """Tiles and launch settings of one call. Tiles are of C^T: ``block_n`` weight rows by
    ``block_m`` tokens, ``block_k`` input channels per step (never across a scale group)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    scale_before_dot: bool = False  # w4a16 group scales multiply the weights, not each partial dot
    dequantize_first: bool = False  # weight-only: dequantize to x's dtype once, then cuBLAS


_OVERRIDES: Dict[str, object] = {}


def set_config_overrides(**fields) -> Dict[str, object]:
    """Force ``Config`` fields on every following call (tests and benchmarks); no arguments
    clears them. Returns the previous overrides. ``split_k`` is still capped so no split is
    empty."""
    unknown = set(fields) - {f.name for f in dataclasses.fields(Config)}
    if unknown:
        raise ValueError(f"unknown Config fields {sorted(unknown)}")
    previous = dict(_OVERRIDES)
    _OVERRIDES.clear()
    _OVERRIDES.update(fields)
    return previous


def _next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def choose_config(scheme: str, m: int, n: int, k: int, group_size: int, sm_count: int) -> Config:
    """The heuristic: tile by M bucket, split K until the output tiles give ~3 programs per SM."""
    weight_only = scheme in ("w4a16", "w8a16")
    grouped = scheme == "w4a16" and group_size != -1
    if scheme in ("w8a8", "fp8") and MID_MIN_M <= m <= MID_MAX_M:
        return _w8a8_mid_config(m, n, k, sm_count)
    if weight_only and m >= DEQUANT_MIN_M:
        return Config(block_m=0, block_n=64, block_k=_dequant_block_k(scheme, group_size, k),
                      dequantize_first=True)
    if grouped:
        block_k = min(group_size, 128)
    else:
        block_k = min(128, max(32, _next_pow2(k)))
    # Tiles by M bucket, from a sweep on an H200 (14336x4096, GPU time under CUDA graphs): past
    # M = 32, splitting K cost more than the idle SMs it would fill (the split rule below then
    # only fires for grids under half a wave), and the 16-bit paths prefer a shallower K step.
    if m <= 16:
        block_m, block_n, num_warps, num_stages = 16, 128, 4, 4
    elif m <= 32:
        block_m, block_n, num_warps, num_stages = 32, 128, 4, 4
    elif m <= 64:
        block_m, block_n, num_warps, num_stages = (64 if weight_only else 32), 64, 4, 4
    elif scheme == "w4a16":
        block_m, block_n, num_warps, num_stages = 128, 128, 8, 3
        block_k = min(block_k, 64)
    elif scheme == "w8a16":
        # Not 128x128 with BLOCK_K 64 and 8 warps: Triton 3.6 miscompiles the int8 path there
        # (wrong sums on an H200; tests/test_quant_matmul_triton.py::test_gpu_llm_shapes).
        block_m, block_n, num_warps, num_stages = 128, 64, 4, 3
    elif m < 512:
        block_m, block_n, num_warps, num_stages = 128, 128, (4 if scheme == "fp8" else 8), 3
    elif scheme == "fp8":  # fp8 needs a second accumulator (promotion): wider N, not M
        block_m, block_n, num_warps, num_stages = 128, 256, 8, 3
    elif m < 2048:
        block_m, block_n, num_warps, num_stages = 128, 128, 8, 3
    else:
        block_m, block_n, num_warps, num_stages = 256, 128, 8, 3
    tiles = _cdiv(m, block_m) * _cdiv(n, block_n)
    iters = _cdiv(k, block_k)
    split_k = 1
    busy = 2 * sm_count if m <= 32 else sm_count // 2
    if tiles < busy:
        if weight_only and m > 16 and not (grouped and group_size < 128):
            return _weight_only_small_grid_config(m, n, k, grouped, group_size, sm_count)
        split_k = max(1, min(16, iters // 2, _cdiv(3 * sm_count, tiles)))
    return Config(block_m=block_m, block_n=block_n, block_k=block_k, split_k=split_k, num_warps=num_warps,
                  num_stages=num_stages, scale_before_dot=grouped and block_m >= 64)


# fp8 and int8 w8a8 from 17 to 256 tokens: (block_m, block_n, num_warps, num_stages), largest
# first. H100 sweeps (CUDA graphs; fp8: N x K = 14336x4096, 4096x4096, 4096x14336, 45 configs;
# int8: those and 6144x4096, 33 configs; M = 32-256): the largest tile that still gives every
# SM a program, then split K (only when K is long) for grids short of 1.5 waves, was within 10%
# of the best config on 10 of 12 fp8 shapes and within 3% on 15 of 16 int8 ones (4096x14336 at
# 128 tokens: 10%), and up to 4.5x (fp8) and 4x (int8) faster than the generic rule below,
# which split K 7-13 ways into partials that cost more than the products.
MID_TILES = ((128, 128, 4, 3), (128, 64, 4, 4), (64, 64, 4, 5), (32, 64, 4, 5))
MID_MIN_M, MID_MAX_M = 17, 256
MID_SPLIT_MIN_ITERS = 64  # 128-deep K steps a program must have for a split to pay


def _w8a8_mid_config(m: int, n: int, k: int, sm_count: int) -> Config:
    block_k = min(128, max(32, _next_pow2(k)))
    fitting = [t for t in MID_TILES if t[0] <= max(32, _next_pow2(m))]
    block_m, block_n, num_warps, num_stages = next(
        (t for t in fitting if _cdiv(m, t[0]) * _cdiv(n, t[1]) >= sm_count), fitting[-1])
    tiles = _cdiv(m, block_m) * _cdiv(n, block_n)
    split_k = 1
    if _cdiv(k, block_k) >= MID_SPLIT_MIN_ITERS and 2 * tiles < 3 * sm_count:
        split_k = 4 if 2 * tiles < sm_count else 2
    return Config(block_m=block_m, block_n=block_n, block_k=block_k, split_k=split_k, num_warps=num_warps,
                  num_stages=num_stages)


def _weight_only_small_grid_config(m: int, n: int, k: int, grouped: bool, group_size: int, sm_count: int) -> Config:
    """Weight-only, 17-256 tokens, where the tiles above leave the GPU short of programs: narrow
    tiles first, then at most a 4-way K split. H100 sweep (N x K = 4096x4096, 4096x14336,
    14336x4096, M = 32-256, CUDA graphs): 1.0-2.5x the 7-13-way splits of the generic rule,
    whose fp32 partials cost more than the products they spread (4096x4096, M=128: w4a16 56 ->
    23 us, w8a16 30 -> 19)."""
    block_m = 32 if m <= 32 else 64
    block_k = min(group_size, 128) if grouped else min(128, max(32, _next_pow2(k)))
    tiles = _cdiv(m, block_m) * _cdiv(n, 64)
    split_k = 1 if tiles >= sm_count else (4 if 2 * tiles < sm_count else 2)
    return Config(block_m=block_m, block_n=64, block_k=block_k, split_k=split_k, num_warps=4, num_stages=5,
                  scale_before_dot=grouped and block_m >= 64)


def _dequant_block_k(scheme: str, group_size: int, k: int) -> int:
    if scheme == "w4a16" and group_size != -1:
        return min(group_size, 128)
    return min(128, max(32, _next_pow2(k)))


def _config(scheme: str, m: int, n: int, k: int, group_size: int, device: torch.device) -> Config:
    cfg = choose_config(scheme, m, n, k, group_size, _sm_count(device))
    if _OVERRIDES:
        cfg = dataclasses.replace(cfg, **_OVERRIDES)
        if cfg.dequantize_first and not cfg.block_n:
            cfg = dataclasses.replace(cfg, block_n=64)
    return cfg


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _sm_count(device: torch.device) -> int:
    return current_sm_count(device) if device.type == "cuda" else INTERPRETER_SM_COUNT


# Split-K arrival counters, one buffer per (device, stream); the kernels leave them at zero.
_COUNTERS: Dict[Tuple[str, int, int], torch.Tensor] = {}


def _counters(device: torch.device, count: int) -> torch.Tensor:
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device.type, device.index if device.index is not None else -1, stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < count:
        buf = torch.zeros(max(count, COUNTERS_MIN), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


def _split(cfg: Config, k: int) -> Tuple[int, int]:
    """(programs along K, K iterations per program), no program left without work."""
    iters = _cdiv(k, cfg.block_k)
    per_split = _cdiv(iters, max(1, min(cfg.split_k, iters)))
    return _cdiv(iters, per_split), per_split


# --------------------------------------------------------------------------------------------
# Host side


def quant_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    perm: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    scheme: str,
    layout: str,
    group_size: int,
    n: int,
    k: int,
) -> torch.Tensor:
    """x ``[M, K]`` (float16/bfloat16) and a weight's stored tensors -> ``[M, N]`` in x's dtype."""
    if perm is not None:  # stored channel j is original channel perm[j]
        x = x.index_select(1, perm)
    x = x.contiguous()
    packed, scales = packed.contiguous(), scales.contiguous()
    zeros = zeros.contiguous() if zeros is not None else None
    # The kernels index [M, N] and [M, K] with int32: very long inputs go in row blocks.
    rows = INT32_ELEMENTS // max(n, k)
    if x.shape[0] > rows:
        return torch.cat([_matmul(x[i:i + rows], packed, scales, zeros, bias, scheme, group_size, n, k)
                          for i in range(0, x.shape[0], rows)])
    return _matmul(x, packed, scales, zeros, bias, scheme, group_size, n, k)


def _matmul(x, packed, scales, zeros, bias, scheme, group_size, n, k) -> torch.Tensor:
    cfg = _config(scheme, x.shape[0], n, k, group_size, x.device)
    if scheme in ("w4a16", "w8a16"):
        if cfg.dequantize_first:
            return _dequantize_then_matmul(x, packed, scales, zeros, bias, scheme, group_size, n, k, cfg)
        return _weight_only(x, packed, scales, zeros, bias, scheme, group_size, n, k, cfg)
    if scheme in ("w8a8", "fp8"):
        return _w8a8(x, packed, scales, bias, scheme == "fp8", n, k, cfg)
    raise ValueError(f"unknown scheme {scheme!r}")


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the kernels write is allocated here (tests fill them with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _launch_state(cfg: Config, m: int, n: int, k: int, out: torch.Tensor):
    """(grid, programs along K, K iterations per program, partials workspace, counters)."""
    split_k, per_split = _split(cfg, k)
    if split_k > 1 and split_k * m * n > INT32_ELEMENTS:
        split_k, per_split = 1, _cdiv(k, cfg.block_k)
    grid = (_cdiv(m, cfg.block_m), _cdiv(n, cfg.block_n), split_k)
    if split_k > 1:
        ws = _empty((split_k, m, n), torch.float32, out.device)
        counters = _counters(out.device, grid[0] * grid[1])
    else:
        ws = counters = out  # never touched
    return grid, split_k, per_split, ws, counters


def _weight_only(x, packed, scales, zeros, bias, scheme, group_size, n, k, cfg: Config) -> torch.Tensor:
    m = x.shape[0]
    out = _empty((m, n), x.dtype, x.device)
    grid, split_k, per_split, ws, counters = _launch_state(cfg, m, n, k, out)
    grouped = scheme == "w4a16" and group_size != -1
    scale_before = grouped and cfg.scale_before_dot
    asm = use_asm(x.device, scheme, scale_before)
    _weight_only_kernel[grid](
        x, packed.view(torch.int16) if asm and scheme == "w4a16" else packed, scales,
        zeros if zeros is not None else scales,
        bias if bias is not None else out, out, ws, counters,
        m, n, k, x.stride(0), packed.stride(0) * (2 if asm and scheme == "w4a16" else 1), scales.stride(0),
        out.stride(0), per_split,
        MAGIC_BITS, W4=scheme == "w4a16", GROUPED=grouped, GROUP_SIZE=group_size if grouped else 1,
        HAS_ZEROS=zeros is not None, SCALE_BEFORE_DOT=scale_before,
        HAS_BIAS=bias is not None, SPLIT_K=split_k, EVEN_K=k % cfg.block_k == 0,
        BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, ASM=asm,
        INTERPRET=interpreting(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


# The inline-PTX dequantizers (NVIDIA GPUs). Off: the portable float32 paths. The interpreter
# cannot run PTX: ASM_IN_INTERPRETER (tests) runs the PTX paths' data layout with plain
# operations in place of the asm.
ASM_DEQUANT = True
ASM_IN_INTERPRETER = False


def use_asm(device: torch.device, scheme: str, scale_before_dot: bool) -> bool:
    if not ASM_DEQUANT or scheme not in ("w4a16", "w8a16") or scale_before_dot:
        return False
    if interpreting():
        return ASM_IN_INTERPRETER
    return device.type == "cuda" and torch.version.hip is None


def dequantize(packed, scales, zeros, scheme: str, group_size: int, n: int, k: int, dtype: torch.dtype,
               block_n: int = 64) -> torch.Tensor:
    """The weight ``[N, K]`` in ``dtype`` (stored channel order), by the Triton dequantizer."""
    w = _empty((n, k), dtype, packed.device)
    grouped = scheme == "w4a16" and group_size != -1
    block_k = _dequant_block_k(scheme, group_size, k)
    # K blocks of the same rows launch next to each other (H100, 4096x14336: 59 -> 55 us).
    _dequantize_kernel[(_cdiv(k, block_k), _cdiv(n, block_n))](
        packed, scales, zeros if zeros is not None else scales, w, n, k, packed.stride(0), scales.stride(0),
        w.stride(0), MAGIC_BITS,
        W4=scheme == "w4a16", GROUPED=grouped, GROUP_SIZE=group_size if grouped else 1,
        HAS_ZEROS=zeros is not None, BLOCK_N=block_n, BLOCK_K=block_k, INTERPRET=interpreting(), num_warps=4,
    )
    return w


def _dequantize_then_matmul(x, packed, scales, zeros, bias, scheme, group_size, n, k, cfg: Config):
    w = dequantize(packed, scales, zeros, scheme, group_size, n, k, x.dtype, cfg.block_n)
    if bias is not None:
        return torch.addmm(bias, x, w.t())
    return x @ w.t()


def quantize_rows(x: torch.Tensor, fp8: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token quantization of ``x [M, K]``: (int8 or e4m3 ``[M, K]``, fp32 scales ``[M]``)."""
    m, k = x.shape
    if fp8 and interpreting():
        # The interpreter's float8 casts round differently from the GPU's and torch's.
        from ..reference.quant_matmul import quantize_rows_fp8

        q, s = quantize_rows_fp8(x)
        return q, s.reshape(m)
    q = _empty((m, k), torch.float8_e4m3fn if fp8 else torch.int8, x.device)
    s = _empty((m,), torch.float32, x.device)
    # Rows up to 8K channels are held in registers (at most 32 values per thread): H100, K=4096,
    # 1-4096 tokens, 9-12% faster than two passes over 2K-channel blocks. Longer rows take
    # those two passes (K=14336: 8K-channel blocks were 10-30% slower).
    block_k = max(128, _next_pow2(k))
    whole_row = block_k <= QUANTIZE_WHOLE_ROW_MAX
    if not whole_row:
        block_k = 2048
    _quantize_rows_kernel[(m,)](x, q, s, k, x.stride(0), q.stride(0), FP8=fp8, BLOCK_K=block_k,
                                WHOLE_ROW=whole_row, num_warps=4 if block_k <= 1024 else 8)
    return q, s


def _w8a8(x, packed, scales, bias, fp8: bool, n: int, k: int, cfg: Config) -> torch.Tensor:
    m = x.shape[0]
    xq, xs = quantize_rows(x, fp8)
    out = _empty((m, n), x.dtype, x.device)
    grid, split_k, per_split, ws, counters = _launch_state(cfg, m, n, k, out)
    _w8a8_kernel[grid](
        xq, xs, packed, scales, bias if bias is not None else out, out, ws, counters,
        m, n, k, xq.stride(0), packed.stride(0), out.stride(0), per_split,
        FP8=fp8, HAS_BIAS=bias is not None, SPLIT_K=split_k, EVEN_K=k % cfg.block_k == 0,
        BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, INTERPRET=interpreting(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def supports(x, packed, scales, zeros, perm, bias, scheme, layout, group_size, n, k) -> Optional[str]:
    """None when these kernels serve the (validated) call, else the reason."""
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"the Triton kernels take float16 or bfloat16 activations, got {x.dtype}"
    want = "int4_k8" if scheme == "w4a16" else "rowmajor"
    if layout != want:
        return f"the Triton kernels read {scheme} weights in the {want!r} layout, got {layout!r}"
    if scheme == "w4a16" and k % 8:
        return f"the Triton int4 kernel needs K % 8 == 0 (whole packed words), got K={k}"
    if scheme == "fp8":
        return unavailable_reason(x.device, True, True)
    return None


_TRITON_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16"}


def compile_for_target(capability: Tuple[int, int] = (9, 0), scheme: str = "w4a16", m: int = 1,
                       n: int = 4096, k: int = 4096, group_size: int = 128, dtype: torch.dtype = torch.bfloat16,
                       symmetric: bool = True, cfg: Optional[Config] = None, asm: Optional[bool] = None):
    """Compile the matmul kernel a call would launch, ahead of time, for a GPU that need not be
    present (``.asm["ptx"]``/``["sass"]`` show ``wgmma``/``HGMMA`` on sm_90). Pointers, strides
    and K are declared 16-divisible, as the launcher sees them for ordinary shapes. Not
    available under ``TRITON_INTERPRET=1``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    weight_only = scheme in ("w4a16", "w8a16")
    kernel = _weight_only_kernel if weight_only else _w8a8_kernel
    if not isinstance(kernel, triton.runtime.JITFunction):
        raise RuntimeError("compile_for_target needs TRITON_INTERPRET unset before triton is imported")
    if cfg is None:
        cfg = choose_config(scheme, m, n, k, group_size, 132)
    grouped = scheme == "w4a16" and group_size != -1
    split_k = _cdiv(_cdiv(k, cfg.block_k), _cdiv(_cdiv(k, cfg.block_k), cfg.split_k))
    elem = _TRITON_DTYPES[dtype]
    if weight_only:
        scale_before = grouped and cfg.scale_before_dot
        if asm is None:
            asm = ASM_DEQUANT and not scale_before
        constexprs = dict(
            W4=scheme == "w4a16", GROUPED=grouped, GROUP_SIZE=group_size if grouped else 1,
            HAS_ZEROS=not symmetric, SCALE_BEFORE_DOT=scale_before, HAS_BIAS=True,
            SPLIT_K=split_k, EVEN_K=k % cfg.block_k == 0, BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m,
            BLOCK_K=cfg.block_k, ASM=asm, INTERPRET=False)
        w_type = ("i16" if asm else "i32") if scheme == "w4a16" else "i8"
        pointer_types = {"x_ptr": elem, "w_ptr": w_type, "s_ptr": elem,
                         "z_ptr": "u8", "bias_ptr": elem, "out_ptr": elem, "ws_ptr": "fp32", "cnt_ptr": "i32"}
    else:
        fp8 = scheme == "fp8"
        constexprs = dict(FP8=fp8, HAS_BIAS=True, SPLIT_K=split_k, EVEN_K=k % cfg.block_k == 0,
                          BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, INTERPRET=False)
        q = "fp8e4nv" if fp8 else "i8"
        pointer_types = {"xq_ptr": q, "xs_ptr": "fp32", "w_ptr": q, "ws_scale_ptr": "fp32", "bias_ptr": elem,
                         "out_ptr": elem, "ws_ptr": "fp32", "cnt_ptr": "i32"}
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointer_types:
            signature[name] = "*" + pointer_types[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if name.startswith("stride") or name in ("K", "magic"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", capability[0] * 10 + capability[1], 32)
    return triton.compile(source, target=target, options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})

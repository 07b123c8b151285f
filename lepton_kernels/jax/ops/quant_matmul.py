"""Weight quantization and quantized matmul for JAX: Mosaic TPU kernels, ``pallas_call``
wrapper, public functions and jnp references, in one module.

Schemes and quantization rules are those of the torch API (``lepton_kernels.quant.weight``),
so both produce the same real weights. ``w`` is ``[N, K]`` (the ``nn.Linear`` layout) and
``quant_matmul`` computes ``x @ w.T + bias``. Scales are computed in float32, floored at the
smallest normal number of their storage dtype and rounded *up* to it (the weight's dtype for
w4a16/w8a16, float32 for w8a8/fp8); values are quantized against that stored scale (round to
nearest even):

* ``"w4a16"``: groups of 32/64/128 input channels or one per output channel
  (``group_size=-1``). Symmetric: ``scale = max|w|/7``, ``u = clamp(round(w/scale), -8, 7) + 8``.
  Asymmetric: range widened to include 0, ``scale = (hi-lo)/15``, ``zero = round(-lo/scale)``,
  ``u = clamp(round(w/scale) + zero, 0, 15)``. Real weight ``(u - zero) * scale``.
* ``"w8a16"``: int8 per output channel, ``scale = max|w|/127``, ``q = clamp(round(w/scale), ±127)``.
* ``"w8a8"``: the w8a16 weights (float32 scales) times int8 activations quantized per token on
  the fly (``s = max(max|x|/127, tiny)``, ``q = clamp(round(x/s), ±127)``); int32
  accumulation, both scales applied in float32.
* ``"fp8"``: e4m3 weights per output channel (``scale = max|w|/448``) times e4m3 activations
  quantized per token (``s = max(max|x|/448, tiny)``); float32 accumulation.

Storage is TPU-oriented and K-major (``[K, N]``, so the kernels run plain ``x @ W`` on the
MXU), with K zero-padded: int8/fp8 weights to a multiple of 128, int4 weights to a multiple of
1024; scales (and zero points) are kept as float32 ``[groups, N]`` holding the stored-dtype
values. ``QuantizedWeight.from_packed`` converts the torch API's layouts to this one.

int4 values are packed eight to an int32 along K in *planes*: within each 1024-row tile of K,
nibble ``j`` (bits ``4j..4j+3``) of packed row ``p`` (0..127) holds row ``128*j + p``.
Unpacking nibble ``j`` of a ``[128, bn]`` block therefore yields 128 consecutive rows of W,
which multiply a lane-aligned 128-column slice of x: no shuffles in the kernel.

TPU kernel: grid ``(M/bm, N/bn, K/bk)``, K last and sequential, a VMEM accumulator (int32 for
w8a8, float32 otherwise). w8a8 multiplies int8 x int8 on the MXU; w8a16 converts the int8 tile
to the activation dtype in VMEM; fp8 converts both operands to bfloat16 (exact for e4m3);
w4a16 unpacks each nibble plane with shifts, applies zero and (group) scale and runs one
128-deep matmul per plane. Per-channel scales are applied once, in the epilogue.
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
from ..gpu import quant_matmul as gpu_quant

SCHEMES = ("w4a16", "w8a16", "w8a8", "fp8")
GROUP_SIZES = (32, 64, 128)
INT4_PLANE_ROWS = 128            # rows of W per nibble plane
INT4_TILE_K = 8 * INT4_PLANE_ROWS  # rows of W per packed tile (one kernel K step)
INT8_MAX, INT4_SYM_MAX = 127.0, 7.0


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


LAYOUT_INT4 = "tpu_int4_planes"  # w4a16
LAYOUT_KN = "tpu_kn"  # w8a16, w8a8, fp8


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["packed", "scales", "zeros", "perm"],
                   meta_fields=["scheme", "group_size", "n", "k", "dtype"])
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A quantized ``[N, K]`` weight in the TPU layout (a pytree: pass it through ``jax.jit``).

    Attributes:
        packed: int8 / float8_e4m3fn ``[Kp, N]`` (Kp = K rounded up to 128), or for w4a16
            int32 ``[Kp/8, N]`` (Kp = K rounded up to 1024) in nibble planes (module docstring).
        scales: float32 ``[G, N]``: ``G = Kp/group_size`` groups (w4a16), else 1.
        zeros: w4a16 asymmetric only: float32 zero points (integers in [0, 16]) shaped like
            ``scales``; None means the symmetric zero 8.
        perm: optional int32 ``[K]``: stored input channel ``j`` is original channel
            ``perm[j]`` (GPTQ act-order imports); ``quant_matmul`` gathers ``x[..., perm]``.
        scheme, group_size (-1: one group per output channel), n (N), k (K), dtype (of the
        original weight; the default of :meth:`dequantize`).
    """

    packed: jax.Array
    scales: jax.Array
    zeros: Optional[jax.Array]
    perm: Optional[jax.Array]
    scheme: str
    group_size: int
    n: int
    k: int
    dtype: jnp.dtype

    @property
    def shape(self):
        """``(N, K)`` of the original weight."""
        return (self.n, self.k)

    @property
    def layout(self) -> str:
        return LAYOUT_INT4 if self.scheme == "w4a16" else LAYOUT_KN

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @property
    def nbytes(self) -> int:
        """Bytes a matmul reads for the weight: packed values + scales + zeros."""
        parts = [self.packed, self.scales] + ([self.zeros] if self.zeros is not None else [])
        return sum(p.size * jnp.dtype(p.dtype).itemsize for p in parts)

    def dequantize(self, dtype=None) -> jax.Array:
        """The weight ``[N, K]`` (original channel order) in ``dtype`` (default :attr:`dtype`)."""
        return dequantize_weight(self).astype(dtype or self.dtype)

    @classmethod
    def from_packed(cls, packed, scales, zeros=None, *, scheme: str, group_size: int, shape, dtype,
                    layout: Optional[str] = None, perm=None) -> "QuantizedWeight":
        """Convert the torch API's storage (``lepton_kernels.quant.weight``) to this layout.

        Args take the torch layout's arrays (NumPy or JAX; e.g. from a ``state_dict``):
        ``"int4_k8"`` (w4a16: packed int32 ``[N, K/8]``, scales ``[N, G]``, zeros uint8
        ``[N, G]``) or ``"rowmajor"`` (packed ``[N, K]`` int8/e4m3, scales ``[N, 1]``).
        The real weights are unchanged (scales become float32 exactly).
        """
        n, k = (int(d) for d in shape)
        layout = layout or ("int4_k8" if scheme == "w4a16" else "rowmajor")
        if scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r}; known schemes: {', '.join(SCHEMES)}")
        want = "int4_k8" if scheme == "w4a16" else "rowmajor"
        if layout != want:
            raise ValueError(f"layout {layout!r} is not a layout of {scheme} (known: {want})")
        packed = jnp.asarray(packed)
        scales = jnp.asarray(scales).astype(jnp.float32)
        if scheme == "w4a16":
            V.check_shape("packed", packed, (n, k // 8), "([N, K/8] int32, layout int4_k8)")
            shifts = (4 * jnp.arange(8, dtype=jnp.int32))[None, None, :]  # channel 8j+i: bits 4i..4i+3
            u = (lax.shift_right_logical(packed.astype(jnp.int32)[:, :, None], shifts) & 0xF).reshape(n, k)
            kp = _round_up(k, INT4_TILE_K)
            u = jnp.pad(u.T, ((0, kp - k), (0, 0)))
            g = k if group_size == -1 else group_size
            pad_groups = (kp - k) // g if group_size != -1 else 0
            scales = jnp.pad(scales.T, ((0, pad_groups), (0, 0)))
            if zeros is not None:
                zeros = jnp.pad(jnp.asarray(zeros).astype(jnp.float32).T, ((0, pad_groups), (0, 0)))
            packed = pack_int4(u)
        else:
            V.check_shape("packed", packed, (n, k), "([N, K], layout rowmajor)")
            packed = jnp.pad(packed.T, ((0, _round_up(k, 128) - k), (0, 0)))
            scales = scales.reshape(1, n)
            zeros = None
        perm = None if perm is None else jnp.asarray(perm).astype(jnp.int32)
        return cls(packed, scales, zeros, perm, scheme, int(group_size), n, k, jnp.dtype(dtype))


@dataclasses.dataclass(frozen=True)
class QuantBlockSizes:
    """Rows of x (``block_m``), output columns (``block_n``) and K (``block_k``) per grid step.

    Roofline: a step reads ``bm*bk*x_bytes + bk*bn*w_bytes`` and does ``2*bm*bn*bk`` FLOPs.
    At decode (M <= 16) only the weight tile matters and the kernel is HBM-bound at any size,
    so the tile must be large enough to hide the ~0.35 us per-step overhead behind its DMA:
    an int8 ``1024x1024`` tile is 1 MiB = 1.3 us at v5e's 819 GB/s (0.64 us at v6e's
    1.64 TB/s). At large M the intensity is ``2*bm*bn/(bm*x_bytes + bn*w_bytes)``: with
    ``bm=256, bn=1024`` (v5e, bf16 x, int8 w) 341 FLOP/byte, above v5e's bf16 ridge (240)
    though below its int8 ridge (394 TOP/s / 819 GB/s = 480); v6e's ``bm=512, bn=1024``
    gives 512 FLOP/byte, about its bf16 ridge (560). VMEM (double-buffered x, w, out + f32
    accumulator + the dequantized tile) stays below 8 MiB (v5e, 16 MiB scoped) and 18 MiB
    (v6e, 32 MiB scoped).

    w4a16 always steps K by one packed tile (1024 rows; ``block_k`` is ignored) and
    dequantizes one 128-row plane at a time. ``block_m`` must be a multiple of 32 (int8
    sublane tiling), ``block_n`` and ``block_k`` of 128; smaller dims use one full block.
    """

    block_m: int
    block_n: int
    block_k: int

    def __post_init__(self):
        for name, value, align in (("block_m", self.block_m, 32), ("block_n", self.block_n, 128),
                                   ("block_k", self.block_k, 128)):
            if value <= 0 or value % align:
                raise ValueError(f"{name} must be a positive multiple of {align}, got {value}")


DEFAULT_BLOCK_SIZES = {
    "v5e": QuantBlockSizes(block_m=256, block_n=1024, block_k=1024),
    "v6e": QuantBlockSizes(block_m=512, block_n=1024, block_k=2048),
}


# --------------------------------------------------------------------------------------------
# Quantization (plain jnp; runs once per weight)
# --------------------------------------------------------------------------------------------

def _div(a, b):
    """``a / b`` rounded correctly. XLA rewrites a division by a broadcast (or a constant) into a
    multiplication by its reciprocal, which is off by an ulp about half the time; hiding the
    broadcast behind an optimization barrier keeps a true division, so quantization matches
    the torch API's bit for bit (on CPU; TPU division has its own rounding)."""
    a = jnp.asarray(a, jnp.float32)
    return a / lax.optimization_barrier(jnp.broadcast_to(jnp.asarray(b, jnp.float32), a.shape))


def stored_scale(scale, dtype):
    """Float32 scales -> the values ``dtype`` stores: floored at its smallest normal number and
    rounded *up* (never down, so ``|w| / scale`` stays within the integer range). Returned as
    float32 (exactly the stored values)."""
    dtype = jnp.dtype(dtype)
    scale = jnp.maximum(scale.astype(jnp.float32), jnp.finfo(dtype).tiny)
    stored = scale.astype(dtype)
    if dtype != jnp.float32:
        # The next representable value up: positive floats order like their bit patterns.
        bumped = lax.bitcast_convert_type(lax.bitcast_convert_type(stored, jnp.int16) + 1, dtype)
        stored = jnp.where(stored.astype(jnp.float32) < scale, bumped, stored)
    return stored.astype(jnp.float32)


def pack_int4(u):
    """int ``[Kp, N]`` with values 0..15, Kp % 1024 == 0 -> int32 ``[Kp/8, N]`` (nibble planes)."""
    kp, n = u.shape
    tiles = u.astype(jnp.uint32).reshape(kp // INT4_TILE_K, 8, INT4_PLANE_ROWS, n)
    packed = jnp.zeros((kp // INT4_TILE_K, INT4_PLANE_ROWS, n), jnp.uint32)
    for j in range(8):
        packed = packed | (tiles[:, j] << (4 * j))
    return lax.bitcast_convert_type(packed, jnp.int32).reshape(kp // 8, n)


def unpack_int4(packed):
    """Inverse of :func:`pack_int4`: int32 ``[Kp/8, N]`` -> int32 ``[Kp, N]`` in 0..15."""
    rows, n = packed.shape
    tiles = packed.reshape(rows // INT4_PLANE_ROWS, 1, INT4_PLANE_ROWS, n)
    shifts = (4 * jnp.arange(8, dtype=jnp.int32)).reshape(1, 8, 1, 1)
    return (lax.shift_right_logical(tiles, shifts) & 0xF).reshape(rows * 8, n)


def _quantize_int4(wt, group_size, symmetric, dtype):
    """wt float32 [K, N] -> (u [K, N] in 0..15, scales [G, N], zeros [G, N] or None)."""
    k, n = wt.shape
    g = k if group_size == -1 else group_size
    wg = wt.reshape(k // g, g, n)
    if symmetric:
        scale = stored_scale(_div(jnp.abs(wg).max(axis=1), 7.0), dtype)
        u = jnp.clip(jnp.round(_div(wg, scale[:, None])), -8, 7) + 8
        return u.reshape(k, n), scale, None
    lo = jnp.minimum(wg.min(axis=1), 0.0)
    hi = jnp.maximum(wg.max(axis=1), 0.0)
    scale = stored_scale(_div(hi - lo, 15.0), dtype)
    zero = jnp.clip(jnp.round(_div(-lo, scale)), 0, 15)
    u = jnp.clip(jnp.round(_div(wg, scale[:, None])) + zero[:, None], 0, 15)
    return u.reshape(k, n), scale, zero


def quantize_activations(x, scheme: str):
    """Per-token dynamic quantization of x [M, K] for w8a8 (int8) and fp8 (e4m3).

    Returns ``(xq, x_scale float32 [M, 1])`` with ``x ~ xq * x_scale``.
    """
    xf = x.astype(jnp.float32)
    amax = jnp.abs(xf).max(axis=-1, keepdims=True)
    tiny = jnp.finfo(jnp.float32).tiny
    if scheme == "w8a8":
        scale = jnp.maximum(_div(amax, INT8_MAX), tiny)
        return jnp.clip(jnp.round(_div(xf, scale)), -INT8_MAX, INT8_MAX).astype(jnp.int8), scale
    scale = jnp.maximum(_div(amax, V.FP8_E4M3_MAX), tiny)
    xq = jnp.clip(_div(xf, scale), -V.FP8_E4M3_MAX, V.FP8_E4M3_MAX)
    # The barrier keeps the e4m3 rounding: XLA (excess precision allowed, its default) folds
    # f32 -> e4m3 -> f16 into f32 -> f16, which silently skipped the activation quantization.
    return lax.optimization_barrier(xq.astype(jnp.float8_e4m3fn)), scale


@functools.partial(jax.jit, static_argnames=("scheme", "group_size", "symmetric"))
def _quantize(w, *, scheme, group_size, symmetric):
    n, k = w.shape
    wt = w.astype(jnp.float32).T  # [K, N]
    if scheme == "w4a16":
        kp = _round_up(k, INT4_TILE_K)
        u, scales, zeros = _quantize_int4(wt, group_size, symmetric, w.dtype)
        u = jnp.pad(u, ((0, kp - k), (0, 0)), constant_values=8)
        if group_size != -1:  # padded groups: scale 0, so they dequantize to 0
            pad_groups = (kp - k) // group_size
            scales = jnp.pad(scales, ((0, pad_groups), (0, 0)))
            zeros = None if zeros is None else jnp.pad(zeros, ((0, pad_groups), (0, 0)))
        else:
            scales = scales.reshape(1, n)
            zeros = None if zeros is None else zeros.reshape(1, n)
        return pack_int4(u.astype(jnp.int32)), scales, zeros
    kp = _round_up(k, 128)
    amax = jnp.abs(wt).max(axis=0)
    if scheme in ("w8a16", "w8a8"):
        scales = stored_scale(_div(amax, INT8_MAX), w.dtype if scheme == "w8a16" else jnp.float32)
        q = jnp.clip(jnp.round(_div(wt, scales)), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    else:  # fp8
        scales = stored_scale(_div(amax, V.FP8_E4M3_MAX), jnp.float32)
        q = jnp.clip(_div(wt, scales), -V.FP8_E4M3_MAX, V.FP8_E4M3_MAX).astype(jnp.float8_e4m3fn)
    return jnp.pad(q, ((0, kp - k), (0, 0))), scales.reshape(1, n), None


def quantize_weight(w: jax.Array, scheme: str, *, group_size: int = 128, symmetric: bool = True) -> QuantizedWeight:
    """Quantize a linear layer's weight ``w [N, K]`` (round to nearest), as the torch API does.

    Args:
        w: float16, bfloat16 or float32 ``[N, K]`` (N output channels, K input channels).
        scheme: "w4a16", "w8a16", "w8a8" or "fp8" (module docstring: formulas and layout).
        group_size: w4a16 only: input channels per scale, 32, 64 or 128, or -1 for one scale
            per output channel; must divide K (and K must be a multiple of 8). The 8-bit and
            fp8 schemes always use one scale per output channel: leave the default or pass -1.
        symmetric: w4a16 may be asymmetric (a zero point per group); the others are symmetric.
    """
    if not isinstance(scheme, str) or scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; known schemes: {', '.join(SCHEMES)}")
    w = V.check_array("w", w, ndim=2, dtypes=V.FLOAT_DTYPES)
    n, k = w.shape
    if n == 0 or k == 0:
        raise ValueError(f"w must not be empty, got shape {tuple(w.shape)}")
    V.check_bool("symmetric", symmetric)
    if not isinstance(group_size, int) or isinstance(group_size, bool):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    if scheme == "w4a16":
        if group_size not in GROUP_SIZES + (-1,):
            raise ValueError(f"group_size must be one of 32, 64, 128, -1 for w4a16, got {group_size}")
        g = k if group_size == -1 else group_size
        if k % g or k % 8:
            raise ValueError(f"group_size={group_size} must divide K={k} (the columns of w), and K must be a "
                             "multiple of 8")
    else:
        if group_size not in (-1, 128):  # 128 is the signature's default: accepted and ignored
            raise ValueError(f"{scheme} quantizes per output channel; group_size must be -1 (or left at its "
                             f"default), got {group_size}")
        if not symmetric:
            raise ValueError(f"asymmetric quantization is not supported for {scheme} (symmetric only)")
        group_size = -1
    packed, scales, zeros = _quantize(w, scheme=scheme, group_size=group_size, symmetric=symmetric)
    return QuantizedWeight(packed, scales, zeros, None, scheme, group_size, n, k, jnp.dtype(w.dtype))


def dequantize_weight(qw: QuantizedWeight) -> jax.Array:
    """The real weight ``[N, K]`` float32 (original channel order) that ``qw`` stands for."""
    k = qw.k
    if qw.scheme != "w4a16":
        w = (qw.packed[:k].astype(jnp.float32) * qw.scales).T
    else:
        u = unpack_int4(qw.packed)[:k].astype(jnp.float32)  # [K, N]
        g = k if qw.group_size == -1 else qw.group_size
        scales = jnp.repeat(qw.scales, g, axis=0)[:k]
        zeros = 8.0 if qw.zeros is None else jnp.repeat(qw.zeros, g, axis=0)[:k]
        w = ((u - zeros) * scales).T
    if qw.perm is not None:
        w = jnp.zeros_like(w).at[:, qw.perm].set(w)
    return w


# --------------------------------------------------------------------------------------------
# jnp reference
# --------------------------------------------------------------------------------------------

def quant_matmul_reference(x, qw: QuantizedWeight, bias=None):
    """``x @ w.T + bias`` for x ``[..., K]`` with the rules of ``qw.scheme``, float32 accumulation
    (w8a8: exact int32 sums), scales and bias applied in float32, cast to x's dtype."""
    k, n = qw.k, qw.n
    x2 = x.reshape(-1, k)
    if qw.perm is not None:
        x2 = x2[:, qw.perm]
    hi = lax.Precision.HIGHEST
    if qw.scheme in ("w4a16", "w8a16"):
        w_stored = dequantize_weight(dataclasses.replace(qw, perm=None))  # stored channel order
        out = jnp.dot(x2.astype(jnp.float32), w_stored.T, precision=hi)
    else:
        xq, x_scale = quantize_activations(x2, qw.scheme)
        if qw.scheme == "w8a8":
            acc = jnp.dot(xq, qw.packed[:k], preferred_element_type=jnp.int32).astype(jnp.float32)
        else:
            acc = jnp.dot(xq.astype(jnp.float32), qw.packed[:k].astype(jnp.float32), precision=hi)
        out = acc * x_scale * qw.scales
    if bias is not None:
        out = out + bias.astype(jnp.float32)
    return out.astype(x.dtype).reshape(*x.shape[:-1], n)


# --------------------------------------------------------------------------------------------
# Mosaic TPU kernel
# --------------------------------------------------------------------------------------------

def _dequant_plane(packed, j, scales_ref, zeros_ref, group_size, dtype):
    """Nibble plane ``j`` of a packed ``[128, bn]`` tile as ``dtype`` weights ``[128, bn]``.

    With groups, zero and scale are applied here, per row; per channel, only the zero is (the
    scale is a per-column factor that the epilogue applies once). ``u - zero`` is a small
    integer, exact in bfloat16.
    """
    u = (lax.shift_right_logical(packed, jnp.int32(4 * j)) & 0xF).astype(jnp.float32)
    if group_size == -1:
        zero = 8.0 if zeros_ref is None else zeros_ref[...]  # [1, bn]
        return (u - zero).astype(dtype)
    groups = INT4_PLANE_ROWS // group_size
    rows = slice(j * groups, (j + 1) * groups)

    def per_row(ref):  # [groups, bn] -> [128, bn], each group's row repeated group_size times
        values = ref[rows, :]
        return jnp.broadcast_to(values[:, None, :], (groups, group_size, values.shape[-1])).reshape(
            INT4_PLANE_ROWS, values.shape[-1])

    zero = 8.0 if zeros_ref is None else per_row(zeros_ref)
    return ((u - zero) * per_row(scales_ref)).astype(dtype)


def _quant_matmul_kernel(*refs, scheme, group_size, has_zeros, has_bias, num_k_steps, precision):
    refs = list(refs)
    x_ref, w_ref, scales_ref = refs[:3]
    rest = refs[3:]
    zeros_ref = rest.pop(0) if has_zeros else None
    x_scale_ref = rest.pop(0) if scheme in ("w8a8", "fp8") else None
    bias_ref = rest.pop(0) if has_bias else None
    o_ref, acc_ref = rest
    kk = pl.program_id(2)

    @pl.when(kk == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, acc_ref.dtype)

    x = x_ref[...]
    if scheme == "w8a8":
        acc_ref[...] += jnp.dot(x, w_ref[...], preferred_element_type=jnp.int32)
    elif scheme == "w8a16":
        acc_ref[...] += jnp.dot(x, w_ref[...].astype(x.dtype), preferred_element_type=jnp.float32,
                                precision=precision)
    elif scheme == "fp8":  # e4m3 -> bf16 is exact, and so are the products in f32
        acc_ref[...] += jnp.dot(x.astype(jnp.bfloat16), w_ref[...].astype(jnp.bfloat16),
                                preferred_element_type=jnp.float32)
    else:  # w4a16: one 128-deep matmul per nibble plane, against a lane-aligned slice of x
        packed = w_ref[...]
        partial = None
        for j in range(8):
            w = _dequant_plane(packed, j, scales_ref, zeros_ref, group_size, x.dtype)
            xs = x[:, j * INT4_PLANE_ROWS:(j + 1) * INT4_PLANE_ROWS]
            dot = jnp.dot(xs, w, preferred_element_type=jnp.float32, precision=precision)
            partial = dot if partial is None else partial + dot
        acc_ref[...] += partial

    @pl.when(kk == num_k_steps - 1)
    def _finish():
        acc = acc_ref[...].astype(jnp.float32)
        if x_scale_ref is not None:
            acc = acc * x_scale_ref[...]  # per token, [bm, 1]
        if scheme != "w4a16" or group_size == -1:
            acc = acc * scales_ref[...]  # per output channel, [1, bn]
        if bias_ref is not None:
            acc = acc + bias_ref[...]
        o_ref[...] = acc.astype(o_ref.dtype)


def _pick_block_k(kp: int, preferred: int) -> int:
    """The largest multiple of 128 that divides ``kp`` (itself a multiple of 128) and is <= preferred."""
    if kp <= preferred:
        return kp
    for bk in range(preferred - preferred % 128, 127, -128):
        if kp % bk == 0:
            return bk
    return 128


def quant_matmul_tpu(x2, qw: QuantizedWeight, bias=None, *, block_sizes: Optional[QuantBlockSizes] = None,
                     interpret=False):
    """The ``pallas_call`` wrapper: x2 ``[M, K]`` (stored channel order) -> ``[M, N]`` in x2's dtype."""
    m, k = x2.shape
    n, scheme = qw.n, qw.scheme
    block_sizes = block_sizes or DEFAULT_BLOCK_SIZES[_dispatch.tpu_generation()]
    kp = qw.packed.shape[0] * (8 if scheme == "w4a16" else 1)
    if kp != k:  # weights are stored K-padded; zero columns of x make the padding inert
        x2 = jnp.pad(x2, ((0, 0), (0, kp - k)))
    operands = [x2]
    if scheme in ("w8a8", "fp8"):
        xq, x_scale = quantize_activations(x2, scheme)
        operands = [xq]
    bm = m if m <= block_sizes.block_m else block_sizes.block_m
    bn = n if n <= block_sizes.block_n else block_sizes.block_n
    bk = INT4_TILE_K if scheme == "w4a16" else _pick_block_k(kp, block_sizes.block_k)
    grid = (pl.cdiv(m, bm), pl.cdiv(n, bn), kp // bk)

    in_specs = [pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
                pl.BlockSpec((bk // 8 if scheme == "w4a16" else bk, bn), lambda i, j, kk: (kk, j))]
    operands.append(qw.packed)
    if scheme == "w4a16" and qw.group_size != -1:  # this K step's groups
        scale_spec = pl.BlockSpec((bk // qw.group_size, bn), lambda i, j, kk: (kk, j))
    else:
        scale_spec = pl.BlockSpec((1, bn), lambda i, j, kk: (0, j))
    in_specs.append(scale_spec)
    operands.append(qw.scales)
    if qw.zeros is not None:
        in_specs.append(scale_spec)
        operands.append(qw.zeros)
    if scheme in ("w8a8", "fp8"):
        in_specs.append(pl.BlockSpec((bm, 1), lambda i, j, kk: (i, 0)))
        operands.append(x_scale)
    if bias is not None:
        in_specs.append(pl.BlockSpec((1, bn), lambda i, j, kk: (0, j)))
        operands.append(bias.astype(jnp.float32).reshape(1, n))

    kernel = functools.partial(
        _quant_matmul_kernel, scheme=scheme, group_size=qw.group_size, has_zeros=qw.zeros is not None,
        has_bias=bias is not None, num_k_steps=grid[2],
        precision=lax.Precision.HIGHEST if x2.dtype == jnp.float32 else None)
    acc_dtype = jnp.int32 if scheme == "w8a8" else jnp.float32
    itemsize = jnp.dtype(x2.dtype).itemsize
    cost = pl.CostEstimate(flops=2 * m * n * kp, transcendentals=0,
                           bytes_accessed=qw.nbytes * grid[0] + m * kp * itemsize * grid[1] + m * n * itemsize)
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
        out_shape=jax.ShapeDtypeStruct((m, n), x2.dtype),
        scratch_shapes=[pltpu.VMEM((bm, bn), acc_dtype)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        cost_estimate=cost,
        interpret=interpret,
    )(*operands)


# --------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------

def _tpu_unavailable_reason(x, qw: QuantizedWeight) -> Optional[str]:
    if jnp.dtype(x.dtype) == jnp.float16:
        return "TPUs have no float16 matmul path; use bfloat16"
    return None


@functools.partial(jax.jit, static_argnames=("impl", "block_sizes"))
def _run(x, qw, bias, *, impl, block_sizes):
    if impl == "reference":
        return quant_matmul_reference(x, qw, bias)
    interpret = _dispatch.interpret_params() if impl == "interpret" else False
    x2 = x.reshape(-1, qw.k)
    if qw.perm is not None:  # gather the activation columns once, never the weight
        x2 = x2[:, qw.perm]
    if impl == "gpu":
        out = gpu_quant.quant_matmul_gpu(x2, qw, bias)
    else:
        out = quant_matmul_tpu(x2, qw, bias, block_sizes=block_sizes, interpret=interpret)
    return out.reshape(*x.shape[:-1], qw.n)


def quant_matmul(x: jax.Array, qw: QuantizedWeight, bias: Optional[jax.Array] = None, *,
                 block_sizes: Optional[QuantBlockSizes] = None, backend: str = "auto") -> jax.Array:
    """Multiply activations by a quantized weight: ``x @ W^T + bias``.

    Args:
        x: ``[..., K]`` float16, bfloat16 or float32. For "w8a8" and "fp8" weights x is
            quantized per token (per row of the flattened ``[M, K]``) on the fly.
        qw: the quantized ``[N, K]`` weight (:func:`quantize_weight`,
            :meth:`QuantizedWeight.from_packed`).
        bias: ``[N]`` in x's dtype, or None (added in float32 before the cast).
        block_sizes: :class:`QuantBlockSizes` for the TPU kernel; default per TPU generation.
        backend: "auto" (default), "tpu", "interpret", "gpu" or "reference".

    Returns:
        ``[..., N]`` in x's dtype.
    """
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"qw must be a QuantizedWeight (see lepton_kernels.jax.quantize_weight), "
                        f"got {type(qw).__name__}")
    x = V.check_array("x", x, dtypes=V.FLOAT_DTYPES)
    if x.ndim == 0:
        raise ValueError(f"x must have shape (..., K={qw.k}), got a 0-d array")
    if x.shape[-1] != qw.k:
        raise ValueError(f"x must have shape (..., K={qw.k}) (K = input channels of qw), got {tuple(x.shape)}")
    if bias is not None:
        bias = V.check_array("bias", bias, ndim=1)
        V.check_same_dtype("bias", bias, "x", x)
        V.check_shape("bias", bias, (qw.n,), "(one value per output channel of qw)")
    if block_sizes is not None and not isinstance(block_sizes, QuantBlockSizes):
        raise TypeError(f"block_sizes must be a QuantBlockSizes or None, got {type(block_sizes).__name__}")
    gpu_reason = functools.partial(gpu_quant.unavailable_reason, x, qw)
    impl = _dispatch.select("quant_matmul", backend, _tpu_unavailable_reason(x, qw), gpu_reason)
    if x.size == 0:
        return jnp.zeros((*x.shape[:-1], qw.n), x.dtype)
    return _run(x, qw, bias, impl=impl, block_sizes=block_sizes)

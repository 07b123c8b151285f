"""``quant_matmul`` for Hopper GPUs: a Pallas Mosaic GPU kernel and its wrapper.

The kernel reads :class:`~lepton_kernels.jax.QuantizedWeight`'s packed layout as it is
(K-major ``[Kp, N]`` int8/e4m3, or int32 nibble planes for w4a16) and computes the output
transposed, ``out^T = W x^T``: the dequantized weight tile is wgmma's A operand, straight from
registers, and the tokens are its N dimension (8 to 256 wide). A decode step (M = 1..16) thus
pads the tokens to 8 or 16, not to wgmma's 64 rows, and the dequantized weight never goes back
to shared memory.

Kernel outline (one CUDA block per ``(K split, N tile, M tile)``, three warpgroups):

* warpgroup 2 is the producer: per K step it TMA-copies the activation tile and each
  consumer's weight tile (plus, for w4a16 groups, its scale and zero rows) into one of
  ``num_stages`` shared-memory slots, re-filling a slot once both consumers released it;
* warpgroups 0 and 1 each own ``block_n / 2`` output channels. Per K step a consumer loads
  its weight tile transposed (channels x K) into registers, dequantizes it to 16 bits, and
  runs ``acc[channels, tokens] += W x^T`` with wgmma (float32 accumulation). The epilogue
  applies the per-channel weight scale, the per-token activation scale and the bias, and
  writes the tile transposed through shared memory into ``out [M, N]``.

Dequantization per scheme (the 16-bit operand dtype is ``compute dtype`` below):

* w8a16: int8 -> x's dtype (exact); the channel scale is applied in the epilogue.
* w8a8: x is quantized per token in a jnp pre-pass (the reference's rule) and fed as bfloat16,
  which holds int8 values exactly; int8 weights -> bfloat16. Products are exact and summed in
  float32, so this equals int8 x int8 with int32 accumulation up to float32 rounding of sums
  beyond 2^24, at the 16-bit tensor-core rate (half the s8 rate; it matters for prefill only).
  Native s8/e4m3 wgmma takes both operands K-major only (the weight as ``[N, K]``), and
  Mosaic GPU cannot transpose 8-bit register tiles: the stored ``[K, N]`` layout would need a
  transpose of the whole weight per call.
* fp8: likewise with e4m3 activations fed as float16 (e4m3 is exact in float16) and e4m3
  weights -> float16 (``cvt.f16x2.e4m3x2``).
* w4a16: nibble plane ``j`` of a packed ``[P, n]`` tile holds K rows ``128 j + p``: one
  TMA of ``P`` packed rows brings 8 slices of ``P`` consecutive K rows, each multiplied with
  its own ``P``-column slice of x (8 activation copies per stage). A nibble becomes float32
  without an integer conversion (``u | 0x4B000000`` is the float ``2^23 + u``), minus
  ``2^23 + zero``, times the group's scale (one scale row per plane and step: ``P`` divides
  the group size), rounded once to x's dtype; per-channel scales wait for the epilogue.

Shapes: x rows are padded to a multiple of ``block_m`` and x columns to the weight's padded K
(zero columns make the padded weight rows inert), so every copy is in bounds; N must be a multiple
of ``block_n``. Small grids split K (``split_k``) and sum float32 partials in jnp.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import _mosaic

CONSUMERS = 2  # compute warpgroups per block, each with block_n / 2 output channels
SMEM_BYTES = 227 * 1024  # opt-in shared memory per block on H100/H200
ACT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
INT4_PLANES = 8
INT4_PLANE_ROWS = 128  # K rows per nibble plane of a packed 1024-row tile (see ops.quant_matmul)
FLOAT_2_23 = 8388608.0  # bits 0x4B000000: the float 2^23, whose last mantissa bits count units
ROW_VECTOR_MIN = 32  # float32 entries per per-token vector copy (copies move multiples of 128 bytes)
DEFAULT_NUM_SMS = 132  # H100/H200 SXM; only when no GPU is visible (exporting)


@dataclasses.dataclass(frozen=True)
class GpuQuantConfig:
    """Tile sizes of the Mosaic GPU kernel.

    ``block_m`` tokens per block (wgmma's N: a multiple of 8, at most 256), ``block_n`` output
    channels per block (two consumer warpgroups of ``block_n / 2``, a multiple of 64),
    ``block_k`` K rows per pipeline stage, ``num_stages`` stages in flight, ``split_k``
    blocks sharing one output tile's K range (their float32 partials are summed after).

    ``block_k`` is a multiple of 64 that divides the stored K for the 8-bit schemes. For w4a16
    a step is ``block_k / 8`` packed rows (all 8 nibble planes of them): 16, 32, 64 or 128
    rows, which must divide the group size, so that each plane of a step has one scale row.

    Registers bound the tiles: a consumer keeps the float32 accumulator ``(block_n/2) x
    block_m`` (``block_n*block_m/256`` registers per lane) plus its weight tile and the
    dequantized copy. Shared memory holds ``num_stages`` x (x tile + weight tiles + group rows)
    and the output tile (:func:`smem_bytes`).
    """

    block_m: int = 16
    block_n: int = 128
    block_k: int = 128
    num_stages: int = 4
    split_k: int = 1

    def __post_init__(self):
        if not 8 <= self.block_m <= 256 or self.block_m % 8:
            raise ValueError(f"block_m must be a multiple of 8 in [8, 256] (wgmma N), got {self.block_m}")
        if self.block_n <= 0 or self.block_n % (64 * CONSUMERS) or self.block_n > 256:
            raise ValueError(f"block_n must be 128 or 256 ({CONSUMERS} warpgroups x a multiple of 64 rows), "
                             f"got {self.block_n}")
        if self.block_k <= 0 or self.block_k % 64:
            raise ValueError(f"block_k must be a positive multiple of 64, got {self.block_k}")
        if self.num_stages < 2:
            raise ValueError(f"num_stages must be at least 2, got {self.num_stages}")
        if self.split_k < 1:
            raise ValueError(f"split_k must be at least 1, got {self.split_k}")

    @property
    def n_per_wg(self) -> int:
        return self.block_n // CONSUMERS


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What one call needs to know, all static: scheme details, step geometry, operand set."""

    scheme: str
    int4: bool
    grouped: bool  # w4a16 with a scale (and zero) row per group and plane
    group_size: int
    has_zeros: bool
    act_scaled: bool  # w8a8 / fp8: per-token activation scale in the epilogue
    channel_scaled: bool  # per-channel weight scale in the epilogue
    has_bias: bool
    rows: int  # packed weight rows per step (int4: P, also x columns per plane; else block_k)
    steps: int  # K steps per block (after the split)
    compute_dtype: jnp.dtype
    out_dtype: jnp.dtype


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def compute_dtype(scheme: str, x_dtype) -> jnp.dtype:
    """The 16-bit dtype both wgmma operands take for ``scheme`` (module docstring)."""
    if scheme == "w8a8":
        return jnp.dtype(jnp.bfloat16)
    if scheme == "fp8":
        return jnp.dtype(jnp.float16)
    return jnp.dtype(x_dtype)


def _swizzle(row_bytes: int) -> int:
    for swizzle in (128, 64, 32):
        if row_bytes % swizzle == 0:
            return swizzle
    raise ValueError(f"rows of {row_bytes} bytes cannot be swizzled")


def _smem_bytes(rows: int, config: GpuQuantConfig, *, int4: bool, grouped: bool, has_zeros: bool,
                out_bytes: int) -> int:
    n_wg, bm = config.n_per_wg, config.block_m
    x_bytes = bm * rows * 2 * (INT4_PLANES if int4 else 1)
    w_bytes = CONSUMERS * rows * n_wg * (4 if int4 else 1)
    s_bytes = CONSUMERS * INT4_PLANES * n_wg * 4 * (1 + has_zeros) if grouped else 0
    stage = x_bytes + w_bytes + s_bytes
    epilogue = CONSUMERS * (bm * n_wg * out_bytes + 3 * n_wg * 4 + _round_up(bm, ROW_VECTOR_MIN) * 4)
    return config.num_stages * stage + epilogue + 2048  # barriers and Mosaic's own scratch


def smem_bytes(config: GpuQuantConfig, scheme: str, *, group_size: int = -1, symmetric: bool = True,
               out_dtype=jnp.bfloat16, split: Optional[bool] = None) -> int:
    """Shared memory a block of ``config`` needs for ``scheme`` (bytes)."""
    int4 = scheme == "w4a16"
    rows = config.block_k // INT4_PLANES if int4 else config.block_k
    out_bytes = 4 if (config.split_k > 1 if split is None else split) else jnp.dtype(out_dtype).itemsize
    return _smem_bytes(rows, config, int4=int4, grouped=int4 and group_size != -1,
                       has_zeros=int4 and not symmetric, out_bytes=out_bytes)


@functools.lru_cache(maxsize=None)
def num_sms() -> int:
    """Streaming multiprocessors of the default GPU (132 where none is visible)."""
    try:
        count = getattr(jax.devices("gpu")[0], "core_count", None)
    except Exception:  # RuntimeError: no GPU backend
        count = None
    return int(count) if count else DEFAULT_NUM_SMS


def _pick_split(tiles: int, steps: int, min_steps: int, sms: int) -> int:
    """The smallest K split whose blocks keep 3/4 of the SM slots of their waves busy (fewest
    float32 partials), else the split that fills them best; each split keeps ``min_steps``."""
    def fill(split):
        blocks = tiles * split
        return blocks / (-(-blocks // sms) * sms)

    options = [s for s in range(1, steps + 1) if steps % s == 0 and (s == 1 or steps // s >= min_steps)]
    for split in options:
        if fill(split) >= 0.75:
            return split
    return max(options, key=fill)


def default_config(scheme: str, m: int, n: int, k_padded: int, *, group_size: int = -1,
                   symmetric: bool = True, out_dtype=jnp.bfloat16, sms: Optional[int] = None) -> GpuQuantConfig:
    """Tile sizes for an ``[m, k] x [k, n]`` call (``k_padded``: the weight's stored K).

    Decode (m <= 64) is bound by the weight stream: tokens are padded to a multiple of 8 only,
    128 channels per block, K split until the blocks fill the SMs, and as many stages as shared
    memory holds (100+ KiB of weights in flight per SM). Larger m trades that for wgmma width:
    128 tokens per block, and 256 channels (8-bit weights) once that alone fills the GPU, which
    halves how often x is re-read; otherwise 128 channels and a K split (float32 partials).
    """
    int4 = scheme == "w4a16"
    sms = sms or num_sms()
    if m <= 64:
        block_m, block_n, block_k = _round_up(max(m, 1), 8), 128, (256 if int4 else 128)
    else:
        block_m = 128 if m > 96 else _round_up(m, 8)
        block_k = 128 if int4 else 64
        wide_tiles = (n // 256) * (-(-m // block_m)) if n % 256 == 0 else 0
        block_n = 256 if not int4 and wide_tiles >= sms else 128
    if int4 and group_size != -1:
        block_k = min(block_k, INT4_PLANES * group_size)
    total_steps = k_padded // block_k
    tiles = (n // block_n) * (-(-m // block_m))
    split = _pick_split(tiles, total_steps, min_steps=4, sms=sms)
    steps = total_steps // split
    config = GpuQuantConfig(block_m, block_n, block_k, num_stages=2, split_k=split)
    stages = 2
    for candidate in range(8, 1, -1):
        trial = dataclasses.replace(config, num_stages=candidate)
        if smem_bytes(trial, scheme, group_size=group_size, symmetric=symmetric, out_dtype=out_dtype) <= SMEM_BYTES:
            stages = candidate
            break
    return dataclasses.replace(config, num_stages=max(2, min(stages, steps)))


def unavailable_reason(x, qw, *, check_device: bool = True) -> Optional[str]:
    """None when :func:`quant_matmul_gpu` serves ``x @ qw`` (x ``[..., K]``), else why not."""
    scheme = qw.scheme
    x_dtype = jnp.dtype(x.dtype)
    if scheme in ("w4a16", "w8a16") and x_dtype not in ACT_DTYPES:
        return (f"the Mosaic GPU kernel takes float16/bfloat16 activations for {scheme} (wgmma), "
                f"got {x_dtype.name}")
    if qw.n % (64 * CONSUMERS):
        return f"the Mosaic GPU kernel needs N (output channels) to be a multiple of {64 * CONSUMERS}, got {qw.n}"
    return _mosaic.device_reason() if check_device else _mosaic.bindings_reason()


# --------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------

def _quant_matmul_kernel(*refs, plgpu, plan: _Plan, config: GpuQuantConfig, compiled: bool):
    """One block: ``block_n`` output channels x ``block_m`` tokens over one K split."""
    refs = list(refs)
    x_ref, w_ref = refs.pop(0), refs.pop(0)
    s4_ref = refs.pop(0) if plan.grouped else None
    z4_ref = refs.pop(0) if plan.grouped and plan.has_zeros else None
    col_refs = [refs.pop(0) for _ in range(plan.channel_scaled + (plan.has_zeros and not plan.grouped)
                                           + plan.has_bias)]
    row_scale_ref = refs.pop(0) if plan.act_scaled else None
    out_ref = refs.pop(0)
    x_smem, w_smem, s_smem, z_smem, col_smem, row_smem, o_smem, ready, free, epi_ready = refs

    bm, n_wg, stages, rows = config.block_m, config.n_per_wg, config.num_stages, plan.rows
    steps = plan.steps
    split, n_tile, m_tile = lax.axis_index("split"), lax.axis_index("n"), lax.axis_index("m")
    wg = lax.axis_index("wg")
    m0 = m_tile * bm
    n0 = n_tile * config.block_n
    first_step = split * steps

    def layout(value, kind):  # register layouts only matter to the compiler; the interpreter lacks them
        return plgpu.layout_cast(value, kind) if compiled else value

    def load_vector(ref, along_channels: bool):
        """A float32 vector from shared memory, laid out to broadcast over the accumulator."""
        if not compiled:
            return ref[...]
        return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(1 if along_channels else 0))

    def load_weight_t(ref):
        """The ``[rows, n_wg]`` weight tile transposed: ``[n_wg, rows]`` (channels x K).

        It arrives in the transposed wgmma layout; only 16- and 32-bit values convert to the
        wgmma A-operand layout, so 8-bit tiles are converted to 16 bits first."""
        if not compiled:
            return ref[...].T
        return plgpu.load(plgpu.transpose_ref(ref, (1, 0)), (), layout=plgpu.Layout.WGMMA_TRANSPOSED)

    # ---- producer ---------------------------------------------------------------------------
    def issue_step(i, slot):
        step = first_step + i
        if plan.int4:
            tile_idx = lax.div(step * rows, jnp.int32(INT4_PLANE_ROWS))
            p0 = lax.rem(step * rows, jnp.int32(INT4_PLANE_ROWS))
            for j in range(INT4_PLANES):
                cols = pl.ds(tile_idx * (INT4_PLANES * INT4_PLANE_ROWS) + j * INT4_PLANE_ROWS + p0, rows)
                plgpu.copy_gmem_to_smem(x_ref.at[pl.ds(m0, bm), cols], x_smem.at[slot, j], ready.at[slot])
        else:
            plgpu.copy_gmem_to_smem(x_ref.at[pl.ds(m0, bm), pl.ds(step * rows, rows)], x_smem.at[slot],
                                    ready.at[slot])
        for c in range(CONSUMERS):
            channels = pl.ds(n0 + c * n_wg, n_wg)
            plgpu.copy_gmem_to_smem(w_ref.at[pl.ds(step * rows, rows), channels], w_smem.at[slot, c],
                                    ready.at[slot])
            if plan.grouped:  # the 8 planes' group rows of this step: [tile, plane, group in plane]
                group = lax.div(p0, jnp.int32(plan.group_size))
                plgpu.copy_gmem_to_smem(s4_ref.at[tile_idx, :, group, channels], s_smem.at[slot, c], ready.at[slot])
                if plan.has_zeros:
                    plgpu.copy_gmem_to_smem(z4_ref.at[tile_idx, :, group, channels], z_smem.at[slot, c],
                                            ready.at[slot])

    @pl.when(wg == CONSUMERS)
    def _producer():
        if compiled:
            plgpu.set_max_registers(40, action="decrease")
        for i in range(min(stages, steps)):
            issue_step(i, i)

        @pl.loop(stages, steps)
        def _refill(i):
            slot = lax.rem(i, jnp.int32(stages))
            plgpu.barrier_wait(free.at[slot])
            issue_step(i, slot)

        @pl.loop(max(steps - stages, 0), steps)
        def _drain(i):  # wait for the last releases too: no barrier phase goes unobserved
            plgpu.barrier_wait(free.at[lax.rem(i, jnp.int32(stages))])

    # ---- consumers --------------------------------------------------------------------------
    @pl.when(wg < CONSUMERS)
    def _consumer():
        if compiled:
            plgpu.set_max_registers(232, action="increase")
        my_channels = pl.ds(n0 + wg * n_wg, n_wg)
        for v, ref in enumerate(col_refs):  # epilogue (and per-channel zero) vectors, once per block
            plgpu.copy_gmem_to_smem(ref.at[my_channels], col_smem.at[wg, v], epi_ready.at[wg])
        if row_scale_ref is not None:
            plgpu.copy_gmem_to_smem(row_scale_ref.at[pl.ds(m0, row_smem.shape[-1])], row_smem.at[wg],
                                    epi_ready.at[wg])
        has_epi = bool(col_refs) or row_scale_ref is not None
        if has_epi:
            plgpu.barrier_wait(epi_ready.at[wg])
        vectors = {}
        v = 0
        for name, present in (("scale", plan.channel_scaled), ("zero", plan.has_zeros and not plan.grouped),
                              ("bias", plan.has_bias)):
            if present:
                vectors[name] = col_smem.at[wg, v]
                v += 1

        cdt = plan.compute_dtype

        def channel_bcast(vec, shape):
            return lax.broadcast_in_dim(vec, shape, (0,))

        zero_bias = None  # per-channel zeros: 2^23 + zero, subtracted in dequant
        if "zero" in vectors:
            zero_bias = load_vector(vectors["zero"], True) + FLOAT_2_23

        def dequant_plane(packed, j, slot):
            """Nibble plane ``j`` of the packed tile as compute-dtype ``[n_wg, P]`` weights."""
            bits = packed if j == 0 else lax.shift_right_logical(packed, jnp.int32(4 * j))
            f = lax.bitcast_convert_type((bits & 0xF) | 0x4B000000, jnp.float32)  # 2^23 + u, exact
            if plan.grouped:
                if plan.has_zeros:
                    zero = load_vector(z_smem.at[slot, wg, j], True) + FLOAT_2_23
                    w = f - channel_bcast(zero, f.shape)
                else:
                    w = f - (FLOAT_2_23 + 8.0)
                w = w * channel_bcast(load_vector(s_smem.at[slot, wg, j], True), f.shape)
            elif zero_bias is not None:
                w = f - channel_bcast(zero_bias, f.shape)
            else:
                w = f - (FLOAT_2_23 + 8.0)  # small integers: exact in 16 bits, scaled in the epilogue
            return w.astype(cdt)

        def dequant_8bit(wq):
            if plan.scheme == "w8a16" and cdt == jnp.float16:
                # int8 -> bfloat16 has a 2-instruction path; bfloat16 -> float32 is a shift.
                return wq.astype(jnp.bfloat16).astype(jnp.float32).astype(cdt)
            return wq.astype(cdt)

        def step(i, acc):
            slot = lax.rem(i, jnp.int32(stages))
            plgpu.barrier_wait(ready.at[slot])
            tile = load_weight_t(w_smem.at[slot, wg])
            if plan.int4:
                tile = layout(tile, plgpu.Layout.WGMMA)
                operands = [(dequant_plane(tile, j, slot), x_smem.at[slot, j]) for j in range(INT4_PLANES)]
            else:
                operands = [(layout(dequant_8bit(tile), plgpu.Layout.WGMMA), x_smem.at[slot])]
            for a, x_tile in operands:
                if compiled:
                    plgpu.wgmma(acc, a, plgpu.transpose_ref(x_tile, (1, 0)))
                else:  # the interpreter has no register wgmma operands
                    acc = acc + lax.dot_general(a, x_tile[...], (((1,), (1,)), ((), ())),
                                                preferred_element_type=jnp.float32)
            if compiled:
                plgpu.wgmma_wait(0)
            plgpu.barrier_arrive(free.at[slot])
            return acc

        if compiled:
            def run(acc_ref):
                @pl.loop(0, steps)
                def _steps(i):
                    step(i, acc_ref)

                return acc_ref[...]

            acc = pl.run_scoped(run, plgpu.ACC((n_wg, bm), jnp.float32))
        else:
            acc = lax.fori_loop(0, steps, step, jnp.zeros((n_wg, bm), jnp.float32))

        if "scale" in vectors:
            acc = acc * channel_bcast(load_vector(vectors["scale"], True), acc.shape)
        if row_scale_ref is not None:
            acc = acc * lax.broadcast_in_dim(load_vector(row_smem.at[wg, :bm], False), acc.shape, (1,))
        if "bias" in vectors:
            acc = acc + channel_bcast(load_vector(vectors["bias"], True), acc.shape)
        out = acc.astype(plan.out_dtype)
        if compiled:
            plgpu.transpose_ref(o_smem.at[wg], (1, 0))[...] = layout(out, plgpu.Layout.WGMMA_TRANSPOSED)
        else:
            o_smem.at[wg][...] = out.T
        plgpu.commit_smem()
        dst = out_ref.at[split] if config.split_k > 1 else out_ref
        plgpu.copy_smem_to_gmem(o_smem.at[wg], dst.at[pl.ds(m0, bm), my_channels])
        plgpu.wait_smem_to_gmem(0)


# --------------------------------------------------------------------------------------------
# Wrapper
# --------------------------------------------------------------------------------------------

def _transforms(plgpu, row_bytes: int, itemsize: int):
    swizzle = _swizzle(row_bytes)
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def quant_matmul_gpu(x2, qw, bias=None, *, config: Optional[GpuQuantConfig] = None, interpret=None):
    """x2 ``[M, K]`` (stored channel order) -> ``[M, N]`` in x2's dtype.

    The caller checks :func:`unavailable_reason` first; this only traces the kernel (and the
    jnp pre/post-passes: activation quantization, padding, the split-K sum).
    ``interpret``: Pallas' Mosaic GPU interpreter parameters, to run on a CPU (slow; tests).
    """
    from ..ops import quant_matmul as qm  # the op module imports this one

    m, k = x2.shape
    n, scheme = qw.n, qw.scheme
    int4 = scheme == "w4a16"
    kp = qw.packed.shape[0] * (INT4_PLANES if int4 else 1)
    grouped = int4 and qw.group_size != -1
    config = config or default_config(scheme, m, n, kp, group_size=qw.group_size, symmetric=qw.symmetric,
                                      out_dtype=x2.dtype)
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    rows = bk // INT4_PLANES if int4 else bk
    if n % bn:
        raise ValueError(f"N={n} must be a multiple of block_n={bn}")
    if int4 and (INT4_PLANE_ROWS % rows or rows % 16 or (grouped and qw.group_size % rows)):
        raise ValueError(f"w4a16 needs block_k/8 ({rows}) to be a multiple of 16 that divides 128"
                         + (f" and the group size {qw.group_size}" if grouped else ""))
    total_steps = kp // bk
    if kp % bk or total_steps % config.split_k:
        raise ValueError(f"block_k={bk} x split_k={config.split_k} must divide the stored K={kp}")
    steps = total_steps // config.split_k
    split = config.split_k > 1
    out_dtype = jnp.dtype(jnp.float32) if split else jnp.dtype(x2.dtype)
    needed = _smem_bytes(rows, config, int4=int4, grouped=grouped, has_zeros=qw.zeros is not None,
                         out_bytes=out_dtype.itemsize)
    if needed > SMEM_BYTES:
        raise ValueError(f"{config} needs {needed} bytes of shared memory for {scheme}; the limit is {SMEM_BYTES}")
    cdt = compute_dtype(scheme, x2.dtype)

    # Activations: quantized per token for w8a8/fp8 (exact in the 16-bit compute dtype), rows
    # padded to the tile, columns to the stored K.
    row_scale = None
    if scheme in ("w8a8", "fp8"):
        xq, row_scale = qm.quantize_activations(x2, scheme)
        xk = xq.astype(cdt)
        row_scale = row_scale.reshape(m)
    else:
        xk = x2.astype(cdt)
    mp = _round_up(m, bm)
    if mp != m or kp != k:
        xk = jnp.pad(xk, ((0, mp - m), (0, kp - k)))
    row_len = _round_up(bm, ROW_VECTOR_MIN)  # a copy moves a multiple of 128 bytes
    if row_scale is not None:
        row_scale = jnp.pad(row_scale, (0, mp - m + row_len - bm))

    operands = [xk, qw.packed]
    if grouped:  # [G, N] -> [tiles, plane, group in plane, N]: one strided TMA per step
        per_plane = INT4_PLANE_ROWS // qw.group_size
        shape4 = (kp // (INT4_PLANES * INT4_PLANE_ROWS), INT4_PLANES, per_plane, n)
        operands.append(qw.scales.reshape(shape4))
        if qw.zeros is not None:
            operands.append(qw.zeros.reshape(shape4))
    channel_scaled = not grouped
    if channel_scaled:
        operands.append(qw.scales.reshape(n))
    if int4 and not grouped and qw.zeros is not None:
        operands.append(qw.zeros.reshape(n))
    fuse_bias = bias is not None and not split
    if fuse_bias:
        operands.append(bias.astype(jnp.float32))
    if row_scale is not None:
        operands.append(row_scale)

    plan = _Plan(scheme=scheme, int4=int4, grouped=grouped, group_size=qw.group_size,
                 has_zeros=qw.zeros is not None, act_scaled=row_scale is not None, channel_scaled=channel_scaled,
                 has_bias=fuse_bias, rows=rows, steps=steps, compute_dtype=cdt, out_dtype=out_dtype)

    plgpu = _mosaic.plgpu()
    n_wg, stages = config.n_per_wg, config.num_stages
    w_itemsize = jnp.dtype(qw.packed.dtype).itemsize
    x_tf = _transforms(plgpu, rows * 2, 2)
    x_shape = (stages, INT4_PLANES, bm, rows) if int4 else (stages, bm, rows)
    out_tf = _transforms(plgpu, n_wg * out_dtype.itemsize, out_dtype.itemsize)
    num_col = channel_scaled + (int4 and not grouped and qw.zeros is not None) + fuse_bias
    copies_per_step = (INT4_PLANES if int4 else 1) + CONSUMERS * (1 + grouped + (grouped and qw.zeros is not None))
    scratch = (
        plgpu.SMEM(x_shape, cdt, transforms=x_tf),
        plgpu.SMEM((stages, CONSUMERS, rows, n_wg), qw.packed.dtype,
                   transforms=_transforms(plgpu, n_wg * w_itemsize, w_itemsize)),
        plgpu.SMEM((stages, CONSUMERS, INT4_PLANES, n_wg), jnp.float32) if grouped else None,
        plgpu.SMEM((stages, CONSUMERS, INT4_PLANES, n_wg), jnp.float32) if grouped and qw.zeros is not None else None,
        plgpu.SMEM((CONSUMERS, num_col, n_wg), jnp.float32) if num_col else None,
        plgpu.SMEM((CONSUMERS, row_len), jnp.float32) if row_scale is not None else None,
        plgpu.SMEM((CONSUMERS, bm, n_wg), out_dtype, transforms=out_tf),
        plgpu.Barrier(num_arrivals=copies_per_step, num_barriers=stages),  # ready
        plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),  # free
        plgpu.Barrier(num_arrivals=max(num_col + (row_scale is not None), 1), num_barriers=CONSUMERS),  # epi_ready
    )
    out_shape = (config.split_k, mp, n) if split else (mp, n)
    body = functools.partial(_quant_matmul_kernel, plgpu=plgpu, plan=plan, config=config,
                             compiled=interpret is None)
    out = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct(out_shape, out_dtype),
        scratch_types=scratch,
        grid=(config.split_k, n // bn, mp // bm),  # M tiles fastest: they share a weight tile in L2
        grid_names=("split", "n", "m"),
        num_threads=CONSUMERS + 1,
        thread_name="wg",
        **({} if interpret is None else dict(interpret=interpret)),
    )(*operands)
    if split:
        out = out.sum(axis=0)
        if bias is not None:
            out = out + bias.astype(jnp.float32)
        out = out.astype(x2.dtype)
    return out[:m] if mp != m else out

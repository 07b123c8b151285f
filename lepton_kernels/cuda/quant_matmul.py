"""Launch the compiled quantized matmul for a few tokens (``csrc/quant/quant_gemv.h``).

Serves w4a16 (``int4_k8``: group sizes 32, 64, 128 or per channel, with or without zero points),
w8a16 (``rowmajor`` int8), and w8a8 / fp8 (``rowmajor`` int8 / e4m3, fp8 on sm_89 or newer) for
float16/bfloat16 activations and M <= 16 tokens, the memory-bound decode case where every weight
byte is read once; larger batches go to the Triton kernels (``supports`` says so, and "auto"
moves on). w8a8 and fp8 first quantize the activations per token (``quantize_rows``, bit for bit
the reference's) into float16 values, exact for int8 and e4m3 alike, so their GEMV is w8a16's on
float16 tensor cores with both scales in the epilogue; on sm_90 it is launched as a programmatic
dependent of the quantization, so its first weight loads, and L2 prefetches of the next few
steps, overlap it (``Plan.pdl``, ``Plan.l2_steps``).

The block plan (how many blocks along N and along K) is chosen here, from the shapes and the SM
count, so it can be tuned without rebuilding: a block's 8 warps each own ``Plan.rows_per_warp``
weight rows (``rows_per_warp_choices``), some side by side along N (``warps_n``), the rest
splitting its K range; when the row tiles alone cannot fill the GPU, K is also split across blocks, whose
fp32 partials the last block of each row tile sums (in split order: deterministic) through a
workspace and a per-stream counter buffer that the kernel leaves at zero (CUDA-graph safe;
concurrent calls must be on different streams, and a graph uses the counters of the stream
it was captured on, so its replays must not overlap calls on that stream).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Dict, List, Optional, Tuple

import torch

from .._backends import is_compiling, trace_as_constant
from .._splits import current_capability, current_sm_count
from . import DTYPE_CODES, _C, current_stream

MAX_M = 16  # kQuantGemvMaxM in quant_gemv.h
STEP_K = 128  # input channels per warp step
WARPS = 8
BLOCKS_PER_SM = 2  # resident blocks per SM at the kernel's register budget
MAX_SPLITS = 32
FULL_FRACTION = 0.75  # w8a16: of the resident slots, row tiles filling this many are not split
ROWS_FULL_FRACTION = 0.7  # the most rows per warp once their row tiles fill this many slots
SPLIT_COST_STEPS = 2  # w4a16: a split's partial and combine, in warp steps
COUNTERS_MIN = 1 << 12
_VEC = {"w4a16": 4, "w8a16": 16, "w8a8": 16, "fp8": 16}  # packed elements per 16 bytes
_LAYOUTS = {"w4a16": "int4_k8", "w8a16": "rowmajor", "w8a8": "rowmajor", "fp8": "rowmajor"}
_K_MULTIPLE = {"w4a16": 32, "w8a16": 16, "w8a8": 16, "fp8": 16}  # input channels per 16-byte load
DYNAMIC = ("w8a8", "fp8")  # activations quantized per token; the weights read as w8a16's
# w8a8/fp8 on sm_90: overlap the GEMV's start with the quantization (Plan.pdl). H100, CUDA graphs,
# 14336x4096 / 4096x4096 / 4096x14336 at 1-16 tokens: PDL without L2 prefetch was the fastest
# variant everywhere (fp8 one token: 25.6 / 11.9 / 26.9 us; without PDL 26.4 / 12.9 / 28.7);
# prefetching 4, 8 or 16 steps into L2 while waiting cost 4-20%.
USE_PDL = True
L2_STEPS = 0  # with pdl: steps of weights each warp asks L2 for while it waits (Plan.l2_steps)


@dataclasses.dataclass(frozen=True)
class Plan:
    warps_n: int  # warps of a block side by side along N; the other warps split its K range
    row_tiles: int  # blocks along N
    splits: int  # blocks along K
    steps_per_split: int  # 128-channel steps per block along K
    prefetch: bool = True  # load a step's weights while the previous step computes
    pdl: bool = False  # w8a8/fp8: a programmatic dependent launch after the quantization (sm_90+)
    l2_steps: int = 0  # with pdl: 128-channel steps a warp prefetches into L2 before it waits
    rows_per_warp: int = 0  # weight rows a warp owns: one of rows_per_warp_choices(M, int4)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def rows_per_warp_choices(m: int, int4: bool) -> Tuple[int, int]:
    """(most, fewer) weight rows a warp may own (quant_gemv_rows_per_warp_choices in
    quant_gemv.h); equal for int4 above 8 tokens."""
    if not int4:
        return 32, 16
    return (64 if m <= 8 else 32), 32


def _rows_per_warp(m: int, n: int, int4: bool, slots: int) -> int:
    # The most rows (the most independent mma chains per warp), unless their row tiles leave
    # over 30% of the resident slots empty: then half as many, which spreads a short weight over
    # the SMs without splitting K. H100, CUDA graphs, us (most vs fewer), one token: w4a16
    # 4096x4096 8.7 vs 7.7, 6144x4096 10.3 vs 9.1, 4096x14336 17.9 vs 17.2, 14336x4096 15.3 vs
    # 16.0; w8a16 4096x4096 11.7 vs 10.1, 6144x4096 13.1 vs 13.9, 14336x4096 24.6 vs 26.2; 16
    # tokens, w8a16 (fp8): 14336x4096 28.6 (30.8) vs 32.3 (32.5), 6144x4096 16.7 (17.0) vs 18.0
    # (18.8).
    most, fewer = rows_per_warp_choices(m, int4)
    return most if _cdiv(n, most) >= ROWS_FULL_FRACTION * slots else fewer


def choose_plan(m: int, n: int, k: int, int4: bool, sm_count: int, warps_n: Optional[int] = None,
                splits: Optional[int] = None, prefetch: bool = True, pdl: bool = False,
                l2_steps: Optional[int] = None, rows_per_warp: Optional[int] = None) -> Plan:
    """The heuristic (``warps_n``/``splits``/``prefetch``/``pdl``/``l2_steps``/``rows_per_warp``
    force those choices: tests, tuning). ``pdl`` and ``l2_steps`` only matter to w8a8 and fp8,
    whose plan is otherwise w8a16's."""
    slots = BLOCKS_PER_SM * sm_count
    per_warp = _rows_per_warp(m, n, int4, slots) if rows_per_warp is None else rows_per_warp
    if per_warp not in rows_per_warp_choices(m, int4):
        raise ValueError(f"rows_per_warp must be one of {sorted(set(rows_per_warp_choices(m, int4)))} "
                         f"for M={m}, got {per_warp}")
    if warps_n is None:
        warps_n = _warps_n(n, per_warp, int4, slots)
    row_tiles = _cdiv(n, per_warp * warps_n)
    steps = _cdiv(k, STEP_K)
    if splits is None:
        splits = _splits(row_tiles, steps, WARPS // warps_n, sm_count, slots, int4)
    per_split = _cdiv(steps, max(1, min(splits, steps)))
    if l2_steps is None:
        l2_steps = L2_STEPS if pdl else 0
    return Plan(warps_n, row_tiles, _cdiv(steps, per_split), per_split, prefetch, pdl, l2_steps, per_warp)


def _warps_n(n: int, per_warp: int, int4: bool, slots: int) -> int:
    # One warp across: its block is one warp's rows with all 8 warps on K, the most blocks to
    # spread over the SMs (H100, 4096 x 4096 at 16 tokens: w4a16 (1, 1) 10.4 us vs (2, 4) 13.2;
    # w8a16 (1, 1) 12.2 us vs (4, 4) 16.0). When those blocks overflow one wave of resident
    # slots, the fewest warps across that fit one wave (6144 x 4096 w8a16 at 16 tokens: (2, 1)
    # 17.7 us vs (4, 2) 21.8; 14336 rows at 16 tokens: w4a16 (2, 1) 22.6 us, w8a16 (4, 1)
    # 31.2 us, the fastest measured).
    warps_n = 1
    while warps_n < WARPS and _cdiv(n, per_warp * warps_n) > slots:
        warps_n *= 2
    return warps_n


def _splits(row_tiles: int, steps: int, warps_k: int, sm_count: int, slots: int, int4: bool) -> int:
    if not int4:
        # w8a16: as many splits as one wave holds once the tiles leave most slots idle
        # (4096 x 14336 at one token: (1, 2) 26.5 us vs (1, 1) 28.6).
        if row_tiles >= FULL_FRACTION * slots:
            return 1
        most = max(1, steps // warps_k)
        return max(1, min(slots // row_tiles, most, MAX_SPLITS))
    # The split count (one wave of resident blocks at most, a step per warp at least) that
    # minimizes a block's busiest warp's steps plus what a split costs (the partial's round trip
    # and the combine, SPLIT_COST_STEPS); ties go to fewer splits. H100 measurements it matches
    # (us; 64 rows per warp up to 8 tokens): 4096 x 4096 at 1 token (1, 4) 8.7 vs (1, 1) 9.9,
    # at 16 tokens (1, 1) 10.4 vs (1, 2) 11.8; 4096 x 14336 at 1 token (1, 4) 17.6 vs (1, 2)
    # 19.7, at 16 tokens (1, 2) 23.8 vs (1, 1) 27.0; 6144 x 4096 at 1 token (1, 1) 10.3 vs
    # (1, 2) 10.7.
    most = max(1, min(slots // row_tiles, steps // warps_k, MAX_SPLITS))
    best, best_cost = 1, None
    for s in range(1, most + 1):
        cost = _cdiv(_cdiv(steps, s), warps_k) + (SPLIT_COST_STEPS if s > 1 else 0)
        if best_cost is None or cost < best_cost:
            best, best_cost = s, cost
    return best


_OVERRIDES: Dict[str, object] = {}
_OVERRIDABLE = ("warps_n", "splits", "prefetch", "pdl", "l2_steps", "rows_per_warp")


def set_plan_overrides(**fields) -> Dict[str, object]:
    """Force ``warps_n``, ``splits``, ``prefetch``, ``pdl``, ``l2_steps`` and/or ``rows_per_warp``
    on every following call (tests, tuning); no arguments clears them. Returns the previous
    overrides."""
    unknown = set(fields) - set(_OVERRIDABLE)
    if unknown:
        raise ValueError(f"unknown plan fields {sorted(unknown)} (known: {', '.join(_OVERRIDABLE)})")
    previous = dict(_OVERRIDES)
    _OVERRIDES.clear()
    _OVERRIDES.update(fields)
    return previous


@functools.lru_cache(maxsize=4096)
def _cached_plan(m: int, n: int, k: int, int4: bool, sm_count: int, pdl: bool) -> Plan:
    return choose_plan(m, n, k, int4, sm_count, pdl=pdl)


def _plan(m: int, n: int, k: int, int4: bool, device: torch.device, pdl: bool = False) -> Plan:
    sm_count = current_sm_count(device)
    if _OVERRIDES:
        return choose_plan(m, n, k, int4, sm_count, **dict({"pdl": pdl}, **_OVERRIDES))
    return _cached_plan(m, n, k, int4, sm_count, pdl)


# Split-K arrival counters, one buffer per (device, stream); the kernel leaves them at zero.
_COUNTERS: Dict[Tuple[int, int], torch.Tensor] = {}
# Outgrown buffers stay allocated: a captured CUDA graph may still point at one.
_RETIRED: List[torch.Tensor] = []


def _counters(device: torch.device, count: int) -> torch.Tensor:
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (index, current_stream(device))
    buf = _COUNTERS.get(key)
    if buf is not None and buf.numel() >= count:
        return buf
    if torch.cuda.is_current_stream_capturing():
        # Its zero fill is captured, not run: eager calls must not see this buffer, but the
        # graph zeroes it on every replay before the kernel.
        return torch.zeros(count, dtype=torch.int32, device=device)
    if buf is not None:
        _RETIRED.append(buf)
    buf = torch.zeros(max(count, COUNTERS_MIN), dtype=torch.int32, device=device)
    _COUNTERS[key] = buf
    return buf


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the kernel writes is allocated here (tests fill them with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _rows_aligned(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when its rows are 16-byte aligned with a unit inner stride, else a copy."""
    m = x.shape[0]
    if x.stride(1) == 1 and (m == 1 or x.stride(0) % 8 == 0) and x.data_ptr() % 16 == 0:
        return x
    out = torch.empty((m, x.shape[1]), dtype=x.dtype, device=x.device)
    return out.copy_(x)


@trace_as_constant
def _fp8_reason(device: torch.device) -> Optional[str]:
    major, minor = current_capability(device)
    if (major, minor) < (8, 9):
        return f"the CUDA fp8 kernel converts e4m3 on compute capability 8.9 or newer, this GPU is {major}.{minor}"
    return None


def supports(x, packed, scales, zeros, perm, bias, scheme, layout, group_size, n, k) -> Optional[str]:
    """None when the compiled kernel serves the (validated) call, else the reason. Looks at
    metadata only (works on meta tensors; a CUDA ``x``'s capability for fp8); whether the
    extension runs on ``x``'s device is checked by the caller."""
    if scheme not in _LAYOUTS:
        return f"the CUDA kernel serves the schemes {', '.join(_LAYOUTS)}, not {scheme}"
    if layout != _LAYOUTS[scheme]:
        return f"the CUDA kernel reads {scheme} weights in the {_LAYOUTS[scheme]!r} layout, got {layout!r}"
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"the CUDA kernel takes float16 or bfloat16 activations, got {x.dtype}"
    if scheme == "fp8" and x.device.type == "cuda":
        reason = _fp8_reason(x.device)
        if reason is not None:
            return reason
    m = x.shape[0]
    if m > MAX_M:
        return (f"the CUDA kernel serves up to {MAX_M} tokens (rows of x), got {m}; larger batches run "
                "on the Triton tensor-core kernels")
    multiple = _K_MULTIPLE[scheme]
    if k % multiple:
        return (f"the CUDA {scheme} kernel reads {multiple} input channels per 16-byte load and needs "
                f"K % {multiple} == 0, got K={k}")
    vec = _VEC[scheme]
    # Dynamo cannot trace storage_offset(): under torch.compile only the strides are checked
    # here (the C++ launcher still checks the pointer's alignment and raises).
    offset = 0 if is_compiling() else packed.storage_offset()
    if packed.stride(1) != 1 or (n > 1 and packed.stride(0) % vec) or offset % vec:
        return (f"the CUDA kernel needs 16-byte aligned rows of packed (unit inner stride, rows a multiple "
                f"of {vec} elements apart), got strides {tuple(packed.stride())} and storage offset {offset}")
    return None


def _launch_quantize_rows(x: torch.Tensor, xq: torch.Tensor, x_scales: torch.Tensor, fp8: bool) -> None:
    m, k = x.shape
    _C.quantize_rows(x.data_ptr(), x.stride(0), DTYPE_CODES[x.dtype], xq.data_ptr(), x_scales.data_ptr(), m, k,
                     fp8, current_stream(x.device))


def _quantize_rows(x: torch.Tensor, fp8: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The activation quantization of w8a8 (``fp8=False``) and fp8 on its own: x ``[M, K]``
    (float16/bfloat16, K % 8 == 0) -> (float16 ``[M, K]`` holding the int8 or e4m3 values,
    float32 scales ``[M]``), bit for bit ``quantize_rows_int8`` / ``quantize_rows_fp8`` of
    ``lepton_kernels.reference.quant_matmul``."""
    x = _rows_aligned(x)
    xq = _empty(tuple(x.shape), torch.float16, x.device)
    x_scales = _empty((x.shape[0],), torch.float32, x.device)
    _launch_quantize_rows(x, xq, x_scales, fp8)
    return xq, x_scales


def quant_matmul(x, packed, scales, zeros, perm, bias, scheme, layout, group_size, n, k) -> torch.Tensor:
    """x ``[M, K]`` (float16/bfloat16, M <= 16) and a weight's stored tensors -> ``[M, N]``."""
    if perm is not None:  # stored channel j is original channel perm[j]
        x = x.index_select(1, perm)
    x = _rows_aligned(x)
    m = x.shape[0]
    int4 = scheme == "w4a16"
    dynamic = scheme in DYNAMIC
    device = x.device
    plan = _plan(m, n, k, int4, device, pdl=dynamic and USE_PDL)
    out = _empty((m, n), x.dtype, device)
    # The workspace tensor must outlive the launch: freed earlier, the allocator could hand its
    # memory to the next allocation on this stream (the counters themselves on a first call),
    # and the partials would overwrite it.
    workspace = counters = None
    if plan.splits > 1:
        counters = _counters(device, plan.row_tiles)
        workspace = _empty((plan.splits * m * n,), torch.float32, device)
    x_scales = None
    if dynamic:
        # Allocated before either launch, so that the two kernels are adjacent on the stream
        # (the GEMV's programmatic dependency is on the kernel just before it).
        xq = _empty((m, k), torch.float16, device)
        x_scales = _empty((m,), torch.float32, device)
        _launch_quantize_rows(x, xq, x_scales, scheme == "fp8")
        x = xq
    has_zeros = zeros is not None
    has_bias = bias is not None
    _C.quant_gemv(
        x.data_ptr(), x.stride(0), packed.data_ptr(), packed.stride(0),
        scales.data_ptr(), scales.stride(0), scales.stride(1), DTYPE_CODES[scales.dtype],
        zeros.data_ptr() if has_zeros else 0, zeros.stride(0) if has_zeros else 0,
        zeros.stride(1) if has_zeros else 0,
        bias.data_ptr() if has_bias else 0, bias.stride(0) if has_bias else 0,
        out.data_ptr(), out.stride(0), 0 if workspace is None else workspace.data_ptr(),
        0 if counters is None else counters.data_ptr(),
        m, n, k, group_size if int4 else -1, int4, DTYPE_CODES[out.dtype],
        plan.warps_n, plan.row_tiles, plan.splits, plan.steps_per_split, plan.prefetch, current_stream(device),
        0 if x_scales is None else x_scales.data_ptr(), scheme == "fp8", plan.pdl, plan.l2_steps,
        plan.rows_per_warp,
    )
    return out

"""Benchmark of ``quant_matmul``: the Triton kernels of each scheme, and the compiled CUDA kernel at
M <= 16, against cuBLAS bf16 and the scheme's own PyTorch anchor.

Shapes: bf16 activations ``x [M, K]``, weights ``N x K`` in {4096x4096, 6144x4096, 14336x4096,
4096x14336}, M in {1, 2, 4, ..., 4096} (quick: 14336x4096 with M in {1, 16, 256, 4096}).
Schemes (our rows): w4a16 (group 128, symmetric), w8a16, w8a8 (int8, per-token activations) and
fp8 (e4m3, per-token activations). Anchors, each timed in the same run and reported as
"n/a: <reason>" when it cannot run:

* cuBLAS bf16 (``x @ w.t()``): *the* anchor of every shape (the *vs anchor* column);
* tinygemm int4 g128 (``torch._weight_int4pack_mm``) for w4a16;
* ``torch._int_mm`` plus its per-token x per-channel scaling for w8a8;
* ``torch._scaled_mm`` with row-wise scales for fp8.

w8a16 has no PyTorch anchor (``aten._weight_int8pack_mm`` is not a usable CUDA path). The
``cuda`` rows (M <= 16) cover every scheme; a scheme the compiled kernel does not serve gets an
"n/a: <reason>" row. At M = 1 and 16 on two shapes the rows also show the w4a16 kernel with its
portable dequantizer (no inline PTX); from M = 256 on, the weight-only scheme's other large-M
path (fused dequant-GEMM or dequantize-then-cuBLAS, whichever the heuristic did not pick), so
the crossover can be read off.

The full grid runs in parts (``lepton-kernels bench quant_matmul --part I/N``), split over the
N x K shapes (``PART_CASES``): each part builds its own weights, so no state crosses parts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .harness import Harness, Row
from .report import PlotSpec

OP = "quant_matmul"
SHAPES = ((4096, 4096), (6144, 4096), (14336, 4096), (4096, 14336))  # (N, K)
QUICK_SHAPES = ((14336, 4096),)
MS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096)
QUICK_MS = (1, 16, 256, 4096)
SCHEMES = ("w4a16", "w8a16", "w8a8", "fp8")
GROUP_SIZE = 128
PORTABLE_MS = (1, 16)  # w4a16 without the PTX dequantizer, on PORTABLE_SHAPES
PORTABLE_SHAPES = ((4096, 4096), (14336, 4096))
OTHER_PATH_MIN_M = 256  # weight-only: also time the path the heuristic did not pick
EAGER_COLUMN = "eager µs/call"
# Up to this M (decode and small batches, which serving engines replay as CUDA graphs, and
# M = 1024, whose kernels still run shorter than a Python call's dispatch, which do_bench's
# per-call events would count: H100, 4096x4096 fp8 268 us by do_bench for a ~35 us kernel)
# every row, anchors included, is timed as a graph of back-to-back calls: GPU time, no launch gaps.
GRAPH_MAX_M = 1024

LABELS = {"w4a16": f"triton w4a16 g{GROUP_SIZE}", "w8a16": "triton w8a16", "w8a8": "triton w8a8",
          "fp8": "triton fp8"}
# The compiled kernel at M <= CUDA_MAX_M (lepton_kernels.cuda.quant_matmul.MAX_M): every scheme is
# tried, so its rows appear as the kernel learns a scheme; until then the row is "n/a: <reason>".
CUDA_LABELS = {"w4a16": f"cuda w4a16 g{GROUP_SIZE}", "w8a16": "cuda w8a16", "w8a8": "cuda w8a8",
               "fp8": "cuda fp8"}
CUDA_MAX_M = 16
OUR_BACKENDS = ("triton", "cuda")
ANCHOR_CUBLAS = "anchor: cuBLAS bf16"
SCHEME_ANCHORS = {"w4a16": f"anchor: tinygemm int4 g{GROUP_SIZE}", "w8a8": "anchor: torch._int_mm",
                  "fp8": "anchor: torch._scaled_mm rowwise"}
SCHEME_COLUMN = "vs scheme anchor"

NOTES = [
    "x: bf16 [M, K] random; weights quantized from random bf16 [N, K] with lepton_kernels.quantize_weight "
    f"(w4a16: group {GROUP_SIZE}, symmetric). FLOPs counted: 2·M·N·K.",
    "Bytes counted (GB/s, % copy): the weight's bytes only — packed values + scales (bf16: N·K·2; w4a16: "
    "N·K/2 + 2·N·K/128; w8a16: N·K + 2·N; w8a8/fp8: N·K + 4·N). That is the floor-setting traffic at small M; "
    "at large M read TFLOP/s.",
    "Our rows time the public op: `quant_matmul(x, qw, backend=\"triton\")` for the `triton` rows, and "
    f"`backend=\"cuda\"` (the compiled kernel) for the `cuda` rows of every scheme at M <= {CUDA_MAX_M}; a "
    "scheme the compiled kernel does not serve shows its reason as an `n/a` row. The w8a8/fp8 rows of either "
    "backend include the per-token activation quantization. The `torch._int_mm` and `torch._scaled_mm` "
    "anchors get already-quantized activations (GEMM + scaling only); `_scaled_mm` runs with "
    "use_fast_accum=False, its default (our fp8 kernel also adds each 128-deep step into fp32).",
    f"*vs anchor* compares with `{ANCHOR_CUBLAS}`; `{SCHEME_COLUMN}` (triton and cuda rows alike) with the "
    "scheme's own anchor (tinygemm for w4a16, torch._int_mm for w8a8, torch._scaled_mm for fp8); above 1: ours "
    "is faster.",
    "`[portable dequant]`: the w4a16 kernel with the float32 shift/mask dequantizer instead of the inline-PTX "
    "one (the default on NVIDIA GPUs). `[fused]` / `[dequant+cuBLAS]`: the weight-only path the heuristic did "
    "not pick at that M (it dequantizes once and calls cuBLAS from M = "
    "lepton_kernels.triton.quant_matmul.DEQUANT_MIN_M).",
    f"M <= {GRAPH_MAX_M}: every row, anchors included, is timed as a CUDA graph of back-to-back calls (how "
    "decode steps run in serving engines): GPU time without launch gaps.",
    f"`{EAGER_COLUMN}` (M = 1): back-to-back eager calls through the public API; above the median (GPU time) "
    "it is the host's Python and dispatch cost that limits a decode step.",
]

PLOT = PlotSpec(x="M", y="gbps", where={"N": 14336, "K": 4096},
                title="quant_matmul, N×K = 14336×4096, bf16 x: weight bytes / time")


@dataclass(frozen=True)
class Case:
    n: int
    k: int
    m: int

    def shape(self) -> Dict[str, Any]:
        return {"N": self.n, "K": self.k, "M": self.m}

    @property
    def flops(self) -> int:
        return 2 * self.m * self.n * self.k


def weight_bytes(scheme: str, n: int, k: int) -> int:
    """Bytes of the weight as stored (packed values + scales); "bf16" for the dense weight."""
    if scheme == "bf16":
        return 2 * n * k
    if scheme == "w4a16":
        return n * k // 2 + 2 * n * (k // GROUP_SIZE)
    if scheme == "w8a16":
        return n * k + 2 * n
    return n * k + 4 * n  # w8a8, fp8: fp32 scales


def shapes(quick: bool) -> Tuple[Tuple[int, int], ...]:
    return QUICK_SHAPES if quick else SHAPES


def ms(quick: bool) -> Tuple[int, ...]:
    return QUICK_MS if quick else MS


# A part of the grid (--part I/N) is a contiguous block of the N x K shapes, all M values each.
PART_CASES = shapes
PART_WHAT = "N×K shapes"


def shape_label(shape: Tuple[int, int]) -> str:
    return f"N={shape[0]} K={shape[1]}"


# -- inputs -----------------------------------------------------------------------------------------

def _weights(harness: Harness, n: int, k: int) -> Dict[str, List[Any]]:
    """Rotated weight sets per format: enough copies that each format's sets span a few L2s."""
    from ..quant.weight import quantize_weight

    device = harness.device
    out: Dict[str, List[Any]] = {}
    count = {s: harness.rotation_sets(weight_bytes(s, n, k), alloc_bytes=2 * weight_bytes(s, n, k), max_sets=32)
             for s in ("bf16",) + SCHEMES}
    dense = [torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
             for _ in range(max(count.values()))]
    out["bf16"] = dense[:count["bf16"]]
    for scheme in SCHEMES:
        group = GROUP_SIZE if scheme == "w4a16" else -1
        out[scheme] = [quantize_weight(w, scheme, group_size=group) for w in dense[:count[scheme]]]
    del dense
    return out


def _xs(m: int, k: int, sets: int, device) -> List[torch.Tensor]:
    return [torch.randn(m, k, device=device, dtype=torch.bfloat16) for _ in range(sets)]


# -- our rows ---------------------------------------------------------------------------------------

def _ours(config: Optional[Dict[str, Any]] = None, asm: Optional[bool] = None, backend: str = "triton") -> Callable:
    from ..ops.quant_matmul import quant_matmul
    from ..triton import quant_matmul as tq

    if config is None and asm is None:
        def call(x, qw):
            return quant_matmul(x, qw, backend=backend)
        return call

    def call_with(x, qw):
        previous = tq.set_config_overrides(**(config or {}))
        saved = tq.ASM_DEQUANT
        if asm is not None:
            tq.ASM_DEQUANT = asm
        try:
            return quant_matmul(x, qw, backend="triton")
        finally:
            tq.ASM_DEQUANT = saved
            tq.set_config_overrides(**previous)
    return call_with


def _other_path_config(scheme: str, case: Case) -> Tuple[str, Dict[str, Any]]:
    """The weight-only large-M path the heuristic does not take for this case, as overrides."""
    from ..triton import quant_matmul as tq

    group = GROUP_SIZE if scheme == "w4a16" else -1
    chosen = tq.choose_config(scheme, case.m, case.n, case.k, group, torch.cuda.get_device_properties(
        torch.cuda.current_device()).multi_processor_count)
    if chosen.dequantize_first:
        fused = tq.choose_config(scheme, min(case.m, tq.DEQUANT_MIN_M - 1), case.n, case.k, group, 132)
        fields = {f: getattr(fused, f) for f in ("block_m", "block_n", "block_k", "num_warps", "num_stages",
                                                  "scale_before_dot")}
        return "[fused]", dict(fields, split_k=1, dequantize_first=False)
    return "[dequant+cuBLAS]", dict(dequantize_first=True, block_n=64)


# -- anchors ----------------------------------------------------------------------------------------

def _cublas(x, w):
    return x @ w.t()


def _tinygemm_weights(qws: List[Any]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """tinygemm's packed int4 and [K/128, N, 2] scale-and-zero tensors (timing only: the values
    are random nibbles and our scales, not a conversion of our format)."""
    out = []
    for qw in qws:
        n, k = qw.n, qw.k
        q = torch.randint(0, 16, (n, k), device=qw.device, dtype=torch.int32)
        try:  # torch >= 2.5: uint8 [N, K/2], two nibbles a byte
            packed = torch._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)
        except (RuntimeError, TypeError):  # older torch: int32 [N, K]
            packed = torch._convert_weight_to_int4pack(q, 8)
        scale_zero = torch.stack([qw.scales.t().to(torch.bfloat16),
                                  torch.zeros_like(qw.scales.t(), dtype=torch.bfloat16)], dim=-1).contiguous()
        out.append((packed, scale_zero))
    return out


def _tinygemm(x, packed, scale_zero):
    return torch._weight_int4pack_mm(x, packed, GROUP_SIZE, scale_zero)


def _quantized_x(xs: List[torch.Tensor], fp8: bool) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    from ..reference.quant_matmul import quantize_rows_fp8, quantize_rows_int8

    fn = quantize_rows_fp8 if fp8 else quantize_rows_int8
    return [fn(x) for x in xs]


def _int_mm(xq, sx, wq, sw):
    return (torch._int_mm(xq, wq.t()).to(torch.float32) * sx * sw.t()).to(torch.bfloat16)


def _scaled_mm(xq, sx, wq, sw):
    return torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=sw.t(), out_dtype=torch.bfloat16)


def _na_row(label: str, case: Case, exc: BaseException, num_bytes: Optional[int]) -> Row:
    text = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
    return Row(op=OP, backend=label, shape=case.shape(), median_us=float("nan"), method="n/a", bytes=num_bytes,
               flops=case.flops, note=f"n/a: {type(exc).__name__}: {text}")


# -- run --------------------------------------------------------------------------------------------

def _time_row(harness: Harness, label: str, case: Case, fn: Callable, inputs: List[Tuple], num_bytes: int,
              *, is_anchor: bool = False, eager: bool = False) -> Row:
    fn(*inputs[0])  # fails here when the backend refuses the inputs
    torch.cuda.synchronize()
    timing = harness.time(fn, inputs, method="graph" if case.m <= GRAPH_MAX_M else "auto")
    row = Row.from_timing(OP, label, case.shape(), timing, bytes=num_bytes, flops=case.flops, is_anchor=is_anchor)
    if eager:
        row.extra[EAGER_COLUMN] = harness.time(fn, inputs, method="eager loop").median_us
    harness.log(f"    {label:<40} {timing.median_us:10.2f} µs  ({timing.method})")
    return row


def _try_row(harness: Harness, rows: List[Row], label: str, case: Case, build: Callable[[], Tuple[Callable, List]],
             num_bytes: int, **kwargs) -> Optional[Row]:
    """Time one row; an implementation that cannot run becomes an "n/a" row, not a failure."""
    try:
        fn, inputs = build()
        row = _time_row(harness, label, case, fn, inputs, num_bytes, **kwargs)
    except Exception as exc:  # noqa: BLE001 - reported in the table
        torch.cuda.synchronize()
        rows.append(_na_row(label, case, exc, num_bytes))
        harness.log(f"    {label:<40} n/a ({type(exc).__name__}: {str(exc).strip()[:80]})")
        return None
    rows.append(row)
    return row


def run(harness: Harness, quick: bool = False) -> List[Row]:
    rows: List[Row] = []
    for n, k in harness.part_of(shapes(quick), what=PART_WHAT, label=shape_label):
        harness.log(f"  N={n} K={k}: building weights")
        weights = _weights(harness, n, k)
        try:
            tiny = _tinygemm_weights(weights["w4a16"])
        except Exception as exc:  # noqa: BLE001 - the anchor rows say why
            tiny = exc
        for m in ms(quick):
            case = Case(n, k, m)
            harness.log(f"  N={n} K={k} M={m}")
            case_rows: List[Row] = []
            sets = max(len(v) for v in weights.values())
            xs = _xs(m, k, sets, harness.device)

            def pair(seq):  # rotate x and weights together
                return [(xs[i % len(xs)],) + (tuple(seq[i]) if isinstance(seq[i], tuple) else (seq[i],))
                        for i in range(max(len(seq), 1))]

            _try_row(harness, case_rows, ANCHOR_CUBLAS, case, lambda: (_cublas, pair(weights["bf16"])),
                     weight_bytes("bf16", n, k), is_anchor=True)
            anchor_us: Dict[str, float] = {}
            for scheme in SCHEMES:
                qws = weights[scheme]
                nbytes = weight_bytes(scheme, n, k)
                _try_row(harness, case_rows, LABELS[scheme], case, lambda: (_ours(), pair(qws)), nbytes,
                         eager=m == 1)
                if scheme in CUDA_LABELS and m <= CUDA_MAX_M:
                    _try_row(harness, case_rows, CUDA_LABELS[scheme], case,
                             lambda: (_ours(backend="cuda"), pair(qws)), nbytes, eager=m == 1)
                if scheme == "w4a16" and m in PORTABLE_MS and (n, k) in PORTABLE_SHAPES:
                    _try_row(harness, case_rows, LABELS[scheme] + " [portable dequant]", case,
                             lambda: (_ours(asm=False), pair(qws)), nbytes)
                if scheme in ("w4a16", "w8a16") and m >= OTHER_PATH_MIN_M:
                    tag, config = _other_path_config(scheme, case)
                    _try_row(harness, case_rows, f"{LABELS[scheme]} {tag}", case,
                             lambda: (_ours(config=config), pair(qws)), nbytes)
                anchor = SCHEME_ANCHORS.get(scheme)
                if anchor is None:
                    continue
                if scheme == "w4a16":
                    def build():
                        if isinstance(tiny, Exception):
                            raise tiny
                        return _tinygemm, pair(tiny)
                else:
                    def build(fp8=scheme == "fp8"):
                        quantized = _quantized_x(xs, fp8)
                        inputs = [quantized[i % len(xs)] + (qws[i].packed, qws[i].scales) for i in range(len(qws))]
                        return (_scaled_mm if fp8 else _int_mm), inputs
                row = _try_row(harness, case_rows, anchor, case, build, nbytes)
                if row is not None:
                    anchor_us[scheme] = row.median_us
            for row in case_rows:
                if not row.backend.startswith(OUR_BACKENDS) or row.method == "n/a":
                    continue
                scheme = row.backend.split()[1]
                if scheme in anchor_us:
                    row.extra[SCHEME_COLUMN] = f"{anchor_us[scheme] / row.median_us:.2f}x"
            rows += case_rows
            del xs
        del weights, tiny
        torch.cuda.empty_cache()
    return rows

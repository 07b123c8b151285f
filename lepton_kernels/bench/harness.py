"""Timing, ceilings and result rows shared by every op's benchmark.

How a kernel is timed (``Harness.time``):

* ``do_bench`` (when Triton is importable) or ``events``: each call timed alone between two
  CUDA events, the L2 flushed before each call and the inputs rotated among several sets;
  the median of many runs after a warm-up.
* ``graph``: for kernels of a few microseconds, where launch gaps would dominate, one CUDA
  graph of N back-to-back calls, each on a different input set; median replay time / N.
* ``eager loop``: N back-to-back eager calls / N. When Python and dispatch cost more than the
  kernel this is the host's cost per call, so it shows dispatch overhead.

Ceilings (``measure_ceilings``) are measured on the same GPU in the same run: a large
device-to-device copy (bytes read + written) and a bf16 cuBLAS matmul on random data. Rows
report their bandwidth and arithmetic rate against them, and their speed against the anchor row
(an established implementation of the same work) of the same shape.

Hardware facts (L2 size, SM count) are read from the device, never assumed.

A long benchmark can run in parts (``Harness(part=(i, n))``, ``lepton-kernels bench <op> --part
I/N``): the op's module passes its list of shape cases through ``Harness.part_of``, which keeps
the i-th of n contiguous blocks of it; ``lepton-kernels bench --merge`` joins the parts' results.
"""
from __future__ import annotations

import dataclasses
import datetime
import math
import platform
import re
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

import torch

T = TypeVar("T")

# Rotated input sets together span this many times the L2, so no run finds its inputs cached.
ROTATION_L2_FACTOR = 3
MAX_ROTATION_SETS = 1024
# Kernels estimated shorter than this are timed as a CUDA graph of back-to-back calls.
SHORT_KERNEL_US = 20.0
# Fewest calls captured in one graph (more when there are more input sets).
MIN_GRAPH_CALLS = 64
EAGER_LOOP_CALLS = 100
# Used only if torch does not report the L2 size: large enough to flush any current GPU's L2.
FALLBACK_L2_BYTES = 256 << 20

METHOD_DESCRIPTIONS = {
    "do_bench": "triton.testing.do_bench: each call timed alone with CUDA events, L2 flushed "
                "before each call, input sets rotated; median",
    "events": "each call timed alone with CUDA events, L2 flushed (a write of twice its size) "
              "before each call, input sets rotated; median",
    "graph": "one CUDA graph of N back-to-back calls, each on a different input set; median "
             "replay time / N (launch gaps excluded)",
    "eager loop": "N back-to-back eager calls between two CUDA events / N: when the host is "
                  "slower than the kernel this is Python + dispatch cost per call",
}


# --------------------------------------------------------------------------------------------
# Results


@dataclass
class Timing:
    """One measurement: the median and spread of per-call times in microseconds."""

    median_us: float
    method: str
    p10_us: Optional[float] = None
    p90_us: Optional[float] = None
    runs: Optional[int] = None  # timed samples
    calls_per_run: int = 1  # calls inside one timed sample (graph, eager loop)
    note: str = ""  # e.g. why a graph could not be captured


@dataclass
class Row:
    """One line of a results table.

    ``bytes`` and ``flops`` are what the benchmark declares one call must move / compute; the
    derived fields (``gbps`` ... ``vs_anchor``) are filled by ``finalize_rows``. A row compares
    against the anchor row (``is_anchor``) of the same ``group`` (by default: the same shape).
    """

    op: str
    backend: str  # "cuda" / "triton" / "torch", or "anchor: <what>"
    shape: Dict[str, Any]
    median_us: float
    method: str
    bytes: Optional[int] = None
    flops: Optional[int] = None
    is_anchor: bool = False
    group: Optional[str] = None
    p10_us: Optional[float] = None
    p90_us: Optional[float] = None
    runs: Optional[int] = None
    calls_per_run: int = 1
    note: str = ""
    extra: Dict[str, Any] = field(default_factory=dict)  # more columns, e.g. "eager µs/call"
    gbps: Optional[float] = None
    tflops: Optional[float] = None
    pct_copy: Optional[float] = None
    pct_matmul: Optional[float] = None
    vs_anchor: Optional[float] = None

    @classmethod
    def from_timing(cls, op: str, backend: str, shape: Dict[str, Any], timing: Timing, **kwargs) -> "Row":
        note = kwargs.pop("note", "")
        notes = "; ".join(n for n in (note, timing.note) if n)
        return cls(op=op, backend=backend, shape=dict(shape), median_us=timing.median_us, method=timing.method,
                   p10_us=timing.p10_us, p90_us=timing.p90_us, runs=timing.runs,
                   calls_per_run=timing.calls_per_run, note=notes, **kwargs)

    @property
    def group_key(self) -> str:
        if self.group is not None:
            return self.group
        return ", ".join(f"{k}={v}" for k, v in self.shape.items())

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Ceilings:
    """What this GPU reaches on the simplest memory-bound and compute-bound work."""

    copy_gbps: float  # device-to-device copy, (bytes read + written) / time, 1e9 bytes/s
    matmul_tflops: float  # bf16 cuBLAS matmul, 2*M*N*K / time
    copy_bytes: int  # bytes read + written by one timed copy
    matmul_shape: Sequence[int] = (8192, 8192, 8192)
    method: str = ""

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def gbps(num_bytes: Optional[float], us: float) -> Optional[float]:
    """Bandwidth in GB/s (1e9 bytes/s) of ``num_bytes`` moved in ``us`` microseconds."""
    if num_bytes is None or not us > 0:
        return None
    return num_bytes / us / 1e3


def tflops(flops: Optional[float], us: float) -> Optional[float]:
    if flops is None or not us > 0:
        return None
    return flops / us / 1e6


def percent_of(value: Optional[float], ceiling: Optional[float]) -> Optional[float]:
    if value is None or not ceiling:
        return None
    return 100.0 * value / ceiling


def speed_vs_anchor(anchor_us: Optional[float], us: float) -> Optional[float]:
    """Anchor time / this time: above 1 means faster than the anchor."""
    if anchor_us is None or not us > 0:
        return None
    return anchor_us / us


def finalize_rows(rows: List[Row], ceilings: Optional[Ceilings]) -> List[Row]:
    """Fill each row's rates, its share of the ceilings and its speed against its anchor."""
    anchors: Dict[str, float] = {}
    for row in rows:
        if row.is_anchor:
            anchors.setdefault(row.group_key, row.median_us)
    for row in rows:
        row.gbps = gbps(row.bytes, row.median_us)
        row.tflops = tflops(row.flops, row.median_us)
        row.pct_copy = percent_of(row.gbps, ceilings.copy_gbps if ceilings else None)
        row.pct_matmul = percent_of(row.tflops, ceilings.matmul_tflops if ceilings else None)
        row.vs_anchor = speed_vs_anchor(anchors.get(row.group_key), row.median_us)
    return rows


# --------------------------------------------------------------------------------------------
# Pure helpers


def gpu_slug(name: str) -> str:
    """A short file-name-friendly GPU name: "NVIDIA H100 80GB HBM3" -> "h100"."""
    drop = {"nvidia", "geforce", "tesla", "quadro", "generation", "graphics", "corporation"}
    words = []
    for word in re.split(r"[^a-z0-9]+", name.lower()):
        if not word or word in drop:
            continue
        # memory size and packaging say nothing that the model name does not
        if re.fullmatch(r"\d+gb|hbm\d*e?|sxm\d*|gddr\w*", word):
            continue
        words.append(word)
    return "-".join(words) or "gpu"


def rotation_count(bytes_per_set: int, l2_bytes: int, *, factor: float = ROTATION_L2_FACTOR,
                   max_sets: int = MAX_ROTATION_SETS, budget_bytes: Optional[int] = None) -> int:
    """How many input sets to rotate so that together they span ``factor`` x the L2."""
    if bytes_per_set <= 0:
        return 1
    n = max(1, math.ceil(factor * l2_bytes / bytes_per_set))
    if budget_bytes is not None:
        n = min(n, max(1, budget_bytes // bytes_per_set))
    return min(n, max_sets)


def summarize_ms(times_ms: Sequence[float], calls_per_run: int = 1) -> Dict[str, float]:
    """Median and 10th/90th percentiles of per-call times in microseconds."""
    per_call = sorted(t * 1e3 / calls_per_run for t in times_ms)
    return {"median_us": statistics.median(per_call), "p10_us": _quantile(per_call, 0.1),
            "p90_us": _quantile(per_call, 0.9)}


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def choose_method(estimate_us: float, *, graph_ok: bool, have_triton: bool,
                  short_kernel_us: float = SHORT_KERNEL_US) -> str:
    """Short kernels as a graph (launch gaps would dominate), the rest one call at a time."""
    if graph_ok and estimate_us < short_kernel_us:
        return "graph"
    return "do_bench" if have_triton else "events"


def _have_triton() -> bool:
    try:
        import triton.testing  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# Running in parts


def check_part(part: Any) -> Tuple[int, int]:
    """``part`` as ``(i, n)``: part ``i`` of ``n``, 1 <= i <= n."""
    if (not isinstance(part, (tuple, list)) or len(part) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in part)):
        raise TypeError(f"part must be a pair of ints (i, n), got {part!r}")
    i, n = part
    if n < 1 or not 1 <= i <= n:
        raise ValueError(f"part must be (i, n) with 1 <= i <= n, got {i}/{n}")
    return i, n


def parse_part(text: str) -> Tuple[int, int]:
    """``"I/N"`` (e.g. ``"2/3"``) -> ``(2, 3)``; ValueError saying what is wrong otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if match is None:
        raise ValueError(f"--part takes I/N, e.g. 1/2 (part 1 of 2), got {text!r}")
    i, n = int(match.group(1)), int(match.group(2))
    if n < 1 or not 1 <= i <= n:
        raise ValueError(f"--part I/N needs 1 <= I <= N, got {i}/{n}")
    return i, n


def split_part(cases: Sequence[T], part: Tuple[int, int], *, what: str = "shape cases") -> List[T]:
    """Part ``i`` of ``n`` of ``cases``: contiguous blocks in the listed order, the first
    ``len % n`` blocks one case longer. Every case lands in exactly one part; an empty part is
    refused, so ``n`` may not exceed the number of cases."""
    i, n = check_part(part)
    cases = list(cases)
    if n > len(cases):
        only = " (only --part 1/1 is valid)" if len(cases) == 1 else ""
        raise ValueError(f"--part {i}/{n}: {len(cases)} {what} cannot be split into {n} parts; N can be at most "
                         f"{len(cases)}{only}")
    size, longer = divmod(len(cases), n)
    start = (i - 1) * size + min(i - 1, longer)
    return cases[start:start + size + (1 if i <= longer else 0)]


def part_record(cases: Sequence[Any], part: Tuple[int, int], *, what: str = "shape cases",
                label: Callable[[Any], str] = str) -> Dict[str, Any]:
    """What a part's results file says about the part: which of how many, and its cases."""
    i, n = check_part(part)
    chosen = split_part(cases, part, what=what)
    return {"index": i, "count": n, "what": what, "total_cases": len(cases),
            "cases": [label(c) for c in chosen]}


# --------------------------------------------------------------------------------------------
# Environment


def _package_version(name: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _driver_version() -> Optional[str]:
    """The display driver's version (e.g. "580.159.04"), from nvidia-smi if it is on the PATH."""
    smi = shutil.which("nvidia-smi")
    if smi is not None:
        try:
            out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20, check=True).stdout
            first = out.strip().splitlines()[0].strip() if out.strip() else ""
            if first:
                return first
        except (OSError, subprocess.SubprocessError, IndexError):
            pass
    try:
        from .. import cuda as lk_cuda

        version = int(lk_cuda.build_info().get("driver_version") or 0)
    except Exception:  # a broken extension must not stop a benchmark of the other backends
        version = 0
    return f"supports CUDA {version // 1000}.{version % 1000 // 10}" if version else None


def environment(device: torch.device) -> Dict[str, Any]:
    """What the results depend on: the GPU, its driver, and the software versions."""
    from .. import __version__

    props = torch.cuda.get_device_properties(device)
    return {
        "gpu": props.name,
        "gpu_slug": gpu_slug(props.name),
        "capability": f"{props.major}.{props.minor}",
        "sm_count": props.multi_processor_count,
        "l2_bytes": int(getattr(props, "L2_cache_size", 0) or 0),
        "memory_bytes": int(props.total_memory),
        "driver": _driver_version(),
        "cuda_runtime": torch.version.cuda,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _package_version("triton") or _package_version("pytorch-triton"),
        "lepton_kernels": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


# --------------------------------------------------------------------------------------------
# Timing on the GPU


def _flush_buffer(device: torch.device, l2_bytes: int) -> torch.Tensor:
    return torch.empty(max(2 * l2_bytes, 1 << 20), dtype=torch.uint8, device=device)


def _rotating_call(fn: Callable, inputs: Sequence[Sequence[Any]]) -> Callable[[], Any]:
    """A no-argument callable that calls ``fn`` on the next input set each time."""
    sets = [tuple(s) for s in inputs] or [()]
    state = {"i": 0}

    def call():
        i = state["i"]
        state["i"] = i + 1 if i + 1 < len(sets) else 0
        return fn(*sets[i])

    return call


def _time_each_call(call: Callable[[], Any], flush: Optional[torch.Tensor], runs: int) -> List[float]:
    """Milliseconds of each of ``runs`` calls, each between its own pair of events."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    for start, end in zip(starts, ends):
        if flush is not None:
            flush.zero_()
        start.record()
        call()
        end.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def _runs_for(budget_ms: float, estimate_ms: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, budget_ms / max(estimate_ms, 1e-4))))


def time_fn(
    fn: Callable,
    inputs: Sequence[Sequence[Any]],
    *,
    method: str = "auto",
    graph_ok: bool = True,
    l2_bytes: int = FALLBACK_L2_BYTES,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    short_kernel_us: float = SHORT_KERNEL_US,
    min_graph_calls: int = MIN_GRAPH_CALLS,
    loop_calls: int = EAGER_LOOP_CALLS,
) -> Timing:
    """Median time of one call of ``fn(*inputs[i])``, rotating ``i`` over the input sets.

    Args:
        fn: the work to time; it must only enqueue GPU work (a sync inside it is timed too).
        inputs: argument tuples; each call takes the next one, so build enough sets that
            together they exceed the L2 (``rotation_count``).
        method: "auto" (a graph for kernels under ``short_kernel_us`` when ``graph_ok``, else
            "do_bench" when Triton is importable, else "events"), "do_bench", "events",
            "graph" or "eager loop" (see ``METHOD_DESCRIPTIONS``).
        graph_ok: False for work that cannot be captured (host syncs, allocation-dependent
            control flow); a failed capture also falls back to one call at a time.
    """
    if method not in ("auto",) + tuple(METHOD_DESCRIPTIONS):
        raise ValueError(f"unknown timing method {method!r}; known: auto, {', '.join(METHOD_DESCRIPTIONS)}")
    call = _rotating_call(fn, inputs)
    flush = _flush_buffer(torch.cuda.current_device(), l2_bytes)
    # Warm-up: compilation, module loading, allocator growth, clocks.
    call()
    torch.cuda.synchronize()
    estimate = statistics.median(_time_each_call(call, flush, 5))  # ms
    warm = _runs_for(warmup_ms, estimate, 1, 1000)
    for _ in range(warm):
        call()
    torch.cuda.synchronize()

    note = ""
    if method == "auto":
        # Events around one eager call also catch the launch gap, so judge "short" by the GPU
        # time alone: a small graph of back-to-back calls.
        gpu_estimate = None
        if graph_ok:
            try:
                gpu_estimate = _graph_estimate_ms(fn, inputs)
            except Exception as exc:
                torch.cuda.synchronize()
                note = f"graph capture failed ({type(exc).__name__}), timed call by call"
        method = choose_method((gpu_estimate if gpu_estimate is not None else estimate) * 1e3,
                               graph_ok=gpu_estimate is not None, have_triton=_have_triton(),
                               short_kernel_us=short_kernel_us)
    if method == "graph":
        try:
            return _time_graph(fn, inputs, rep_ms, min_graph_calls)
        except Exception as exc:  # capture refused (a sync, an allocation): time call by call
            torch.cuda.synchronize()
            note = f"graph capture failed ({type(exc).__name__}), timed call by call"
            method = "do_bench" if _have_triton() else "events"
    if method == "eager loop":
        return _time_loop(call, estimate, rep_ms, loop_calls)
    if method == "do_bench":
        return _time_do_bench(call, warmup_ms, rep_ms, note)
    runs = _runs_for(rep_ms, estimate, 10, 2000)
    stats = summarize_ms(_time_each_call(call, flush, runs))
    return Timing(method="events", runs=runs, note=note, **stats)


def _time_do_bench(call: Callable[[], Any], warmup_ms: float, rep_ms: float, note: str) -> Timing:
    from triton.testing import do_bench

    try:
        times = do_bench(call, warmup=warmup_ms, rep=rep_ms, return_mode="all")
    except AssertionError:  # a Triton without return_mode="all"
        times = None
    if isinstance(times, (list, tuple)) and times:
        return Timing(method="do_bench", runs=len(times), note=note, **summarize_ms(times))
    median, p10, p90 = do_bench(call, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.1, 0.9])
    return Timing(method="do_bench", median_us=median * 1e3, p10_us=p10 * 1e3, p90_us=p90 * 1e3, note=note)


def _capture(fn: Callable, sets: Sequence[tuple], calls: int) -> "torch.cuda.CUDAGraph":
    """A CUDA graph of ``calls`` back-to-back calls of ``fn``, cycling over ``sets``."""
    # Warm up on a side stream, as graph capture wants (no lazy init inside the capture).
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(min(3, len(sets))):
            fn(*sets[i])
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(*sets[i % len(sets)])
    graph.replay()  # the first replay uploads the graph
    torch.cuda.synchronize()
    return graph


def _graph_estimate_ms(fn: Callable, inputs: Sequence[Sequence[Any]], calls: int = 8) -> float:
    """GPU time of one call, without launch gaps: one replay of a graph of a few calls."""
    sets = [tuple(s) for s in inputs] or [()]
    graph = _capture(fn, sets, calls)
    try:
        return statistics.median(_time_each_call(graph.replay, None, 3)) / calls
    finally:
        del graph


def _time_graph(fn: Callable, inputs: Sequence[Sequence[Any]], rep_ms: float, min_calls: int) -> Timing:
    sets = [tuple(s) for s in inputs] or [()]
    calls = max(len(sets), min_calls)
    graph = _capture(fn, sets, calls)
    try:
        for _ in range(2):
            graph.replay()
        torch.cuda.synchronize()
        replay_ms = statistics.median(_time_each_call(graph.replay, None, 3))
        runs = _runs_for(rep_ms, replay_ms, 10, 500)
        stats = summarize_ms(_time_each_call(graph.replay, None, runs), calls_per_run=calls)
    finally:
        del graph
    return Timing(method="graph", runs=runs, calls_per_run=calls, **stats)


def _time_loop(call: Callable[[], Any], estimate_ms: float, rep_ms: float, calls: int) -> Timing:
    runs = _runs_for(rep_ms, estimate_ms * calls, 5, 50)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    for start, end in zip(starts, ends):
        torch.cuda.synchronize()  # start from an empty queue: the host must keep up on its own
        start.record()
        for _ in range(calls):
            call()
        end.record()
    torch.cuda.synchronize()
    stats = summarize_ms([s.elapsed_time(e) for s, e in zip(starts, ends)], calls_per_run=calls)
    return Timing(method="eager loop", runs=runs, calls_per_run=calls, **stats)


# --------------------------------------------------------------------------------------------
# Ceilings


def measure_ceilings(device: Optional[torch.device] = None, *, copy_bytes: int = 2 << 30,
                     matmul_n: int = 8192, rep_ms: float = 200.0) -> Ceilings:
    """Copy bandwidth and bf16 matmul rate of this GPU, measured now.

    The copy moves ``copy_bytes`` from one buffer to another (bytes read + written counted,
    so 2 x ``copy_bytes``), shrunk if the GPU lacks the memory; the matmul multiplies random
    ``matmul_n``-square bf16 matrices (random data: zeros run faster than real data).
    """
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else device
    with torch.cuda.device(device):
        free, _ = torch.cuda.mem_get_info()
        copy_bytes = int(min(copy_bytes, free // 4)) // 4096 * 4096
        src = torch.empty(copy_bytes // 4, dtype=torch.float32, device=device).uniform_()
        dst = torch.empty_like(src)
        # One buffer of 2 x copy_bytes >> L2: no flush or rotation needed.
        copy = time_fn(lambda: dst.copy_(src), [()], method="do_bench" if _have_triton() else "events",
                       l2_bytes=1 << 20, rep_ms=rep_ms)
        del src, dst

        a = torch.randn(matmul_n, matmul_n, dtype=torch.bfloat16, device=device)
        b = torch.randn(matmul_n, matmul_n, dtype=torch.bfloat16, device=device)
        c = torch.empty(matmul_n, matmul_n, dtype=torch.bfloat16, device=device)
        mm = time_fn(lambda: torch.mm(a, b, out=c), [()], method=copy.method, l2_bytes=1 << 20, rep_ms=rep_ms)
        del a, b, c
        torch.cuda.empty_cache()
    moved = 2 * copy_bytes
    return Ceilings(
        copy_gbps=gbps(moved, copy.median_us),
        matmul_tflops=tflops(2 * matmul_n ** 3, mm.median_us),
        copy_bytes=moved,
        matmul_shape=(matmul_n, matmul_n, matmul_n),
        method=copy.method,
    )


# --------------------------------------------------------------------------------------------
# The object each op's benchmark receives


class Harness:
    """One benchmark run on one GPU: ceilings, environment and timing settings.

    Each op's benchmark module gets one and calls ``time`` for every (backend, shape); the
    runner (``lepton_kernels.bench.run``) measures the ceilings first and writes the report.
    With ``part=(i, n)`` the module's ``run`` times only the cases ``part_of`` hands it.
    """

    def __init__(self, device: Optional[torch.device] = None, *, quick: bool = False, warmup_ms: float = 25.0,
                 rep_ms: Optional[float] = None, log: Optional[Callable[[str], None]] = None,
                 part: Optional[Tuple[int, int]] = None):
        self.part = check_part(part) if part is not None else None
        # what part_of chose (None until it is called): the runner refuses a part run whose
        # module never asked, rather than report the whole grid as one part
        self.part_info: Optional[Dict[str, Any]] = None
        if not torch.cuda.is_available():
            raise RuntimeError("benchmarks need a CUDA GPU, and torch sees none")
        self.device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
        torch.cuda.set_device(self.device)
        self.quick = quick
        self.warmup_ms = warmup_ms
        self.rep_ms = rep_ms if rep_ms is not None else (50.0 if quick else 100.0)
        self._log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        props = torch.cuda.get_device_properties(self.device)
        self.l2_bytes = int(getattr(props, "L2_cache_size", 0) or 0)
        self.l2_known = self.l2_bytes > 0
        if not self.l2_known:
            self.l2_bytes = FALLBACK_L2_BYTES
        self.ceilings: Optional[Ceilings] = None
        self.methods_used: List[str] = []
        self.notes: List[str] = []
        self._env: Optional[Dict[str, Any]] = None

    def log(self, msg: str) -> None:
        self._log(msg)

    def note(self, msg: str) -> None:
        """A sentence for the report (e.g. a backend skipped and why)."""
        if msg not in self.notes:
            self.notes.append(msg)

    def part_of(self, cases: Sequence[T], *, what: str = "shape cases",
                label: Callable[[Any], str] = str) -> List[T]:
        """This run's share of ``cases`` (all of them without a part): see ``split_part``.
        ``what`` names the cases in messages, ``label`` describes one in the results file."""
        if self.part is None:
            self.part_info = {}
            return list(cases)
        self.part_info = part_record(cases, self.part, what=what, label=label)
        chosen = split_part(cases, self.part, what=what)
        self.log(f"part {self.part[0]}/{self.part[1]}: {len(chosen)} of {len(cases)} {what}: "
                 + ", ".join(self.part_info["cases"]))
        return chosen

    def measure_ceilings(self) -> Ceilings:
        self.log("measuring ceilings: device-to-device copy, bf16 matmul 8192^3 ...")
        self.ceilings = measure_ceilings(self.device, rep_ms=max(self.rep_ms, 100.0))
        self.log(f"  copy {self.ceilings.copy_gbps:,.0f} GB/s, matmul {self.ceilings.matmul_tflops:,.0f} TFLOP/s")
        return self.ceilings

    def rotation_sets(self, touched_bytes: int, *, alloc_bytes: Optional[int] = None,
                      max_sets: int = MAX_ROTATION_SETS) -> int:
        """How many input sets to build: enough that the bytes one call touches, summed over
        the sets, span a few times the L2; no more than a quarter of free memory holds
        (``alloc_bytes``: what one set allocates, default ``touched_bytes``)."""
        free, _ = torch.cuda.mem_get_info(self.device)
        n = rotation_count(touched_bytes, self.l2_bytes, max_sets=max_sets)
        return max(1, min(n, free // 4 // max(1, alloc_bytes or touched_bytes)))

    def time(self, fn: Callable, inputs: Sequence[Sequence[Any]], *, method: str = "auto",
             graph_ok: bool = True) -> Timing:
        """Time ``fn`` over rotated ``inputs`` (see ``time_fn``); remember the method used."""
        timing = time_fn(fn, inputs, method=method, graph_ok=graph_ok, l2_bytes=self.l2_bytes,
                         warmup_ms=self.warmup_ms, rep_ms=self.rep_ms)
        if timing.method not in self.methods_used:
            self.methods_used.append(timing.method)
        return timing

    def environment(self) -> Dict[str, Any]:
        """The GPU and software versions, read once (at the start of the run)."""
        if self._env is None:
            self._env = environment(self.device)
            if not self.l2_known:
                self._env["l2_bytes_note"] = "torch did not report the L2 size; assumed 256 MiB for flushing"
        return dict(self._env)

"""``lepton-kernels``: what is installed and which backends run here, a self-check of every
backend against the torch reference, and the benchmarks.

    lepton-kernels info [--json]
    lepton-kernels selfcheck [--op NAME ...] [--device cpu|cuda] [--json]
    lepton-kernels bench <op> [--quick] [--out DIR] [--no-plot] [--part I/N]
    lepton-kernels bench --merge PART.json [PART.json ...] [--out DIR] [--no-plot]
    lepton-kernels bench --replot RESULTS.json [...]
    lepton-kernels bench --list

A long benchmark runs in parts, each its own process (possibly on another machine with the same
GPU model): ``bench <op> --part I/N`` times the I-th of N contiguous blocks of the op's shape
list, measuring the ceilings again, and writes ``<op>-<gpu>.partIofN.md|json``; ``bench --merge``
checks that the parts belong together (same op, GPU and --quick; parts 1..N each once) and
writes the usual ``<op>-<gpu>.md|json|png`` from them, without a GPU.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import platform
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2

# allclose tolerances (atol, rtol) per output dtype, loose enough for a different summation order
# in half precision; integers and bools must match exactly.
_TOLERANCES = {
    "float16": (1e-2, 1e-2),
    "bfloat16": (3e-2, 3e-2),
    "float32": (2e-3, 2e-3),  # Triton's float32 dot runs in tf32 by default
    "float64": (1e-6, 1e-6),
    "float8_e4m3fn": (2e-2, 0.13),  # one e4m3 step is 1/8 relative
    "float8_e5m2": (2e-2, 0.26),
}


# --------------------------------------------------------------------------------------------
# Shared: ops, devices, versions


def _package_version(name: str) -> Optional[str]:
    """The installed version, read from metadata so the package (e.g. jax) is not imported."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def import_ops() -> Dict[str, str]:
    """Import every module of ``lepton_kernels.ops`` (each registers its op and backends), so ops
    added later appear without a change here. Returns module -> error for those that failed."""
    import lepton_kernels.ops as ops_pkg

    errors = {}
    for info in pkgutil.iter_modules(ops_pkg.__path__):
        name = f"{ops_pkg.__name__}.{info.name}"
        try:
            importlib.import_module(name)
        except Exception as exc:  # one broken op must not hide the others
            errors[name] = f"{type(exc).__name__}: {exc}"
    return errors


def public_function(op: str) -> Callable:
    """The public function of ``op``: ``lepton_kernels.ops.<op>.<op>``."""
    return getattr(importlib.import_module(f"lepton_kernels.ops.{op}"), op)


@dataclass
class Example:
    """An op's registered example (a call of its public function) and what its backends get."""

    op: str
    args: tuple
    kwargs: dict
    fn: Callable
    backend_args: tuple  # what the public function hands to selection and to every backend
    backend_kwargs: dict

    def reasons(self, auto: bool = False) -> Dict[str, Optional[str]]:
        """Each backend -> why it cannot serve the example (None: it can); ``auto``: also
        why "auto" would leave the example to another backend."""
        from lepton_kernels import _backends

        return _backends.explain(self.op, *self.backend_args, auto=auto, **self.backend_kwargs)

    def run(self, backend: str, args: tuple, kwargs: dict) -> Any:
        return self.fn(*args, **kwargs, backend=backend)


def prepare_example(op: str, device) -> Example:
    """Build ``op``'s example on ``device`` and find what its backends' ``supports`` receive."""
    from lepton_kernels import _backends

    args, kwargs = _backends.example(op, device)
    fn = public_function(op)
    try:
        with _backends.capture_selection():
            fn(*args, **kwargs)
    except _backends.SelectionCaptured as captured:
        return Example(op, tuple(args), dict(kwargs), fn, captured.args, captured.kwargs)
    raise RuntimeError(f"{op}'s public function returned without selecting a backend")


def default_device():
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _versions() -> Dict[str, Optional[str]]:
    import torch

    import lepton_kernels

    return {
        "python": platform.python_version(),
        "lepton_kernels": lepton_kernels.__version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _package_version("triton") or _package_version("pytorch-triton"),
        "jax": _package_version("jax"),
        "numpy": _package_version("numpy"),
    }


def _gpus() -> List[Dict[str, Any]]:
    import torch

    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(index)
        gpus.append({
            "index": index, "name": p.name, "capability": f"{p.major}.{p.minor}",
            "sm_count": p.multi_processor_count, "memory_bytes": int(p.total_memory),
            "l2_bytes": int(getattr(p, "L2_cache_size", 0) or 0),
        })
    return gpus


# --------------------------------------------------------------------------------------------
# info


def collect_info() -> Dict[str, Any]:
    from lepton_kernels import _backends
    from lepton_kernels import cuda as lk_cuda

    import_errors = import_ops()
    device = default_device()
    try:
        requested = _backends.requested_backend("auto")
    except ValueError as exc:
        requested = f"invalid: {exc}"

    info: Dict[str, Any] = {
        "versions": _versions(),
        "gpus": _gpus(),
        "device": str(device),
        "extension": {
            "build_info": lk_cuda.build_info(),
            "compiled_archs": list(lk_cuda.compiled_archs()),
            "reason_unusable": lk_cuda.unavailable_reason(device),
        },
        "environment": {name: os.environ.get(name) for name in (_backends.ENV_BACKEND, "TRITON_INTERPRET")},
        "auto_means": requested,
        "import_errors": import_errors,
        "ops": {},
    }
    for op in _backends.ops():
        entry: Dict[str, Any] = {
            "backends": [b for b in _backends.BACKENDS if b in _backends.implementations(op)],
            "auto": None, "skipped": {}, "supports": {}, "error": None,
        }
        try:
            reasons = prepare_example(op, device).reasons(auto=True)
        except Exception as exc:
            no_example = isinstance(exc, ValueError) and "no registered example" in str(exc)
            entry["error"] = "no registered example" if no_example else f"{type(exc).__name__}: {exc}"
            info["ops"][op] = entry
            continue
        entry["supports"] = {b: reasons[b] for b in _backends.BACKENDS if b in reasons}
        for backend in entry["backends"]:
            if reasons[backend] is None:
                entry["auto"] = backend
                break
            entry["skipped"][backend] = reasons[backend]
        info["ops"][op] = entry
    return info


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.1f} GiB"


def format_info(info: Dict[str, Any]) -> str:
    v = info["versions"]
    lines = [
        f"lepton-kernels {v['lepton_kernels']}",
        f"  python {v['python']}, torch {v['torch']} (CUDA {v['torch_cuda'] or 'none'}), "
        f"triton {v['triton'] or 'not installed'}, jax {v['jax'] or 'not installed'}, numpy {v['numpy']}",
    ]
    if info["gpus"]:
        for g in info["gpus"]:
            lines.append(f"GPU {g['index']}: {g['name']}, compute capability {g['capability']}, {g['sm_count']} SMs, "
                         f"{_gib(g['memory_bytes'])}, {g['l2_bytes'] / 2**20:.0f} MiB L2")
    else:
        lines.append("GPU: no CUDA GPU")
    ext = info["extension"]
    build = ext["build_info"]
    if build.get("cuda"):
        archs = ", ".join(f"sm_{a}" for a in ext["compiled_archs"]) or "none"
        lines.append(f"compiled extension: CUDA {build.get('cuda_version')}, archs {archs}")
    else:
        lines.append(f"compiled extension: no CUDA kernels ({build.get('reason')})")
    if ext["reason_unusable"]:
        lines.append(f"  not usable on {info['device']}: {ext['reason_unusable']}")
    for name, value in info["environment"].items():
        if value is not None:
            lines.append(f"{name}={value}")
    for module, error in info["import_errors"].items():
        lines.append(f"import failed: {module}: {error}")

    auto = info["auto_means"]
    header = f"backend \"auto\" picks, for each op's example on {info['device']}"
    if auto != "auto":
        header += f" (but {auto!s} is forced by the environment)" if not auto.startswith("invalid") else f" ({auto})"
    lines.append(header + ":")
    width = max((len(op) for op in info["ops"]), default=0)
    for op, entry in info["ops"].items():
        if entry["error"]:
            what = entry["error"] if entry["error"] == "no registered example" else f"example failed: {entry['error']}"
            lines.append(f"  {op:<{width}}  unknown: {what}   (backends: {', '.join(entry['backends'])})")
            continue
        choice = entry["auto"] or "nothing (no backend serves it)"
        lines.append(f"  {op:<{width}}  {choice}   (backends: {', '.join(entry['backends'])})")
        for backend, reason in entry["skipped"].items():
            lines.append(f"  {'':<{width}}    skipped {backend}: {reason}")
    return "\n".join(lines)


def _cmd_info(args: argparse.Namespace) -> int:
    info = collect_info()
    print(json.dumps(info, indent=2, default=str) if args.json else format_info(info))
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# selfcheck


def _clone(obj: Any) -> Any:
    """A deep copy of the tensors in ``obj`` that keeps their strides (an example may pass
    strided views on purpose)."""
    import torch

    if isinstance(obj, torch.Tensor):
        try:
            out = torch.empty_strided(obj.shape, obj.stride(), dtype=obj.dtype, device=obj.device)
            out.copy_(obj)
            return out
        except RuntimeError:  # overlapping strides (expanded tensors)
            return obj.clone()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(x) for x in obj)
    if isinstance(obj, dict):
        return {k: _clone(x) for k, x in obj.items()}
    return obj


def _tensors(obj: Any, name: str) -> List[Tuple[str, Any]]:
    import torch

    if isinstance(obj, torch.Tensor):
        return [(name, obj)]
    if isinstance(obj, (list, tuple)):
        return [t for i, x in enumerate(obj) for t in _tensors(x, f"{name}[{i}]")]
    if isinstance(obj, dict):
        return [t for k, x in obj.items() for t in _tensors(x, f"{name}[{k!r}]")]
    return []


def _outcome(out: Any, args: tuple, kwargs: dict) -> List[Tuple[str, Any]]:
    """Every tensor the call produced or could have mutated: the return value, then the args."""
    found = _tensors(out, "output")
    found += [t for i, a in enumerate(args) for t in _tensors(a, f"arg {i}")]
    found += [t for k in sorted(kwargs) for t in _tensors(kwargs[k], k)]
    return found


def compare(name: str, got, ref) -> Tuple[Optional[str], float]:
    """(None, max abs error) when ``got`` matches ``ref``; else (what differs, max abs error)."""
    import torch

    if tuple(got.shape) != tuple(ref.shape):
        return f"{name}: shape {tuple(got.shape)}, reference {tuple(ref.shape)}", float("inf")
    if got.dtype != ref.dtype:
        return f"{name}: dtype {got.dtype}, reference {ref.dtype}", float("inf")
    if got.numel() == 0:
        return None, 0.0
    g, r = got.detach().cpu(), ref.detach().cpu()
    if not (g.is_floating_point() or g.is_complex()):
        bad = int((g != r).sum())
        return (f"{name}: {bad} of {g.numel()} elements differ" if bad else None), float(bad > 0)
    g, r = g.double(), r.double()
    nan_g, nan_r = torch.isnan(g), torch.isnan(r)
    if bool((nan_g != nan_r).any()):
        where = "NaN where the reference has a number" if bool((nan_g & ~nan_r).any()) else \
            "a number where the reference has NaN"
        return f"{name}: {where}", float("inf")
    finite = ~nan_r
    diff = (g - r).abs()[finite]
    err = float(diff.max()) if diff.numel() else 0.0
    atol, rtol = _TOLERANCES.get(str(got.dtype).replace("torch.", ""), (1e-2, 1e-2))
    close = torch.isclose(g, r, rtol=rtol, atol=atol, equal_nan=True)
    bad = int((~close).sum())
    if bad:
        return (f"{name}: {bad} of {g.numel()} elements differ, max abs error {err:.3g} "
                f"(atol {atol:g}, rtol {rtol:g})"), err
    return None, err


def check_op(op: str, device) -> List[Dict[str, Any]]:
    """Run every backend of ``op`` that supports its example on ``device`` and compare with the
    torch backend. Returns one result per backend: status PASS / FAIL / SKIP and a detail.

    Each backend gets its own deep copy of the example, so in-place ops (which mutate their
    arguments) are compared on the tensors they mutated as well as on what they return.
    """
    import torch

    from lepton_kernels import _backends

    def result(backend: str, status: str, detail: str = "") -> Dict[str, Any]:
        return {"op": op, "backend": backend, "status": status, "detail": detail}

    impls = _backends.implementations(op)
    backends = [b for b in _backends.BACKENDS if b in impls]
    try:
        torch.manual_seed(0)
        example = prepare_example(op, device)
        reasons = example.reasons()
    except ValueError as exc:
        if "no registered example" in str(exc):
            return [result("-", "SKIP", "no registered example")]
        return [result("-", "FAIL", f"example failed: {exc}")]
    except Exception as exc:
        return [result("-", "FAIL", f"example failed: {type(exc).__name__}: {exc}")]

    def call(backend: str) -> List[Tuple[str, Any]]:
        args, kwargs = _clone(example.args), _clone(example.kwargs)
        out = example.run(backend, args, kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return _outcome(out, args, kwargs)

    if "torch" not in impls or reasons.get("torch") is not None:
        why = "no torch backend" if "torch" not in impls else f"torch backend unavailable: {reasons['torch']}"
        return [result(b, "SKIP", f"no reference ({why})") for b in backends]
    try:
        reference = call("torch")
    except Exception as exc:
        return [result("torch", "FAIL", f"reference raised {type(exc).__name__}: {exc}")] + [
            result(b, "SKIP", "no reference") for b in backends if b != "torch"]

    results = []
    for backend in backends:
        if backend == "torch":
            results.append(result(backend, "PASS", "reference"))
            continue
        if reasons.get(backend) is not None:
            results.append(result(backend, "SKIP", reasons[backend]))
            continue
        try:
            got = call(backend)
        except Exception as exc:
            results.append(result(backend, "FAIL", f"raised {type(exc).__name__}: {exc}"))
            continue
        if [n for n, _ in got] != [n for n, _ in reference]:
            results.append(result(backend, "FAIL", "returned different outputs than the reference"))
            continue
        problems, worst = [], 0.0
        for (name, g), (_, r) in zip(got, reference):
            problem, err = compare(name, g, r)
            worst = max(worst, err)
            if problem:
                problems.append(problem)
        if problems:
            results.append(result(backend, "FAIL", "; ".join(problems)))
        else:
            results.append(result(backend, "PASS", f"max abs error {worst:.3g} vs torch"))
    return results


def _cmd_selfcheck(args: argparse.Namespace) -> int:
    import torch

    from lepton_kernels import _backends

    if args.device == "cuda" and not torch.cuda.is_available():
        print("selfcheck --device cuda: torch sees no CUDA GPU", file=sys.stderr)
        return EXIT_USAGE
    device = default_device() if args.device is None else torch.device(args.device)
    import_errors = import_ops()
    ops = list(args.op) if args.op else list(_backends.ops())
    results: List[Dict[str, Any]] = []
    if not args.op:
        results += [{"op": module, "backend": "-", "status": "FAIL", "detail": f"import failed: {error}"}
                    for module, error in import_errors.items()]
    for op in ops:
        if op not in _backends.ops():
            detail = "no such op registered" + (f" (import errors: {'; '.join(import_errors.values())})"
                                                if import_errors else f"; known: {', '.join(_backends.ops())}")
            results.append({"op": op, "backend": "-", "status": "FAIL", "detail": detail})
            continue
        results += check_op(op, device)

    counts = {s: sum(r["status"] == s for r in results) for s in ("PASS", "FAIL", "SKIP")}
    if args.json:
        print(json.dumps({"device": str(device), "results": results, "counts": counts}, indent=2))
    else:
        for r in results:
            label = f"{r['op']}[{r['backend']}]" if r["backend"] != "-" else r["op"]
            print(f"{r['status']}  {label}  {r['detail']}".rstrip())
        print(f"selfcheck on {device}: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped")
    return EXIT_FAIL if counts["FAIL"] else EXIT_OK


# --------------------------------------------------------------------------------------------
# bench


def _cmd_bench(args: argparse.Namespace) -> int:
    from lepton_kernels import bench

    if args.list:
        for name in bench.names():
            print(name)
        return EXIT_OK
    clash = [flag for flag, given in (("--replot", args.replot), ("--merge", args.merge), ("an op", args.op))
             if given]
    if len(clash) > 1:
        print(f"lepton-kernels bench: give one of an op, --merge or --replot, not {' and '.join(clash)}",
              file=sys.stderr)
        return EXIT_USAGE
    if args.merge:
        return _merge(bench, args)
    if args.replot:
        paths = [bench.replot(path) for path in args.replot]
        for path in paths:
            if path is not None:
                print(f"wrote {path}")
        if not all(paths):
            print("lepton-kernels bench --replot: some plots were not drawn (matplotlib missing, or no matching "
                  "rows)", file=sys.stderr)
            return EXIT_FAIL
        return EXIT_OK
    if args.op is None:
        print(f"lepton-kernels bench: name an op to benchmark: {', '.join(bench.names())}", file=sys.stderr)
        return EXIT_USAGE
    if args.op not in bench.BENCHMARKS:
        print(f"lepton-kernels bench: no benchmark for {args.op!r}; benchmarked ops: {', '.join(bench.names())}",
              file=sys.stderr)
        return EXIT_USAGE
    part = None
    if args.part is not None:
        from lepton_kernels.bench.harness import parse_part

        try:  # a bad request fails here, before the GPU is looked at
            part = parse_part(args.part)
            bench.check_part(args.op, part, args.quick)
        except ValueError as exc:
            print(f"lepton-kernels bench: {exc}", file=sys.stderr)
            return EXIT_USAGE
    import torch

    if not torch.cuda.is_available():
        print(f"lepton-kernels bench needs a CUDA GPU, and torch {torch.__version__} sees none "
              f"(CUDA build: {torch.version.cuda or 'none'}). Run it on a machine with an NVIDIA GPU.",
              file=sys.stderr)
        return EXIT_USAGE
    paths = bench.run_benchmark(args.op, quick=args.quick, out_dir=args.out or bench.DEFAULT_OUT_DIR,
                                plot=not args.no_plot, part=part)
    _print_written(paths)
    return EXIT_OK


def _print_written(paths: Dict[str, Any]) -> None:
    for kind in ("md", "json", "png"):
        if kind in paths:
            print(f"wrote {paths[kind]}")


def _merge(bench, args: argparse.Namespace) -> int:
    """``bench --merge``: the parts' JSON -> the op's usual results files."""
    ignored = [flag for flag, given in (("--part", args.part is not None), ("--quick", args.quick)) if given]
    if ignored:
        print(f"lepton-kernels bench --merge takes no {' or '.join(ignored)}: each part file records its op, "
              "part and --quick", file=sys.stderr)
        return EXIT_USAGE
    try:
        paths = bench.merge(args.merge, args.out or bench.DEFAULT_OUT_DIR, plot=not args.no_plot)
    except (OSError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        print(f"lepton-kernels bench --merge: {exc}", file=sys.stderr)
        return EXIT_USAGE
    _print_written(paths)
    if not args.no_plot and "png" not in paths:
        print("lepton-kernels bench --merge: no plot drawn (matplotlib missing, the op has no plot, or no matching "
              "rows); draw it later with --replot", file=sys.stderr)
    return EXIT_OK


# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lepton-kernels", description="GPU kernels for LLM inference.")
    sub = parser.add_subparsers(dest="command", metavar="command")

    info = sub.add_parser("info", help="versions, GPU, compiled kernels, and which backend each op picks here")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=_cmd_info)

    check = sub.add_parser("selfcheck", help="run every available backend on each op's example and compare "
                                             "with the torch reference")
    check.add_argument("--op", action="append", metavar="NAME", help="check only this op (repeatable)")
    check.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.set_defaults(func=_cmd_selfcheck)

    from lepton_kernels.bench import DEFAULT_OUT_DIR

    bench = sub.add_parser(
        "bench", help="benchmark an op on this GPU and write benchmarks/results/<op>-<gpu>.*",
        description="Benchmark an op on this GPU and write <op>-<gpu>.md|json|png. A long benchmark can run in "
                    "parts (--part I/N, one process each, on machines with the same GPU model) whose results "
                    "--merge joins into the usual files on any machine.")
    bench.add_argument("op", nargs="?", help="the op to benchmark (see --list)")
    bench.add_argument("--list", action="store_true", help="list the ops that have a benchmark")
    bench.add_argument("--quick", action="store_true", help="fewer shapes and shorter timing")
    bench.add_argument("--out", default=None, metavar="DIR",
                       help=f"where to write the results, also of --merge (default: {DEFAULT_OUT_DIR}, relative to "
                            "the current directory)")
    bench.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    bench.add_argument("--part", metavar="I/N",
                       help="run only part I of N (1 <= I <= N) of the op's shape list, split into N contiguous "
                            "blocks in its order; the ceilings are measured in every part. Writes "
                            "<op>-<gpu>.partIofN.md|json (no plot). For ops whose benchmark can be split "
                            "(flash_attention, paged_attention, quant_matmul); N may not exceed the number of "
                            "shape cases (quant_matmul: 4 N×K shapes, 1 with --quick)")
    bench.add_argument("--merge", nargs="+", metavar="PART_JSON",
                       help="join the .partIofN.json files of one op's parts (same op, GPU and --quick; parts "
                            "1..N each exactly once) into <op>-<gpu>.md|json|png in --out. No GPU needed")
    bench.add_argument("--replot", nargs="+", metavar="JSON",
                       help="draw the PNG of results files written earlier (no GPU needed; needs matplotlib)")
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

"""Benchmarks of the ops on a CUDA GPU: ``lepton-kernels bench <op>``.

Each op's benchmark is a module here named after the op (found automatically, listed in
``BENCHMARKS``) that defines

* ``run(harness: Harness, quick: bool) -> list[Row]``: time every backend and the anchor over
  its shapes with ``harness.time`` and return one ``Row`` per (backend, shape);
* optionally ``PLOT`` (a ``report.PlotSpec``, or a function ``quick -> PlotSpec``) and
  ``NOTES`` (sentences for the report: what bytes/FLOPs are counted, what the anchor is).

``run_benchmark`` measures the ceilings, runs the module and writes
``<out_dir>/<op>-<gpu>.{md,json,png}``.
"""
from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple, Union

# Modules of this package that are not benchmarks.
_SUPPORT_MODULES = {"harness", "report"}


def _discover() -> Dict[str, str]:
    """op name -> module: every public module here except the harness itself, so a new op's
    benchmark needs only its module (named after the op)."""
    found = {}
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_") and info.name not in _SUPPORT_MODULES:
            found[info.name] = f"{__name__}.{info.name}"
    return found


# op name -> module that benchmarks it
BENCHMARKS: Dict[str, str] = _discover()

DEFAULT_OUT_DIR = Path("benchmarks") / "results"


def names() -> Tuple[str, ...]:
    return tuple(sorted(BENCHMARKS))


def load(op: str):
    if op not in BENCHMARKS:
        raise ValueError(f"no benchmark for {op!r}; benchmarked ops: {', '.join(names())}")
    return importlib.import_module(BENCHMARKS[op])


def run_benchmark(
    op: str,
    *,
    quick: bool = False,
    out_dir: Union[str, Path] = DEFAULT_OUT_DIR,
    plot: bool = True,
    log: Optional[Callable[[str], None]] = None,
) -> Dict[str, Path]:
    """Benchmark ``op`` on the current CUDA GPU and write its report; return the paths written."""
    from .harness import Harness, finalize_rows
    from .report import write_report

    module = load(op)
    harness = Harness(quick=quick, log=log)
    harness.log(f"{op}: benchmarking on {harness.environment()['gpu']}" + (" (quick)" if quick else ""))
    ceilings = harness.measure_ceilings()
    rows = finalize_rows(list(module.run(harness, quick)), ceilings)
    notes = list(getattr(module, "NOTES", ())) + harness.notes
    return write_report(op, rows, ceilings, harness.environment(), out_dir, methods=harness.methods_used,
                        notes=notes, quick=quick, plot=plot_spec(op, quick), make_plot=plot)


def plot_spec(op: str, quick: bool):
    """The op's ``PLOT`` (a ``report.PlotSpec``), or None."""
    spec = getattr(load(op), "PLOT", None)
    return spec(quick) if callable(spec) else spec


def replot(json_path: Union[str, Path]) -> Optional[Path]:
    """Draw the PNG of a results JSON (next to it) on a machine with matplotlib, e.g. after a
    GPU run without it. Needs no GPU. Returns the path, or None when nothing could be drawn."""
    from .report import read_results, replot_results

    data = read_results(json_path)
    return replot_results(json_path, plot_spec(data["op"], bool(data.get("quick"))))


__all__ = ["BENCHMARKS", "DEFAULT_OUT_DIR", "load", "names", "plot_spec", "replot", "run_benchmark"]

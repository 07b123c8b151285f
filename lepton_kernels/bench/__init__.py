"""Benchmarks of the ops on a CUDA GPU: ``lepton-kernels bench <op>``.

Each op's benchmark is a module here named after the op (found automatically, listed in
``BENCHMARKS``) that defines

* ``run(harness: Harness, quick: bool) -> list[Row]``: time every backend and the anchor over
  its shapes with ``harness.time`` and return one ``Row`` per (backend, shape);
* optionally ``PLOT`` (a ``report.PlotSpec``, or a function ``quick -> PlotSpec``) and
  ``NOTES`` (sentences for the report: what bytes/FLOPs are counted, what the anchor is);
* optionally ``PART_CASES``: a function ``quick -> list`` of the shape cases ``run`` loops over,
  which ``run`` passes through ``harness.part_of``. Only such a module can run in parts.

``run_benchmark`` measures the ceilings, runs the module and writes
``<out_dir>/<op>-<gpu>.{md,json,png}``. With ``part=(i, n)`` it runs the i-th of n contiguous
blocks of ``PART_CASES`` (the ceilings are measured in every part) and writes
``<op>-<gpu>.part<I>of<N>.{md,json}``; ``merge`` joins the parts' JSON into the usual files,
on any machine.
"""
from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

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


def parted_names() -> Tuple[str, ...]:
    """The benchmarked ops that can run in parts (their module defines ``PART_CASES``)."""
    return tuple(name for name in names() if callable(getattr(load(name), "PART_CASES", None)))


def check_part(op: str, part: Tuple[int, int], quick: bool = False) -> list:
    """The shape cases part ``part`` = (i, n) of ``op``'s benchmark would run; ValueError when
    the op cannot run in parts or has fewer cases than ``n``. Needs no GPU, so a bad request
    fails before any measurement."""
    from .harness import split_part

    cases = getattr(load(op), "PART_CASES", None)
    if not callable(cases):
        raise ValueError(f"the {op} benchmark cannot run in parts (its module defines no PART_CASES); run it "
                         f"whole. Benchmarks that run in parts: {', '.join(parted_names()) or 'none'}")
    what = getattr(load(op), "PART_WHAT", "shape cases")
    return split_part(cases(quick), part, what=f"{what} of the {op} benchmark" + (" (--quick)" if quick else ""))


def run_benchmark(
    op: str,
    *,
    quick: bool = False,
    out_dir: Union[str, Path] = DEFAULT_OUT_DIR,
    plot: bool = True,
    log: Optional[Callable[[str], None]] = None,
    part: Optional[Tuple[int, int]] = None,
) -> Dict[str, Path]:
    """Benchmark ``op`` on the current CUDA GPU and write its report; return the paths written.
    ``part=(i, n)``: only the i-th of n blocks of its shape cases, into ``.part<I>of<N>`` files."""
    from .harness import Harness, finalize_rows
    from .report import write_report

    module = load(op)
    if part is not None:
        check_part(op, part, quick)
    harness = Harness(quick=quick, log=log, part=part)
    harness.log(f"{op}: benchmarking on {harness.environment()['gpu']}" + (" (quick)" if quick else "")
                + (f", part {part[0]} of {part[1]}" if part else ""))
    ceilings = harness.measure_ceilings()
    rows = finalize_rows(list(module.run(harness, quick)), ceilings)
    if part is not None and not harness.part_info:
        raise RuntimeError(f"the {op} benchmark defines PART_CASES but its run() never called harness.part_of: "
                           f"it ran every case, not part {part[0]} of {part[1]}")
    notes = list(getattr(module, "NOTES", ())) + harness.notes
    return write_report(op, rows, ceilings, harness.environment(), out_dir, methods=harness.methods_used,
                        notes=notes, quick=quick, plot=plot_spec(op, quick), make_plot=plot,
                        part=harness.part_info if part is not None else None)


def merge(part_paths: Sequence[Union[str, Path]], out_dir: Union[str, Path] = DEFAULT_OUT_DIR, *,
          plot: bool = True) -> Dict[str, Path]:
    """Join the ``.part<I>of<N>.json`` results of one op's parts into ``<out_dir>/<op>-<gpu>.*``
    (ValueError when they do not belong together). Needs no GPU. Returns the paths written."""
    from .report import merge_parts, read_results, write_report

    datas = [read_results(path) for path in part_paths]
    merged = merge_parts(datas, [Path(path).name for path in part_paths])
    return write_report(merged["op"], merged["rows"], merged["ceilings"], merged["env"], out_dir,
                        methods=merged["methods"], notes=merged["notes"], quick=merged["quick"],
                        plot=plot_spec(merged["op"], merged["quick"]) if merged["op"] in BENCHMARKS else None,
                        make_plot=plot, merged_parts=merged["merged_parts"])


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


__all__ = ["BENCHMARKS", "DEFAULT_OUT_DIR", "check_part", "load", "merge", "names", "parted_names", "plot_spec",
           "replot", "run_benchmark"]

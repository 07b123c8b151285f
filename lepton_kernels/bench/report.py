"""Write a benchmark's results: ``<op>-<gpu>.md`` (readable), ``.json`` (the same data) and an
optional ``.png`` plot (only when matplotlib is importable)."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from .harness import METHOD_DESCRIPTIONS, Ceilings, Row

SCHEMA_VERSION = 1


@dataclass
class PlotSpec:
    """One curve per backend: ``y`` ("gbps" or "tflops") against the shape parameter ``x``,
    over the rows whose shape matches ``where`` (less ``exclude_backends``); the matching
    ceiling drawn as a line."""

    x: str
    y: str = "gbps"
    where: Dict[str, Any] = field(default_factory=dict)
    exclude_backends: Sequence[str] = ()
    log_x: bool = True
    title: str = ""


def results_stem(op: str, env: Dict[str, Any], quick: bool = False) -> str:
    """``<op>-<gpu>``, plus ``-quick`` so a quick run never overwrites a full one."""
    return f"{op}-{env.get('gpu_slug') or 'gpu'}" + ("-quick" if quick else "")


def write_report(
    op: str,
    rows: Sequence[Row],
    ceilings: Optional[Ceilings],
    env: Dict[str, Any],
    out_dir: Union[str, Path],
    *,
    methods: Sequence[str] = (),
    notes: Sequence[str] = (),
    quick: bool = False,
    plot: Optional[PlotSpec] = None,
    make_plot: bool = True,
) -> Dict[str, Path]:
    """Write the markdown and JSON reports (and the plot when asked and possible).

    ``rows`` should already be finalized (``harness.finalize_rows``). Returns the paths
    written, keyed "md", "json" and, when drawn, "png".
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = results_stem(op, env, quick)
    methods = list(methods) or sorted({r.method for r in rows})
    paths = {"md": out / f"{stem}.md", "json": out / f"{stem}.json"}

    data = {
        "schema": SCHEMA_VERSION,
        "op": op,
        "quick": quick,
        "environment": env,
        "ceilings": ceilings.to_dict() if ceilings else None,
        "timing_methods": {m: METHOD_DESCRIPTIONS.get(m, "") for m in methods},
        "notes": list(notes),
        "rows": [r.to_dict() for r in rows],
    }
    paths["json"].write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    paths["md"].write_text(render_markdown(op, rows, ceilings, env, methods=methods, notes=notes, quick=quick),
                           encoding="utf-8")
    if make_plot and plot is not None:
        png = out / f"{stem}.png"
        if draw_plot(op, rows, ceilings, env, plot, png):
            paths["png"] = png
    return paths


# --------------------------------------------------------------------------------------------
# Markdown


def _fmt(value: Optional[float], digits: int = 1, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:,.{digits}f}{suffix}"


def _fmt_us(us: float) -> str:
    # three significant figures below 100 µs, whole microseconds above
    return f"{us:,.0f}" if us >= 100 else f"{us:.3g}"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return _fmt_us(value) if abs(value) < 1e6 else f"{value:.3g}"
    return str(value).replace("|", "\\|")


def render_markdown(op: str, rows: Sequence[Row], ceilings: Optional[Ceilings], env: Dict[str, Any], *,
                    methods: Sequence[str] = (), notes: Sequence[str] = (), quick: bool = False) -> str:
    lines: List[str] = [f"# {op} on {env.get('gpu', 'unknown GPU')}" + (" (quick run)" if quick else ""), ""]
    l2 = env.get("l2_bytes")
    facts = [
        ("GPU", f"{env.get('gpu')}, compute capability {env.get('capability')}, {env.get('sm_count')} SMs"
                + (f", {l2 / 2**20:.0f} MiB L2" if l2 else "")),
        ("driver / CUDA", f"{env.get('driver') or 'unknown'} / CUDA runtime {env.get('cuda_runtime')}"),
        ("software", f"python {env.get('python')}, torch {env.get('torch')}, triton {env.get('triton') or 'not installed'}, "
                     f"lepton_kernels {env.get('lepton_kernels')}"),
        ("date", env.get("date", "")),
    ]
    if ceilings is not None:
        m, n, k = ceilings.matmul_shape
        facts.append(("ceilings (this run)",
                      f"copy {_fmt(ceilings.copy_gbps, 0)} GB/s (device-to-device, "
                      f"{ceilings.copy_bytes / 2**30:.0f} GiB read + written); bf16 matmul "
                      f"{_fmt(ceilings.matmul_tflops, 0)} TFLOP/s (cuBLAS {m}x{n}x{k}, random data)"))
    lines += [f"- **{name}**: {value}" for name, value in facts]
    lines += ["", "Timing methods:"]
    lines += [f"- `{m}`: {METHOD_DESCRIPTIONS.get(m, '')}" for m in methods]
    lines += ["", "GB/s are 1e9 bytes/s of the bytes the benchmark declares (below); % copy and % matmul "
                  "compare with the ceilings above; *vs anchor* is the anchor's time / this row's time "
                  "for the same shape (above 1: faster than the anchor)."]
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    lines += ["", *render_table(rows), ""]
    return "\n".join(lines)


def render_table(rows: Sequence[Row]) -> List[str]:
    shape_keys: List[str] = []
    extra_keys: List[str] = []
    for r in rows:
        shape_keys += [k for k in r.shape if k not in shape_keys]
        extra_keys += [k for k in r.extra if k not in extra_keys]
    has_bytes = any(r.bytes is not None for r in rows)
    has_flops = any(r.flops is not None for r in rows)
    has_anchor = any(r.vs_anchor is not None for r in rows)
    has_note = any(r.note for r in rows)

    header = ["backend", *shape_keys, "method", "median µs"]
    header += ["GB/s", "% copy"] if has_bytes else []
    header += ["TFLOP/s", "% matmul"] if has_flops else []
    header += ["vs anchor"] if has_anchor else []
    header += extra_keys + (["note"] if has_note else [])

    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        cells = [f"**{r.backend}**" if r.is_anchor else r.backend]
        cells += [_cell(r.shape.get(k, "")) for k in shape_keys]
        method = r.method + (f" ×{r.calls_per_run}" if r.calls_per_run > 1 else "")
        cells += [method, _fmt_us(r.median_us)]
        if has_bytes:
            cells += [_fmt(r.gbps, 0), _fmt(r.pct_copy, 1, "%")]
        if has_flops:
            cells += [_fmt(r.tflops, 1), _fmt(r.pct_matmul, 1, "%")]
        if has_anchor:
            cells += [_fmt(r.vs_anchor, 2, "x")]
        cells += [_cell(r.extra[k]) if k in r.extra else "" for k in extra_keys]
        if has_note:
            cells += [_cell(r.note)]
        out.append("| " + " | ".join(cells) + " |")
    return out


# --------------------------------------------------------------------------------------------
# Plot


def _matplotlib():
    """(Figure, FigureCanvasAgg), or None when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure, FigureCanvasAgg


def draw_plot(op: str, rows: Sequence[Row], ceilings: Optional[Ceilings], env: Dict[str, Any], spec: PlotSpec,
              path: Path) -> bool:
    """Draw ``spec`` into ``path``; False (and nothing written) when matplotlib is missing or no
    row matches. Uses the object API with the Agg canvas, so no pyplot state is touched."""
    mpl = _matplotlib()
    if mpl is None:
        return False
    Figure, FigureCanvasAgg = mpl
    curves: Dict[str, List[tuple]] = {}
    for r in rows:
        if r.backend in spec.exclude_backends or any(r.shape.get(k) != v for k, v in spec.where.items()):
            continue
        x, y = r.shape.get(spec.x), getattr(r, spec.y, None)
        if isinstance(x, (int, float)) and y is not None:
            curves.setdefault(r.backend, []).append((x, y))
    if not curves:
        return False
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for backend, points in curves.items():
        points.sort()
        style = "--" if backend.startswith("anchor") else "-"
        ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", label=backend)
    ceiling = None
    if ceilings is not None:
        ceiling = {"gbps": ceilings.copy_gbps, "tflops": ceilings.matmul_tflops}.get(spec.y)
    if ceiling:
        ax.axhline(ceiling, color="gray", linestyle=":", label="ceiling (copy)" if spec.y == "gbps" else "ceiling (matmul)")
    if spec.log_x:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(spec.x)
    ax.set_ylabel({"gbps": "GB/s", "tflops": "TFLOP/s"}.get(spec.y, spec.y))
    where = ", ".join(f"{k}={v}" for k, v in spec.where.items())
    ax.set_title(spec.title or f"{op} on {env.get('gpu', '')}" + (f" ({where})" if where else ""), fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)
    return True


def read_results(json_path: Union[str, Path]) -> Dict[str, Any]:
    """A results JSON written by :func:`write_report`."""
    data = json.loads(Path(json_path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or "rows" not in data or "op" not in data:
        raise ValueError(f"{json_path} is not a benchmark results file (no 'op' and 'rows')")
    return data


def replot_results(json_path: Union[str, Path], spec: Optional[PlotSpec]) -> Optional[Path]:
    """Draw ``spec`` from a results JSON into the PNG beside it; None when matplotlib is
    missing, the op has no plot, or no row matches."""
    if spec is None:
        return None
    data = read_results(json_path)
    rows = [SimpleNamespace(**row) for row in data["rows"]]
    ceilings = Ceilings(**data["ceilings"]) if data.get("ceilings") else None
    path = Path(json_path).with_suffix(".png")
    return path if draw_plot(data["op"], rows, ceilings, data.get("environment", {}), spec, path) else None

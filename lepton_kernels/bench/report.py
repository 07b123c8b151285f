"""Write a benchmark's results: ``<op>-<gpu>.md`` (readable), ``.json`` (the same data) and an
optional ``.png`` plot (only when matplotlib is importable).

A run of one part of the shape list writes ``<op>-<gpu>.part<I>of<N>.md|json`` (no plot);
``merge_parts`` checks that a set of them belongs together and joins their rows into the data
of one ordinary results file."""
from __future__ import annotations

import dataclasses
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


CEILINGS_LABEL = "ceilings (this run)"
MERGED_CEILINGS_LABEL = "ceilings (part 1; see the per-part notes)"


def results_stem(op: str, env: Dict[str, Any], quick: bool = False, part: Optional[Dict[str, Any]] = None) -> str:
    """``<op>-<gpu>``, plus ``-quick`` so a quick run never overwrites a full one, plus
    ``.part<I>of<N>`` for one part of a run."""
    stem = f"{op}-{env.get('gpu_slug') or 'gpu'}" + ("-quick" if quick else "")
    return stem + (f".part{part['index']}of{part['count']}" if part else "")


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
    part: Optional[Dict[str, Any]] = None,
    merged_parts: Optional[List[Dict[str, Any]]] = None,
) -> Dict[str, Path]:
    """Write the markdown and JSON reports (and the plot when asked and possible).

    ``rows`` should already be finalized (``harness.finalize_rows``). ``part`` (a
    ``harness.part_record``) marks the results of one part of the shape list: the files are
    named ``.part<I>of<N>`` and no plot is drawn. ``merged_parts`` (from ``merge_parts``)
    marks a report joined from parts: it is recorded in the JSON and the header's ceilings
    are labelled as part 1's. Returns the paths written, keyed "md", "json" and, when drawn,
    "png".
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = results_stem(op, env, quick, part)
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
    if part:
        data["part"] = dict(part)
    if merged_parts:
        data["merged_parts"] = list(merged_parts)
    paths["json"].write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    ceilings_label = MERGED_CEILINGS_LABEL if merged_parts else CEILINGS_LABEL
    paths["md"].write_text(render_markdown(op, rows, ceilings, env, methods=methods, notes=notes, quick=quick,
                                           part=part, ceilings_label=ceilings_label), encoding="utf-8")
    if make_plot and plot is not None and not part:
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
                    methods: Sequence[str] = (), notes: Sequence[str] = (), quick: bool = False,
                    part: Optional[Dict[str, Any]] = None, ceilings_label: str = CEILINGS_LABEL) -> str:
    title = f"# {op} on {env.get('gpu', 'unknown GPU')}" + (" (quick run)" if quick else "")
    if part:
        title += f", part {part['index']} of {part['count']}"
    lines: List[str] = [title, ""]
    l2 = env.get("l2_bytes")
    facts = [
        ("GPU", f"{env.get('gpu')}, compute capability {env.get('capability')}, {env.get('sm_count')} SMs"
                + (f", {l2 / 2**20:.0f} MiB L2" if l2 else "")),
        ("driver / CUDA", f"{env.get('driver') or 'unknown'} / CUDA runtime {env.get('cuda_runtime')}"),
        ("software", f"python {env.get('python')}, torch {env.get('torch')}, triton {env.get('triton') or 'not installed'}, "
                     f"lepton_kernels {env.get('lepton_kernels')}"),
        ("date", env.get("date", "")),
    ]
    if part:
        facts.append(("part", f"{part['index']} of {part['count']}: {len(part.get('cases', []))} of "
                              f"{part.get('total_cases', '?')} {part.get('what', 'shape cases')} "
                              f"({'; '.join(part.get('cases', []))}); join the parts with "
                              "`lepton-kernels bench --merge`"))
    if ceilings is not None:
        m, n, k = ceilings.matmul_shape
        facts.append((ceilings_label,
                      f"copy {_fmt(ceilings.copy_gbps, 0)} GB/s (device-to-device, "
                      f"{ceilings.copy_bytes / 2**30:.0f} GiB read + written); bf16 matmul "
                      f"{_fmt(ceilings.matmul_tflops, 0)} TFLOP/s (cuBLAS {m}x{n}x{k}, random data)"))
    lines += [f"- **{name}**: {value}" for name, value in facts]
    lines += ["", "Timing methods:"]
    lines += [f"- `{m}`: {METHOD_DESCRIPTIONS.get(m, '')}" for m in methods]
    against = ("the ceilings measured in the row's own part (notes below)" if ceilings_label != CEILINGS_LABEL
               else "the ceilings above")
    lines += ["", "GB/s are 1e9 bytes/s of the bytes the benchmark declares (below); % copy and % matmul "
                  f"compare with {against}; *vs anchor* is the anchor's time / this row's time "
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


# --------------------------------------------------------------------------------------------
# Joining parts

# Environment entries whose difference between parts is worth a word in the merged report.
_COMPARED_ENV = ("driver", "cuda_runtime", "torch", "triton", "lepton_kernels", "capability", "sm_count")


def rows_from_results(data: Dict[str, Any]) -> List[Row]:
    """The rows of a results JSON as ``Row`` objects, their derived values kept as written."""
    known = {f.name for f in dataclasses.fields(Row)}
    return [Row(**{k: v for k, v in row.items() if k in known}) for row in data["rows"]]


def merge_parts(parts: Sequence[Dict[str, Any]], names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Join the results of the parts of one run (``read_results`` of each ``.part<I>of<N>.json``)
    into the arguments of ``write_report`` for the whole: op, rows (in part order), ceilings and
    environment of part 1, notes, timing methods, quick, merged_parts.

    The parts must be of the same op, GPU name and quick flag and cover parts 1..N of one N
    exactly once; otherwise ValueError naming what is missing, duplicated or mismatched
    (``names``, e.g. the file names, identify the parts in messages).
    """
    names = list(names) if names is not None else [f"part file {j + 1}" for j in range(len(parts))]
    if not parts:
        raise ValueError("no part files to merge")
    not_parts = [name for name, data in zip(names, parts) if not isinstance(data.get("part"), dict)]
    if not_parts:
        raise ValueError(f"not part results (no 'part' entry; written by `bench <op> --part I/N`): "
                         f"{', '.join(not_parts)}")
    problems = []
    for key, what in (("op", "ops"), ("quick", "quick flags")):
        values = {name: data.get(key) for name, data in zip(names, parts)}
        if len(set(map(str, values.values()))) > 1:
            problems.append(f"different {what}: " + ", ".join(f"{n}: {v}" for n, v in values.items()))
    gpus = {name: data.get("environment", {}).get("gpu") for name, data in zip(names, parts)}
    if len(set(gpus.values())) > 1:
        problems.append("different GPUs: " + ", ".join(f"{n}: {v}" for n, v in gpus.items()))
    counts = {name: data["part"].get("count") for name, data in zip(names, parts)}
    totals = {name: data["part"].get("total_cases") for name, data in zip(names, parts)}
    count = counts[names[0]]
    if len(set(counts.values())) > 1:
        problems.append("parts of different splits: " + ", ".join(
            f"{n}: part {d['part'].get('index')}/{counts[n]}" for n, d in zip(names, parts)))
    elif len(set(totals.values())) > 1:  # the op's shape list changed between the parts' runs
        problems.append("parts split different case lists: " + ", ".join(
            f"{n}: {t} cases" for n, t in totals.items()))
    elif not isinstance(count, int) or count < 1:
        problems.append(f"part count {count!r} is not a positive int")
    else:
        given: Dict[int, List[str]] = {}
        for name, data in zip(names, parts):
            given.setdefault(data["part"].get("index"), []).append(name)
        duplicated = {i: files for i, files in given.items() if len(files) > 1}
        missing = [i for i in range(1, count + 1) if i not in given]
        stray = [i for i in given if not isinstance(i, int) or not 1 <= i <= count]
        problems += [f"part {i}/{count} given more than once: {', '.join(files)}"
                     for i, files in sorted(duplicated.items())]
        if missing:
            problems.append(f"missing part(s) {', '.join(f'{i}/{count}' for i in missing)}")
        if stray:
            problems.append(f"part number(s) outside 1..{count}: {', '.join(map(str, stray))}")
    if problems:
        raise ValueError("cannot merge these parts: " + "; ".join(problems))

    order = sorted(range(len(parts)), key=lambda j: parts[j]["part"]["index"])
    first = parts[order[0]]
    env0 = first.get("environment", {})
    rows: List[Row] = []
    notes: List[str] = []
    methods: Dict[str, str] = {}
    merged_parts = []
    for j in order:
        data = parts[j]
        rows += rows_from_results(data)
        notes += [n for n in data.get("notes", []) if n not in notes]
        methods.update({m: d for m, d in data.get("timing_methods", {}).items() if m not in methods})
        merged_parts.append({"part": data["part"], "file": str(names[j]),
                             "date": data.get("environment", {}).get("date"), "ceilings": data.get("ceilings")})
    notes.append(f"Joined from {count} parts run as separate processes on {env0.get('gpu')} (header: part 1's "
                 "environment). Each part measured its own ceilings; each row's % copy and % matmul were "
                 "computed against its own part's ceilings and are kept as measured. *vs anchor* always compares "
                 "rows of one shape, timed in the same part.")
    for entry, j in zip(merged_parts, order):
        notes.append(_part_note(entry, parts[j].get("environment", {}), env0))
    ceilings = Ceilings(**first["ceilings"]) if first.get("ceilings") else None
    return {"op": first["op"], "rows": rows, "ceilings": ceilings, "env": env0, "notes": notes,
            "methods": list(methods), "quick": bool(first.get("quick")), "merged_parts": merged_parts}


def _part_note(entry: Dict[str, Any], env: Dict[str, Any], env0: Dict[str, Any]) -> str:
    part, c = entry["part"], entry.get("ceilings")
    text = f"Part {part['index']} of {part['count']} ({'; '.join(part.get('cases', [])) or 'no case list'}): " \
           f"run {entry.get('date') or 'at an unknown date'}; "
    if c:
        text += (f"ceilings copy {_fmt(c.get('copy_gbps'), 0)} GB/s, "
                 f"bf16 matmul {_fmt(c.get('matmul_tflops'), 0)} TFLOP/s")
    else:
        text += "no ceilings measured"
    changed = [f"{k} {env.get(k)}" for k in _COMPARED_ENV if env.get(k) != env0.get(k)]
    if changed:
        text += f"; unlike part 1: {', '.join(changed)}"
    return text + "."

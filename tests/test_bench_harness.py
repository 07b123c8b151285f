"""The benchmark harness: its arithmetic, naming and reports (CPU), and its timing (GPU)."""
from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from lepton_kernels import bench
from lepton_kernels.bench import harness, report
from lepton_kernels.bench import paged_kv_write as bench_pkw
from lepton_kernels.bench import quant_matmul as bench_qmm
from lepton_kernels.bench.harness import Ceilings, Row


@pytest.mark.parametrize("name, slug", [
    ("NVIDIA H200", "h200"),
    ("NVIDIA H100 80GB HBM3", "h100"),
    ("NVIDIA H100 PCIe", "h100-pcie"),
    ("NVIDIA A100-SXM4-80GB", "a100"),
    ("NVIDIA GeForce RTX 4090", "rtx-4090"),
    ("NVIDIA L40S", "l40s"),
    ("NVIDIA GH200 480GB", "gh200"),
    ("", "gpu"),
])
def test_gpu_slug(name, slug):
    assert harness.gpu_slug(name) == slug


def test_rotation_count():
    l2 = 50 << 20
    assert harness.rotation_count(1 << 30, l2) == 1  # one set already dwarfs the L2
    n = harness.rotation_count(10 << 20, l2)
    assert n * (10 << 20) >= 3 * l2 and (n - 1) * (10 << 20) < 3 * l2
    assert harness.rotation_count(1000, l2) == harness.MAX_ROTATION_SETS
    assert harness.rotation_count(10 << 20, l2, budget_bytes=25 << 20) == 2
    assert harness.rotation_count(0, l2) == 1


def test_summarize_ms():
    stats = harness.summarize_ms([0.004, 0.001, 0.003, 0.002, 0.005])
    assert stats["median_us"] == pytest.approx(3.0)
    assert stats["p10_us"] == pytest.approx(1.4)
    assert stats["p90_us"] == pytest.approx(4.6)
    # a graph of 10 calls: per-call time
    assert harness.summarize_ms([0.1], calls_per_run=10)["median_us"] == pytest.approx(10.0)


def test_choose_method():
    assert harness.choose_method(3.0, graph_ok=True, have_triton=True) == "graph"
    assert harness.choose_method(3.0, graph_ok=False, have_triton=True) == "do_bench"
    assert harness.choose_method(300.0, graph_ok=True, have_triton=True) == "do_bench"
    assert harness.choose_method(300.0, graph_ok=True, have_triton=False) == "events"


def test_time_fn_rejects_unknown_method():
    with pytest.raises(ValueError, match="unknown timing method"):
        harness.time_fn(lambda: None, [()], method="stopwatch")


def test_rates_and_percentages():
    assert harness.gbps(3e9, 1000.0) == pytest.approx(3000.0)  # 3 GB in 1 ms
    assert harness.tflops(2e12, 2000.0) == pytest.approx(1000.0)
    assert harness.percent_of(1500.0, 3000.0) == pytest.approx(50.0)
    assert harness.percent_of(None, 3000.0) is None
    assert harness.percent_of(1.0, 0.0) is None
    assert harness.speed_vs_anchor(10.0, 5.0) == pytest.approx(2.0)
    assert harness.speed_vs_anchor(None, 5.0) is None


def _synthetic_rows():
    shape_a = {"T": 16, "D": 128}
    shape_b = {"T": 4096, "D": 128}
    return [
        Row("demo", "cuda", shape_a, 4.0, "graph", bytes=8_000_000, p10_us=3.9, p90_us=4.2, calls_per_run=64),
        Row("demo", "anchor: torch copy_", shape_a, 5.0, "graph", bytes=8_000_000, is_anchor=True),
        Row("demo", "cuda", shape_b, 100.0, "do_bench", bytes=300_000_000, flops=10**11,
            extra={"eager µs/call": 101.5}),
        Row("demo", "triton", shape_b, 150.0, "do_bench", bytes=300_000_000, note="odd | note"),
        Row("demo", "anchor: torch copy_", shape_b, 120.0, "do_bench", bytes=300_000_000, is_anchor=True),
        Row("demo", "torch", {"T": 9, "D": 128}, 7.0, "events"),  # no anchor, no bytes
    ]


CEILINGS = Ceilings(copy_gbps=4000.0, matmul_tflops=800.0, copy_bytes=4 << 30)


def test_finalize_rows():
    rows = harness.finalize_rows(_synthetic_rows(), CEILINGS)
    cuda_a, anchor_a, cuda_b, triton_b, anchor_b, lone = rows
    assert cuda_a.gbps == pytest.approx(2000.0)  # 8 MB in 4 µs
    assert cuda_a.pct_copy == pytest.approx(50.0)
    assert cuda_a.vs_anchor == pytest.approx(5.0 / 4.0)
    assert anchor_a.vs_anchor == pytest.approx(1.0)
    assert cuda_b.tflops == pytest.approx(1000.0)
    assert cuda_b.pct_matmul == pytest.approx(125.0)
    assert triton_b.vs_anchor == pytest.approx(120.0 / 150.0)
    assert triton_b.tflops is None and triton_b.pct_matmul is None
    assert lone.gbps is None and lone.vs_anchor is None
    # an explicit group overrides the shape match
    a, b = harness.finalize_rows([
        Row("demo", "x", {"T": 1}, 2.0, "events", group="g"),
        Row("demo", "anchor", {"T": 2}, 4.0, "events", group="g", is_anchor=True)], CEILINGS)
    assert a.vs_anchor == pytest.approx(2.0)


def test_row_from_timing_merges_notes():
    timing = harness.Timing(median_us=3.0, method="events", p10_us=2.0, p90_us=4.0, runs=50,
                            note="graph capture failed (RuntimeError), timed call by call")
    row = Row.from_timing("demo", "torch", {"T": 1}, timing, bytes=10, note="syncs")
    assert row.median_us == 3.0 and row.runs == 50 and row.bytes == 10
    assert row.note.startswith("syncs; graph capture failed")


ENV = {"gpu": "NVIDIA H200", "gpu_slug": "h200", "capability": "9.0", "sm_count": 132, "l2_bytes": 60 << 20,
       "driver": "580.1", "cuda_runtime": "13.0", "python": "3.11", "torch": "2.11", "triton": "3.6",
       "lepton_kernels": "0.1.0", "date": "2026-01-01 00:00 UTC"}


def test_write_report(tmp_path):
    rows = harness.finalize_rows(_synthetic_rows(), CEILINGS)
    paths = report.write_report("demo", rows, CEILINGS, ENV, tmp_path / "out", methods=["graph", "do_bench"],
                                notes=["bytes are made up"], make_plot=False)
    assert paths["md"] == tmp_path / "out" / "demo-h200.md"
    assert paths["json"] == tmp_path / "out" / "demo-h200.json"
    assert "png" not in paths

    data = json.loads(paths["json"].read_text())
    assert data["op"] == "demo" and data["environment"]["gpu"] == "NVIDIA H200"
    assert data["ceilings"]["copy_gbps"] == 4000.0
    assert set(data["timing_methods"]) == {"graph", "do_bench"}
    assert len(data["rows"]) == len(rows)
    assert data["rows"][0]["pct_copy"] == pytest.approx(50.0)
    assert data["rows"][2]["extra"] == {"eager µs/call": 101.5}

    md = paths["md"].read_text()
    assert md.startswith("# demo on NVIDIA H200")
    for text in ("132 SMs", "copy 4,000 GB/s", "800 TFLOP/s", "`graph`", "bytes are made up",
                 "| backend | T | D | method | median µs | GB/s | % copy | TFLOP/s | % matmul | vs anchor |",
                 "graph ×64", "50.0%", "1.25x", "0.80x", "**anchor: torch copy_**", "odd \\| note", "102"):
        assert text in md, text
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(rows)
    assert len({line.count(" | ") for line in table if not line.startswith("|---")}) == 1


def test_quick_results_do_not_overwrite_full_ones(tmp_path):
    rows = harness.finalize_rows(_synthetic_rows(), CEILINGS)
    paths = report.write_report("demo", rows, CEILINGS, ENV, tmp_path, quick=True, make_plot=False)
    assert paths["md"].name == "demo-h200-quick.md"
    assert "(quick run)" in paths["md"].read_text()


def test_plot_skipped_without_matplotlib_or_rows(tmp_path, monkeypatch):
    rows = harness.finalize_rows(_synthetic_rows(), CEILINGS)
    spec = report.PlotSpec(x="T", where={"D": 128})
    assert not report.draw_plot("demo", rows, CEILINGS, ENV, report.PlotSpec(x="T", where={"D": 64}),
                                tmp_path / "none.png")
    monkeypatch.setattr(report, "_matplotlib", lambda: None)  # as if not installed
    paths = report.write_report("demo", rows, CEILINGS, ENV, tmp_path, plot=spec)
    assert "png" not in paths and not (tmp_path / "demo-h200.png").exists()


def test_plot_drawn_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    rows = harness.finalize_rows(_synthetic_rows(), CEILINGS)
    paths = report.write_report("demo", rows, CEILINGS, ENV, tmp_path, plot=report.PlotSpec(x="T"))
    assert paths["png"].stat().st_size > 0


def test_replot_from_results_json(tmp_path, monkeypatch):
    """A GPU run without matplotlib leaves md + json; the plot is drawn later from the json."""
    rows = harness.finalize_rows(_synthetic_rows(), CEILINGS)
    paths = report.write_report("demo", rows, CEILINGS, ENV, tmp_path, make_plot=False)
    spec = report.PlotSpec(x="T", where={"D": 128})
    assert report.replot_results(paths["json"], None) is None  # an op without a plot
    with pytest.raises(ValueError, match="not a benchmark results file"):
        (tmp_path / "other.json").write_text("{}")
        report.read_results(tmp_path / "other.json")
    if report._matplotlib() is not None:
        assert report.replot_results(paths["json"], spec) == tmp_path / "demo-h200.png"
        assert (tmp_path / "demo-h200.png").stat().st_size > 0
    monkeypatch.setattr(report, "_matplotlib", lambda: None)
    assert report.replot_results(paths["json"], spec) is None


def test_registry():
    assert "paged_kv_write" in bench.names()
    assert bench.load("paged_kv_write").run is bench_pkw.run
    with pytest.raises(ValueError, match="no benchmark for"):
        bench.load("no_such_op")


def test_paged_kv_write_cases_and_bytes():
    full = bench_pkw.cases(quick=False)
    assert [c.tokens for c in full if c.block_size == 16 and not c.fp8] == [16, 256, 4096, 16384, 65536]
    assert any(c.block_size == 128 for c in full) and any(c.fp8 for c in full)
    quick = bench_pkw.cases(quick=True)
    assert [c.tokens for c in quick if c.block_size == 16 and not c.fp8] == [4096, 65536]

    case = bench_pkw.Case(4096)
    hkv, d = bench_pkw.NUM_KV_HEADS, bench_pkw.HEAD_DIM
    assert case.op_bytes() == 4 * 4096 * hkv * d * 2 + 8 * 4096
    assert case.anchor_bytes() == 4 * 4096 * hkv * d * 2
    fp8 = bench_pkw.Case(16384, fp8=True)
    assert fp8.anchor_bytes() == 2 * 16384 * hkv * d * (2 + 1)
    assert fp8.num_blocks() * fp8.block_size >= 2 * fp8.tokens


def test_paged_kv_write_inputs_are_valid_calls():
    # the benchmark's inputs are accepted by the op, and slots are distinct and in range
    for case in (bench_pkw.Case(32), bench_pkw.Case(16, fp8=True), bench_pkw.Case(40, block_size=128)):
        s = bench_pkw.make_set(case, torch.device("cpu"))
        slots = s["slot_mapping"]
        assert slots.unique().numel() == case.tokens
        assert int(slots.max()) < case.num_blocks() * case.block_size
        import lepton_kernels

        lepton_kernels.paged_kv_write(s["k"], s["v"], s["k_cache"], s["v_cache"], slots,
                                      k_scale=s["k_scale"], v_scale=s["v_scale"], backend="torch")


# -- running in parts --------------------------------------------------------------------------------

@pytest.mark.parametrize("length", range(1, 10))
def test_split_part_puts_every_case_in_one_part_in_order(length):
    cases = [f"c{j}" for j in range(length)]
    for n in range(1, length + 1):
        parts = [harness.split_part(cases, (i, n)) for i in range(1, n + 1)]
        assert [c for part in parts for c in part] == cases  # contiguous, in order, each once
        sizes = [len(part) for part in parts]
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
        assert sizes == sorted(sizes, reverse=True)  # the longer blocks come first


def test_split_part_refuses_more_parts_than_cases():
    with pytest.raises(ValueError, match=r"--part 2/4: 3 shape cases cannot be split into 4 parts; N can be at most 3"):
        harness.split_part([1, 2, 3], (2, 4))
    with pytest.raises(ValueError, match=r"only --part 1/1 is valid"):
        harness.split_part(["only"], (1, 2), what="N×K shapes")


@pytest.mark.parametrize("text, part", [("1/2", (1, 2)), ("2/2", (2, 2)), (" 3 / 4 ", (3, 4)), ("1/1", (1, 1))])
def test_parse_part(text, part):
    assert harness.parse_part(text) == part


@pytest.mark.parametrize("text, message", [
    ("2", "takes I/N"), ("a/b", "takes I/N"), ("1/2/3", "takes I/N"), ("", "takes I/N"), ("-1/2", "takes I/N"),
    ("0/2", "1 <= I <= N"), ("3/2", "1 <= I <= N"), ("1/0", "1 <= I <= N"),
])
def test_parse_part_errors(text, message):
    with pytest.raises(ValueError, match=message):
        harness.parse_part(text)


def test_check_part_errors():
    assert harness.check_part((2, 3)) == (2, 3)
    with pytest.raises(TypeError, match="pair of ints"):
        harness.check_part((1, 2.0))
    with pytest.raises(TypeError, match="pair of ints"):
        harness.check_part("1/2")
    with pytest.raises(ValueError, match="1 <= i <= n"):
        harness.check_part((3, 2))


def test_harness_part_of_and_record():
    stub = types.SimpleNamespace(part=(2, 2), part_info=None, log=lambda msg: None)
    shapes = [(4096, 4096), (6144, 4096), (14336, 4096)]
    label = bench_qmm.shape_label
    assert harness.Harness.part_of(stub, shapes, what="N×K shapes", label=label) == [(14336, 4096)]
    assert stub.part_info == {"index": 2, "count": 2, "what": "N×K shapes", "total_cases": 3,
                              "cases": ["N=14336 K=4096"]}
    whole = types.SimpleNamespace(part=None, part_info=None, log=lambda msg: None)
    assert harness.Harness.part_of(whole, shapes) == shapes and whole.part_info == {}


def test_harness_checks_its_part_first():
    with pytest.raises(ValueError, match="1 <= i <= n"):
        harness.Harness(part=(3, 2))  # refused before it looks for a GPU


def test_ops_that_run_in_parts():
    assert set(bench.parted_names()) == {"flash_attention", "paged_attention", "quant_matmul"}
    assert bench.check_part("quant_matmul", (1, 2)) == list(bench_qmm.SHAPES[:2])
    assert bench.check_part("quant_matmul", (2, 2)) == list(bench_qmm.SHAPES[2:])
    assert bench.check_part("quant_matmul", (1, 1), quick=True) == list(bench_qmm.QUICK_SHAPES)
    with pytest.raises(ValueError, match=r"quant_matmul benchmark \(--quick\).*only --part 1/1 is valid"):
        bench.check_part("quant_matmul", (1, 2), quick=True)
    with pytest.raises(ValueError, match="N can be at most 4"):
        bench.check_part("quant_matmul", (1, 5))
    with pytest.raises(ValueError, match="paged_kv_write benchmark cannot run in parts.*quant_matmul"):
        bench.check_part("paged_kv_write", (1, 2))
    # each module's run loops over exactly its PART_CASES: the parts together are the whole run
    from lepton_kernels.bench import flash_attention as bench_fa
    from lepton_kernels.bench import paged_attention as bench_pa

    for quick in (False, True):
        cases = bench_pa.part_cases(quick)
        decode = bench_pa.QUICK_DECODE_SHAPES if quick else bench_pa.DECODE_SHAPES
        assert cases == list(decode) + [bench_pa.PREFILL_CASE]
        n = len(cases)
        assert [c for i in range(1, n + 1) for c in bench.check_part("paged_attention", (i, n), quick)] == cases
        assert bench.check_part("flash_attention", (1, 1), quick) == bench_fa.cases(quick)
    assert bench_pa.case_label((64, 4096)) == "decode B=64 L=4096"
    assert bench_pa.case_label(bench_pa.PREFILL_CASE).startswith("prefill B=4")


def test_quant_matmul_cuda_rows_cover_every_scheme():
    # cuda rows exist for every scheme (n/a where the compiled kernel lacks it), and their label's
    # second word is the scheme, which is how the scheme-anchor column finds its anchor
    assert set(bench_qmm.CUDA_LABELS) == set(bench_qmm.SCHEMES)
    for scheme, label in bench_qmm.CUDA_LABELS.items():
        assert label.startswith(bench_qmm.OUR_BACKENDS) and label.split()[1] == scheme


def _part(tmp_path, index, count, ceilings, *, op="demo", env=None, quick=False, rows=None, date=None):
    """A part's results as ``run_benchmark`` writes them, from hand-built rows."""
    shapes = [{"T": 16 * 4 ** j, "D": 128} for j in range(count)]
    shape = shapes[index - 1] if rows is None else None
    if rows is None:
        rows = [Row(op, "cuda", shape, 4.0 * index, "graph", bytes=8_000_000),
                Row(op, "anchor: torch copy_", shape, 5.0 * index, "graph", bytes=8_000_000, is_anchor=True)]
    env = dict(env or ENV, date=date or f"2026-01-0{index} 00:00 UTC")
    record = {"index": index, "count": count, "what": "shapes", "total_cases": count,
              "cases": [f"T={shapes[index - 1]['T']}"]}
    paths = report.write_report(op, harness.finalize_rows(rows, ceilings), ceilings, env, tmp_path,
                                methods=["graph"], notes=["bytes are made up", f"note of part {index}"],
                                quick=quick, make_plot=True, plot=report.PlotSpec(x="T"), part=record)
    return paths["json"]


def test_part_report_files(tmp_path):
    path = _part(tmp_path, 1, 2, CEILINGS)
    assert path.name == "demo-h200.part1of2.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-h200.part1of2.json", "demo-h200.part1of2.md"]
    data = report.read_results(path)
    assert data["part"]["index"] == 1 and data["part"]["count"] == 2 and data["part"]["cases"] == ["T=16"]
    md = path.with_suffix(".md").read_text()
    assert md.startswith("# demo on NVIDIA H200, part 1 of 2")
    assert "**part**: 1 of 2: 1 of 2 shapes (T=16)" in md
    quick = _part(tmp_path, 1, 1, CEILINGS, quick=True)
    assert quick.name == "demo-h200-quick.part1of1.json"


def test_merge_parts(tmp_path):
    other = Ceilings(copy_gbps=2000.0, matmul_tflops=700.0, copy_bytes=4 << 30)
    env2 = dict(ENV, torch="2.12")
    p1 = _part(tmp_path / "a", 1, 2, CEILINGS)
    p2 = _part(tmp_path / "b", 2, 2, other, env=env2)
    paths = bench.merge([p2, p1], tmp_path / "out", plot=False)  # any order
    assert paths["json"] == tmp_path / "out" / "demo-h200.json" and "png" not in paths

    data = report.read_results(paths["json"])
    assert "part" not in data and [m["part"]["index"] for m in data["merged_parts"]] == [1, 2]
    assert data["environment"]["date"] == "2026-01-01 00:00 UTC"  # part 1's header
    assert data["ceilings"]["copy_gbps"] == 4000.0
    rows = data["rows"]
    assert [r["shape"]["T"] for r in rows] == [16, 16, 64, 64]  # part order
    # each row keeps the % copy of its own part's ceilings: 8 MB in 4 µs = 2000 GB/s, in 8 µs 1000 GB/s
    assert rows[0]["pct_copy"] == pytest.approx(50.0) and rows[2]["pct_copy"] == pytest.approx(50.0)
    assert rows[2]["vs_anchor"] == pytest.approx(10.0 / 8.0)
    assert data["notes"][:3] == ["bytes are made up", "note of part 1", "note of part 2"]

    md = paths["md"].read_text()
    assert md.startswith("# demo on NVIDIA H200\n")
    for text in ("ceilings (part 1; see the per-part notes)**: copy 4,000 GB/s", "Joined from 2 parts",
                 "compare with the ceilings measured in the row's own part",
                 "computed against its own part's ceilings",
                 "Part 1 of 2 (T=16): run 2026-01-01 00:00 UTC; ceilings copy 4,000 GB/s, bf16 matmul 800 TFLOP/s.",
                 "Part 2 of 2 (T=64): run 2026-01-02 00:00 UTC; ceilings copy 2,000 GB/s, bf16 matmul 700 TFLOP/s; "
                 "unlike part 1: torch 2.12."):
        assert text in md, text
    assert len([line for line in md.splitlines() if line.startswith("| ")]) == 1 + 4

    # the merged file reads back as an ordinary results file, and replots
    spec = report.PlotSpec(x="T")
    if report._matplotlib() is not None:
        assert report.replot_results(paths["json"], spec) == tmp_path / "out" / "demo-h200.png"


def test_merge_errors(tmp_path):
    p1 = _part(tmp_path / "a", 1, 3, CEILINGS)
    p2 = _part(tmp_path / "b", 2, 3, CEILINGS)
    p3 = _part(tmp_path / "c", 3, 3, CEILINGS)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"missing part\(s\) 2/3"):
        bench.merge([p1, p3], out)
    with pytest.raises(ValueError, match=r"part 1/3 given more than once: demo-h200.part1of3.json, "
                                         r"demo-h200.part1of3.json"):
        bench.merge([p1, p1, p2, p3], out)
    with pytest.raises(ValueError, match="parts of different splits"):
        bench.merge([p1, _part(tmp_path / "d", 2, 2, CEILINGS)], out)
    with pytest.raises(ValueError, match="different ops"):
        bench.merge([p1, p2, _part(tmp_path / "e", 3, 3, CEILINGS, op="other")], out)
    with pytest.raises(ValueError, match="different GPUs: .*NVIDIA H100"):
        bench.merge([p1, p2, _part(tmp_path / "f", 3, 3, CEILINGS, env=dict(ENV, gpu="NVIDIA H100"))], out)
    with pytest.raises(ValueError, match="different quick flags"):
        bench.merge([p1, p2, _part(tmp_path / "g", 3, 3, CEILINGS, quick=True)], out)
    whole = report.write_report("demo", harness.finalize_rows(_synthetic_rows(), CEILINGS), CEILINGS, ENV,
                                tmp_path / "h", make_plot=False)["json"]
    with pytest.raises(ValueError, match="not part results .*demo-h200.json"):
        bench.merge([p1, whole], out)
    with pytest.raises(ValueError, match="no part files"):
        report.merge_parts([])
    assert not out.exists()


def test_run_benchmark_in_parts_without_a_gpu(tmp_path, monkeypatch):
    """run_benchmark's part logic end to end, with a stand-in harness and op module."""

    class StubHarness:
        part_of = harness.Harness.part_of

        def __init__(self, *, quick=False, log=None, part=None):
            self.part, self.part_info, self.notes, self.methods_used = part, None, [], ["events"]

        def log(self, msg):
            pass

        def environment(self):
            return dict(ENV)

        def measure_ceilings(self):
            return CEILINGS

    def run(h, quick):
        return [Row("stub", "torch", {"T": t}, 2.0, "events", bytes=1000) for t in h.part_of([1, 2, 3], what="Ts")]

    module = types.ModuleType("lepton_kernels.bench._stub_op")
    module.run, module.PART_CASES = run, lambda quick: [1, 2, 3]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(bench.BENCHMARKS, "stub", module.__name__)
    monkeypatch.setattr(harness, "Harness", StubHarness)

    parts = [bench.run_benchmark("stub", out_dir=tmp_path, part=(i, 2))["json"] for i in (1, 2)]
    assert [p.name for p in parts] == ["stub-h200.part1of2.json", "stub-h200.part2of2.json"]
    assert [r["shape"]["T"] for r in report.read_results(parts[0])["rows"]] == [1, 2]
    merged = report.read_results(bench.merge(parts, tmp_path / "out")["json"])
    assert [r["shape"]["T"] for r in merged["rows"]] == [1, 2, 3]

    with pytest.raises(ValueError, match="N can be at most 3"):
        bench.run_benchmark("stub", out_dir=tmp_path, part=(1, 4))
    module.run = lambda h, quick: []  # declares PART_CASES but never asks for its part
    with pytest.raises(RuntimeError, match="never called harness.part_of"):
        bench.run_benchmark("stub", out_dir=tmp_path, part=(1, 2))


@pytest.mark.gpu
def test_time_fn_and_ceilings_on_gpu():
    x = torch.randn(1 << 20, device="cuda")
    ys = [torch.empty_like(x) for _ in range(4)]
    for method in ("auto", "events", "graph", "eager loop"):
        t = harness.time_fn(lambda y: y.copy_(x), [(y,) for y in ys], method=method, rep_ms=10)
        assert t.median_us > 0 and t.method in harness.METHOD_DESCRIPTIONS
    ceilings = harness.measure_ceilings(copy_bytes=256 << 20, matmul_n=2048, rep_ms=20)
    assert ceilings.copy_gbps > 0 and ceilings.matmul_tflops > 0

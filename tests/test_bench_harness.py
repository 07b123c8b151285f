"""The benchmark harness: its arithmetic, naming and reports (CPU), and its timing (GPU)."""
from __future__ import annotations

import json

import pytest
import torch

from lepton_kernels import bench
from lepton_kernels.bench import harness, report
from lepton_kernels.bench import paged_kv_write as bench_pkw
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


@pytest.mark.gpu
def test_time_fn_and_ceilings_on_gpu():
    x = torch.randn(1 << 20, device="cuda")
    ys = [torch.empty_like(x) for _ in range(4)]
    for method in ("auto", "events", "graph", "eager loop"):
        t = harness.time_fn(lambda y: y.copy_(x), [(y,) for y in ys], method=method, rep_ms=10)
        assert t.median_us > 0 and t.method in harness.METHOD_DESCRIPTIONS
    ceilings = harness.measure_ceilings(copy_bytes=256 << 20, matmul_n=2048, rep_ms=20)
    assert ceilings.copy_gbps > 0 and ceilings.matmul_tflops > 0

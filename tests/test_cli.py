"""The ``lepton-kernels`` command line: info, selfcheck, bench."""
from __future__ import annotations

import json
import os

import sys
import types

import pytest
import torch

from lepton_kernels import _backends, cli

HAS_CUDA = torch.cuda.is_available()


def test_info_mentions_paged_kv_write(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "lepton-kernels" in out
    assert "paged_kv_write" in out
    assert ("no CUDA GPU" in out) != HAS_CUDA


def test_info_json(capsys):
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info["versions"]) >= {"python", "lepton_kernels", "torch", "triton", "jax"}
    op = info["ops"]["paged_kv_write"]
    assert op["error"] is None
    assert op["backends"] == ["cuda", "triton", "torch"]
    assert op["auto"] in op["backends"]
    # every backend faster than the one picked says why it was skipped
    faster = op["backends"][: op["backends"].index(op["auto"])]
    assert set(op["skipped"]) == set(faster)
    assert all(isinstance(op["skipped"][b], str) and op["skipped"][b] for b in faster)
    if not HAS_CUDA:
        assert info["gpus"] == []
        assert "cuda" in op["skipped"]


def test_selfcheck_paged_kv_write_passes(capsys):
    assert cli.main(["selfcheck", "--op", "paged_kv_write"]) == 0
    out = capsys.readouterr().out
    assert "PASS  paged_kv_write[torch]" in out
    assert "FAIL" not in out.replace("0 failed", "")
    if not HAS_CUDA:
        assert "SKIP  paged_kv_write[cuda]" in out
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            # the interpreter runs the Triton kernel on CPU tensors: it is really compared
            assert "PASS  paged_kv_write[triton]" in out


def test_selfcheck_json(capsys):
    assert cli.main(["selfcheck", "--op", "paged_kv_write", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["counts"]["FAIL"] == 0
    assert {r["backend"] for r in report["results"]} == {"cuda", "triton", "torch"}


def test_selfcheck_unknown_op_fails(capsys):
    assert cli.main(["selfcheck", "--op", "no_such_op"]) == 1
    assert "no such op" in capsys.readouterr().out


@pytest.fixture
def probe_op(monkeypatch):
    """A throwaway op (public function in a stand-in ``lepton_kernels.ops`` module): ``out``
    is written in place and ``2 * x`` returned. The triton backend is wrong by the amount
    chosen per test."""
    op = "_selfcheck_probe"
    state = {"triton_error": 0.0, "triton_writes": True}

    def reference(x, out):
        out.copy_(x * 2)
        return x * 2

    def triton_impl(x, out):
        if state["triton_writes"]:
            out.copy_(x * 2)
        return x * 2 + state["triton_error"]

    impls = {
        "cuda": _backends.Implementation(op, "cuda", reference, lambda x, out: "no compiled kernel here"),
        "triton": _backends.Implementation(op, "triton", triton_impl, lambda x, out: None),
        "torch": _backends.Implementation(op, "torch", reference, lambda x, out: None),
    }
    monkeypatch.setitem(_backends._REGISTRY, op, impls)

    def public(x, out, *, backend="auto"):
        return _backends.select(op, backend, x, out).fn(x, out)

    module = types.ModuleType(f"lepton_kernels.ops.{op}")
    setattr(module, op, public)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(_backends._EXAMPLES, op, lambda device: (
        (torch.randn(7, 5, device=device, dtype=torch.float16),
         torch.full((7, 5), float("nan"), device=device, dtype=torch.float16)), {}))
    return op, state


def _statuses(results):
    return {r["backend"]: r["status"] for r in results}


def test_check_op_passes_matching_backends(probe_op):
    op, _ = probe_op
    results = cli.check_op(op, torch.device("cpu"))
    assert _statuses(results) == {"cuda": "SKIP", "triton": "PASS", "torch": "PASS"}
    assert "no compiled kernel here" in [r for r in results if r["backend"] == "cuda"][0]["detail"]


def test_check_op_catches_a_wrong_return_value(probe_op, capsys):
    op, state = probe_op
    state["triton_error"] = 0.5
    results = cli.check_op(op, torch.device("cpu"))
    assert _statuses(results)["triton"] == "FAIL"
    assert cli.main(["selfcheck", "--op", op, "--device", "cpu"]) == 1
    assert f"FAIL  {op}[triton]" in capsys.readouterr().out


def test_check_op_catches_an_unwritten_in_place_output(probe_op):
    op, state = probe_op
    state["triton_writes"] = False  # leaves the NaN-poisoned buffer as it was
    results = cli.check_op(op, torch.device("cpu"))
    triton = [r for r in results if r["backend"] == "triton"][0]
    assert triton["status"] == "FAIL"
    assert "NaN" in triton["detail"]


def test_compare_tolerances_and_mismatches():
    x = torch.randn(64, dtype=torch.float16)
    assert cli.compare("x", x, x.clone())[0] is None
    assert cli.compare("x", (x.float() + 1e-3).half(), x)[0] is None  # within fp16 tolerance
    assert "elements differ" in cli.compare("x", x + 1, x)[0]
    assert "shape" in cli.compare("x", x[:10], x)[0]
    assert "dtype" in cli.compare("x", x.float(), x)[0]
    poisoned = x.clone()
    poisoned[3] = float("nan")
    assert "NaN" in cli.compare("x", poisoned, x)[0]
    idx = torch.arange(9)
    assert cli.compare("i", idx, idx.clone())[0] is None
    assert "1 of 9" in cli.compare("i", idx + (idx == 4), idx)[0]


def test_clone_keeps_strides_and_copies():
    base = torch.randn(4, 6, 3)
    view = base[:, ::2]  # a strided view, as an example may pass on purpose
    copied = cli._clone(((view,), {"v": view}))
    got = copied[0][0]
    assert got.stride() == view.stride()
    assert torch.equal(got, view)
    assert got.data_ptr() != view.data_ptr()
    assert copied[1]["v"].data_ptr() != view.data_ptr()


def test_bench_list(capsys):
    assert cli.main(["bench", "--list"]) == 0
    assert "paged_kv_write" in capsys.readouterr().out.split()


def test_bench_unknown_op_exits_2(capsys):
    assert cli.main(["bench", "no_such_op"]) == 2
    assert "no benchmark for 'no_such_op'" in capsys.readouterr().err


def test_no_command_exits_2(capsys):
    assert cli.main([]) == 2


@pytest.mark.skipif(HAS_CUDA, reason="checks the message given without a GPU")
def test_bench_without_gpu_exits_2(tmp_path, capsys):
    assert cli.main(["bench", "paged_kv_write", "--quick", "--out", str(tmp_path)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.gpu
def test_bench_paged_kv_write_quick(tmp_path, capsys):
    assert cli.main(["bench", "paged_kv_write", "--quick", "--out", str(tmp_path), "--no-plot"]) == 0
    md = list(tmp_path.glob("paged_kv_write-*-quick.md"))
    js = list(tmp_path.glob("paged_kv_write-*-quick.json"))
    assert len(md) == 1 and len(js) == 1
    data = json.loads(js[0].read_text())
    assert data["ceilings"]["copy_gbps"] > 0 and data["ceilings"]["matmul_tflops"] > 0
    backends = {r["backend"] for r in data["rows"]}
    assert "anchor: torch copy_" in backends and "torch" in backends
    assert all(r["median_us"] > 0 for r in data["rows"])
    assert all(r["vs_anchor"] is not None for r in data["rows"])


def test_bench_replot_draws_from_a_results_json(tmp_path, capsys):
    """``bench --replot``: the plot of a results file, on a machine without a GPU."""
    from lepton_kernels.bench import report
    from lepton_kernels.bench.harness import Ceilings, Row, finalize_rows

    rows = [Row(op="paged_kv_write", backend=backend, shape={"T": t, "block_size": 16, "cache": "bf16"},
                median_us=us, method="graph", bytes=1 << 20, is_anchor=backend.startswith("anchor"))
            for backend, us in (("anchor: torch copy_", 2.0), ("cuda", 1.0)) for t in (256, 4096)]
    rows = finalize_rows(rows, Ceilings(copy_gbps=3000.0, matmul_tflops=700.0, copy_bytes=1 << 30))
    env = {"gpu": "NVIDIA H100", "gpu_slug": "h100"}
    paths = report.write_report("paged_kv_write", rows, None, env, tmp_path, make_plot=False)
    code = cli.main(["bench", "--replot", str(paths["json"])])
    if report._matplotlib() is None:
        assert code == 1 and "not drawn" in capsys.readouterr().err
    else:
        assert code == 0 and (tmp_path / "paged_kv_write-h100.png").stat().st_size > 0


# -- bench in parts -----------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["quant_matmul", "--part", "3/2"], "1 <= I <= N"),
    (["quant_matmul", "--part", "half"], "--part takes I/N"),
    (["quant_matmul", "--part", "1/5"], "N can be at most 4"),
    (["quant_matmul", "--quick", "--part", "1/2"], "only --part 1/1 is valid"),
    (["paged_kv_write", "--part", "1/2"], "paged_kv_write benchmark cannot run in parts"),
    (["quant_matmul", "--merge", "x.json"], "not --merge and an op"),
    (["--merge", "x.json", "--replot", "y.json"], "not --replot and --merge"),
    (["--merge", "x.json", "--part", "1/2"], "--merge takes no --part"),
])
def test_bench_part_usage_errors_exit_2_before_any_gpu_work(argv, message, tmp_path, capsys):
    assert cli.main(["bench", *argv, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_bench_part_help_names_the_ops_that_run_in_parts(capsys):
    from lepton_kernels import bench

    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert ", ".join(bench.parted_names()) in text and "--merge" in text


def _quant_part(tmp_path, index, count, copy_gbps):
    """A quant_matmul part file as a GPU run writes it (hand-built rows)."""
    from lepton_kernels.bench import report
    from lepton_kernels.bench import quant_matmul as bench_qmm
    from lepton_kernels.bench.harness import Ceilings, Row, finalize_rows, part_record

    shapes = bench_qmm.SHAPES
    record = part_record(shapes, (index, count), what=bench_qmm.PART_WHAT, label=bench_qmm.shape_label)
    rows = []
    for n, k in shapes[(index - 1) * len(shapes) // count:index * len(shapes) // count]:
        for m in (1, 16):
            shape = {"N": n, "K": k, "M": m}
            rows += [Row("quant_matmul", bench_qmm.ANCHOR_CUBLAS, shape, 40.0, "graph", bytes=2 * n * k,
                         is_anchor=True),
                     Row("quant_matmul", bench_qmm.LABELS["w4a16"], shape, 12.0, "graph", bytes=n * k // 2)]
    ceilings = Ceilings(copy_gbps=copy_gbps, matmul_tflops=800.0, copy_bytes=4 << 30)
    env = {"gpu": "NVIDIA H100 80GB HBM3", "gpu_slug": "h100", "date": f"2026-02-0{index} 10:00 UTC"}
    return report.write_report("quant_matmul", finalize_rows(rows, ceilings), ceilings, env, tmp_path,
                               notes=bench_qmm.NOTES, part=record)["json"]


def test_bench_merge_writes_the_usual_results_and_replots(tmp_path, capsys):
    from lepton_kernels.bench import report

    parts = [_quant_part(tmp_path / "parts", i, 2, 3000.0 + i) for i in (1, 2)]
    assert [p.name for p in parts] == ["quant_matmul-h100.part1of2.json", "quant_matmul-h100.part2of2.json"]
    out = tmp_path / "results"
    assert cli.main(["bench", "--merge", *map(str, parts), "--out", str(out), "--no-plot"]) == 0
    assert f"wrote {out / 'quant_matmul-h100.json'}" in capsys.readouterr().out
    data = report.read_results(out / "quant_matmul-h100.json")
    assert [(r["shape"]["N"], r["shape"]["K"]) for r in data["rows"][::4]] == [(4096, 4096), (6144, 4096),
                                                                            (14336, 4096), (4096, 14336)]
    assert not (out / "quant_matmul-h100.png").exists()
    code = cli.main(["bench", "--replot", str(out / "quant_matmul-h100.json")])
    if report._matplotlib() is None:
        assert code == 1
    else:
        assert code == 0 and (out / "quant_matmul-h100.png").stat().st_size > 0


def test_bench_merge_errors_exit_2(tmp_path, capsys):
    part1 = _quant_part(tmp_path, 1, 2, 3000.0)
    assert cli.main(["bench", "--merge", str(part1), "--out", str(tmp_path / "out")]) == 2
    assert "missing part(s) 2/2" in capsys.readouterr().err
    assert cli.main(["bench", "--merge", str(tmp_path / "nothing.json"), "--out", str(tmp_path / "out")]) == 2
    assert "nothing.json" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{not json")
    assert cli.main(["bench", "--merge", str(tmp_path / "bad.json"), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()

"""The compiled quant_matmul GEMV (w4a16, w8a16, w8a8, fp8; M <= 16) against the references.

CPU: ``supports`` (its reasons, on CPU and meta tensors), the block-plan heuristic, the w8a8/fp8
launch sequence, and that "auto" never picks the compiled backend for what it declines. GPU
(``-m gpu``): every scheme, group size, symmetry, activation and scale dtype, M from 1 to 16,
odd N, K tails, bias, act-order, strided and misaligned x, forced split-K plans, poisoned
buffers, determinism, CUDA graphs and torch.compile; for w8a8 and fp8 also the activation
quantization bit for bit and the programmatic dependent launch on and off.
"""
from __future__ import annotations

import dataclasses
import types
import weakref

import pytest
import torch

import lepton_kernels as lk
from lepton_kernels import _backends
from lepton_kernels import cuda as compiled
from lepton_kernels.cuda import quant_matmul as cq
from lepton_kernels.ops.quant_matmul import OP, quant_matmul
from lepton_kernels.quant.weight import QuantizedWeight, quantize_weight
from lepton_kernels.reference.quant_matmul import quantize_rows_fp8, quantize_rows_int8

from ._utils import poisoned

CUDA_OK = torch.cuda.is_available() and compiled.unavailable_reason(torch.device("cuda")) is None
needs_kernel = pytest.mark.skipif(not CUDA_OK, reason="the compiled CUDA kernels cannot run here")
FP8_OK = CUDA_OK and torch.cuda.get_device_capability() >= (8, 9)
DYNAMIC = [pytest.param("w8a8"),
           pytest.param("fp8", marks=pytest.mark.skipif(not FP8_OK, reason="e4m3 needs compute capability 8.9+"))]

W4 = [(32, True), (32, False), (64, True), (64, False), (128, True), (128, False), (-1, True), (-1, False)]
SCHEMES = [("w4a16", g, sym) for g, sym in W4] + [("w8a16", -1, True)]
DTYPES = [torch.float16, torch.bfloat16]
MS = [1, 2, 3, 7, 8, 9, 16]


def _qw(n, k, scheme, group_size=-1, symmetric=True, dtype=torch.float16, device="cuda"):
    w = torch.randn(n, k, device=device) * 0.05
    return quantize_weight(w.to(dtype), scheme, group_size=group_size, symmetric=symmetric)


def _reference(x, qw, bias=None):
    """float64 ``x @ dequantize(W)^T + bias``, unrounded."""
    ref = x.double() @ qw.dequantize(torch.float64).t()
    return ref if bias is None else ref + bias.double()


def _check(out, ref, dtype):
    """The accuracy rule: mean|C - C_ref| / mean|C_ref| below 1e-3 (float16) or 4e-3 (bfloat16)."""
    assert out.dtype == dtype and out.shape == ref.shape
    assert not out.isnan().any(), "NaN in the output (unwritten elements?)"
    rel = ((out.double() - ref).abs().mean() / ref.abs().mean()).item()
    tol = 1e-3 if dtype == torch.float16 else 4e-3
    assert rel < tol, f"mean relative error {rel:.3g} >= {tol:g}"


def _args(x, qw, bias=None):
    """The normalized arguments every backend and its ``supports`` receive."""
    return (x.reshape(-1, qw.k), qw.packed, qw.scales, qw.zeros, qw.perm, bias, qw.scheme, qw.layout,
            qw.group_size, qw.n, qw.k)


@pytest.fixture
def plan_overrides():
    yield cq.set_plan_overrides
    cq.set_plan_overrides()


# -- CPU: supports, plan ----------------------------------------------------------------------------

@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_supports_accepts_weight_only(device):
    for scheme, group_size, symmetric in SCHEMES:
        qw = _qw(96, 256, scheme, group_size, symmetric, device="cpu").to(device)
        for dtype in DTYPES:
            for m in (1, 16):
                x = torch.empty(m, 256, dtype=dtype, device=device)
                assert cq.supports(*_args(x, qw)) is None


def test_supports_reasons():
    x = torch.randn(4, 256, dtype=torch.float16)
    qw = _qw(64, 256, "w4a16", 64, device="cpu")
    args = list(_args(x, qw))
    args[6] = "w2a16"
    assert "serves the schemes w4a16, w8a16, w8a8, fp8, not w2a16" in cq.supports(*args)
    args = list(_args(x, qw))
    args[7] = "rowmajor"
    assert "'int4_k8' layout, got 'rowmajor'" in cq.supports(*args)
    assert "float16 or bfloat16 activations, got torch.float32" in cq.supports(*_args(x.float(), qw))
    reason = cq.supports(*_args(torch.randn(17, 256, dtype=torch.float16), qw))
    assert "up to 16 tokens" in reason and "got 17" in reason and "Triton" in reason
    # K within the layout's rules but not a whole 16-byte load per lane
    assert "K % 32 == 0, got K=40" in cq.supports(*_args(torch.randn(2, 40, dtype=torch.float16),
                                                         _qw(32, 40, "w4a16", -1, device="cpu")))
    assert "K % 16 == 0, got K=24" in cq.supports(*_args(torch.randn(2, 24, dtype=torch.float16),
                                                         _qw(32, 24, "w8a16", device="cpu")))


def test_supports_needs_aligned_weight_rows():
    qw = _qw(64, 256, "w4a16", 128, device="cpu")
    x = torch.randn(2, 256, dtype=torch.float16)
    wide = torch.zeros(64, 33, dtype=torch.int32)[:, :32]  # rows 33 words apart
    shifted = torch.zeros(64 * 32 + 1, dtype=torch.int32)[1:].view(64, 32)  # 4-byte storage offset
    for packed in (wide, shifted):
        view = QuantizedWeight(packed, qw.scales, None, scheme="w4a16", group_size=128, shape=(64, 256),
                               dtype=torch.float16)
        assert "16-byte aligned rows of packed" in cq.supports(*_args(x, view))


def test_cpu_inputs_are_declined_with_the_reason():
    qw = _qw(64, 256, "w8a16", device="cpu")
    x = torch.randn(2, 256, dtype=torch.float16)
    assert "compiled kernels need CUDA tensors" in _backends.explain(OP, *_args(x, qw))["cuda"]
    with pytest.raises(lk.BackendUnavailableError, match="backend 'cuda' cannot serve this call"):
        quant_matmul(x, qw, backend="cuda")
    assert torch.equal(quant_matmul(x, qw), quant_matmul(x, qw, backend="torch"))


def test_plan_heuristic_invariants():
    for m in (1, 2, 4, 5, 8, 9, 16):
        for n, k in ((1, 128), (96, 256), (97, 4096), (4096, 4096), (14336, 4096), (4096, 14336), (128, 64)):
            for int4 in (True, False):
                for sms in (1, 132):
                    plan = cq.choose_plan(m, n, k, int4, sms)
                    steps = -(-k // cq.STEP_K)
                    assert plan.rows_per_warp in cq.rows_per_warp_choices(m, int4)
                    rows = plan.rows_per_warp * plan.warps_n
                    assert plan.warps_n in (1, 2, 4, 8)
                    assert plan.row_tiles == -(-n // rows)
                    assert plan.splits * plan.steps_per_split >= steps > (plan.splits - 1) * plan.steps_per_split
                    assert 1 <= plan.splits <= cq.MAX_SPLITS
    # Forced choices stay consistent (no empty split).
    plan = cq.choose_plan(3, 96, 1024, True, 132, warps_n=8, splits=5, prefetch=False)
    assert plan.warps_n == 8 and plan.splits * plan.steps_per_split >= 8 > (plan.splits - 1) * plan.steps_per_split
    assert not plan.prefetch and cq.choose_plan(3, 96, 1024, True, 132).prefetch
    with pytest.raises(ValueError, match="unknown plan fields"):
        cq.set_plan_overrides(block_n=64)
    assert cq.choose_plan(3, 4096, 4096, True, 132, rows_per_warp=64).rows_per_warp == 64
    with pytest.raises(ValueError, match="rows_per_warp must be one of \\[32\\] for M=9"):
        cq.choose_plan(9, 4096, 4096, True, 132, rows_per_warp=64)


def test_plan_heuristic_measured_choices():
    """The plans an H100 sweep (132 SMs; rows per warp x warps across x splits, CUDA graphs)
    measured fastest, or within 4% of it: the most rows per warp unless their tiles leave 30% of
    the slots empty, the fewest warps across whose row tiles fit a wave, then (w4a16) the split
    that evens a warp's steps against the cost of a split, (w8a16) as many splits as a wave holds
    once tiles leave most slots idle."""
    sms = 132
    for n, k, m, int4, want in ((4096, 4096, 1, True, (32, 1, 1)), (4096, 4096, 16, True, (32, 1, 1)),
                                (6144, 4096, 4, True, (32, 1, 1)), (6144, 4096, 16, True, (32, 1, 1)),
                                (14336, 4096, 1, True, (64, 1, 1)), (14336, 4096, 16, True, (32, 2, 1)),
                                (4096, 14336, 4, True, (32, 1, 2)), (4096, 14336, 16, True, (32, 1, 2)),
                                (14336, 4096, 1, False, (32, 2, 1)), (14336, 4096, 16, False, (32, 2, 1)),
                                (6144, 4096, 1, False, (32, 1, 1)), (6144, 4096, 16, False, (32, 1, 1)),
                                (4096, 14336, 16, False, (16, 1, 1)), (4096, 14336, 1, False, (16, 1, 1)),
                                (4096, 4096, 16, False, (16, 1, 1)), (4096, 4096, 1, False, (16, 1, 1))):
        plan = cq.choose_plan(m, n, k, int4, sms)
        assert (plan.rows_per_warp, plan.warps_n, plan.splits) == want, (n, k, m, int4, plan)
        assert plan.row_tiles * plan.splits <= cq.BLOCKS_PER_SM * sms


def test_split_k_buffers_outlive_the_launch(monkeypatch):
    """The workspace and counters must still be allocated when the kernel is enqueued: a
    tensor freed before the launch lends its memory to the next allocation on the stream."""
    live = []
    seen = {}

    def fake_empty(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype)
        live.append(weakref.ref(t))
        return t

    def fake_launch(*args):
        seen["workspace"], seen["counters"] = args[15], args[16]
        seen["alive"] = all(ref() is not None for ref in live)

    plan = cq.Plan(warps_n=1, row_tiles=2, splits=3, steps_per_split=1)
    counters = torch.zeros(cq.COUNTERS_MIN, dtype=torch.int32)
    monkeypatch.setattr(cq, "_empty", fake_empty)
    monkeypatch.setattr(cq, "_plan", lambda *args, **kwargs: plan)
    monkeypatch.setattr(cq, "_counters", lambda device, count: counters)
    monkeypatch.setattr(cq, "current_stream", lambda device: 0)
    monkeypatch.setattr(cq, "_C", types.SimpleNamespace(quant_gemv=fake_launch))
    qw = _qw(96, 384, "w4a16", 128, device="cpu")
    cq.quant_matmul(*_args(torch.randn(2, 384, dtype=torch.float16), qw))
    assert len(live) == 2 and seen["alive"]
    assert seen["workspace"] != 0 and seen["counters"] == counters.data_ptr()


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_supports_accepts_dynamic_schemes(device):
    for scheme in ("w8a8", "fp8"):
        qw = _qw(96, 272, scheme, device="cpu").to(device)
        for dtype in DTYPES:
            for m in (1, 9, 16):
                assert cq.supports(*_args(torch.empty(m, 272, dtype=dtype, device=device), qw)) is None


@pytest.mark.parametrize("scheme", ["w8a8", "fp8"])
def test_supports_dynamic_reasons(scheme):
    qw = _qw(64, 256, scheme, device="cpu").to("meta")
    reason = cq.supports(*_args(torch.empty(17, 256, dtype=torch.bfloat16, device="meta"), qw))
    assert "up to 16 tokens" in reason and "got 17" in reason
    qw24 = _qw(32, 24, scheme, device="cpu").to("meta")
    x24 = torch.empty(2, 24, dtype=torch.float16, device="meta")
    assert f"CUDA {scheme} kernel reads 16 input channels" in cq.supports(*_args(x24, qw24))
    assert "K % 16 == 0, got K=24" in cq.supports(*_args(x24, qw24))
    x = torch.empty(2, 256, dtype=torch.float16, device="meta")
    args = list(_args(x, qw))
    args[7] = "int4_k8"
    assert "'rowmajor' layout, got 'int4_k8'" in cq.supports(*args)
    assert "got torch.float32" in cq.supports(*_args(x.float(), qw))


def test_supports_fp8_needs_sm89(monkeypatch):
    """fp8 converts e4m3 with sm_89 instructions: a CUDA x on an older GPU gets the reason (w8a8
    runs on any GPU the extension serves)."""
    capability = {"now": (8, 0)}
    monkeypatch.setattr(cq, "current_capability", lambda device: capability["now"])
    fake_cuda_x = types.SimpleNamespace(dtype=torch.bfloat16, shape=(4, 256), device=torch.device("cuda", 0))
    for scheme in ("fp8", "w8a8"):
        qw = _qw(64, 256, scheme, device="cpu")
        args = list(_args(torch.empty(4, 256), qw))
        args[0] = fake_cuda_x
        reason = cq.supports(*args)
        if scheme == "w8a8":
            assert reason is None
        else:
            assert "compute capability 8.9 or newer" in reason and "8.0" in reason
    capability["now"] = (9, 0)
    assert cq.supports(*args) is None


def test_dynamic_plan_is_the_int8_plan():
    for m, n, k in ((1, 14336, 4096), (16, 4096, 14336), (3, 200, 1040)):
        plan = cq.choose_plan(m, n, k, False, 132, pdl=True)
        assert plan.pdl and plan.l2_steps == cq.L2_STEPS
        assert dataclasses.replace(plan, pdl=False, l2_steps=0) == cq.choose_plan(m, n, k, False, 132)
    assert cq.choose_plan(1, 4096, 4096, False, 132, pdl=True, l2_steps=0).l2_steps == 0
    previous = cq.set_plan_overrides(pdl=False, l2_steps=2)
    try:
        plan = cq.choose_plan(1, 4096, 4096, False, 132, **cq._OVERRIDES)
        assert not plan.pdl and plan.l2_steps == 2
    finally:
        cq.set_plan_overrides(**previous)


@pytest.mark.parametrize("scheme", ["w8a8", "fp8"])
def test_dynamic_launch_sequence(monkeypatch, scheme):
    """w8a8/fp8: every buffer is allocated before the two launches (so the GEMV directly follows
    the quantization on the stream: its programmatic dependency), the GEMV reads the quantized
    float16 rows and their scales, and every buffer is still alive when it is enqueued."""
    live, events = [], []

    def fake_empty(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype)
        live.append(weakref.ref(t))
        events.append(("alloc", dtype))
        return t

    def fake_quantize_rows(x, x_stride, dtype, xq, scales, m, k, fp8, stream):
        events.append(("quantize_rows", xq, scales, fp8))

    def fake_gemv(*args):
        events.append(("quant_gemv", args[0], args[-5], args[-4], args[-3], args[22], args[-2], args[-1]))
        seen["alive"] = all(ref() is not None for ref in live)

    seen = {}
    plan = cq.Plan(warps_n=1, row_tiles=4, splits=2, steps_per_split=2, pdl=True, l2_steps=3, rows_per_warp=16)
    counters = torch.zeros(cq.COUNTERS_MIN, dtype=torch.int32)
    monkeypatch.setattr(cq, "_empty", fake_empty)
    monkeypatch.setattr(cq, "_plan", lambda *args, **kwargs: plan)
    monkeypatch.setattr(cq, "_counters", lambda device, count: counters)
    monkeypatch.setattr(cq, "current_stream", lambda device: 0)
    monkeypatch.setattr(cq, "_C", types.SimpleNamespace(quant_gemv=fake_gemv, quantize_rows=fake_quantize_rows))
    qw = _qw(96, 512, scheme, device="cpu")
    cq.quant_matmul(*_args(torch.randn(3, 512, dtype=torch.bfloat16), qw))
    kinds = [e[0] for e in events]
    assert kinds == ["alloc"] * 4 + ["quantize_rows", "quant_gemv"], kinds
    assert sorted(str(e[1]) for e in events[:4]) == sorted(["torch.bfloat16", "torch.float32", "torch.float16",
                                                            "torch.float32"])
    _, xq, scales, fp8 = events[4]
    _, x_ptr, x_scales, gemv_fp8, pdl, dtype_code, l2_steps, rows_per_warp = events[5]
    assert x_ptr == xq and x_scales == scales and fp8 == gemv_fp8 == (scheme == "fp8") and pdl
    assert l2_steps == plan.l2_steps and rows_per_warp == plan.rows_per_warp
    assert dtype_code == compiled.DTYPE_CODES[torch.bfloat16]  # the output's dtype
    assert seen["alive"]


# -- GPU ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@needs_kernel
@pytest.mark.parametrize("scheme,group_size,symmetric", SCHEMES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(scheme, group_size, symmetric, dtype):
    # Odd N; K a multiple of the group (and 32) but not of the 128-channel step where allowed.
    k = 384 if group_size == 128 else 320 if scheme == "w4a16" else 336
    n = 97
    qw = _qw(n, k, scheme, group_size, symmetric, dtype=dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    for m in MS:
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        for b in (None, bias):
            out = quant_matmul(x, qw, b, backend="cuda")
            _check(out, _reference(x, qw, b), dtype)


@pytest.mark.gpu
@needs_kernel
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scheme,group_size", [("w4a16", 32), ("w4a16", 128), ("w4a16", -1), ("w8a16", -1)])
def test_scale_dtypes(scheme, group_size, weight_dtype):
    """Scales are stored in the weight's dtype, which need not be x's."""
    qw = _qw(200, 512, scheme, group_size, False if scheme == "w4a16" else True, dtype=weight_dtype)
    assert qw.scales.dtype == weight_dtype
    for dtype in DTYPES:
        x = torch.randn(5, 512, device="cuda", dtype=dtype)
        _check(quant_matmul(x, qw, backend="cuda"), _reference(x, qw), dtype)


@pytest.mark.gpu
@needs_kernel
@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_zero_points_span_0_to_16(group_size):
    """GPTQ v1 checkpoints can store a zero point of 16: the kernel must not assume 4 bits."""
    n, k = 64, 256
    qw = _qw(n, k, "w4a16", group_size, False)
    zeros = torch.randint(0, 17, qw.zeros.shape, device="cuda", dtype=torch.uint8)
    zeros[0] = 16
    zeros[1] = 0
    qw = QuantizedWeight(qw.packed, qw.scales, zeros, scheme="w4a16", group_size=group_size, shape=(n, k),
                         dtype=qw.dtype)
    for dtype in DTYPES:
        x = torch.randn(3, k, device="cuda", dtype=dtype)
        _check(quant_matmul(x, qw, backend="cuda"), _reference(x, qw), dtype)


@pytest.mark.gpu
@needs_kernel
@pytest.mark.parametrize("scheme,group_size,symmetric", [("w4a16", 64, False), ("w4a16", 128, True),
                                                         ("w8a16", -1, True)])
@pytest.mark.parametrize("warps_n,splits,prefetch", [(1, 3, True), (2, 2, False), (4, 5, True), (8, 1, True),
                                                     (1, 8, False), (1, 1, False)])
@pytest.mark.parametrize("rows", ["most", "fewer"])
def test_forced_plans(plan_overrides, scheme, group_size, symmetric, warps_n, splits, prefetch, rows):
    """Every block arrangement (both row counts a warp may own up to 8 tokens), split K
    included, with and without prefetching, gives the right answer."""
    n, k = 300, 1024
    qw = _qw(n, k, scheme, group_size, symmetric, dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    for m in (1, 6, 16):
        choice = cq.rows_per_warp_choices(m, scheme == "w4a16")
        plan_overrides(warps_n=warps_n, splits=splits, prefetch=prefetch, rows_per_warp=choice[rows == "fewer"])
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        _check(quant_matmul(x, qw, bias, backend="cuda"), _reference(x, qw, bias), torch.bfloat16)


@pytest.mark.gpu
@needs_kernel
@pytest.mark.parametrize("scheme,group_size,symmetric,k", [("w4a16", 32, True, 1056), ("w4a16", 64, False, 1088),
                                                           ("w4a16", -1, False, 1120), ("w4a16", -1, True, 1056),
                                                           ("w8a16", -1, True, 1040), ("w8a16", -1, True, 1072)])
@pytest.mark.parametrize("splits,prefetch", [(1, True), (1, False), (3, True), (9, False)])
def test_k_tails_every_plan(plan_overrides, scheme, group_size, symmetric, k, splits, prefetch):
    """A K that is not a multiple of the 128-channel step leaves the last step's lanes short:
    they skip their loads (the registers keep finite weights that multiply x's zeros), whichever
    warp, split and pipeline mode meets that step."""
    n = 150
    qw = _qw(n, k, scheme, group_size, symmetric, dtype=torch.float16)
    plan_overrides(splits=splits, prefetch=prefetch)
    for m in (1, 9):
        for dtype in DTYPES:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            _check(quant_matmul(x, qw, backend="cuda"), _reference(x, qw), dtype)


@pytest.mark.gpu
@needs_kernel
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group_size", [64, 128])
def test_symmetric_scale_dtypes(group_size, weight_dtype):
    """The group modes compile one loop per scale dtype and zero-point presence: the symmetric
    ones too."""
    qw = _qw(130, 768, "w4a16", group_size, True, dtype=weight_dtype)
    for dtype in DTYPES:
        for m in (1, 12):
            x = torch.randn(m, 768, device="cuda", dtype=dtype)
            _check(quant_matmul(x, qw, backend="cuda"), _reference(x, qw), dtype)


@pytest.mark.gpu
@needs_kernel
@pytest.mark.parametrize("group_size,symmetric", [(128, True), (128, False), (-1, True), (-1, False)])
def test_folded_zero_points_keep_the_accuracy_bar(group_size, symmetric):
    """Per channel and in groups of 128 the kernel sums (magic + u) * x and subtracts
    (magic + zero) * sum(x) per step: cancellation in fp32. The bar must hold on a full-size
    weight with large activations (and outlier channels), in one block and split along K."""
    torch.manual_seed(0)
    n = k = 4096
    qw = _qw(n, k, "w4a16", group_size, symmetric, dtype=torch.bfloat16)
    for dtype in DTYPES:
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda") * 30
            x[:, ::97] *= 50  # outlier channels: |x| up to ~6e3, well inside float16
            x = x.to(dtype)
            ref = _reference(x, qw)
            _check(quant_matmul(x, qw, backend="cuda"), ref, dtype)
            previous = cq.set_plan_overrides(splits=4)
            try:
                _check(quant_matmul(x, qw, backend="cuda"), ref, dtype)
            finally:
                cq.set_plan_overrides(**previous)


@pytest.mark.gpu
@needs_kernel
def test_split_k_is_deterministic_and_resets_counters(plan_overrides):
    qw = _qw(256, 2048, "w4a16", 128, True, dtype=torch.float16)
    x = torch.randn(4, 2048, device="cuda", dtype=torch.float16)
    plan_overrides(splits=7)
    first = quant_matmul(x, qw, backend="cuda")
    for _ in range(5):
        assert torch.equal(quant_matmul(x, qw, backend="cuda"), first)
    torch.cuda.synchronize()
    for buf in cq._COUNTERS.values():
        assert int(buf.abs().sum()) == 0


@pytest.mark.gpu
@needs_kernel
def test_poisoned_buffers(monkeypatch, plan_overrides):
    """Output and split-K workspace start as NaN: every element read must have been written."""
    monkeypatch.setattr(cq, "_empty", lambda shape, dtype, device: poisoned(*shape, dtype=dtype, device=device))
    for splits in (1, 4):
        plan_overrides(splits=splits)
        for scheme, group_size, symmetric in [("w4a16", 32, False), ("w4a16", 128, True), ("w8a16", -1, True)]:
            qw = _qw(131, 512, scheme, group_size, symmetric)
            for m in (1, 9, 16):
                x = torch.randn(m, 512, device="cuda", dtype=torch.float16)
                _check(quant_matmul(x, qw, backend="cuda"), _reference(x, qw), torch.float16)


@pytest.mark.gpu
@needs_kernel
@pytest.mark.parametrize("scheme,group_size", [("w4a16", 64), ("w8a16", -1)])
def test_act_order(scheme, group_size):
    """``perm`` gathers x's columns once per call; the weight is never touched."""
    n, k = 96, 512
    base = _qw(n, k, scheme, group_size, scheme == "w8a16", dtype=torch.bfloat16)
    perm = torch.randperm(k, device="cuda").to(torch.int32)
    qw = QuantizedWeight(base.packed, base.scales, base.zeros, scheme=scheme, group_size=group_size, shape=(n, k),
                         dtype=torch.bfloat16, perm=perm)
    x = torch.randn(2, 3, k, device="cuda", dtype=torch.bfloat16)
    out = quant_matmul(x, qw, backend="cuda")
    assert out.shape == (2, 3, n)
    _check(out.reshape(6, n), _reference(x.reshape(6, k), qw), torch.bfloat16)


@pytest.mark.gpu
@needs_kernel
def test_strided_and_misaligned_x():
    n, k = 160, 512
    for scheme, group_size in (("w4a16", 128), ("w8a16", -1)):
        qw = _qw(n, k, scheme, group_size)
        wide = torch.randn(7, k + 8, device="cuda", dtype=torch.float16)
        odd = torch.randn(7, k + 3, device="cuda", dtype=torch.float16)
        flat = torch.randn(7 * k + 1, device="cuda", dtype=torch.float16)
        views = {
            "rows 16-byte aligned, not contiguous": wide[:, :k],
            "rows not 16-byte aligned": odd[:, :k],
            "transposed": torch.randn(k, 7, device="cuda", dtype=torch.float16).t(),
            "storage offset 1": flat[1:].view(7, k),
            "every other row": torch.randn(14, k, device="cuda", dtype=torch.float16)[::2],
            "one row with a stride": wide[2:3, :k],
        }
        for what, x in views.items():
            out = quant_matmul(x, qw, backend="cuda")
            try:
                _check(out, _reference(x, qw), torch.float16)
            except AssertionError as exc:
                raise AssertionError(f"{scheme}, x {what}: {exc}") from None


@pytest.mark.gpu
@needs_kernel
def test_bias_with_a_stride():
    qw = _qw(96, 256, "w4a16", 32, False)
    bias = torch.randn(192, device="cuda", dtype=torch.float16)[::2]
    x = torch.randn(4, 256, device="cuda", dtype=torch.float16)
    _check(quant_matmul(x, qw, bias, backend="cuda"), _reference(x, qw, bias), torch.float16)


@pytest.mark.gpu
@needs_kernel
def test_auto_picks_cuda_up_to_16_tokens():
    assert compiled._C.QUANT_GEMV_MAX_M == cq.MAX_M
    qw = _qw(256, 512, "w4a16", 128)
    for m, want in ((1, "cuda"), (16, "cuda"), (17, "triton")):
        x = torch.randn(m, 512, device="cuda", dtype=torch.float16)
        assert _backends.select(OP, "auto", *_args(x, qw)).backend == want
    x = torch.randn(1, 512, device="cuda", dtype=torch.float16)
    for scheme in ("w8a8", "fp8") if FP8_OK else ("w8a8",):
        dynamic = _qw(256, 512, scheme)
        for m, want in ((1, "cuda"), (16, "cuda"), (17, "triton")):
            xm = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
            assert _backends.select(OP, "auto", *_args(xm, dynamic)).backend == want, (scheme, m)
    # Weights with rows that are not 16-byte aligned: "auto" moves on, "cuda" says why.
    packed = torch.zeros(256, 65, dtype=torch.int32, device="cuda")[:, :64]
    view = QuantizedWeight(packed, qw.scales, None, scheme="w4a16", group_size=128, shape=(256, 512),
                           dtype=torch.float16)
    assert _backends.select(OP, "auto", *_args(x, view)).backend == "triton"
    with pytest.raises(lk.BackendUnavailableError, match="16-byte aligned rows"):
        quant_matmul(x, view, backend="cuda")


@pytest.mark.gpu
@needs_kernel
@pytest.mark.parametrize("scheme,group_size", [("w4a16", 128), ("w4a16", 32), ("w8a16", -1)])
@pytest.mark.parametrize("n,k", [(4096, 4096), (4096, 14336)])
def test_llm_shapes(scheme, group_size, n, k):
    qw = _qw(n, k, scheme, group_size, dtype=torch.bfloat16)
    for m in (1, 4, 16):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        _check(quant_matmul(x, qw, backend="cuda"), _reference(x, qw), torch.bfloat16)


@pytest.mark.gpu
@needs_kernel
def test_cuda_graph_capture_and_replay():
    """No host sync and no data-dependent shapes: a captured call replays on new inputs, split
    K included (its counters must come back to zero between replays)."""
    for scheme, group_size, m, n, k in (("w4a16", 128, 1, 4096, 4096), ("w8a16", -1, 16, 1024, 4096),
                                        ("w4a16", 32, 5, 512, 1024)):
        qw = _qw(n, k, scheme, group_size, dtype=torch.bfloat16)
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        static_x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up (plan cache, counters) outside the capture
                quant_matmul(static_x, qw, bias, backend="cuda")
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):  # the warm-up's stream: its counters
            static_out = quant_matmul(static_x, qw, bias, backend="cuda")
        for _ in range(3):
            static_x.copy_(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
            graph.replay()
            torch.cuda.synchronize()
            _check(static_out, _reference(static_x, qw, bias), torch.bfloat16)


@pytest.mark.gpu
@needs_kernel
def test_split_k_captured_first_on_a_new_stream(plan_overrides):
    """A stream's first split-K call inside a capture gets counters the graph zeroes itself;
    eager calls on that stream afterwards get their own."""
    qw = _qw(512, 2048, "w4a16", 128, dtype=torch.bfloat16)
    static_x = torch.randn(3, 2048, device="cuda", dtype=torch.bfloat16)
    plan_overrides(splits=4)
    quant_matmul(static_x, qw, backend="cuda")  # imports and caches, on the default stream
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        static_out = quant_matmul(static_x, qw, backend="cuda")
    for _ in range(3):
        static_x.copy_(torch.randn_like(static_x))
        graph.replay()
        torch.cuda.synchronize()
        _check(static_out, _reference(static_x, qw), torch.bfloat16)
    with torch.cuda.stream(stream):
        out = quant_matmul(static_x, qw, backend="cuda")
    torch.cuda.synchronize()
    _check(out, _reference(static_x, qw), torch.bfloat16)


@pytest.mark.gpu
@needs_kernel
def test_torch_compile_fullgraph():
    qw = _qw(256, 512, "w4a16", 64, False, dtype=torch.float16)
    bias = torch.randn(256, device="cuda", dtype=torch.float16)

    def f(x):
        return torch.relu(quant_matmul(x, qw, bias, backend="cuda")) * 2

    compiled = torch.compile(f, fullgraph=True)
    x = torch.randn(2, 3, 512, device="cuda", dtype=torch.float16)
    expected = f(x)
    assert torch.equal(compiled(x), expected)
    x = torch.randn(16, 512, device="cuda", dtype=torch.float16)  # another M (a recompile)
    assert torch.equal(compiled(x), f(x))


def test_auto_leaves_larger_w8a16_batches_to_triton(monkeypatch):
    # Measured on an H200: from 9 tokens on, the Triton w8a16 kernel matches the CUDA one.
    from lepton_kernels.ops import quant_matmul as qm_op

    monkeypatch.setattr(qm_op, "_triton_supports", lambda *args: None)
    qw = quantize_weight(torch.randn(64, 256), "w8a16")
    args = lambda m: (torch.randn(m, 256), qw.packed, qw.scales, None, None, None, "w8a16", qw.layout, -1, 64, 256)
    assert qm_op._cuda_auto_supports(*args(8)) is None
    assert "Triton" in qm_op._cuda_auto_supports(*args(9))
    qw4 = quantize_weight(torch.randn(64, 256), "w4a16", group_size=128)
    assert qm_op._cuda_auto_supports(torch.randn(16, 256), qw4.packed, qw4.scales, None, None, None, "w4a16",
                                     qw4.layout, 128, 64, 256) is None


# -- GPU: w8a8 and fp8 (activations quantized per token) ---------------------------------------------

def _check_dynamic(out, x, qw, bias=None):
    """w8a8/fp8 against the torch backend, which quantizes x as the kernel does (bit for bit:
    test_quantize_rows_bit_for_bit), so the two differ only by
    * their fp32 sums of exact products: the kernel's tensor cores (which may truncate) and
      reductions, and for fp8 the reference's fp32 matmul; each within gamma_K = K * 2^-23 of
      sum_k |xq wq| (u = 2^-23 covers truncation), scaled by s_x * s_w: K * 2^-22 * mag together;
    * a few fp32 roundings in scaling and adding the bias: 2^-20 * (|exact| + |bias|);
    * one rounding of each to the output dtype: one ulp of the larger, at most eps * |value|
      (plus fp16's smallest subnormal).
    That bound is loose at large K (mag / |exact| ~ sqrt(K)); the mean error must also stay
    below one ulp (the output rounding alone averages about a quarter), which a lost piece of K
    or a wrong k order would break at once."""
    dtype = x.dtype
    assert out.dtype == dtype and out.shape == (x.shape[0], qw.n)
    assert not out.isnan().any(), "NaN in the output (unwritten elements?)"
    ref = quant_matmul(x, qw, bias, backend="torch")
    xq, sx = (quantize_rows_fp8 if qw.scheme == "fp8" else quantize_rows_int8)(x)
    xq = xq.to(torch.float32).double()  # (float8 converts to float32 everywhere)
    wq = qw.packed.to(torch.float32).double()
    scale = sx.double() * qw.scales.double().t()
    exact = (xq @ wq.t()) * scale
    mag = (xq.abs() @ wq.abs().t()) * scale
    bias_abs = 0.0
    if bias is not None:
        exact = exact + bias.double()
        bias_abs = bias.double().abs()
    eps = 2.0 ** -10 if dtype == torch.float16 else 2.0 ** -7
    k = x.shape[1]
    tol = (eps * torch.maximum(out.double().abs(), ref.double().abs()) + k * 2.0 ** -22 * mag
           + 2.0 ** -20 * (exact.abs() + bias_abs) + 2.0 ** -24)
    diff = (out.double() - ref.double()).abs()
    bad = diff > tol
    assert not bad.any(), (f"{int(bad.sum())} of {bad.numel()} outputs past the bound; worst "
                           f"{(diff / tol).max().item():.3g}x of it")
    rel = ((out.double() - exact).abs().mean() / exact.abs().mean()).item()
    assert rel < eps, f"mean error {rel:.3g} of the mean |output|, above one ulp ({eps:g})"


@pytest.mark.gpu
@needs_kernel
@pytest.mark.parametrize("scheme", DYNAMIC)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(200, 4096), (4104, 1040), (200, 16)])
def test_dynamic_matches_reference(scheme, dtype, n, k):
    """Odd N; K a whole number of 128-channel steps, a tail of one 16-channel piece, or a single
    piece; 1 to 16 tokens, one and two token tiles; with and without bias."""
    qw = _qw(n, k, scheme, dtype=dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    for m in (1, 3, 8, 9, 16):
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        for b in (None, bias):
            _check_dynamic(quant_matmul(x, qw, b, backend="cuda"), x, qw, b)


@pytest.mark.gpu
@needs_kernel
@pytest.mark.parametrize("fp8", [False, pytest.param(True, marks=pytest.mark.skipif(
    not FP8_OK, reason="e4m3 needs compute capability 8.9+"))])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [16, 1040, 4096, 16400])
def test_quantize_rows_bit_for_bit(fp8, dtype, k):
    """The pre-pass' xq and s_x equal quantize_rows_int8/_fp8's exactly: random rows, a zero row
    (s = FLT_MIN), tiny values (float16 subnormals), large ones, an outlier, and a row with s = 1
    exactly whose values sit on rounding ties (int8: x.5; e4m3: midpoints of its grid). K = 16400
    is past the rows kept in registers (a second read)."""
    qmax = 448.0 if fp8 else 127.0
    x = torch.randn(9, k, device="cuda") * 3
    x[1] = 0
    x[2] *= 1e-6
    x[3] = ((torch.arange(k, device="cuda") % 64) - 32) / 4  # multiples of 1/4: ties either way
    x[3, 0] = qmax  # s = qmax / qmax = 1
    x[4] *= 1e3
    x[5, k // 2] = 1e4
    x[6] = -x[6].abs()
    x = x.to(dtype)
    ref_q, ref_s = (quantize_rows_fp8 if fp8 else quantize_rows_int8)(x)
    wide = torch.zeros(9, k + 8, device="cuda", dtype=dtype)
    wide[:, :k] = x
    for view in (x, wide[:, :k], x[3:4]):
        rows = slice(3, 4) if view.shape[0] == 1 else slice(None)
        xq, s = cq._quantize_rows(view, fp8)
        assert xq.dtype == torch.float16 and xq.shape == view.shape and s.shape == (view.shape[0],)
        assert torch.equal(s, ref_s[rows].reshape(-1)), (s, ref_s[rows].reshape(-1))
        mismatch = xq.float() != ref_q[rows].float()
        assert not mismatch.any(), (f"{int(mismatch.sum())} values differ, first at "
                                    f"{mismatch.nonzero()[0].tolist()}")


@pytest.mark.gpu
@needs_kernel
@pytest.mark.parametrize("scheme", DYNAMIC)
@pytest.mark.parametrize("warps_n,splits,prefetch,pdl,l2_steps", [
    (1, 1, True, True, None), (1, 3, True, False, None), (2, 2, False, True, 0), (4, 5, True, True, 16),
    (8, 1, True, False, 3), (1, 8, False, True, 1)])
def test_dynamic_forced_plans(plan_overrides, scheme, warps_n, splits, prefetch, pdl, l2_steps):
    """Every block arrangement, split K included, with and without prefetching (into registers,
    and into L2 during the wait) and with and without the programmatic dependent launch, on a K
    with a tail."""
    n, k = 300, 1040
    qw = _qw(n, k, scheme, dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    for m in (1, 6, 16):
        rows = cq.rows_per_warp_choices(m, False)[(warps_n + splits) % 2]  # both, across the cases
        plan_overrides(warps_n=warps_n, splits=splits, prefetch=prefetch, pdl=pdl, l2_steps=l2_steps,
                       rows_per_warp=rows)
        for dtype in DTYPES:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            b = bias.to(dtype)
            _check_dynamic(quant_matmul(x, qw, b, backend="cuda"), x, qw, b)


@pytest.mark.gpu
@needs_kernel
@pytest.mark.parametrize("scheme", DYNAMIC)
def test_dynamic_poisoned_buffers(monkeypatch, plan_overrides, scheme):
    """Output, split-K workspace, quantized activations and their scales start as NaN."""
    monkeypatch.setattr(cq, "_empty", lambda shape, dtype, device: poisoned(*shape, dtype=dtype, device=device))
    qw = _qw(131, 1040, scheme)
    for splits in (1, 4):
        plan_overrides(splits=splits)
        for m in (1, 9, 16):
            for dtype in DTYPES:
                x = torch.randn(m, 1040, device="cuda", dtype=dtype)
                _check_dynamic(quant_matmul(x, qw, backend="cuda"), x, qw)


@pytest.mark.gpu
@needs_kernel
@pytest.mark.parametrize("scheme", DYNAMIC)
def test_dynamic_back_to_back(plan_overrides, scheme):
    """Many calls queued without a sync, each on new activations (the allocator hands the same
    workspace to the next call): with the programmatic dependent launch a GEMV that read its
    activations before the quantization finished would show."""
    qw = _qw(4096, 4096, scheme, dtype=torch.bfloat16)
    for splits in (None, 3):
        plan_overrides(**({} if splits is None else {"splits": splits}))
        xs = [torch.randn(1 + i % 16, 4096, device="cuda", dtype=torch.bfloat16) * (1 + i) for i in range(12)]
        outs = [quant_matmul(x, qw, backend="cuda") for x in xs]
        torch.cuda.synchronize()
        for x, out in zip(xs, outs):
            _check_dynamic(out, x, qw)


@pytest.mark.gpu
@needs_kernel
@pytest.mark.parametrize("scheme", DYNAMIC)
@pytest.mark.parametrize("n,k", [(14336, 4096), (4096, 14336)])
def test_dynamic_llm_shapes(scheme, n, k):
    qw = _qw(n, k, scheme, dtype=torch.bfloat16)
    for m in (1, 4, 16):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        _check_dynamic(quant_matmul(x, qw, backend="cuda"), x, qw)


@pytest.mark.gpu
@needs_kernel
@pytest.mark.parametrize("scheme", DYNAMIC)
@pytest.mark.parametrize("pdl", [True, False])
def test_dynamic_cuda_graph_capture_and_replay(plan_overrides, scheme, pdl):
    """The quantization and the GEMV (a programmatic dependent launch or not) are captured as
    two kernels and replay on new inputs, split K included."""
    for m, n, k, splits in ((1, 4096, 4096, None), (16, 512, 4096, 4), (5, 200, 1040, None)):
        plan_overrides(pdl=pdl, **({} if splits is None else {"splits": splits}))
        qw = _qw(n, k, scheme, dtype=torch.bfloat16)
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        static_x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                quant_matmul(static_x, qw, bias, backend="cuda")
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            static_out = quant_matmul(static_x, qw, bias, backend="cuda")
        for i in range(3):
            static_x.copy_(torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * (1 + i))
            graph.replay()
            torch.cuda.synchronize()
            _check_dynamic(static_out, static_x, qw, bias)


@pytest.mark.gpu
@needs_kernel
@pytest.mark.parametrize("scheme", DYNAMIC)
def test_dynamic_torch_compile_fullgraph(scheme):
    """The fp8 capability check in ``supports`` is a trace-time constant: no graph break."""
    qw = _qw(256, 512, scheme, dtype=torch.bfloat16)

    def f(x):
        return torch.relu(quant_matmul(x, qw, backend="cuda")) * 2

    compiled_f = torch.compile(f, fullgraph=True)
    for shape in ((2, 3, 512), (16, 512)):
        x = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
        assert torch.equal(compiled_f(x), f(x))

"""Triton quant_matmul against the torch backend.

On the CPU the kernels run in Triton's interpreter (slow): small shapes cover every path (each
scheme, split-K, group scales applied before the dot, dequantize-then-cuBLAS, K tails, odd N,
act-order, poisoned buffers). The inline-PTX int4 dequantizer only runs on a GPU; an
ahead-of-time compile checks here that it assembles. The ``gpu`` tests cover LLM-sized layers,
every M bucket, fp8 and CUDA graphs.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

from lepton_kernels import _backends  # noqa: E402
from lepton_kernels.ops.quant_matmul import OP, quant_matmul  # noqa: E402
from lepton_kernels.quant.packing import pack_int4  # noqa: E402
from lepton_kernels.quant.weight import QuantizedWeight, quantize_weight  # noqa: E402
from lepton_kernels.reference.quant_matmul import quantize_rows_int8  # noqa: E402
from lepton_kernels.triton import quant_matmul as tq  # noqa: E402

# The "cpu" cases run on the GPU when there is one (the interpreter only runs without one).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

WEIGHT_ONLY = [("w4a16", 32, True), ("w4a16", 64, False), ("w4a16", 128, False), ("w4a16", -1, True),
               ("w4a16", -1, False), ("w8a16", -1, True)]


@pytest.fixture
def overrides():
    """Set ``Config`` overrides for one test; cleared afterwards whatever happens."""
    yield tq.set_config_overrides
    tq.set_config_overrides()


def _qw(n, k, scheme, group_size=-1, symmetric=True, dtype=torch.float16, device=DEVICE):
    w = torch.randn(n, k, device=device) * 0.05
    return quantize_weight(w.to(dtype), scheme, group_size=group_size, symmetric=symmetric)


def _both(x, qw, bias=None):
    """(triton, torch) results of the public op."""
    return quant_matmul(x, qw, bias, backend="triton"), quant_matmul(x, qw, bias, backend="torch")


def _check(out, ref, *, mean_tol, rounded_weights=False):
    """``mean|out - ref| / mean|ref| < mean_tol``, and elementwise within two roundings of the
    output plus, where the kernel rounds weights to 16 bits (``rounded_weights``), 8 unit
    roundoffs of ref's RMS (the sum of K independent per-weight roundings, ~5 sigma)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert not out.isnan().any(), "NaN in the output (unwritten elements?)"
    diff = (out.double() - ref.double()).abs()
    rel = (diff.mean() / ref.double().abs().mean()).item()
    assert rel < mean_tol, f"mean relative error {rel:.3g} >= {mean_tol:g}"
    u = torch.finfo(ref.dtype).eps / 2
    rms = ref.double().pow(2).mean().sqrt()
    bound = 2 * u * ref.double().abs() + (8 if rounded_weights else 1) * u * rms
    worst = (diff - bound).max().item()
    assert worst <= 0, f"elementwise error exceeds its bound by {worst:.3g} (rms of ref {rms.item():.3g})"


def _mean_tol(dtype):
    return 1e-3 if dtype == torch.float16 else 4e-3


def _rows_quantized(x, fp8):
    """The reference's per-token quantization with a correctly rounded scale division. (On CUDA,
    PyTorch divides a tensor by a Python float as a multiply by its reciprocal, which can be an
    ulp off; the kernel and the CPU reference divide.)"""
    x32 = x.float()
    qmax = 448.0 if fp8 else 127.0
    s = (x32.abs().amax(-1, keepdim=True).double() / qmax).float().clamp_min(torch.finfo(torch.float32).tiny)
    if fp8:
        return (x32 / s).clamp(-qmax, qmax).to(torch.float8_e4m3fn), s
    return torch.round(x32 / s).clamp(-qmax, qmax).to(torch.int8), s


def _w8a8_expected(x, qw, bias=None):
    """The reference's w8a8/fp8 product (exact integer sums in fp64 / e4m3 products summed in
    fp32), on activations from ``_rows_quantized``."""
    fp8 = qw.scheme == "fp8"
    q, s = _rows_quantized(x.reshape(-1, qw.k), fp8)
    if fp8:
        out = (q.float() @ qw.packed.float().t()) * s * qw.scales.t()
        out = out if bias is None else out + bias.float()
    else:
        out = (q.double() @ qw.packed.double().t()) * s.double() * qw.scales.double().t()
        out = out if bias is None else out + bias.double()
    return out.to(x.dtype).reshape(*x.shape[:-1], qw.n)


# -- CPU (interpreter) and GPU: small shapes, every path ------------------------------------------

@pytest.mark.parametrize("scheme,group_size,symmetric", WEIGHT_ONLY)
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("n,k", [(64, 128), (96, 256)])
def test_weight_only_matches_torch(scheme, group_size, symmetric, m, n, k):
    qw = _qw(n, k, scheme, group_size, symmetric)
    x = torch.randn(m, k, device=DEVICE, dtype=torch.float16)
    bias = torch.randn(n, device=DEVICE, dtype=torch.float16) if m % 2 else None
    out, ref = _both(x, qw, bias)
    _check(out, ref, mean_tol=1e-3)


@pytest.mark.parametrize("scheme,group_size,symmetric", [("w4a16", 64, False), ("w4a16", -1, True),
                                                         ("w8a16", -1, True)])
def test_weight_only_bf16(scheme, group_size, symmetric):
    qw = _qw(96, 256, scheme, group_size, symmetric, dtype=torch.bfloat16)
    x = torch.randn(5, 256, device=DEVICE, dtype=torch.bfloat16)
    out, ref = _both(x, qw, torch.randn(96, device=DEVICE, dtype=torch.bfloat16))
    _check(out, ref, mean_tol=4e-3)


PATHS = [
    # (scheme, group, symmetric, m, n, k, config overrides, weights rounded to 16 bits)
    ("w4a16", 128, False, 3, 97, 256, dict(split_k=2), False),
    ("w4a16", 32, True, 2, 64, 256, dict(split_k=3), False),
    ("w4a16", -1, False, 3, 64, 136, dict(split_k=2), False),  # K tail (136 = 128 + 8)
    ("w4a16", 64, False, 5, 97, 256, dict(scale_before_dot=True), True),
    ("w4a16", 32, True, 5, 64, 256, dict(scale_before_dot=True, split_k=2), True),
    ("w4a16", 32, False, 4, 96, 256, dict(dequantize_first=True), True),
    ("w4a16", -1, False, 4, 97, 136, dict(dequantize_first=True), True),
    ("w8a16", -1, True, 3, 97, 300, dict(split_k=3), False),  # K tail (300 = 2 * 128 + 44)
    ("w8a16", -1, True, 4, 96, 100, dict(dequantize_first=True), True),
    ("w4a16", 128, True, 40, 64, 256, dict(block_m=32, scale_before_dot=False), False),  # two M tiles
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scheme,group_size,symmetric,m,n,k,config,rounded", PATHS)
def test_paths(overrides, dtype, scheme, group_size, symmetric, m, n, k, config, rounded):
    qw = _qw(n, k, scheme, group_size, symmetric, dtype=dtype)
    x = torch.randn(m, k, device=DEVICE, dtype=dtype)
    bias = torch.randn(n, device=DEVICE, dtype=dtype) if m % 2 else None
    overrides(**config)
    out, ref = _both(x, qw, bias)
    _check(out, ref, mean_tol=_mean_tol(dtype), rounded_weights=rounded)


ASM_PATHS = [
    ("w4a16", 32, True, 3, 97, 256, dict(split_k=2)),
    ("w4a16", 64, False, 5, 64, 256, {}),
    ("w4a16", -1, False, 2, 64, 136, {}),  # K tail
    ("w8a16", -1, True, 3, 97, 300, {}),  # K tail
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scheme,group_size,symmetric,m,n,k,config", ASM_PATHS)
def test_asm_path_layout(monkeypatch, overrides, dtype, scheme, group_size, symmetric, m, n, k, config):
    """The data layout of the inline-PTX paths (int16 halves, channel order, x gathered to
    match). The interpreter computes the asm's values with plain operations; the PTX itself is
    assembled in the AOT test and run by the GPU tests."""
    if DEVICE.type == "cpu":
        monkeypatch.setattr(tq, "ASM_IN_INTERPRETER", True)
    assert tq.use_asm(DEVICE, scheme, False)
    qw = _qw(n, k, scheme, group_size, symmetric, dtype=dtype)
    x = torch.randn(m, k, device=DEVICE, dtype=dtype)
    overrides(**config)
    out, ref = _both(x, qw, torch.randn(n, device=DEVICE, dtype=dtype))
    _check(out, ref, mean_tol=_mean_tol(dtype))


def _gptq_act_order(n, k, group_size, dtype, device):
    """A GPTQ v1 layer with a shuffled g_idx: imported with a ``perm``."""
    groups = k // group_size
    q = torch.randint(0, 16, (k, n), device=device, dtype=torch.int32)
    zeros = torch.randint(0, 15, (groups, n), device=device, dtype=torch.int32)  # v1 stores zero - 1
    scales = (torch.rand(groups, n, device=device) * 0.02 + 0.005).to(dtype)
    g_idx = (torch.arange(k, device=device) // group_size)[torch.randperm(k, device=device)].to(torch.int32)
    qw = QuantizedWeight.from_gptq(pack_int4(q, dim=0), pack_int4(zeros, dim=1), scales, g_idx)
    assert qw.perm is not None
    return qw


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_act_order_3d_input(dtype):
    qw = _gptq_act_order(64, 256, 64, dtype, DEVICE)
    x = torch.randn(2, 3, 256, device=DEVICE, dtype=dtype)
    out, ref = _both(x, qw, torch.randn(64, device=DEVICE, dtype=dtype))
    assert out.shape == (2, 3, 64)
    _check(out, ref, mean_tol=_mean_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,split_k", [(1, None), (3, 3), (17, None)])
def test_w8a8_matches_reference(overrides, dtype, m, split_k):
    """Integer products summed exactly on both sides; scales in fp32 here, fp64 in the
    reference: equal up to one rounding of the output."""
    n, k = 97, 300
    qw = _qw(n, k, "w8a8", dtype=dtype)
    x = torch.randn(m, k, device=DEVICE, dtype=dtype) * 3
    x[0, :7] = 40.0  # an outlier sets the row's scale
    if m > 2:
        x[2] = 0  # an all-zero token: the scale floor, no NaN
    bias = torch.randn(n, device=DEVICE, dtype=dtype)
    if split_k is not None:
        overrides(split_k=split_k)
    out, ref = _both(x, qw, bias)
    expected = _w8a8_expected(x, qw, bias)
    if DEVICE.type == "cpu":
        assert torch.equal(expected, ref)  # the formula above is the reference's
    assert not out.isnan().any()
    assert ((out.double() - expected.double()).abs() <= torch.finfo(dtype).eps * expected.double().abs() + 1e-6).all()
    if m > 2:
        assert torch.equal(out[2], bias)


@pytest.mark.parametrize("m,split_k", [(2, 2), (17, None)])
def test_fp8_matches_reference(overrides, m, split_k):
    """Under the interpreter the activations are quantized by torch (its fp8 casts round
    differently); the GEMM, scales and split-K are the kernel's."""
    n, k = 96, 256
    qw = _qw(n, k, "fp8", dtype=torch.float16)
    x = torch.randn(m, k, device=DEVICE, dtype=torch.float16)
    bias = torch.randn(n, device=DEVICE, dtype=torch.float16)
    if split_k is not None:
        overrides(split_k=split_k)
    _check(quant_matmul(x, qw, bias, backend="triton"), _w8a8_expected(x, qw, bias), mean_tol=1e-3)


@pytest.mark.parametrize("k", [300, tq.QUANTIZE_WHOLE_ROW_MAX + 40], ids=["one_pass", "two_passes"])
def test_quantize_rows_int8_is_the_reference(k):
    x = torch.randn(5, k, device=DEVICE, dtype=torch.bfloat16) * 4
    x[1] = 0
    x[3, 10] = 1e4
    x[4, ::7] = 0.5  # exact ties after scaling happen for some values
    q, s = tq.quantize_rows(x, fp8=False)
    q_ref, s_ref = _rows_quantized(x, fp8=False)
    assert torch.equal(s, s_ref.reshape(-1)) and torch.equal(q, q_ref)
    if DEVICE.type == "cpu":
        q_ref, s_ref = quantize_rows_int8(x)
        assert torch.equal(s, s_ref.reshape(-1)) and torch.equal(q, q_ref)


def _poison(shape, dtype, device):
    if dtype.is_floating_point and dtype != torch.float8_e4m3fn:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    if dtype == torch.float8_e4m3fn:
        return torch.full(shape, float("nan"), device=device).to(dtype)
    return torch.full(shape, torch.iinfo(dtype).max, dtype=dtype, device=device)


@pytest.mark.parametrize("scheme,config", [("w4a16", dict(split_k=3)), ("w8a8", dict(split_k=2)),
                                           ("w8a16", dict(dequantize_first=True))])
def test_poisoned_buffers(monkeypatch, overrides, scheme, config):
    """Outputs, split-K partials, quantized activations and dequantized weights start as NaN:
    every element read must have been written."""
    monkeypatch.setattr(tq, "_empty", _poison)
    qw = _qw(97, 256, scheme, 64 if scheme == "w4a16" else -1)
    x = torch.randn(3, 256, device=DEVICE, dtype=torch.float16)
    overrides(**config)
    out, ref = _both(x, qw)
    if scheme == "w8a8":
        ref = _w8a8_expected(x, qw)
    _check(out, ref, mean_tol=1e-3, rounded_weights=config.get("dequantize_first", False))


def test_split_k_is_deterministic_and_resets_counters(overrides):
    qw = _qw(96, 512, "w4a16", 64, False)
    x = torch.randn(4, 512, device=DEVICE, dtype=torch.float16)
    overrides(split_k=4)
    first = quant_matmul(x, qw, backend="triton")
    assert torch.equal(first, quant_matmul(x, qw, backend="triton"))
    assert tq._COUNTERS and all(int(c.abs().sum()) == 0 for c in tq._COUNTERS.values())


def test_config_heuristic():
    small = tq.choose_config("w4a16", 1, 14336, 4096, 128, 132)
    assert (small.block_m, small.block_k) == (16, 128) and small.split_k > 1 and not small.dequantize_first
    assert tq.choose_config("w4a16", 1, 4096, 4096, 32, 132).block_k == 32  # never across a group
    assert tq.choose_config("w4a16", 256, 14336, 4096, 64, 132).scale_before_dot
    assert tq.choose_config("w8a16", tq.DEQUANT_MIN_M, 4096, 4096, -1, 132).dequantize_first
    big = tq.choose_config("w8a8", 4096, 14336, 4096, -1, 132)
    assert big.split_k == 1 and not big.dequantize_first
    # w8a8 and fp8, 17-256 tokens: the largest tile that still gives each SM a program, and K
    # split only when it is long and the grid short.
    for scheme in ("w8a8", "fp8"):
        mid = tq.choose_config(scheme, 128, 4096, 4096, -1, 132)
        assert (mid.block_m, mid.block_n, mid.split_k) == (32, 64, 1)
        assert tq.choose_config(scheme, 256, 14336, 4096, -1, 132).block_m == 128
        assert tq.choose_config(scheme, 32, 4096, 14336, -1, 132).split_k == 4
    with pytest.raises(ValueError, match="unknown Config fields"):
        tq.set_config_overrides(tile=3)


def test_supports_reasons():
    qw = _qw(64, 128, "w4a16", 32)
    x = torch.randn(2, 128, device=DEVICE)
    with _backends.capture_selection(), pytest.raises(_backends.SelectionCaptured) as info:
        quant_matmul(x, qw)
    args = info.value.args
    reason = _backends.implementations(OP)["triton"].supports(*args)
    assert reason is not None and "float16 or bfloat16" in reason
    with pytest.raises(_backends.BackendUnavailableError, match="float16 or bfloat16"):
        quant_matmul(x, qw, backend="triton")
    half = (x.half(),) + args[1:]
    assert _backends.implementations(OP)["triton"].supports(*half) is None
    assert "layout" in tq.supports(*half[:7], "rowmajor", *half[8:])


_AOT_SCRIPT = r"""
import sys
try:
    from triton.compiler import ASTSource  # noqa: F401
    from triton.backends.compiler import GPUTarget  # noqa: F401
except ImportError:
    sys.exit(77)
import torch
from lepton_kernels.triton.quant_matmul import compile_for_target
# The inline-PTX dequantizers (int4: bf16 with zero points, fp16 symmetric; int8: both dtypes),
# the scaled-weights path, int8 and fp8.
cases = [("w4a16", 1, 128, torch.bfloat16, False), ("w4a16", 16, 32, torch.float16, True),
         ("w8a16", 1, -1, torch.bfloat16, True), ("w8a16", 16, -1, torch.float16, True),
         ("w4a16", 256, 64, torch.bfloat16, False), ("w8a8", 16, -1, torch.bfloat16, True),
         ("fp8", 256, -1, torch.float16, True)]
for scheme, m, g, dtype, sym in cases:
    ptx = compile_for_target((9, 0), scheme, m, 4096, 4096, g, dtype, sym).asm["ptx"]
    print(scheme, m, "wgmma", ptx.count("wgmma.mma_async"), "asm", ptx.count("lop3.b32") + ptx.count("prmt.b32"))
"""


def test_aot_compiles_to_wgmma_on_sm90():
    # The interpreter replaces @triton.jit kernels at import time, so compile in a fresh process
    # without TRITON_INTERPRET (ptxas from the triton wheel; no GPU needed). This is also where
    # the inline PTX of the int4 dequantizer is assembled.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=600)
    if result.returncode == 77:
        pytest.skip("this triton has no ASTSource/GPUTarget AOT API")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 7, result.stdout
    for line in lines:
        words = line.split()
        assert int(words[words.index("wgmma") + 1]) > 0, f"no wgmma: {line}"
    for line in lines[:4]:
        assert int(line.split()[-1]) > 0, f"the kernel lost its PTX dequantizer: {line}"


# -- GPU: LLM-sized layers --------------------------------------------------------------------------

CUDA = torch.device("cuda")
GPU_SCHEMES = [("w4a16", 128, True), ("w4a16", 128, False), ("w4a16", -1, True), ("w4a16", 32, False),
               ("w8a16", -1, True), ("w8a8", -1, True), ("fp8", -1, True)]
GPU_MS = (1, 2, 16, 64, 256, 1024)


def _gpu_check(scheme, out, ref, dtype, m):
    """``ref``: the torch backend for weight-only schemes, ``_w8a8_expected`` for w8a8/fp8."""
    if scheme in ("w4a16", "w8a16"):
        # Past the small-M buckets the weights are rounded to 16 bits (scaled before the dot,
        # or dequantized for cuBLAS).
        _check(out, ref, mean_tol=_mean_tol(dtype), rounded_weights=m > 32)
    elif scheme == "w8a8":
        # Same int8 activations and exact integer sums: at most one rounding apart.
        assert ((out.double() - ref.double()).abs() <= torch.finfo(dtype).eps * ref.double().abs() + 1e-6).all()
    else:
        # fp8: exact products; the tensor cores' accumulation order and precision differ from
        # torch's fp32 sum (fast accumulation within each 128-deep step).
        _check(out, ref, mean_tol=_mean_tol(dtype), rounded_weights=True)


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(1024, 4096), (14336, 4096)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scheme,group_size,symmetric", GPU_SCHEMES)
def test_gpu_llm_shapes(scheme, group_size, symmetric, dtype, n, k):
    if scheme == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9")
    qw = _qw(n, k, scheme, group_size, symmetric, dtype=dtype, device=CUDA)
    bias = torch.randn(n, device=CUDA, dtype=dtype)
    for m in GPU_MS:
        x = torch.randn(m, k, device=CUDA, dtype=dtype)
        b = bias if m % 2 == 0 else None
        out = quant_matmul(x, qw, b, backend="triton")
        ref = quant_matmul(x, qw, b, backend="torch") if scheme in ("w4a16", "w8a16") else _w8a8_expected(x, qw, b)
        _gpu_check(scheme, out, ref, dtype, m)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scheme,group_size,symmetric", [("w4a16", 64, False), ("w4a16", -1, True),
                                                         ("w8a16", -1, True)])
def test_gpu_asm_dequantizer_matches_portable(monkeypatch, scheme, group_size, symmetric, dtype):
    """The inline-PTX dequantizers (default on NVIDIA GPUs) and the portable float32 ones agree."""
    qw = _qw(4096, 4096, scheme, group_size, symmetric, dtype=dtype, device=CUDA)
    for m in (1, 7, 16, 33):
        x = torch.randn(m, 4096, device=CUDA, dtype=dtype)
        fast = quant_matmul(x, qw, backend="triton")
        monkeypatch.setattr(tq, "ASM_DEQUANT", False)
        portable = quant_matmul(x, qw, backend="triton")
        monkeypatch.setattr(tq, "ASM_DEQUANT", True)
        ref = quant_matmul(x, qw, backend="torch")
        # From 33 tokens grouped int4 weights are scaled (rounded to 16 bits) before the dot.
        rounded = scheme == "w4a16" and group_size != -1 and m > 32
        _check(fast, ref, mean_tol=_mean_tol(dtype), rounded_weights=rounded)
        _check(portable, ref, mean_tol=_mean_tol(dtype), rounded_weights=rounded)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [4096, 14336])  # one pass in registers; two passes
def test_gpu_quantize_rows_bit_exact(dtype, k):
    x = torch.randn(37, k, device=CUDA, dtype=dtype) * 3
    x[3] = 0
    x[5, 100] = 3e3
    for fp8 in (False, True):
        if fp8 and torch.cuda.get_device_capability() < (8, 9):
            continue
        q, s = tq.quantize_rows(x, fp8)
        q_ref, s_ref = _rows_quantized(x, fp8)
        assert torch.equal(s, s_ref.reshape(-1))
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_and_replay():
    """Split-K counters reset themselves, so a captured call replays correctly, again and again."""
    n, k = 4096, 4096
    cases = [("w4a16", 128, 1), ("w4a16", -1, 16), ("w8a16", -1, 3), ("w8a8", -1, 4)]
    if torch.cuda.get_device_capability() >= (8, 9):
        cases.append(("fp8", -1, 2))
    for scheme, group_size, m in cases:
        qw = _qw(n, k, scheme, group_size, dtype=torch.bfloat16, device=CUDA)
        bias = torch.randn(n, device=CUDA, dtype=torch.bfloat16)
        static_x = torch.randn(m, k, device=CUDA, dtype=torch.bfloat16)

        def step():
            return quant_matmul(static_x, qw, bias, backend="triton")

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # compile and warm up outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = step()
        for _ in range(3):
            new_x = torch.randn(m, k, device=CUDA, dtype=torch.bfloat16)
            static_x.copy_(new_x)
            graph.replay()
            torch.cuda.synchronize()
            eager = quant_matmul(new_x, qw, bias, backend="triton")
            assert torch.equal(static_out, eager), scheme
            ref = (quant_matmul(new_x, qw, bias, backend="torch") if scheme in ("w4a16", "w8a16")
                   else _w8a8_expected(new_x, qw, bias))
            _gpu_check(scheme, static_out, ref, torch.bfloat16, m)

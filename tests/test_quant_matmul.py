"""quant_matmul (torch backend) and QuantLinear: accuracy, shapes, errors, torch.compile."""
import pytest
import torch

import lepton_kernels as lk
from torch import nn

from lepton_kernels import _backends
from lepton_kernels.ops.quant_matmul import quant_matmul
from lepton_kernels.quant.linear import QuantLinear
from lepton_kernels.quant.weight import quantize_weight

from ._utils import DEVICES

WEIGHT_ONLY = [("w4a16", 128, True), ("w4a16", 32, False), ("w4a16", -1, True), ("w4a16", 64, False),
               ("w8a16", -1, True)]
ALL = WEIGHT_ONLY + [("w8a8", -1, True), ("fp8", -1, True)]


def _rel(out, ref):
    return ((out.double() - ref.double()).abs().mean() / ref.double().abs().mean()).item()


def _qw(n, k, scheme, group_size=-1, symmetric=True, dtype=torch.float16, device="cpu"):
    w = torch.randn(n, k, device=device) * 0.05
    return quantize_weight(w.to(dtype), scheme, group_size=group_size, symmetric=symmetric)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scheme,group_size,symmetric", WEIGHT_ONLY)
@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", [(1, 64, 256), (7, 96, 384), (33, 256, 512)])
def test_weight_only_matches_dequantized(device, scheme, group_size, symmetric, x_dtype, m, n, k):
    qw = _qw(n, k, scheme, group_size, symmetric, dtype=x_dtype, device=device)
    x = torch.randn(m, k, dtype=x_dtype, device=device)
    bias = torch.randn(n, dtype=x_dtype, device=device)
    out = quant_matmul(x, qw, bias, backend="torch")
    assert out.dtype == x_dtype and out.shape == (m, n)
    ref = x.double() @ qw.dequantize(torch.float64).t() + bias.double()
    assert _rel(out, ref) < (1e-3 if x_dtype == torch.float16 else 8e-3)


def _rows_int8(x):
    """The documented per-token quantization, written out: s = max|x|/127, q = round(x / s)."""
    x = x.float()
    s = torch.clamp(x.abs().max(dim=1, keepdim=True).values / 127.0, min=torch.finfo(torch.float32).tiny)
    return torch.clamp(torch.round(x / s), -127, 127).long(), s


def _rows_fp8(x):
    x = x.float()
    s = torch.clamp(x.abs().max(dim=1, keepdim=True).values / 448.0, min=torch.finfo(torch.float32).tiny)
    return torch.clamp(x / s, -448, 448).to(torch.float8_e4m3fn), s


@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_w8a8_matches_emulation(x_dtype):
    """Integer dot products summed exactly (int64 here), scaled in float64: the same value as the
    reference, so the outputs agree to one rounding of the output dtype."""
    m, n, k = 13, 80, 512
    x = torch.randn(m, k, dtype=x_dtype)
    x[2] = 0  # an all-zero token: scale floor, no NaN
    qw = _qw(n, k, "w8a8", dtype=torch.bfloat16)
    bias = torch.randn(n, dtype=x_dtype)
    q_x, s_x = _rows_int8(x)
    dots = (q_x.unsqueeze(1) * qw.packed.long().unsqueeze(0)).sum(-1)  # exact [m, n]
    emul = dots.double() * s_x.double() * qw.scales.double().t() + bias.double()
    out = quant_matmul(x, qw, bias, backend="torch")
    assert out.dtype == x_dtype and not out.isnan().any()
    ulp = torch.finfo(x_dtype).eps
    assert ((out.double() - emul).abs() <= emul.abs() * ulp + 1e-30).all()
    assert torch.equal(out[2], bias)
    # And it is a fair approximation of the unquantized product (int8 quantization error).
    assert _rel(out, x.double() @ qw.dequantize(torch.float64).t() + bias.double()) < 2e-2


@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fp8_matches_emulation(x_dtype):
    """e4m3 products are exact; the reference sums them in float32, this emulation exactly, so
    |C - C_emul| <= K * 2^-24 * (|q_x| @ |q_w|^T) * s_x * s_w, plus one rounding of the output."""
    m, n, k = 11, 72, 384
    x = torch.randn(m, k, dtype=x_dtype)
    x[4] = 0
    qw = _qw(n, k, "fp8", dtype=torch.float16)
    q_x, s_x = _rows_fp8(x)
    a, b = q_x.double(), qw.packed.double()
    scale = s_x.double() * qw.scales.double().t()
    emul = (a @ b.t()) * scale
    sum_bound = k * 2.0**-24 * (a.abs() @ b.abs().t()) * scale
    out = quant_matmul(x, qw, backend="torch")
    assert out.dtype == x_dtype and not out.isnan().any()
    assert ((out.double() - emul).abs() <= sum_bound + emul.abs() * torch.finfo(x_dtype).eps + 1e-30).all()
    assert (out[4] == 0).all()
    assert _rel(out, x.double() @ qw.dequantize(torch.float64).t()) < 6e-2


@pytest.mark.parametrize("scheme,group_size,symmetric", ALL)
def test_shapes(scheme, group_size, symmetric):
    n, k = 48, 256
    qw = _qw(n, k, scheme, group_size, symmetric)
    x3 = torch.randn(2, 5, k, dtype=torch.float16)
    out3 = quant_matmul(x3, qw)
    assert out3.shape == (2, 5, n)
    assert torch.equal(out3, quant_matmul(x3.reshape(10, k), qw).reshape(2, 5, n))
    # (different M may take a different float32 GEMM path: equal up to output rounding)
    close = dict(rtol=2e-3, atol=1e-3)
    torch.testing.assert_close(quant_matmul(x3[0, 1], qw), out3[0, 1], **close)  # 1-D x
    x_t = torch.randn(k, 6, dtype=torch.float16).t()  # non-contiguous
    torch.testing.assert_close(quant_matmul(x_t, qw), quant_matmul(x_t.contiguous(), qw), **close)
    for empty in (torch.randn(0, k, dtype=torch.float16), torch.randn(3, 0, k, dtype=torch.bfloat16)):
        out = quant_matmul(empty, qw, torch.randn(n, dtype=empty.dtype))
        assert out.shape == (*empty.shape[:-1], n) and out.dtype == empty.dtype
    # bias adds after the product
    bias = torch.randn(n, dtype=torch.float32)
    x = torch.randn(4, k, dtype=torch.float32)
    assert torch.allclose(quant_matmul(x, qw, bias), quant_matmul(x, qw) + bias, atol=1e-5, rtol=1e-5)


def test_bad_inputs():
    qw = _qw(64, 256, "w4a16", 64)
    x = torch.randn(3, 256, dtype=torch.float16)
    with pytest.raises(TypeError, match="qw must be a QuantizedWeight"):
        quant_matmul(x, qw.dequantize())
    with pytest.raises(TypeError, match="x must have dtype"):
        quant_matmul(x.to(torch.int32), qw)
    with pytest.raises(TypeError, match="x must have dtype"):
        quant_matmul(x.double(), qw)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        quant_matmul(x.tolist(), qw)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., K=256\)"):
        quant_matmul(torch.randn(3, 128, dtype=torch.float16), qw)
    with pytest.raises(ValueError, match="x must have shape"):
        quant_matmul(torch.tensor(1.0, dtype=torch.float16), qw)
    with pytest.raises(ValueError, match="x must be on the device of qw"):
        quant_matmul(x.to("meta"), qw)
    with pytest.raises(ValueError, match="bias must have shape"):
        quant_matmul(x, qw, torch.randn(65, dtype=torch.float16))
    with pytest.raises(TypeError, match="bias must have the same dtype as x"):
        quant_matmul(x, qw, torch.randn(64, dtype=torch.float32))
    with pytest.raises(ValueError, match="bias must be on"):
        quant_matmul(x, qw, torch.randn(64, dtype=torch.float16, device="meta"))
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        quant_matmul(x, qw, backend="fast")


def test_registered_example_runs():
    args, kwargs = _backends.example("quant_matmul", torch.device("cpu"))
    out = lk.quant_matmul(*args, **kwargs, backend="torch")
    x, qw = args[0], args[1]
    assert out.shape == (x.shape[0], qw.n) and out.dtype == x.dtype and not out.isnan().any()


def test_op_schema_and_fake():
    qw = _qw(32, 128, "w4a16", 32, False)
    x = torch.randn(3, 128, dtype=torch.float16)
    bias = torch.randn(32, dtype=torch.float16)
    args = (x, qw.packed, qw.scales, qw.zeros, qw.perm, bias, qw.scheme, qw.layout, qw.group_size, 32, 128)
    torch.library.opcheck(torch.ops.lepton_kernels.quant_matmul_torch.default, args,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("scheme,group_size,symmetric", [("w4a16", 64, False), ("w8a8", -1, True)])
def test_torch_compile_fullgraph(scheme, group_size, symmetric):
    qw = _qw(64, 256, scheme, group_size, symmetric)
    bias = torch.randn(64, dtype=torch.float16)

    def f(x):
        return torch.relu(quant_matmul(x, qw, bias)) * 2

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    x = torch.randn(2, 3, 256, dtype=torch.float16)
    assert torch.equal(compiled(x), f(x))


# -- QuantLinear ------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme,group_size,symmetric", ALL)
def test_quant_linear_from_linear(scheme, group_size, symmetric):
    linear = nn.Linear(256, 96).to(torch.bfloat16)
    ql = QuantLinear.from_linear(linear, scheme, group_size=group_size, symmetric=symmetric)
    assert (ql.in_features, ql.out_features) == (256, 96)
    assert ql.weight.dtype == torch.bfloat16 and torch.equal(ql.bias, linear.bias)
    x = torch.randn(4, 7, 256, dtype=torch.bfloat16)
    out = ql(x)
    assert torch.equal(out, quant_matmul(x, ql.weight, ql.bias))
    with torch.no_grad():
        assert _rel(out, linear(x)) < (0.15 if scheme == "w4a16" else 0.06)
    assert f"scheme={scheme}" in repr(ql) and "in_features=256" in repr(ql)


def test_quant_linear_moves_and_keeps_format():
    ql = QuantLinear.from_linear(nn.Linear(128, 32), "fp8")  # float32 weight: float32 scales
    assert ql.to(torch.device("cpu")) is ql
    ql.half()
    assert ql.bias.dtype == torch.float16
    assert ql.weight.packed.dtype == torch.float8_e4m3fn and ql.weight.scales.dtype == torch.float32
    assert ql(torch.randn(2, 128, dtype=torch.float16)).dtype == torch.float16
    nn.Sequential(ql).to("meta")  # moves through the parent module
    assert ql.weight.device.type == "meta" and ql.bias.device.type == "meta"
    assert ql.weight.packed.dtype == torch.float8_e4m3fn


def test_quant_linear_bias_follows_x():
    ql = QuantLinear.from_linear(nn.Linear(128, 32), "w8a16")  # float32 bias
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    assert torch.equal(ql(x), quant_matmul(x, ql.weight, ql.bias.to(torch.bfloat16)))
    no_bias = QuantLinear.from_linear(nn.Linear(128, 32, bias=False), "w4a16", group_size=32)
    assert no_bias.bias is None and no_bias(x).shape == (3, 32)


def test_quant_linear_state_dict():
    src = nn.Sequential(nn.Identity(), QuantLinear.from_linear(nn.Linear(256, 64), "w4a16", group_size=64,
                                                                symmetric=False))
    dst = nn.Sequential(nn.Identity(), QuantLinear.from_linear(nn.Linear(256, 64), "w4a16", group_size=64,
                                                                symmetric=False))
    sd = src.state_dict()
    assert "1.weight.packed" in sd and "1.bias" in sd
    dst.load_state_dict({key: t.clone() for key, t in sd.items()}, strict=True)
    assert torch.equal(dst[1].weight.dequantize(), src[1].weight.dequantize())
    x = torch.randn(5, 256)
    assert torch.equal(dst(x), src(x))
    with pytest.raises(RuntimeError, match="Missing key"):
        dst.load_state_dict({"1.bias": sd["1.bias"]}, strict=True)
    wrong = {key: t for key, t in QuantLinear.from_linear(nn.Linear(128, 64), "w8a16").state_dict().items()}
    with pytest.raises(RuntimeError, match=r"shape \(64, 128\) in the checkpoint"):
        dst[1].load_state_dict(wrong)


def test_quant_linear_errors():
    with pytest.raises(TypeError, match="linear must be a torch.nn.Linear"):
        QuantLinear.from_linear(nn.Conv1d(4, 4, 1), "w8a16")
    with pytest.raises(TypeError, match="weight must be a QuantizedWeight"):
        QuantLinear(torch.randn(4, 4))
    qw = _qw(32, 128, "w8a16")
    with pytest.raises(ValueError, match="bias must have shape"):
        QuantLinear(qw, torch.randn(31))


def test_quant_linear_compiles():
    ql = QuantLinear.from_linear(nn.Linear(256, 64).half(), "w4a16", group_size=128)
    x = torch.randn(3, 256, dtype=torch.float16)
    assert torch.equal(torch.compile(ql, fullgraph=True, backend="eager")(x), ql(x))


@pytest.mark.gpu
@pytest.mark.parametrize("scheme,group_size,symmetric", ALL)
def test_quant_linear_to_cuda(scheme, group_size, symmetric):
    cpu = QuantLinear.from_linear(nn.Linear(256, 128).half(), scheme, group_size=group_size, symmetric=symmetric)
    gpu = nn.Sequential(QuantLinear.from_linear(nn.Linear(256, 128).half(), scheme, group_size=group_size,
                                                symmetric=symmetric))
    gpu[0].load_state_dict(cpu.state_dict())
    gpu.to("cuda")
    assert gpu[0].weight.device.type == "cuda" and gpu[0].bias.device.type == "cuda"
    x = torch.randn(9, 256, dtype=torch.float16)
    out = gpu(x.cuda()).cpu()
    ref = quant_matmul(x, cpu.weight, cpu.bias)
    assert _rel(out, ref) < 1e-3

"""quantize_weight / QuantizedWeight: packing, the stored format, error bounds, serialization, errors."""
import pytest
import torch

from lepton_kernels.quant.packing import AWQ_ORDER, IDENTITY_ORDER, pack_int4, unpack_int4
from lepton_kernels.quant.weight import SCHEMES, QuantizedWeight, quantize_weight

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# (scheme, group_size, symmetric) combinations quantize_weight accepts
CONFIGS = [("w4a16", g, sym) for g in (32, 64, 128, -1) for sym in (True, False)] + [
    ("w8a16", -1, True), ("w8a8", -1, True), ("fp8", -1, True)
]


def _weight(n, k, dtype):
    # Rows of different magnitudes, one outlier: scales must follow each row/group.
    w = torch.randn(n, k) * torch.logspace(-2, 1, n).unsqueeze(1)
    w[0, 5] = 40.0
    return w.to(dtype)


def _nibbles(packed):
    """Test-side decode of layout int4_k8: column k of row n is bits 4*(k%8).. of word k//8."""
    n, words = packed.shape
    k = torch.arange(words * 8)
    return (packed[:, k // 8] >> (4 * (k % 8))) & 0xF


# -- packing ------------------------------------------------------------------------------------

@pytest.mark.parametrize("order", [IDENTITY_ORDER, AWQ_ORDER])
@pytest.mark.parametrize("dim", [0, 1])
def test_pack_unpack_round_trip(order, dim):
    values = torch.randint(0, 16, (40, 24), dtype=torch.uint8)
    packed = pack_int4(values, dim=dim, order=order)
    assert packed.dtype == torch.int32
    assert packed.shape == ((5, 24) if dim == 0 else (40, 3))
    assert torch.equal(unpack_int4(packed, dim=dim, order=order), values)


def test_pack_bit_positions():
    values = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]])
    word = 0xF7654321 - 2**32  # value i in bits 4i.., as a signed int32
    assert pack_int4(values).item() == word
    # AWQ: field j holds element order[j], so the fields read 1,3,5,7,2,4,6,15.
    assert pack_int4(values, order=AWQ_ORDER).item() == 0xF6427531 - 2**32


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_int4(torch.zeros(3, 12, dtype=torch.int32))
    with pytest.raises(ValueError, match="order"):
        pack_int4(torch.zeros(3, 8, dtype=torch.int32), order=(0, 1, 2, 3, 4, 5, 6, 6))
    with pytest.raises(TypeError, match="words"):
        unpack_int4(torch.zeros(3, 2, dtype=torch.int64))


# -- the stored format ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size,symmetric", [(32, True), (128, False), (-1, True), (64, False)])
def test_w4_dequantize_is_analytic(dtype, group_size, symmetric):
    n, k = 72, 384
    qw = quantize_weight(_weight(n, k, dtype), "w4a16", group_size=group_size, symmetric=symmetric)
    g = k if group_size == -1 else group_size
    assert qw.packed.dtype == torch.int32 and qw.packed.shape == (n, k // 8)
    assert qw.scales.dtype == dtype and qw.scales.shape == (n, k // g)
    assert qw.layout == "int4_k8" and qw.shape == (n, k) and qw.dtype == dtype
    u = _nibbles(qw.packed)
    if symmetric:
        assert qw.zeros is None and qw.symmetric
        zero = torch.full((n, k // g), 8)
    else:
        assert qw.zeros.dtype == torch.uint8 and qw.zeros.shape == (n, k // g)
        zero = qw.zeros.long()
    want = ((u - zero.repeat_interleave(g, dim=1)).float() * qw.scales.float().repeat_interleave(g, dim=1))
    assert torch.equal(qw.dequantize(), want.to(dtype))
    assert torch.equal(qw.dequantize(torch.float32), want)


@pytest.mark.parametrize("scheme", ["w8a16", "w8a8", "fp8"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_8bit_dequantize_is_analytic(scheme, dtype):
    qw = quantize_weight(_weight(40, 264, dtype), scheme)
    q_dtype = torch.float8_e4m3fn if scheme == "fp8" else torch.int8
    scale_dtype = dtype if scheme == "w8a16" else torch.float32
    assert qw.packed.dtype == q_dtype and qw.packed.shape == (40, 264)
    assert qw.scales.dtype == scale_dtype and qw.scales.shape == (40, 1)
    assert qw.group_size == -1 and qw.zeros is None and qw.layout == "rowmajor"
    if scheme != "fp8":
        assert qw.packed.abs().max() <= 127
    want = qw.packed.float() * qw.scales.float()
    assert torch.equal(qw.dequantize(torch.float32), want)
    assert torch.equal(qw.dequantize(), want.to(dtype))


@pytest.mark.parametrize("scheme,group_size,symmetric", CONFIGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_error_bound(scheme, group_size, symmetric, dtype):
    """Round to nearest: |w - dequant(quant(w))| <= scale / 2 (fp8: half an e4m3 step)."""
    n, k = 64, 256
    w = _weight(n, k, dtype)
    qw = quantize_weight(w, scheme, group_size=group_size, symmetric=symmetric)
    g = k if qw.group_size == -1 else qw.group_size
    scale = qw.scales.float().repeat_interleave(g, dim=1)
    err = (w.float() - qw.dequantize(torch.float32)).abs()
    if scheme == "fp8":
        # e4m3 keeps 3 mantissa bits (half step <= 2^-4 relative); below 2^-6 the step is 2^-9.
        bound = torch.maximum(w.float().abs() * 2.0**-4, scale * 2.0**-10)
    else:
        bound = scale / 2
    assert (err <= bound * (1 + 1e-5) + 1e-30).all(), (err - bound).max()
    # Scales are as small as the bound allows: the largest |w| of a row/group uses (nearly) the full range.
    qmax = {"w4a16": 7.5 if symmetric else 15, "w8a16": 127, "w8a8": 127, "fp8": 448}[scheme]
    if symmetric:
        amax = w.float().abs().view(n, k // g, g).amax(-1)
    else:
        wg = w.float().view(n, k // g, g)
        amax = wg.amax(-1).clamp(min=0) - wg.amin(-1).clamp(max=0)
    assert (amax / qw.scales.float() > qmax * 0.9).all()


@pytest.mark.parametrize("scheme,group_size,symmetric", [("w4a16", 32, True), ("w4a16", 64, False),
                                                         ("w8a16", -1, True), ("w8a8", -1, True), ("fp8", -1, True)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_zero_rows_and_groups(scheme, group_size, symmetric, dtype):
    w = _weight(16, 128, dtype)
    w[3] = 0  # a zero row
    w[5, :64] = 0  # a zero group (w4a16) inside a non-zero row
    w[7] = 1e-30  # underflows to 0 or a denormal in 16 bits
    qw = quantize_weight(w, scheme, group_size=group_size, symmetric=symmetric)
    assert torch.isfinite(qw.scales.float()).all() and (qw.scales.float() > 0).all()
    d = qw.dequantize()
    assert torch.isfinite(d.float()).all()
    assert (d[3] == 0).all()
    if scheme == "w4a16":
        assert (d[5, :64] == 0).all()


def test_asymmetric_one_sided_groups():
    """All-positive and all-negative groups still quantize within half a step (range includes 0)."""
    w = torch.rand(8, 256) + 1.0
    w[4:] = -w[4:]
    qw = quantize_weight(w, "w4a16", group_size=64, symmetric=False)
    scale = qw.scales.repeat_interleave(64, dim=1)
    assert ((w - qw.dequantize()).abs() <= scale / 2 * (1 + 1e-6)).all()


def test_properties_and_move():
    qw = quantize_weight(_weight(48, 256, torch.float16), "w4a16", group_size=64, symmetric=False)
    assert qw.device == torch.device("cpu")
    assert qw.nbytes == 48 * 256 // 2 + 48 * 4 * 2 + 48 * 4
    moved = qw.to("meta")
    assert moved.device == torch.device("meta") and moved.zeros.device.type == "meta"
    assert moved.packed.dtype == torch.int32 and moved.scales.dtype == torch.float16
    assert qw.device == torch.device("cpu")  # the original stays
    assert "w4a16" in repr(qw) and "(48, 256)" in repr(qw)


# -- serialization ------------------------------------------------------------------------------

def _all_kinds():
    from lepton_kernels.quant.importers import from_gptq  # act-order: carries perm

    out = [quantize_weight(_weight(32, 256, torch.bfloat16), s, group_size=g, symmetric=sym)
           for s, g, sym in [("w4a16", 64, False), ("w4a16", -1, True), ("w8a16", -1, True),
                             ("w8a8", -1, True), ("fp8", -1, True)]]
    k, n, groups = 256, 32, 2
    g_idx = (torch.arange(k) // 128)[torch.randperm(k)].to(torch.int32)
    qweight = torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32)
    qzeros = torch.randint(-2**31, 2**31 - 1, (groups, n // 8), dtype=torch.int32)
    out.append(from_gptq(qweight, qzeros, torch.rand(groups, n).half(), g_idx))
    return out


def _assert_same_weight(a, b):
    assert (a.scheme, a.layout, a.group_size, a.shape, a.dtype, a.symmetric) == \
        (b.scheme, b.layout, b.group_size, b.shape, b.dtype, b.symmetric)
    for name in ("packed", "scales", "zeros", "perm"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x.view(torch.uint8), y.view(torch.uint8)), name
    assert torch.equal(a.dequantize(), b.dequantize())


def test_state_dict_round_trip_plain():
    for qw in _all_kinds():
        sd = qw.state_dict()
        assert all(isinstance(v, torch.Tensor) for v in sd.values())
        copy = {key: t.clone() for key, t in sd.items()}
        _assert_same_weight(QuantizedWeight.from_state_dict(copy), qw)


def test_state_dict_round_trip_safetensors(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    for i, qw in enumerate(_all_kinds()):
        path = str(tmp_path / f"w{i}.safetensors")
        st.save_file(qw.state_dict(), path)
        _assert_same_weight(QuantizedWeight.from_state_dict(st.load_file(path)), qw)


def test_from_state_dict_errors():
    sd = quantize_weight(_weight(16, 64, torch.float16), "w8a16").state_dict()
    with pytest.raises(ValueError, match="lacks scales"):
        QuantizedWeight.from_state_dict({k: v for k, v in sd.items() if k != "scales"})
    newer = dict(sd, meta=sd["meta"].clone())
    newer["meta"][0] = 99
    with pytest.raises(ValueError, match="format version 99"):
        QuantizedWeight.from_state_dict(newer)
    with pytest.raises(ValueError, match="scales must have shape"):
        QuantizedWeight.from_state_dict(dict(sd, scales=sd["scales"][:8]))


# -- argument errors ------------------------------------------------------------------------------

def test_quantize_weight_errors():
    w = torch.randn(32, 256, dtype=torch.float16)
    with pytest.raises(ValueError, match="unknown scheme 'w3a16'.*" + ", ".join(SCHEMES)):
        quantize_weight(w, "w3a16")
    with pytest.raises(ValueError, match="group_size.*must be one of"):
        quantize_weight(w, "w4a16", group_size=48)
    with pytest.raises(ValueError, match="group_size=128 must divide K=192"):
        quantize_weight(torch.randn(32, 192), "w4a16", group_size=128)
    with pytest.raises(ValueError, match="multiple of 8"):
        quantize_weight(torch.randn(32, 100), "w4a16", group_size=-1)
    for scheme in ("w8a16", "w8a8", "fp8"):
        with pytest.raises(ValueError, match=f"asymmetric quantization is not supported for {scheme}"):
            quantize_weight(w, scheme, symmetric=False)
        with pytest.raises(ValueError, match="group_size must be -1"):
            quantize_weight(w, scheme, group_size=64)
    with pytest.raises(ValueError, match="w must be 2-D"):
        quantize_weight(torch.randn(2, 32, 256), "w8a16")
    with pytest.raises(TypeError, match="w must have dtype"):
        quantize_weight(torch.randint(0, 5, (32, 256)), "w8a16")
    with pytest.raises(TypeError, match="w must have dtype"):
        quantize_weight(w.double(), "w8a16")
    with pytest.raises(TypeError, match="w must be a torch.Tensor"):
        quantize_weight(w.tolist(), "w8a16")
    with pytest.raises(TypeError, match="symmetric"):
        quantize_weight(w, "w4a16", symmetric="yes")

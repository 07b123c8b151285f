"""GPTQ / AWQ imports: bit-exact against packers written here from the formats' descriptions."""
import pytest
import torch

from lepton_kernels.ops.quant_matmul import quant_matmul
from lepton_kernels.quant.importers import from_awq, from_gptq
from lepton_kernels.quant.weight import QuantizedWeight

AWQ_FIELD_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # field j of a word holds column 8*w + order[j]


def _words(fields):
    """[..., 8] nibbles (field j -> bits 4j..) -> int32 words, built bit by bit in int64."""
    word = torch.zeros(fields.shape[:-1], dtype=torch.int64)
    for j in range(8):
        word |= (fields[..., j].long() & 0xF) << (4 * j)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def gptq_pack(q_kn, zeros_gn):
    """q [K, N] in 0..15, real zero points [G, N] in 1..16 -> (qweight [K/8, N], qzeros [G, N/8])."""
    k, n = q_kn.shape
    qweight = _words(q_kn.view(k // 8, 8, n).transpose(1, 2))  # along K: value i at bits 4i
    stored = zeros_gn - 1  # GPTQ v1 stores zero - 1
    qzeros = _words(stored.view(stored.shape[0], n // 8, 8))  # along N
    return qweight, qzeros


def awq_pack(q_kn, zeros_gn):
    """q [K, N], zeros [G, N] in 0..15 -> (qweight [K, N/8], qzeros [G, N/8]) in AWQ's order."""
    def pack_cols(v):
        groups = v.view(v.shape[0], v.shape[1] // 8, 8)
        return _words(groups[..., AWQ_FIELD_ORDER])
    return pack_cols(q_kn), pack_cols(zeros_gn)


def _expected(q_kn, zeros_gn, scales_gn, g_idx, dtype=None):
    """w[n, k] = (q[k, n] - z[g(k), n]) * s[g(k), n], rounded once to ``dtype`` (default: the scales')."""
    g = g_idx.long()
    return ((q_kn - zeros_gn[g]).float() * scales_gn[g].float()).t().to(dtype or scales_gn.dtype)


def _random_layer(k, n, groups, dtype, zero_low, zero_high):
    q = torch.randint(0, 16, (k, n))
    zeros = torch.randint(zero_low, zero_high + 1, (groups, n))
    scales = (torch.rand(groups, n) * 0.02 + 0.001).to(dtype)
    return q, zeros, scales


@pytest.mark.parametrize("k,n,group_size", [(256, 64, 32), (512, 96, 128), (384, 128, 64), (256, 72, -1)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gptq_exact(k, n, group_size, dtype):
    groups = 1 if group_size == -1 else k // group_size
    q, zeros, scales = _random_layer(k, n, groups, dtype, 1, 16)  # 16: a stored 15 (v1 quirk)
    zeros[0, :2] = torch.tensor([1, 16])
    qweight, qzeros = gptq_pack(q, zeros)
    g_idx = torch.arange(k) // (k // groups)
    want = _expected(q, zeros, scales, g_idx)
    for gi in (None, g_idx.to(torch.int32)):
        qw = QuantizedWeight.from_gptq(qweight, qzeros, scales, gi)
        assert qw.perm is None and qw.group_size == group_size and qw.dtype == dtype
        assert qw.scheme == "w4a16" and not qw.symmetric
        assert torch.equal(qw.dequantize(), want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gptq_act_order(dtype):
    k, n, g = 512, 128, 128
    groups = k // g
    q, zeros, scales = _random_layer(k, n, groups, dtype, 1, 16)
    qweight, qzeros = gptq_pack(q, zeros)
    g_idx = (torch.arange(k) // g)[torch.randperm(k)].to(torch.int32)  # each group: g shuffled channels
    want = _expected(q, zeros, scales, g_idx)

    qw = from_gptq(qweight, qzeros, scales, g_idx)
    assert qw.perm is not None and qw.perm.dtype == torch.int32
    assert torch.equal(qw.dequantize(), want)
    exact = _expected(q, zeros, scales, g_idx, torch.float32)
    assert torch.equal(qw.dequantize(torch.float32), exact)

    x = torch.randn(9, k, dtype=torch.float16)
    bias = torch.randn(n, dtype=torch.float16)
    ref = x.float() @ exact.t() + bias.float()
    out = quant_matmul(x, qw, bias, backend="torch")
    assert out.dtype == torch.float16 and out.shape == (9, n)
    assert ((out.float() - ref).abs().mean() / ref.abs().mean()).item() < 1e-3
    # Ignoring the permutation would be far off: the check has teeth.
    wrong = x.float() @ exact[:, qw.perm.long()].t()
    assert ((wrong - ref).abs().mean() / ref.abs().mean()).item() > 0.1


@pytest.mark.parametrize("k,n,group_size", [(256, 64, 32), (512, 96, 128), (256, 136, -1)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_awq_exact(k, n, group_size, dtype):
    groups = 1 if group_size == -1 else k // group_size
    q, zeros, scales = _random_layer(k, n, groups, dtype, 0, 15)
    qweight, qzeros = awq_pack(q, zeros)
    qw = QuantizedWeight.from_awq(qweight, qzeros, scales)
    assert qw.group_size == group_size and qw.perm is None and qw.dtype == dtype
    assert torch.equal(qw.dequantize(), _expected(q, zeros, scales, torch.arange(k) // (k // groups)))


def test_awq_order_matters():
    """A word whose fields are 0..7 holds columns in AWQ's order, not the identity."""
    k, n = 32, 8
    qweight = torch.full((k, 1), 0x76543210, dtype=torch.int32)
    qzeros = torch.zeros(1, 1, dtype=torch.int32)
    qw = from_awq(qweight, qzeros, torch.ones(1, n, dtype=torch.float16))
    inverse = [AWQ_FIELD_ORDER.index(c) for c in range(8)]  # column c sits in field inverse[c]
    assert qw.dequantize()[:, 0].tolist() == [float(f) for f in inverse]


def test_importer_errors():
    k, n, groups = 256, 64, 2
    q, zeros, scales = _random_layer(k, n, groups, torch.float16, 1, 16)
    qweight, qzeros = gptq_pack(q, zeros)
    with pytest.raises(TypeError, match="qweight must be int32"):
        from_gptq(qweight.long(), qzeros, scales)
    with pytest.raises(TypeError, match="qzeros must be int32"):
        from_gptq(qweight, qzeros.to(torch.int16), scales)
    with pytest.raises(ValueError, match="qzeros must have shape"):
        from_gptq(qweight, qzeros[:, :4], scales)
    with pytest.raises(ValueError, match="scales must have shape"):
        from_gptq(qweight, qzeros, scales[:, :32])
    with pytest.raises(TypeError, match="scales must have dtype"):
        from_gptq(qweight, qzeros, scales.double())
    with pytest.raises(ValueError, match="bits=8"):
        from_gptq(qweight, qzeros, scales, bits=8)
    with pytest.raises(ValueError, match="g_idx must have shape"):
        from_gptq(qweight, qzeros, scales, torch.zeros(k - 8, dtype=torch.int32))
    uneven = torch.zeros(k, dtype=torch.int32)
    uneven[-10:] = 1
    with pytest.raises(ValueError, match="g_idx must assign exactly K/groups = 128"):
        from_gptq(qweight, qzeros, scales, uneven)
    with pytest.raises(ValueError, match="group size .* 96 is not supported"):
        qw3, qz3 = gptq_pack(torch.randint(0, 16, (288, n)), torch.randint(1, 17, (3, n)))
        from_gptq(qw3, qz3, torch.rand(3, n).half())

    aq, az = awq_pack(q, zeros - 1)
    with pytest.raises(TypeError, match="qweight must be int32"):
        from_awq(aq.float(), az, scales)
    with pytest.raises(ValueError, match="qzeros must have shape"):
        from_awq(aq, az[:1], scales)
    with pytest.raises(ValueError, match="scales must have shape"):
        from_awq(aq, az, scales.t())

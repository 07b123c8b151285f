"""flash_attention (torch backend) against a naive float64 attention written here, plus its checks."""
from __future__ import annotations

import math

import pytest
import torch

from ._utils import assert_close_fa_rule
from lepton_kernels import _backends
from lepton_kernels.ops.flash_attention import flash_attention

NEG_INF = float("-inf")


# -- an independent naive attention: explicit per-query masks and per-(head, query) softmax ------

def naive_mask(num_queries: int, num_keys: int, causal: bool, window=(-1, -1), width: int = None) -> torch.Tensor:
    """[Sq, width] bool: keys each query sees, built one query row at a time."""
    width = num_keys if width is None else width
    left, right = window
    if causal:
        right = 0
    mask = torch.zeros(num_queries, width, dtype=torch.bool)
    for i in range(num_queries):
        pos = i + num_keys - num_queries  # the key position this query sits on
        first = 0 if left < 0 else max(0, pos - left)
        last = num_keys - 1 if right < 0 else min(num_keys - 1, pos + right)
        if first <= last:
            mask[i, first:last + 1] = True
    return mask


def naive_attention(q, k, v, mask, scale, softcap=0.0):
    """One sequence in float64. q [Sq, Hq, D], k/v [Sk, Hkv, D], mask [Sq, Sk] -> out, lse [Hq, Sq].

    Per head: max-subtracted exponentials of the visible scores, normalized by their sum; a row
    with no visible key has sum 0, hence lse = log(0) = -inf and out = 0.
    """
    q, k, v = q.double(), k.double(), v.double()
    num_queries, num_q_heads, _ = q.shape
    group = num_q_heads // k.shape[1]
    out = torch.zeros_like(q)
    lse = torch.empty((num_q_heads, num_queries), dtype=torch.float64)
    for h in range(num_q_heads):
        kh, vh = k[:, h // group], v[:, h // group]
        scores = q[:, h] @ kh.T * scale
        if softcap > 0:
            scores = softcap * torch.tanh(scores / softcap)
        peak = torch.where(mask, scores, NEG_INF).amax(dim=1, keepdim=True) if mask.shape[1] else \
            torch.zeros(num_queries, 1, dtype=torch.float64)
        peak = torch.where(torch.isfinite(peak), peak, 0.0)
        weights = torch.where(mask, torch.exp(scores - peak), 0.0)
        total = weights.sum(dim=1)
        lse[h] = peak[:, 0] + torch.log(total)
        out[:, h] = (weights @ vh) / torch.where(total > 0, total, 1.0)[:, None]
    return out, lse


def lowp_attention(q, k, v, mask, scale, softcap=0.0):
    """The same computation done by torch in the inputs' own (low) dtype: the FA rule's baseline."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    probs = torch.softmax(scores.masked_fill(~mask, NEG_INF), dim=-1).nan_to_num(0.0).to(q.dtype)
    return torch.einsum("hqk,khd->qhd", probs, v)


def naive_padded(q, k, v, causal=False, window=(-1, -1), softcap=0.0, scale=None, kv_lens=None, lowp=False):
    """Padded batch through the per-sequence naive attention: out [B, Sq, Hq, D], lse [B, Hq, Sq]."""
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    outs, lses = [], []
    for b in range(q.shape[0]):
        num_keys = k.shape[1] if kv_lens is None else int(kv_lens[b])
        mask = naive_mask(q.shape[1], num_keys, causal, window, width=k.shape[1])
        if lowp:
            outs.append(lowp_attention(q[b], k[b], v[b], mask, scale, softcap))
        else:
            out, lse = naive_attention(q[b], k[b], v[b], mask, scale, softcap)
            outs.append(out)
            lses.append(lse)
    if lowp:
        return torch.stack(outs)
    return torch.stack(outs), torch.stack(lses)


def randn(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype)


def make_qkv(batch, sq, sk, hq, hkv, d, dtype=torch.float64):
    """Padded q [B, Sq, Hq, D], k and v [B, Sk, Hkv, D]; with batch None, packed [S, H, D]."""
    lead = () if batch is None else (batch,)
    q = randn(*lead, sq, hq, d, dtype=dtype)
    return q, randn(*lead, sk, hkv, d, dtype=dtype), randn(*lead, sk, hkv, d, dtype=dtype)


def check_against_naive(out, lse, ref_out, ref_lse, atol):
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=0)
    masked = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), masked), "lse must be -inf exactly on fully masked rows"
    torch.testing.assert_close(lse.double()[~masked], ref_lse[~masked], atol=atol, rtol=0)


SHAPES = [(1, 1), (1, 128), (113, 203), (128, 128), (64, 32)]
MASKS = [
    dict(),
    dict(causal=True),
    dict(causal=True, window=(64, 0)),
    dict(window=(32, 32)),
    dict(causal=True, softcap=30.0),
]


# -- correctness -------------------------------------------------------------------------------

@pytest.mark.parametrize("mask", MASKS, ids=lambda m: ",".join(f"{k}={v}" for k, v in m.items()) or "full")
@pytest.mark.parametrize("sq,sk", SHAPES)
def test_padded_matches_naive(sq, sk, mask):
    q, k, v = make_qkv(2, sq, sk, 4, 2, 64)
    out, lse = flash_attention(q, k, v, **mask, return_lse=True, backend="torch")
    assert out.shape == q.shape and out.dtype == torch.float64
    assert lse.shape == (2, 4, sq) and lse.dtype == torch.float32
    ref_out, ref_lse = naive_padded(q, k, v, **mask)
    check_against_naive(out, lse, ref_out, ref_lse, atol=1e-5)  # lse is float32
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=0)  # float64 math for float64 inputs


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_head_dims_float32(head_dim):
    q, k, v = make_qkv(1, 113, 203, 4, 2, head_dim, dtype=torch.float32)
    out, lse = flash_attention(q, k, v, causal=True, return_lse=True, backend="torch")
    assert out.dtype == torch.float32
    ref_out, ref_lse = naive_padded(q, k, v, causal=True)
    check_against_naive(out, lse, ref_out, ref_lse, atol=2e-5)


@pytest.mark.parametrize("hq,hkv", [(8, 8), (8, 2), (8, 1)])
@pytest.mark.parametrize("mask", [dict(causal=True), dict(window=(32, 32), softcap=30.0)],
                         ids=["causal", "window+softcap"])
def test_gqa_mqa(hq, hkv, mask):
    q, k, v = make_qkv(2, 64, 96, hq, hkv, 64)
    out, lse = flash_attention(q, k, v, **mask, return_lse=True, backend="torch")
    ref_out, ref_lse = naive_padded(q, k, v, **mask)
    check_against_naive(out, lse, ref_out, ref_lse, atol=1e-5)


def test_softmax_scale_and_causal_as_window():
    q, k, v = make_qkv(2, 40, 70, 2, 2, 32)
    out = flash_attention(q, k, v, softmax_scale=0.3, causal=True, backend="torch")
    ref_out, _ = naive_padded(q, k, v, causal=True, scale=0.3)
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=0)
    default = flash_attention(q, k, v, causal=True, backend="torch")
    explicit = flash_attention(q, k, v, causal=True, softmax_scale=1 / math.sqrt(32), backend="torch")
    torch.testing.assert_close(default, explicit, atol=0, rtol=0)
    as_window = flash_attention(q, k, v, window=(-1, 0), backend="torch")  # right = 0 is causal
    torch.testing.assert_close(as_window, default, atol=0, rtol=0)
    both = flash_attention(q, k, v, causal=True, window=(-1, -1), backend="torch")
    torch.testing.assert_close(both, default, atol=0, rtol=0)


@pytest.mark.parametrize("mask", [dict(), dict(causal=True), dict(causal=True, window=(8, 0), softcap=30.0)],
                         ids=["full", "causal", "window+softcap"])
def test_kv_lens(mask):
    q, k, v = make_qkv(4, 16, 48, 4, 2, 64)
    kv_lens = torch.tensor([48, 0, 5, 1], dtype=torch.int32)
    out, lse = flash_attention(q, k, v, **mask, kv_lens=kv_lens, return_lse=True, backend="torch")
    ref_out, ref_lse = naive_padded(q, k, v, **mask, kv_lens=kv_lens)
    check_against_naive(out, lse, ref_out, ref_lse, atol=1e-5)
    assert (out[1] == 0).all() and torch.isneginf(lse[1]).all()  # no keys at all
    # Padding keys do not matter: changing them changes nothing.
    k2, v2 = k.clone(), v.clone()
    k2[2, 5:] = 1e3
    v2[2, 5:] = float("nan")
    out2 = flash_attention(q, k2, v2, **mask, kv_lens=kv_lens, backend="torch")
    torch.testing.assert_close(out2, out, atol=0, rtol=0)


@pytest.mark.parametrize("with_kv_lens", [False, True])
@pytest.mark.parametrize("mask", [dict(), dict(causal=True), dict(window=(3, 2)), dict(causal=True, softcap=30.0)],
                         ids=["full", "causal", "window", "causal+softcap"])
def test_varlen_matches_naive(mask, with_kv_lens):
    lens_q = [3, 0, 1, 17, 2, 9]
    lens_k = [5, 0, 1, 40, 0, 6]  # includes empty sequences and more queries than keys
    hq, hkv, d = 4, 1, 64
    q, k, v = make_qkv(None, sum(lens_q), sum(lens_k), hq, hkv, d)
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32)
    used_k = [4, 0, 1, 33, 0, 6] if with_kv_lens else lens_k
    kv_lens = torch.tensor(used_k, dtype=torch.int32) if with_kv_lens else None
    out, lse = flash_attention(q, k, v, **mask, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=17,
                               max_seqlen_k=40, kv_lens=kv_lens, return_lse=True, backend="torch")
    assert out.shape == q.shape and lse.shape == (hq, q.shape[0])
    scale = 1 / math.sqrt(d)
    for b in range(len(lens_q)):
        q0, q1, k0 = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b])
        keys = slice(k0, k0 + used_k[b])
        qmask = naive_mask(q1 - q0, used_k[b], mask.get("causal", False), mask.get("window", (-1, -1)))
        ref_out, ref_lse = naive_attention(q[q0:q1], k[keys], v[keys], qmask, scale, mask.get("softcap", 0.0))
        check_against_naive(out[q0:q1], lse[:, q0:q1], ref_out, ref_lse, atol=1e-5)


def test_varlen_equals_padded():
    q, k, v = make_qkv(3, 20, 30, 4, 2, 64, dtype=torch.float32)
    cu_q = torch.tensor([0, 20, 40, 60], dtype=torch.int32)
    cu_k = torch.tensor([0, 30, 60, 90], dtype=torch.int32)
    out, lse = flash_attention(q, k, v, causal=True, return_lse=True, backend="torch")
    out_v, lse_v = flash_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), causal=True,
                                   cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True, backend="torch")
    torch.testing.assert_close(out_v, out.flatten(0, 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(lse_v, lse.permute(1, 0, 2).flatten(1, 2), atol=1e-6, rtol=0)


def test_transposed_inputs_need_no_copy():
    # (B, H, S, D) storage seen as (B, S, H, D): strided in S and H, contiguous in D.
    q = randn(2, 4, 33, 64, dtype=torch.float32).transpose(1, 2)
    k = randn(2, 2, 50, 64, dtype=torch.float32).transpose(1, 2)
    v = randn(2, 2, 50, 64, dtype=torch.float32).transpose(1, 2)
    assert not q.is_contiguous() and q.stride(-1) == 1
    out, lse = flash_attention(q, k, v, causal=True, return_lse=True, backend="torch")
    ref_out, ref_lse = naive_padded(q, k, v, causal=True)
    check_against_naive(out, lse, ref_out, ref_lse, atol=2e-5)
    contiguous = flash_attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=True, backend="torch")
    torch.testing.assert_close(out, contiguous, atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", ["causal_more_queries", "window_outside", "no_keys"])
def test_fully_masked_rows(case):
    if case == "causal_more_queries":  # query i sees keys j <= i - 32: the first 32 rows see none
        q, k, v = make_qkv(1, 64, 32, 2, 2, 64)
        kwargs, masked = dict(causal=True), slice(0, 32)
    elif case == "window_outside":  # query i sees keys i-4 .. i-2: none for i < 2
        q, k, v = make_qkv(1, 8, 4, 2, 2, 64)
        kwargs, masked = dict(window=(0, 2)), slice(0, 2)
    else:
        q, k, v = make_qkv(1, 5, 0, 2, 2, 64)
        kwargs, masked = dict(causal=True), slice(0, 5)
    out, lse = flash_attention(q.float(), k.float(), v.float(), **kwargs, return_lse=True, backend="torch")
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert (out[:, masked] == 0).all()
    assert torch.isneginf(lse[:, :, masked]).all()
    assert torch.isfinite(lse[:, :, masked.stop:]).all()
    ref_out, ref_lse = naive_padded(q, k, v, **kwargs)
    check_against_naive(out, lse, ref_out, ref_lse, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,sq,sk,mask", [
    (4, 4, 113, 203, dict(causal=True)),
    (8, 2, 128, 128, dict(window=(32, 32), softcap=30.0)),
    (8, 1, 64, 32, dict(causal=True, window=(64, 0))),
    (4, 2, 1, 128, dict()),
])
def test_low_precision_fa_rule(dtype, hq, hkv, sq, sk, mask):
    q, k, v = make_qkv(2, sq, sk, hq, hkv, 128, dtype=dtype)
    out, lse = flash_attention(q, k, v, **mask, return_lse=True, backend="torch")
    assert out.dtype == dtype and lse.dtype == torch.float32
    ref_out, ref_lse = naive_padded(q, k, v, **mask)
    assert_close_fa_rule(out, ref_out, naive_padded(q, k, v, **mask, lowp=True))
    masked = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), masked)
    torch.testing.assert_close(lse.double()[~masked], ref_lse[~masked], atol=1e-4, rtol=0)


def test_varlen_low_precision_fa_rule():
    lens_q, lens_k = [7, 0, 1, 40], [9, 3, 1, 40]
    dtype, hq, hkv, d = torch.bfloat16, 8, 2, 96
    q, k, v = make_qkv(None, sum(lens_q), sum(lens_k), hq, hkv, d, dtype=dtype)
    cu_q = torch.tensor([0, 7, 7, 8, 48], dtype=torch.int32)
    cu_k = torch.tensor([0, 9, 12, 13, 53], dtype=torch.int32)
    out = flash_attention(q, k, v, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend="torch")
    refs, lowps = [], []
    for b in range(4):
        qs, ks = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        mask = naive_mask(lens_q[b], lens_k[b], True)
        refs.append(naive_attention(q[qs], k[ks], v[ks], mask, 1 / math.sqrt(d))[0])
        lowps.append(lowp_attention(q[qs], k[ks], v[ks], mask, 1 / math.sqrt(d)))
    assert_close_fa_rule(out, torch.cat(refs), torch.cat(lowps))


def test_return_value_and_example():
    q, k, v = make_qkv(1, 4, 4, 2, 2, 16, dtype=torch.float32)
    out = flash_attention(q, k, v, backend="torch")
    assert isinstance(out, torch.Tensor)
    args, kwargs = _backends.example("flash_attention", torch.device("cpu"))
    out, lse = flash_attention(*args, **kwargs, return_lse=True, backend="torch")
    assert out.shape == args[0].shape and not torch.isnan(out).any()
    # The registered op (what torch.compile sees) gives what the eager call gives.
    op = _backends.implementations("flash_attention")["torch"].fn
    q, k, v = args
    op_out, op_lse = op(q, k, v, True, 1 / math.sqrt(q.shape[-1]), -1, 0, 0.0, None, None, q.shape[1], k.shape[1], None)
    torch.testing.assert_close(op_out, out, atol=0, rtol=0)
    torch.testing.assert_close(op_lse, lse, atol=0, rtol=0)


# -- torch.compile and fake tensors -------------------------------------------------------------

def test_torch_compile_fullgraph():
    def attend(q, k, v, cu_q, cu_k):
        padded = flash_attention(q, k, v, causal=True, window=(8, 0), softcap=20.0, backend="torch")
        packed, lse = flash_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_seqlens_q=cu_q,
                                      cu_seqlens_k=cu_k, max_seqlen_q=12, max_seqlen_k=16, return_lse=True,
                                      backend="torch")
        return padded, packed, lse

    q, k, v = make_qkv(2, 12, 16, 4, 2, 32, dtype=torch.float32)
    cu_q = torch.tensor([0, 12, 24], dtype=torch.int32)
    cu_k = torch.tensor([0, 16, 32], dtype=torch.int32)
    compiled = torch.compile(attend, fullgraph=True, backend="eager")
    for got, want in zip(compiled(q, k, v, cu_q, cu_k), attend(q, k, v, cu_q, cu_k)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k, v = torch.empty(3, 10, 8, 64), torch.empty(3, 20, 2, 64), torch.empty(3, 20, 2, 64)
        out, lse = flash_attention(q, k, v, causal=True, return_lse=True, backend="torch")
        assert out.shape == (3, 10, 8, 64) and lse.shape == (3, 8, 10) and lse.dtype == torch.float32
        cu = torch.empty(4, dtype=torch.int32)
        out, lse = flash_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_seqlens_q=cu,
                                   cu_seqlens_k=cu, return_lse=True, backend="torch")
        assert out.shape == (30, 8, 64) and lse.shape == (8, 30)
        out = flash_attention(q.half(), k.half(), v.half(), backend="torch")
        assert out.dtype == torch.float16


# -- validation ----------------------------------------------------------------------------------

def _padded():
    q, k, v = make_qkv(2, 8, 12, 4, 2, 32, dtype=torch.float32)
    return q, k, v


def _varlen():
    q, k, v = make_qkv(None, 10, 15, 4, 2, 32, dtype=torch.float32)
    cu_q = torch.tensor([0, 4, 10], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 15], dtype=torch.int32)
    return q, k, v, dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


def _bad_call(case):
    """(positional args, keyword args) of one invalid call."""
    q, k, v = _padded()
    vq, vk, vv, cu = _varlen()
    i32 = torch.int32
    calls = {
        "q_not_tensor": ((q.tolist(), k, v), {}),
        "q_dtype": ((q.to(torch.int32), k, v), {}),
        "q_rank": ((q[0, 0], k, v), {}),
        "q_3d_without_cu_seqlens": ((vq, vk, vv), {}),
        "k_dtype": ((q, k.double(), v), {}),
        "v_dtype": ((q, k, v.half()), {}),
        "k_device": ((q, k.to("meta"), v), {}),
        "k_rank": ((q, k[0], v), {}),
        "head_dim": ((q, k[..., :16], v[..., :16]), {}),
        "v_shape": ((q, k, v[:, :6]), {}),
        "heads": ((q, k[:, :, :1].expand(2, 12, 3, 32), v[:, :, :1].expand(2, 12, 3, 32)), {}),
        "batch": ((q, k[:1], v[:1]), {}),
        "q_last_dim": ((q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v), {}),
        "k_last_dim": ((q, k.transpose(-1, -2).contiguous().transpose(-1, -2), v), {}),
        "causal_window": ((q, k, v), dict(causal=True, window=(4, 2))),
        "window_value": ((q, k, v), dict(window=(-2, 0))),
        "window_type": ((q, k, v), dict(window=(1.5, 0))),
        "window_len": ((q, k, v), dict(window=(4,))),
        "causal_type": ((q, k, v), dict(causal=1)),
        "softcap_negative": ((q, k, v), dict(softcap=-1.0)),
        "softcap_type": ((q, k, v), dict(softcap="30")),
        "scale_type": ((q, k, v), dict(softmax_scale="0.1")),
        "return_lse_type": ((q, k, v), dict(return_lse=1)),
        "max_seqlen_padded": ((q, k, v), dict(max_seqlen_q=8)),
        "kv_lens_dtype": ((q, k, v), dict(kv_lens=torch.tensor([3, 4]))),
        "kv_lens_shape": ((q, k, v), dict(kv_lens=torch.tensor([3, 4, 5], dtype=i32))),
        "only_cu_seqlens_q": ((vq, vk, vv), dict(cu_seqlens_q=cu["cu_seqlens_q"])),
        "only_cu_seqlens_k": ((vq, vk, vv), dict(cu_seqlens_k=cu["cu_seqlens_k"])),
        "varlen_4d": ((q, k, v), cu),
        "cu_seqlens_dtype": ((vq, vk, vv), dict(cu, cu_seqlens_q=cu["cu_seqlens_q"].long())),
        "cu_seqlens_rank": ((vq, vk, vv), dict(cu, cu_seqlens_k=cu["cu_seqlens_k"][None])),
        "cu_seqlens_length": ((vq, vk, vv), dict(cu, cu_seqlens_k=torch.tensor([0, 5, 10, 15], dtype=i32))),
        "cu_seqlens_device": ((vq, vk, vv), dict(cu, cu_seqlens_q=cu["cu_seqlens_q"].to("meta"))),
        "varlen_kv_lens_shape": ((vq, vk, vv), dict(cu, kv_lens=torch.tensor([1], dtype=i32))),
        "max_seqlen_type": ((vq, vk, vv), dict(cu, max_seqlen_q=6.0)),
        "max_seqlen_negative": ((vq, vk, vv), dict(cu, max_seqlen_k=-1)),
    }
    return calls[case]


# case -> (exception type, text the message must contain)
BAD_CALLS = {
    "q_not_tensor": (TypeError, "q must be a torch.Tensor"),
    "q_dtype": (TypeError, "q must have dtype"),
    "q_rank": (ValueError, "q must be [B, Sq, Hq, D]"),
    "q_3d_without_cu_seqlens": (ValueError, "cu_seqlens_q"),
    "k_dtype": (TypeError, "k must have the same dtype as q"),
    "v_dtype": (TypeError, "v must have the same dtype as q"),
    "k_device": (ValueError, "k must be on cpu"),
    "k_rank": (ValueError, "k must have 4 dimensions"),
    "head_dim": (ValueError, "k head dim (16)"),
    "v_shape": (ValueError, "v must have shape (2, 12, 2, 32)"),
    "heads": (ValueError, "num q heads (4) must be a multiple of num kv heads (3)"),
    "batch": (ValueError, "k must have the batch size of q (2)"),
    "q_last_dim": (ValueError, "q must be contiguous in its last dimension"),
    "k_last_dim": (ValueError, "k must be contiguous in its last dimension"),
    "causal_window": (ValueError, "causal=True conflicts with window"),
    "window_value": (ValueError, "window[0] (left) must be -1"),
    "window_type": (TypeError, "window[0] (left) must be an int"),
    "window_len": (TypeError, "window must be a (left, right) pair"),
    "causal_type": (TypeError, "causal must be a bool"),
    "softcap_negative": (ValueError, "softcap must be >= 0"),
    "softcap_type": (TypeError, "softcap must be a float"),
    "scale_type": (TypeError, "softmax_scale must be a float"),
    "return_lse_type": (TypeError, "return_lse must be a bool"),
    "max_seqlen_padded": (ValueError, "max_seqlen_q applies only to varlen"),
    "kv_lens_dtype": (TypeError, "kv_lens must have dtype in (int32)"),
    "kv_lens_shape": (ValueError, "kv_lens must have shape (2,)"),
    "only_cu_seqlens_q": (ValueError, "cu_seqlens_k is None"),
    "only_cu_seqlens_k": (ValueError, "cu_seqlens_q is None"),
    "varlen_4d": (ValueError, "with cu_seqlens (varlen) q must be [Tq, Hq, D]"),
    "cu_seqlens_dtype": (TypeError, "cu_seqlens_q must have dtype in (int32)"),
    "cu_seqlens_rank": (ValueError, "cu_seqlens_k must have 1 dimensions"),
    "cu_seqlens_length": (ValueError, "cu_seqlens_k must have the length of cu_seqlens_q (3"),
    "cu_seqlens_device": (ValueError, "cu_seqlens_q must be on cpu"),
    "varlen_kv_lens_shape": (ValueError, "kv_lens must have shape (2,)"),
    "max_seqlen_type": (TypeError, "max_seqlen_q must be an int"),
    "max_seqlen_negative": (ValueError, "max_seqlen_k must be >= 0"),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_arguments(case):
    args, kwargs = _bad_call(case)
    error, text = BAD_CALLS[case]
    with pytest.raises(error) as info:
        flash_attention(*args, **kwargs, backend="torch")
    assert text in str(info.value)


def test_bad_backend():
    q, k, v = _padded()
    with pytest.raises(ValueError, match="unknown backend"):
        flash_attention(q, k, v, backend="nope")


DEBUG_CASES = {
    "cu_seqlens_start": (dict(cu_seqlens_q=[1, 4, 10]), "cu_seqlens_q[0] must be 0"),
    "cu_seqlens_order": (dict(cu_seqlens_k=[0, 12, 10, 15]), "cu_seqlens_k must be non-decreasing"),
    "cu_seqlens_end": (dict(cu_seqlens_q=[0, 4, 9]), "cu_seqlens_q[-1] must equal Tq = q.shape[0] (10)"),
    "max_seqlen_q": (dict(max_seqlen_q=5), "max_seqlen_q (5) is smaller than the longest query sequence (6)"),
    "max_seqlen_k": (dict(max_seqlen_k=9), "max_seqlen_k (9) is smaller than the longest key sequence (10)"),
    "kv_lens_varlen": (dict(kv_lens=[5, 11]), "kv_lens[1] = 11 must be in [0, 10]"),
    "kv_lens_negative": (dict(kv_lens=[-1, 3]), "kv_lens[0] = -1"),
    "kv_lens_padded": (dict(padded=True, kv_lens=[12, 13]), "kv_lens[1] = 13 must be in [0, 12]"),
}


@pytest.mark.parametrize("case", sorted(DEBUG_CASES))
def test_debug_mode_data_checks(case, monkeypatch):
    changes, text = DEBUG_CASES[case]
    changes = dict(changes)
    if changes.pop("padded", False):
        q, k, v = _padded()
        kwargs = {}
    else:
        q, k, v, kwargs = _varlen()
    if changes.get("cu_seqlens_k") and len(changes["cu_seqlens_k"]) == 4:
        kwargs["cu_seqlens_q"] = torch.tensor([0, 2, 4, 10], dtype=torch.int32)
    for name, value in changes.items():
        kwargs[name] = torch.tensor(value, dtype=torch.int32) if isinstance(value, list) else value
    flash_attention(q, k, v, **kwargs, backend="torch")  # data is not read outside debug mode
    monkeypatch.setenv("LEPTON_KERNELS_DEBUG", "1")
    with pytest.raises(ValueError) as info:
        flash_attention(q, k, v, **kwargs, backend="torch")
    assert text in str(info.value)


def test_debug_mode_accepts_valid_calls(monkeypatch):
    monkeypatch.setenv("LEPTON_KERNELS_DEBUG", "1")
    q, k, v, cu = _varlen()
    flash_attention(q, k, v, **cu, max_seqlen_q=6, max_seqlen_k=10, kv_lens=torch.tensor([5, 0], dtype=torch.int32),
                    backend="torch")
    q, k, v = _padded()
    flash_attention(q, k, v, kv_lens=torch.tensor([12, 0], dtype=torch.int32), backend="torch")

"""paged_attention (torch backend) against the naive float64 attention over explicitly gathered pages."""
from __future__ import annotations

import math

import pytest
import torch

from lepton_kernels import _backends
from lepton_kernels.ops.flash_attention import flash_attention
from lepton_kernels.ops.paged_attention import paged_attention

from ._utils import assert_close_fa_rule
from .test_flash_attention import check_against_naive, lowp_attention, naive_attention, naive_mask

FP8 = torch.float8_e4m3fn


def make_paged(seq_lens, block_size, hkv, d, dtype=torch.float32, spare_blocks=3):
    """Random caches and a block table whose blocks are a random permutation of the cache's.

    Table entries past a sequence's last block point at random (valid) blocks, so reading
    them by mistake changes the result.
    """
    needed = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(needed) + spare_blocks
    max_blocks = max(needed, default=0) + 1
    k_cache = torch.randn(num_blocks, block_size, hkv, d).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, hkv, d).to(dtype)
    order = iter(torch.randperm(num_blocks).tolist())
    table = torch.randint(0, num_blocks, (len(seq_lens), max_blocks))
    for b, count in enumerate(needed):
        for j in range(count):
            table[b, j] = next(order)
    return k_cache, v_cache, table.to(torch.int32), torch.tensor(seq_lens, dtype=torch.int32)


def gather_tokens(cache, table, b, n, scale=None):
    """Sequence ``b``'s first ``n`` tokens [n, Hkv, D] in float64, looked up one token at a time."""
    block_size = cache.shape[1]
    rows = [cache[int(table[b, t // block_size]), t % block_size].double() for t in range(n)]
    tokens = torch.stack(rows) if rows else torch.zeros(0, *cache.shape[2:], dtype=torch.float64)
    if scale is not None:
        tokens = tokens * scale.double().reshape(-1, 1)
    return tokens


def cu_from_lens(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)


def naive_paged(q, k_cache, v_cache, table, seq_lens, q_lens, causal=True, window=(-1, -1), softcap=0.0,
                k_scale=None, v_scale=None, lowp=False):
    """Packed q [Tq, Hq, D] -> out [Tq, Hq, D] and lse [Hq, Tq] (float64), or the low-precision out."""
    scale = 1 / math.sqrt(q.shape[-1])
    outs, lses, start = [], [], 0
    for b, (q_len, n) in enumerate(zip(q_lens, seq_lens.tolist())):
        qb = q[start:start + q_len]
        start += q_len
        k = gather_tokens(k_cache, table, b, n, k_scale)
        v = gather_tokens(v_cache, table, b, n, v_scale)
        mask = naive_mask(q_len, n, causal, window)
        if lowp:
            outs.append(lowp_attention(qb, k.to(q.dtype), v.to(q.dtype), mask, scale, softcap))
        else:
            out, lse = naive_attention(qb, k, v, mask, scale, softcap)
            outs.append(out)
            lses.append(lse)
    if lowp:
        return torch.cat(outs)
    return torch.cat(outs), torch.cat(lses, dim=1)


# -- decode --------------------------------------------------------------------------------------

@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("hq,hkv", [(32, 8), (8, 1), (8, 8)])
def test_decode_matches_naive(hq, hkv, head_dim):
    seq_lens = [1, 37, 100, 16]
    k_cache, v_cache, table, lens = make_paged(seq_lens, 16, hkv, head_dim)
    q = torch.randn(len(seq_lens), hq, head_dim)
    out, lse = paged_attention(q, k_cache, v_cache, table, lens, return_lse=True, backend="torch")
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (len(seq_lens), hq) and lse.dtype == torch.float32
    ref_out, ref_lse = naive_paged(q, k_cache, v_cache, table, lens, [1] * len(seq_lens))
    check_against_naive(out, lse.T, ref_out, ref_lse, atol=2e-5)


@pytest.mark.parametrize("mask", [dict(window=(20, 0)), dict(window=(0, 0)), dict(softcap=30.0), dict(causal=False)],
                         ids=["window", "window0", "softcap", "noncausal"])
def test_decode_options(mask):
    seq_lens = [1, 45, 64, 9]
    k_cache, v_cache, table, lens = make_paged(seq_lens, 8, 2, 64)
    q = torch.randn(len(seq_lens), 8, 64)
    out, lse = paged_attention(q, k_cache, v_cache, table, lens, **mask, return_lse=True, backend="torch")
    ref_out, ref_lse = naive_paged(q, k_cache, v_cache, table, lens, [1] * len(seq_lens), **mask)
    check_against_naive(out, lse.T, ref_out, ref_lse, atol=2e-5)


def test_decode_empty_sequence():
    k_cache, v_cache, table, lens = make_paged([0, 12, 0], 16, 2, 64)
    q = torch.randn(3, 4, 64)
    out, lse = paged_attention(q, k_cache, v_cache, table, lens, return_lse=True, backend="torch")
    assert (out[0] == 0).all() and (out[2] == 0).all()
    assert torch.isneginf(lse[0]).all() and torch.isneginf(lse[2]).all() and torch.isfinite(lse[1]).all()


# -- chunked prefill and mixed batches --------------------------------------------------------------

MIXED_Q_LENS = [1, 7, 0, 20, 1, 3, 0]
MIXED_SEQ_LENS = [1, 30, 5, 20, 64, 3, 0]  # decode, chunk, idle, whole prompt, decode, whole, empty


@pytest.mark.parametrize("mask", [dict(), dict(causal=False), dict(window=(8, 0)), dict(causal=False, window=(16, 16)),
                                  dict(window=(4, 0), softcap=30.0)],
                         ids=["causal", "noncausal", "window", "window16", "window+softcap"])
@pytest.mark.parametrize("block_size", [8, 16, 5])
def test_mixed_batch_matches_naive(block_size, mask):
    k_cache, v_cache, table, lens = make_paged(MIXED_SEQ_LENS, block_size, 2, 64)
    q = torch.randn(sum(MIXED_Q_LENS), 8, 64, dtype=torch.float64)
    k_cache, v_cache = k_cache.double(), v_cache.double()
    out, lse = paged_attention(q, k_cache, v_cache, table, lens, cu_seqlens_q=cu_from_lens(MIXED_Q_LENS),
                               max_seqlen_q=20, **mask, return_lse=True, backend="torch")
    assert out.shape == q.shape and lse.shape == (8, q.shape[0])
    ref_out, ref_lse = naive_paged(q, k_cache, v_cache, table, lens, MIXED_Q_LENS, **mask)
    check_against_naive(out, lse, ref_out, ref_lse, atol=1e-5)
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=0)


@pytest.mark.parametrize("hq,hkv,head_dim", [(32, 8, 64), (8, 1, 128), (4, 4, 256)])
def test_mixed_batch_equals_flash_attention_on_gathered_kv(hq, hkv, head_dim):
    k_cache, v_cache, table, lens = make_paged(MIXED_SEQ_LENS, 16, hkv, head_dim)
    q = torch.randn(sum(MIXED_Q_LENS), hq, head_dim)
    cu_q = cu_from_lens(MIXED_Q_LENS)
    options = dict(window=(12, 0), softcap=25.0)
    out, lse = paged_attention(q, k_cache, v_cache, table, lens, cu_seqlens_q=cu_q, **options, return_lse=True,
                               backend="torch")
    k = torch.cat([gather_tokens(k_cache, table, b, n) for b, n in enumerate(MIXED_SEQ_LENS)]).float()
    v = torch.cat([gather_tokens(v_cache, table, b, n) for b, n in enumerate(MIXED_SEQ_LENS)]).float()
    flash_out, flash_lse = flash_attention(q, k, v, causal=True, **options, cu_seqlens_q=cu_q,
                                           cu_seqlens_k=cu_from_lens(MIXED_SEQ_LENS), return_lse=True,
                                           backend="torch")
    torch.testing.assert_close(out, flash_out, atol=1e-6, rtol=0)
    torch.testing.assert_close(lse, flash_lse, atol=1e-6, rtol=0)


def test_strided_q_and_caches():
    """q sliced out of a fused qkv projection and K/V caches sliced out of one combined cache."""
    seq_lens = [13, 40]
    k_cache, v_cache, table, lens = make_paged(seq_lens, 16, 2, 64)
    kv = torch.stack([k_cache, v_cache], dim=1)  # [num_blocks, 2, block_size, Hkv, D]
    qkv = torch.randn(2, 8 + 2 + 2, 64)
    q = qkv[:, :8]
    assert not q.is_contiguous() and not kv[:, 0].is_contiguous()
    out = paged_attention(q, kv[:, 0], kv[:, 1], table, lens, backend="torch")
    ref_out, _ = naive_paged(q, k_cache, v_cache, table, lens, [1, 1])
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=0)


# -- low precision and fp8 caches -----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_fa_rule(dtype):
    k_cache, v_cache, table, lens = make_paged(MIXED_SEQ_LENS, 16, 2, 128, dtype=dtype)
    q = torch.randn(sum(MIXED_Q_LENS), 8, 128).to(dtype)
    out, lse = paged_attention(q, k_cache, v_cache, table, lens, cu_seqlens_q=cu_from_lens(MIXED_Q_LENS),
                               window=(16, 0), return_lse=True, backend="torch")
    assert out.dtype == dtype
    ref_out, ref_lse = naive_paged(q, k_cache, v_cache, table, lens, MIXED_Q_LENS, window=(16, 0))
    lowp = naive_paged(q, k_cache, v_cache, table, lens, MIXED_Q_LENS, window=(16, 0), lowp=True)
    assert_close_fa_rule(out, ref_out, lowp)
    masked = torch.isneginf(ref_lse)
    torch.testing.assert_close(lse.double()[~masked], ref_lse[~masked], atol=1e-4, rtol=0)


def make_fp8(cache, scale):
    return (cache.float() / scale.reshape(-1, 1)).clamp(-448, 448).to(FP8)


@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_head", [False, True], ids=["per_tensor", "per_head"])
def test_fp8_cache_matches_dequantized(per_head, q_dtype):
    hkv = 4
    k_cache, v_cache, table, lens = make_paged(MIXED_SEQ_LENS, 16, hkv, 64)
    shape = (hkv,) if per_head else ()
    k_scale = torch.rand(shape) * 0.02 + 0.01
    v_scale = torch.rand(shape) * 0.02 + 0.01
    k8, v8 = make_fp8(k_cache, k_scale), make_fp8(v_cache, v_scale)
    q = torch.randn(sum(MIXED_Q_LENS), 8, 64).to(q_dtype)
    out, lse = paged_attention(q, k8, v8, table, lens, cu_seqlens_q=cu_from_lens(MIXED_Q_LENS), k_scale=k_scale,
                               v_scale=v_scale, softcap=30.0, return_lse=True, backend="torch")
    assert out.dtype == q_dtype
    ref_out, ref_lse = naive_paged(q, k8, v8, table, lens, MIXED_Q_LENS, softcap=30.0, k_scale=k_scale,
                                   v_scale=v_scale)
    if q_dtype == torch.float32:
        check_against_naive(out, lse, ref_out, ref_lse, atol=2e-5)
        # The same call on the dequantized cache agrees.
        k_deq, v_deq = k8.float() * k_scale.reshape(-1, 1), v8.float() * v_scale.reshape(-1, 1)
        plain = paged_attention(q, k_deq, v_deq, table, lens, cu_seqlens_q=cu_from_lens(MIXED_Q_LENS), softcap=30.0,
                                backend="torch")
        torch.testing.assert_close(out, plain, atol=1e-6, rtol=0)
    else:
        lowp = naive_paged(q, k8, v8, table, lens, MIXED_Q_LENS, softcap=30.0, k_scale=k_scale, v_scale=v_scale,
                           lowp=True)
        assert_close_fa_rule(out, ref_out, lowp)


def test_fp8_decode_per_head_scale():
    k_cache, v_cache, table, lens = make_paged([5, 33], 8, 2, 128)
    k_scale, v_scale = torch.tensor([0.01, 0.03]), torch.tensor([0.02, 0.005])
    k8, v8 = make_fp8(k_cache, k_scale), make_fp8(v_cache, v_scale)
    q = torch.randn(2, 16, 128, dtype=torch.float16)
    out = paged_attention(q, k8, v8, table, lens, k_scale=k_scale, v_scale=v_scale, backend="torch")
    ref_out, _ = naive_paged(q, k8, v8, table, lens, [1, 1], k_scale=k_scale, v_scale=v_scale)
    lowp = naive_paged(q, k8, v8, table, lens, [1, 1], k_scale=k_scale, v_scale=v_scale, lowp=True)
    assert_close_fa_rule(out, ref_out, lowp)


def test_example():
    args, kwargs = _backends.example("paged_attention", torch.device("cpu"))
    out, lse = paged_attention(*args, **kwargs, return_lse=True, backend="torch")
    assert out.shape == args[0].shape and not torch.isnan(out).any()
    # The registered op (what torch.compile sees) gives what the eager call gives.
    op = _backends.implementations("paged_attention")["torch"].fn
    q, k_cache, v_cache, table, lens = args
    op_out, op_lse = op(q, k_cache, v_cache, table, lens, None, 1, 1 / math.sqrt(q.shape[-1]), True, -1, 0, 0.0,
                        None, None)
    torch.testing.assert_close(op_out, out, atol=0, rtol=0)
    torch.testing.assert_close(op_lse, lse, atol=0, rtol=0)


# -- torch.compile and fake tensors -------------------------------------------------------------

def test_torch_compile_fullgraph():
    k_cache, v_cache, table, lens = make_paged(MIXED_SEQ_LENS, 16, 2, 32)
    q = torch.randn(sum(MIXED_Q_LENS), 4, 32)
    cu_q = cu_from_lens(MIXED_Q_LENS)
    q_decode = torch.randn(len(MIXED_SEQ_LENS), 4, 32)

    def attend(q, q_decode, k_cache, v_cache, table, lens, cu_q):
        prefill, lse = paged_attention(q, k_cache, v_cache, table, lens, cu_seqlens_q=cu_q, max_seqlen_q=20,
                                       window=(8, 0), return_lse=True, backend="torch")
        decode = paged_attention(q_decode, k_cache, v_cache, table, lens, softcap=10.0, backend="torch")
        return prefill, lse, decode

    compiled = torch.compile(attend, fullgraph=True, backend="eager")
    args = (q, q_decode, k_cache, v_cache, table, lens, cu_q)
    for got, want in zip(compiled(*args), attend(*args)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        k_cache = torch.empty(10, 16, 2, 64, dtype=torch.bfloat16)
        table = torch.empty(3, 4, dtype=torch.int32)
        lens = torch.empty(3, dtype=torch.int32)
        q = torch.empty(3, 8, 64, dtype=torch.bfloat16)
        out, lse = paged_attention(q, k_cache, k_cache, table, lens, return_lse=True, backend="torch")
        assert out.shape == (3, 8, 64) and out.dtype == torch.bfloat16 and lse.shape == (3, 8)
        q = torch.empty(11, 8, 64, dtype=torch.bfloat16)
        cu = torch.empty(4, dtype=torch.int32)
        out, lse = paged_attention(q, k_cache, k_cache, table, lens, cu_seqlens_q=cu, return_lse=True, backend="torch")
        assert out.shape == (11, 8, 64) and lse.shape == (8, 11) and lse.dtype == torch.float32
        k8 = torch.empty(10, 16, 2, 64, dtype=FP8)
        scale = torch.empty(2)
        out = paged_attention(q, k8, k8, table, lens, cu_seqlens_q=cu, k_scale=scale, v_scale=scale, backend="torch")
        assert out.shape == (11, 8, 64)


# -- validation ----------------------------------------------------------------------------------

def _valid(num_blocks=6, block_size=8, hkv=2, hq=4, d=32):
    k_cache = torch.randn(num_blocks, block_size, hkv, d)
    v_cache = torch.randn(num_blocks, block_size, hkv, d)
    table = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
    lens = torch.tensor([10, 20], dtype=torch.int32)
    q = torch.randn(2, hq, d)
    return q, k_cache, v_cache, table, lens


def _bad_call(case):
    q, kc, vc, table, lens = _valid()
    i32 = torch.int32
    cu = dict(cu_seqlens_q=torch.tensor([0, 3, 7], dtype=i32))
    qv = torch.randn(7, 4, 32)
    k8, v8 = kc.to(FP8), vc.to(FP8)
    s = torch.tensor(0.1)
    calls = {
        "q_not_tensor": ((None, kc, vc, table, lens), {}),
        "q_rank": ((q[None], kc, vc, table, lens), {}),
        "q_dtype": ((q.to(FP8), kc, vc, table, lens), {}),
        "q_last_dim": ((q.transpose(1, 2).contiguous().transpose(1, 2), kc, vc, table, lens), {}),
        "k_cache_dtype": ((q, kc.half(), vc.half(), table, lens), {}),
        "k_cache_rank": ((q, kc[0], vc[0], table, lens), {}),
        "k_cache_device": ((q, kc.to("meta"), vc, table, lens), {}),
        "k_cache_last_dim": ((q, kc.transpose(-1, -2).contiguous().transpose(-1, -2), vc, table, lens), {}),
        "v_cache_dtype": ((q, kc, vc.double(), table, lens), {}),
        "v_cache_shape": ((q, kc, vc[:4], table, lens), {}),
        "head_dim": ((q, kc[..., :16], vc[..., :16], table, lens), {}),
        "heads": ((torch.randn(2, 3, 32), kc, vc, table, lens), {}),
        "block_table_dtype": ((q, kc, vc, table.long(), lens), {}),
        "block_table_rank": ((q, kc, vc, table[0], lens), {}),
        "seq_lens_dtype": ((q, kc, vc, table, lens.long()), {}),
        "seq_lens_shape": ((q, kc, vc, table, lens[:1]), {}),
        "decode_batch": ((q[:1], kc, vc, table, lens), {}),
        "decode_max_seqlen": ((q, kc, vc, table, lens), dict(max_seqlen_q=4)),
        "cu_seqlens_dtype": ((qv, kc, vc, table, lens), dict(cu_seqlens_q=cu["cu_seqlens_q"].long())),
        "cu_seqlens_shape": ((qv, kc, vc, table, lens), dict(cu_seqlens_q=torch.tensor([0, 7], dtype=i32))),
        "cu_seqlens_device": ((qv, kc, vc, table, lens), dict(cu_seqlens_q=cu["cu_seqlens_q"].to("meta"))),
        "max_seqlen_type": ((qv, kc, vc, table, lens), dict(cu, max_seqlen_q="4")),
        "fp8_without_scale": ((q, k8, v8, table, lens), dict(k_scale=s)),
        "scale_without_fp8": ((q, kc, vc, table, lens), dict(k_scale=s, v_scale=s)),
        "scale_dtype": ((q, k8, v8, table, lens), dict(k_scale=s.double(), v_scale=s)),
        "scale_shape": ((q, k8, v8, table, lens), dict(k_scale=s, v_scale=torch.ones(3))),
        "scale_kinds": ((q, k8, v8, table, lens), dict(k_scale=s, v_scale=torch.ones(2))),
        "causal_window": ((q, kc, vc, table, lens), dict(window=(-1, 4))),
        "window_value": ((q, kc, vc, table, lens), dict(window=(3, -5))),
        "softcap_negative": ((q, kc, vc, table, lens), dict(softcap=-3.0)),
        "scale_nan": ((q, kc, vc, table, lens), dict(softmax_scale=float("nan"))),
        "return_lse_type": ((q, kc, vc, table, lens), dict(return_lse="yes")),
    }
    return calls[case]


BAD_CALLS = {
    "q_not_tensor": (TypeError, "q must be a torch.Tensor"),
    "q_rank": (ValueError, "q must have 3 dimensions"),
    "q_dtype": (TypeError, "q must have dtype"),
    "q_last_dim": (ValueError, "q must be contiguous in its last dimension"),
    "k_cache_dtype": (TypeError, "k_cache must have dtype in (float32, float8_e4m3fn)"),
    "k_cache_rank": (ValueError, "k_cache must have 4 dimensions"),
    "k_cache_device": (ValueError, "k_cache must be on cpu"),
    "k_cache_last_dim": (ValueError, "k_cache must be contiguous in its last dimension"),
    "v_cache_dtype": (TypeError, "v_cache must have the same dtype as k_cache"),
    "v_cache_shape": (ValueError, "v_cache must have shape (6, 8, 2, 32)"),
    "head_dim": (ValueError, "k_cache head dim (16) must equal q's head dim (32)"),
    "heads": (ValueError, "num q heads (3) must be a multiple of num kv heads (2)"),
    "block_table_dtype": (TypeError, "block_table must have dtype in (int32)"),
    "block_table_rank": (ValueError, "block_table must have 2 dimensions"),
    "seq_lens_dtype": (TypeError, "seq_lens must have dtype in (int32)"),
    "seq_lens_shape": (ValueError, "seq_lens must have shape (2,)"),
    "decode_batch": (ValueError, "q.shape[0] (1) must equal block_table.shape[0] (2)"),
    "decode_max_seqlen": (ValueError, "max_seqlen_q applies only to calls with cu_seqlens_q"),
    "cu_seqlens_dtype": (TypeError, "cu_seqlens_q must have dtype in (int32)"),
    "cu_seqlens_shape": (ValueError, "cu_seqlens_q must have shape (3,)"),
    "cu_seqlens_device": (ValueError, "cu_seqlens_q must be on cpu"),
    "max_seqlen_type": (TypeError, "max_seqlen_q must be an int"),
    "fp8_without_scale": (ValueError, "k_scale and v_scale are required"),
    "scale_without_fp8": (ValueError, "k_scale/v_scale apply only to float8_e4m3fn caches"),
    "scale_dtype": (TypeError, "k_scale must have dtype in (float32)"),
    "scale_shape": (ValueError, "v_scale must hold one value (per tensor) or have shape (2,)"),
    "scale_kinds": (ValueError, "k_scale and v_scale must both be per tensor or both per kv head"),
    "causal_window": (ValueError, "causal=True conflicts with window"),
    "window_value": (ValueError, "window[1] (right) must be -1"),
    "softcap_negative": (ValueError, "softcap must be >= 0"),
    "scale_nan": (ValueError, "softmax_scale must be finite"),
    "return_lse_type": (TypeError, "return_lse must be a bool"),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_arguments(case):
    args, kwargs = _bad_call(case)
    error, text = BAD_CALLS[case]
    with pytest.raises(error) as info:
        paged_attention(*args, **kwargs, backend="torch")
    assert text in str(info.value)


DEBUG_CASES = {
    "block_out_of_range": (dict(table=[[0, 9, 2], [3, 4, 5]]), "block_table[0, 1] = 9 is out of range"),
    "block_negative": (dict(table=[[0, 1, 2], [-1, 4, 5]]), "block_table[1, 0] = -1 is out of range"),
    "seq_len_too_long": (dict(lens=[10, 25]), "seq_lens[1] = 25 must be in [0, 24]"),
    "seq_len_negative": (dict(lens=[-2, 5]), "seq_lens[0] = -2"),
    "query_longer_than_seq": (dict(cu=[0, 3, 7], lens=[10, 2]), "sequence 1 has 4 queries"),
    "cu_seqlens_end": (dict(cu=[0, 3, 6]), "cu_seqlens_q[-1] must equal Tq = q.shape[0] (7)"),
    "cu_seqlens_order": (dict(cu=[0, 8, 7]), "cu_seqlens_q must be non-decreasing"),
    "max_seqlen_q": (dict(cu=[0, 3, 7], max_seqlen_q=3), "max_seqlen_q (3) is smaller than the longest"),
}


@pytest.mark.parametrize("case", sorted(DEBUG_CASES))
def test_debug_mode_data_checks(case, monkeypatch):
    changes, text = DEBUG_CASES[case]
    q, kc, vc, table, lens = _valid()
    kwargs = {}
    if "table" in changes:
        table = torch.tensor(changes["table"], dtype=torch.int32)
    if "lens" in changes:
        lens = torch.tensor(changes["lens"], dtype=torch.int32)
    if "cu" in changes:
        q = torch.randn(7, 4, 32)
        kwargs["cu_seqlens_q"] = torch.tensor(changes["cu"], dtype=torch.int32)
    if "max_seqlen_q" in changes:
        kwargs["max_seqlen_q"] = changes["max_seqlen_q"]
    monkeypatch.setenv("LEPTON_KERNELS_DEBUG", "1")
    with pytest.raises(ValueError) as info:
        paged_attention(q, kc, vc, table, lens, **kwargs, backend="torch")
    assert text in str(info.value)


def test_debug_mode_accepts_valid_calls(monkeypatch):
    monkeypatch.setenv("LEPTON_KERNELS_DEBUG", "1")
    q, kc, vc, table, lens = _valid()
    table[0, 2] = 99  # past sequence 0's 10 tokens (2 blocks of 8): never read, need not be valid
    paged_attention(q, kc, vc, table, lens, backend="torch")
    paged_attention(torch.randn(7, 4, 32), kc, vc, table, lens, cu_seqlens_q=torch.tensor([0, 3, 7], dtype=torch.int32),
                    max_seqlen_q=4, backend="torch")

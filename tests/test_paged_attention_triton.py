"""Triton paged_attention (decode, chunked prefill, mixed batches) against the float64 torch reference.

On the CPU the kernels run in Triton's interpreter (slow): a few small cases cover each code
path (GQA packing, pages gathered per row or one page per tile, split-KV + combine, the
sequence search of mixed batches, masks, fp8 scales). The full grid of head dims, block sizes,
long sequences, fp8 caches and CUDA-graph replay runs on a GPU (``gpu`` marker).
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest
import torch

from . import _attention
from ._attention import prepare, to_fp8
from ._utils import assert_close_fa_rule, call_with_poisoned_allocations

triton = pytest.importorskip("triton")

from lepton_kernels import _backends  # noqa: E402
from lepton_kernels.ops import paged_attention as pa_op  # noqa: E402
from lepton_kernels.reference.attention import attention_core  # noqa: E402
from lepton_kernels.reference.paged_attention import gather_pages  # noqa: E402
from lepton_kernels.reference.paged_attention import paged_attention as reference  # noqa: E402
from lepton_kernels.triton import paged_attention as pa_triton  # noqa: E402

# The "cpu" cases run on the GPU when there is one (the interpreter only runs without one).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FP8 = torch.float8_e4m3fn
make_paged = functools.partial(_attention.make_paged, device=DEVICE)


# -- inputs ----------------------------------------------------------------------------------------


def cu_from_lens(lens, device=DEVICE):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)



# -- checks ----------------------------------------------------------------------------------------

def lowp_reference(args):
    """The reference's loop computed by torch in q's own dtype: the FlashAttention rule's baseline."""
    q, k_cache, v_cache, table, lens, cu, _, scale, causal, left, right, softcap, k_scale, v_scale = args
    out = torch.zeros_like(q)
    starts = list(range(len(lens) + 1)) if cu is None else cu.tolist()
    for b, n in enumerate(lens.tolist()):
        q0, q1 = starts[b], starts[b + 1]
        if q1 == q0:
            continue
        k = gather_pages(k_cache, table[b], n, k_scale, q.dtype)
        v = gather_pages(v_cache, table[b], n, v_scale, q.dtype)
        o, _ = attention_core(q[None, q0:q1], k[None], v[None], softmax_scale=scale, causal=causal,
                              window_left=left, window_right=right, softcap=softcap)
        out[q0:q1] = o[0]
    return out


def check(args, **options):
    """Run the Triton kernel on ``args`` and hold it to the FlashAttention rule."""
    out, lse = call_with_poisoned_allocations(pa_triton.paged_attention, *args, **options)
    q, cu = args[0], args[5]
    # float64 reference (fp8 caches go through float32, exactly; the reference applies the scales)
    up = (q.double(), args[1].float().double(), args[2].float().double()) + tuple(args[3:])
    ref_out, ref_lse = reference(*up)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
    assert_close_fa_rule(out, ref_out, lowp_reference(args))
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty), "lse -inf pattern differs from the reference"
    assert not torch.isnan(lse).any()
    torch.testing.assert_close(lse[~empty], ref_lse[~empty].float(), atol=2e-3, rtol=1e-3)
    rows_empty = empty if cu is None else empty.T  # lse [B, Hq] or [Hq, Tq] -> out rows [T, Hq]
    assert (out[rows_empty] == 0).all(), "rows that see no key must be 0"
    return out, lse


# -- CPU (interpreter): one case per code path ------------------------------------------------------

DECODE_LENS = [1, 37, 0, 50, 16, 9]  # not multiples of the block size; one empty sequence
DECODE_CASES = [
    # (name, Hq, Hkv, D, block_size, dtype)
    ("gqa-bs8", 4, 2, 64, 8, torch.float16),  # a 16-key tile spans two pages (rows gather pages)
    ("mqa-bs16", 4, 1, 64, 16, torch.float16),  # one page per tile
    ("gqa-fp32", 4, 2, 64, 16, torch.float32),
    ("gqa-bf16-bs32", 4, 2, 64, 32, torch.bfloat16),  # a tile is half a page
    ("mha-d96-bs5", 2, 2, 96, 5, torch.float16),  # odd head dim and block size
    ("gqa3", 6, 2, 64, 16, torch.float16),  # a group of 3 heads: padding rows in the tile
]


@pytest.mark.parametrize("name,hq,hkv,d,block_size,dtype", DECODE_CASES, ids=[c[0] for c in DECODE_CASES])
def test_cpu_decode(name, hq, hkv, d, block_size, dtype):
    k_cache, v_cache, table, lens = make_paged(DECODE_LENS, block_size, hkv, d, dtype)
    q = torch.randn(len(DECODE_LENS), hq, d, device=DEVICE).to(dtype)
    check(prepare(q, k_cache, v_cache, table, lens))


@pytest.mark.parametrize("num_splits", [3, 8])
def test_cpu_decode_split_kv(num_splits):
    # 8 splits: more than some sequences have tiles, so some splits see no key at all.
    k_cache, v_cache, table, lens = make_paged([70, 1, 0, 33], 8, 2, 64, torch.float16)
    q = torch.randn(4, 4, 64, device=DEVICE).half()
    args = prepare(q, k_cache, v_cache, table, lens)
    out, lse = check(args, _num_splits=num_splits)
    whole, whole_lse = pa_triton.paged_attention(*args, _num_splits=1)
    torch.testing.assert_close(out, whole, atol=2e-3, rtol=0)
    torch.testing.assert_close(lse, whole_lse, atol=1e-4, rtol=0)


DECODE_MASKS = {
    "window": dict(window=(20, 0)),
    "window0": dict(window=(0, 0)),
    "softcap": dict(softcap=5.0, softmax_scale=0.3),
    "noncausal-window": dict(causal=False, window=(8, 8)),
}


@pytest.mark.parametrize("mask", list(DECODE_MASKS))
def test_cpu_decode_masks(mask):
    k_cache, v_cache, table, lens = make_paged([1, 45, 64, 9], 8, 2, 64, torch.float16)
    q = torch.randn(4, 4, 64, device=DEVICE).half()
    check(prepare(q, k_cache, v_cache, table, lens, **DECODE_MASKS[mask]))


MIXED_Q_LENS = [1, 7, 0, 20, 1, 3, 0]
MIXED_SEQ_LENS = [1, 30, 5, 20, 64, 3, 0]  # decode, chunk, idle, whole prompt, decode, whole, empty
MIXED_MASKS = {
    "causal": dict(),
    "noncausal": dict(causal=False),
    "window": dict(window=(8, 0)),
    "window16-16": dict(causal=False, window=(16, 16)),
    "window-softcap": dict(window=(4, 0), softcap=30.0),
}


@pytest.mark.parametrize("mask", list(MIXED_MASKS))
def test_cpu_mixed_batch(mask):
    # Decode and prefill sequences in one launch; programs find their sequence by search.
    k_cache, v_cache, table, lens = make_paged(MIXED_SEQ_LENS, 8, 2, 64, torch.float16)
    q = torch.randn(sum(MIXED_Q_LENS), 8, 64, device=DEVICE).half()
    check(prepare(q, k_cache, v_cache, table, lens, cu_from_lens(MIXED_Q_LENS), max(MIXED_Q_LENS),
                  **MIXED_MASKS[mask]))


def test_cpu_mixed_batch_split_kv_fp32():
    k_cache, v_cache, table, lens = make_paged(MIXED_SEQ_LENS, 16, 2, 64, torch.float32)
    q = torch.randn(sum(MIXED_Q_LENS), 4, 64, device=DEVICE)
    check(prepare(q, k_cache, v_cache, table, lens, cu_from_lens(MIXED_Q_LENS), 20, window=(12, 0)), _num_splits=3)


def test_cpu_varlen_direct_mapping_and_decode():
    # Short query counts: one query block per sequence (no search); max_seqlen_q = 1 takes the
    # decode tiles through the varlen entry.
    k_cache, v_cache, table, lens = make_paged([12, 40, 3], 16, 1, 64, torch.float16)
    q = torch.randn(4, 4, 64, device=DEVICE).half()
    check(prepare(q, k_cache, v_cache, table, lens, cu_from_lens([1, 2, 1]), 2))
    q = torch.randn(2, 4, 64, device=DEVICE).half()
    check(prepare(q, k_cache, v_cache, table, lens, cu_from_lens([1, 0, 1]), 1, softcap=10.0))


@pytest.mark.parametrize("per_head", [False, True], ids=["per_tensor", "per_head"])
def test_cpu_fp8_cache_scales(per_head):
    # The interpreter's fp8 -> fp32 conversion is exact (only fp32 -> fp8 casts round
    # differently), so the scale handling can be checked here; speed and fp16/bf16 on the GPU.
    k_cache, v_cache, table, lens = make_paged([1, 40, 17], 16, 2, 64, torch.float32)
    shape = (2,) if per_head else ()
    k_scale = (torch.rand(shape) * 0.02 + 0.01).to(DEVICE)
    v_scale = (torch.rand(shape) * 0.02 + 0.01).to(DEVICE)
    k8, v8 = to_fp8(k_cache, k_scale), to_fp8(v_cache, v_scale)
    q = torch.randn(3, 4, 64, device=DEVICE)
    check(prepare(q, k8, v8, table, lens, k_scale=k_scale, v_scale=v_scale, softcap=20.0))


def test_cpu_strided_inputs():
    # q sliced out of a fused qkv projection, K/V caches out of one combined cache, and a
    # block table with a row stride and a column stride.
    k_cache, v_cache, table, lens = make_paged([13, 40], 16, 2, 64, torch.float16)
    kv = torch.stack([k_cache, v_cache], dim=1)  # [num_blocks, 2, block_size, Hkv, D]
    qkv = torch.randn(2, 4 + 2 + 2, 64, device=DEVICE).half()
    wide_table = torch.zeros(2, 2 * table.shape[1], dtype=torch.int32, device=DEVICE)
    wide_table[:, ::2] = table
    strided_table = wide_table[:, ::2]
    assert not qkv[:, :4].is_contiguous() and not kv[:, 0].is_contiguous() and not strided_table.is_contiguous()
    check(prepare(qkv[:, :4], kv[:, 0], kv[:, 1], strided_table, lens, window=(20, 0)))


def test_cpu_empty():
    k_cache, v_cache, table, lens = make_paged([5, 3], 8, 2, 64, torch.float16)
    q = torch.randn(0, 4, 64, device=DEVICE).half()
    cu = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    out, lse = pa_triton.paged_attention(*prepare(q, k_cache, v_cache, table, lens, cu, 0))
    assert out.shape == (0, 4, 64) and lse.shape == (4, 0)


def test_public_api_selects_triton():
    k_cache, v_cache, table, lens = make_paged([5, 50], 16, 2, 64, torch.float16)
    q = torch.randn(2, 4, 64, device=DEVICE).half()
    out, lse = pa_op.paged_attention(q, k_cache, v_cache, table, lens, return_lse=True, backend="triton")
    ref_out, ref_lse = pa_op.paged_attention(q, k_cache, v_cache, table, lens, return_lse=True, backend="torch")
    torch.testing.assert_close(out, ref_out, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)
    # The registered op (what torch.compile sees) gives what the eager call gives.
    op = _backends.implementations(pa_op.OP)["triton"].fn
    op_out, op_lse = op(*prepare(q, k_cache, v_cache, table, lens))
    torch.testing.assert_close(op_out, out, atol=0, rtol=0)
    torch.testing.assert_close(op_lse, lse, atol=0, rtol=0)


def test_supports_reasons():
    k_cache, v_cache, table, lens = make_paged([5], 16, 2, 64, torch.float16)
    q = torch.randn(1, 4, 64, device=DEVICE).half()
    assert pa_triton.supports(*prepare(q, k_cache, v_cache, table, lens)) is None
    args = prepare(q.double(), k_cache.double(), v_cache.double(), table, lens)
    assert "float64" in pa_triton.supports(*args)
    assert _backends.implementations(pa_op.OP)["triton"].supports(*args) is not None
    big = torch.randn(1, 4, 512, device=DEVICE).half()
    k_big = torch.randn(2, 16, 2, 512, device=DEVICE).half()
    assert "head dims" in pa_triton.supports(*prepare(big, k_big, k_big, table, lens))


def test_split_heuristic():
    choose = pa_triton.choose_num_splits
    sms = 132
    assert choose(64 * 8, 64, sms, True) == 1  # B=64, Hkv=8: the GPU is full
    assert choose(128 * 8, 32, sms, True) == 1
    few = choose(16 * 8, 64, sms, True)  # B=16: split to fill the GPU
    assert 2 <= few <= 8
    long = choose(8, 512, sms, True)  # one sequence of 32k keys
    assert 16 <= long <= pa_triton.MAX_SPLITS
    assert choose(8, 3, sms, True) == 1  # too few tiles to split
    assert choose(8, 8, sms, True) <= 8 // pa_triton.MIN_TILES_PER_SPLIT
    assert choose(68 * 8, 40, sms, False) == 1  # prefill fills the GPU
    assert 2 <= choose(8, 100, sms, False) <= sms // 8


def test_torch_compile_fullgraph():
    # The Triton backend is one opaque registered op to dynamo (fake implementation for tracing).
    k_cache, v_cache, table, lens = make_paged([5, 30], 8, 2, 64, torch.float16)
    q = torch.randn(2, 4, 64, device=DEVICE).half()
    q_mixed = torch.randn(9, 4, 64, device=DEVICE).half()
    cu = cu_from_lens([1, 8])

    def attend(q, q_mixed, k_cache, v_cache, table, lens, cu):
        decode = pa_op.paged_attention(q, k_cache, v_cache, table, lens, softcap=10.0, backend="triton")
        mixed, lse = pa_op.paged_attention(q_mixed, k_cache, v_cache, table, lens, cu_seqlens_q=cu, max_seqlen_q=8,
                                           window=(6, 0), return_lse=True, backend="triton")
        return decode, mixed, lse

    args = (q, q_mixed, k_cache, v_cache, table, lens, cu)
    compiled = torch.compile(attend, fullgraph=True, backend="eager")
    for got, want in zip(compiled(*args), attend(*args)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_benchmark_layouts():
    # The benchmark's paged caches hold the same K/V as its contiguous anchor inputs, and its
    # prefill FLOP count is 4 Hq D x the visible (query, key) pairs.
    from lepton_kernels.bench import paged_attention as bench
    from lepton_kernels.reference.attention import visible_keys

    s = bench.make_decode_set(2, 64, torch.device("cpu"))
    table = bench.make_table(2, 64, 16, torch.device("cpu"))
    k_cache, v_cache = bench.to_paged(s.k, 16, table), bench.to_paged(s.v, 16, table)
    lens = torch.full((2,), 64, dtype=torch.int32)
    out = pa_op.paged_attention(s.q.float(), k_cache.float(), v_cache.float(), table, lens, backend="torch")
    expected = torch.nn.functional.scaled_dot_product_attention(
        s.q.float().unsqueeze(2), s.k.float().repeat_interleave(4, 1), s.v.float().repeat_interleave(4, 1))[:, :, 0]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    tokens = torch.randn(2, 64, 8, 16)
    paged = bench.to_paged(tokens, 16, table, heads_first=False)
    assert torch.equal(paged[table[1, 2].long()], tokens[1, 32:48])
    pairs = int(visible_keys(512, 2560, torch.tensor([2560]), True, -1, 0).sum())
    assert bench._prefill_flops(4, 2048, 512) == 4 * bench.Q_HEADS * bench.HEAD_DIM * 4 * pairs
    assert bench.kv_bytes(64, 4096) == 2 * 64 * 4096 * 8 * 128 * 2


_AOT_SCRIPT = """
import sys
try:
    from triton.compiler import ASTSource  # noqa: F401
    from triton.backends.compiler import GPUTarget  # noqa: F401
except ImportError:
    sys.exit(77)
import torch
from lepton_kernels.triton.paged_attention import compile_for_target
cases = [
    dict(head_dim=128, group=4, block_size=16),
    dict(head_dim=128, group=4, block_size=128, cache_dtype=torch.float8_e4m3fn, split=True),
    dict(head_dim=128, group=4, max_seqlen_q=512, window_left=256, softcap=True),
    dict(head_dim=128, combine=True),
]
for case in cases:
    kernel = compile_for_target((9, 0), **case)
    ptx = kernel.asm["ptx"]
    print("case", kernel.metadata.shared, ptx.count("wgmma.mma_async") + ptx.count("mma.sync"))
"""


def test_aot_compiles_for_sm90():
    # The interpreter replaces @triton.jit kernels at import time, so compile in a fresh
    # process without TRITON_INTERPRET (ptxas from the triton wheel; no GPU needed): every
    # kernel variant lowers, fits an H100's shared memory and uses tensor-core MMAs.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=600)
    if result.returncode == 77:
        pytest.skip("this triton has no ASTSource/GPUTarget AOT API")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line.split() for line in result.stdout.splitlines() if line.startswith("case")]
    assert len(lines) == 4
    for _, shared, mmas in lines[:-1]:
        assert int(shared) <= 227 * 1024, "shared memory beyond an H100's 227 KB per block"
        assert int(mmas) > 0, "no tensor-core MMA in the attention kernel"


# -- GPU ----------------------------------------------------------------------------------------------

CUDA = torch.device("cuda")
GPU_DECODE_LENS = [1, 17, 0, 300, 1000, 4099]
GPU_HEADS = [(32, 8), (8, 1), (8, 8)]


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [16, 128])
@pytest.mark.parametrize("d,dtype", [(64, torch.bfloat16), (96, torch.float16), (128, torch.float16),
                                     (128, torch.bfloat16), (256, torch.bfloat16)])
def test_gpu_decode_grid(d, dtype, block_size):
    # GQA 32/8, MQA 8/1 and MHA; the split heuristic picks several splits for this small batch.
    for hq, hkv in GPU_HEADS:
        k_cache, v_cache, table, lens = make_paged(GPU_DECODE_LENS, block_size, hkv, d, dtype, device=CUDA)
        q = torch.randn(len(GPU_DECODE_LENS), hq, d, device=CUDA).to(dtype)
        check(prepare(q, k_cache, v_cache, table, lens))


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [None, 1, 7, 64])
def test_gpu_decode_long_split_kv(num_splits):
    # Long sequences (16k+) with the heuristic's split count and forced ones.
    seq_lens = [16411, 1, 9000]
    k_cache, v_cache, table, lens = make_paged(seq_lens, 16, 8, 128, torch.bfloat16, device=CUDA)
    q = torch.randn(3, 32, 128, device=CUDA).bfloat16()
    check(prepare(q, k_cache, v_cache, table, lens), _num_splits=num_splits)


GPU_MASKS = {
    "causal": dict(),
    "noncausal": dict(causal=False),
    "window": dict(window=(256, 0)),
    "window-both": dict(causal=False, window=(100, 50)),
    "softcap": dict(softcap=30.0),
}


@pytest.mark.gpu
@pytest.mark.parametrize("mask", list(GPU_MASKS))
@pytest.mark.parametrize("d,dtype,block_size", [(128, torch.bfloat16, 16), (64, torch.float16, 128),
                                                (256, torch.bfloat16, 16)])
def test_gpu_decode_masks_and_mixed_batch(d, dtype, block_size, mask):
    opts = GPU_MASKS[mask]
    for hq, hkv in ((32, 8), (8, 1)):
        # decode
        k_cache, v_cache, table, lens = make_paged(GPU_DECODE_LENS, block_size, hkv, d, dtype, device=CUDA)
        q = torch.randn(len(GPU_DECODE_LENS), hq, d, device=CUDA).to(dtype)
        check(prepare(q, k_cache, v_cache, table, lens, **opts))
        # decode, chunked prefill, a whole prompt and idle sequences in one launch
        q_lens = [1, 300, 0, 77, 1, 513, 0]
        seq_lens = [1000, 2300, 5, 77, 4099, 700, 0]
        k_cache, v_cache, table, lens = make_paged(seq_lens, block_size, hkv, d, dtype, device=CUDA)
        q = torch.randn(sum(q_lens), hq, d, device=CUDA).to(dtype)
        check(prepare(q, k_cache, v_cache, table, lens, cu_from_lens(q_lens, CUDA), max(q_lens), **opts))


@pytest.mark.gpu
def test_gpu_prefill_split_kv():
    # Few query blocks over long caches: the heuristic splits query-block programs too.
    q_lens, seq_lens = [64, 1], [8000, 3000]
    k_cache, v_cache, table, lens = make_paged(seq_lens, 16, 2, 128, torch.bfloat16, device=CUDA)
    q = torch.randn(sum(q_lens), 8, 128, device=CUDA).bfloat16()
    args = prepare(q, k_cache, v_cache, table, lens, cu_from_lens(q_lens, CUDA), 64)
    check(args)
    check(args, _num_splits=5)


@pytest.mark.gpu
@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per_head", [False, True], ids=["per_tensor", "per_head"])
def test_gpu_fp8_cache(per_head, q_dtype):
    hkv = 8
    shape = (hkv,) if per_head else ()
    k_scale = (torch.rand(shape, device=CUDA) * 0.02 + 0.01)
    v_scale = (torch.rand(shape, device=CUDA) * 0.02 + 0.01)
    for block_size in (16, 128):
        k_cache, v_cache, table, lens = make_paged(GPU_DECODE_LENS, block_size, hkv, 128, torch.float32, device=CUDA)
        k8, v8 = to_fp8(k_cache, k_scale), to_fp8(v_cache, v_scale)
        q = torch.randn(len(GPU_DECODE_LENS), 32, 128, device=CUDA).to(q_dtype)
        check(prepare(q, k8, v8, table, lens, k_scale=k_scale, v_scale=v_scale))
        q_lens = [1, 17, 0, 77, 1, 513]
        q = torch.randn(sum(q_lens), 32, 128, device=CUDA).to(q_dtype)
        check(prepare(q, k8, v8, table, lens, cu_from_lens(q_lens, CUDA), 513, k_scale=k_scale, v_scale=v_scale,
                      window=(200, 0), softcap=30.0))


@pytest.mark.gpu
def test_gpu_fp32():
    k_cache, v_cache, table, lens = make_paged([1, 700, 0, 33], 16, 2, 128, torch.float32, device=CUDA)
    q = torch.randn(4, 8, 128, device=CUDA)
    check(prepare(q, k_cache, v_cache, table, lens))
    q_lens = [1, 70, 0, 33]
    q = torch.randn(sum(q_lens), 8, 128, device=CUDA)
    check(prepare(q, k_cache, v_cache, table, lens, cu_from_lens(q_lens, CUDA), 70))


@pytest.mark.gpu
def test_gpu_cache_beyond_int32_offsets():
    # A cache of more than 2^31 elements (4.3 GB per cache) with the used pages at its end:
    # page offsets need 64-bit arithmetic.
    block_size, hkv, d = 16, 8, 128
    num_blocks = 2 ** 31 // (block_size * hkv * d) + 64
    k_cache = torch.empty(num_blocks, block_size, hkv, d, device=CUDA, dtype=torch.bfloat16)
    v_cache = torch.empty_like(k_cache)
    seq_lens = [320, 1]  # 20 blocks each
    used = torch.arange(num_blocks - 40, num_blocks, device=CUDA)
    k_cache[used] = torch.randn(len(used), block_size, hkv, d, device=CUDA).bfloat16()
    v_cache[used] = torch.randn(len(used), block_size, hkv, d, device=CUDA).bfloat16()
    table = used[torch.randperm(40, device=CUDA)].view(2, 20).to(torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=CUDA)
    q = torch.randn(2, 32, d, device=CUDA).bfloat16()
    check(prepare(q, k_cache, v_cache, table, lens))
    del k_cache, v_cache
    torch.cuda.empty_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("varlen", [False, True], ids=["decode", "mixed"])
def test_gpu_cuda_graph_replay(varlen):
    # Capture once at the largest sizes, then change seq_lens and block_table in place and
    # replay: the split count and grid come from shapes only, the key ranges from the data.
    block_size, hkv, hq, d, max_blocks, batch = 16, 8, 32, 128, 256, 4
    num_blocks = batch * max_blocks
    k_cache = torch.randn(num_blocks, block_size, hkv, d, device=CUDA).bfloat16()
    v_cache = torch.randn_like(k_cache)
    table = torch.randperm(num_blocks, device=CUDA).to(torch.int32).view(batch, max_blocks)
    lens = torch.full((batch,), max_blocks * block_size, dtype=torch.int32, device=CUDA)
    q_lens = [1, 64, 1, 30] if varlen else [1] * batch
    q = torch.randn(sum(q_lens), hq, d, device=CUDA).bfloat16()
    cu = cu_from_lens(q_lens, CUDA) if varlen else None
    max_q = max(q_lens) if varlen else None

    def call():
        return pa_op.paged_attention(q, k_cache, v_cache, table, lens, cu_seqlens_q=cu, max_seqlen_q=max_q,
                                     return_lse=True, backend="triton")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = call()

    for new_lens in ([4096, 64, 1, 30], [100, 3000, 1, 4000], [64, 64, 64, 64]):
        lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        table.copy_(torch.randperm(num_blocks, device=CUDA).to(torch.int32).view(batch, max_blocks))
        q.copy_(torch.randn_like(q))
        graph.replay()
        torch.cuda.synchronize()
        args = prepare(q, k_cache, v_cache, table, lens, cu, max_q)
        up = (q.double(), k_cache.double(), v_cache.double()) + args[3:]
        ref_out, ref_lse = reference(*up)
        assert_close_fa_rule(out, ref_out, lowp_reference(args))
        torch.testing.assert_close(lse, ref_lse.float(), atol=2e-3, rtol=1e-3)


@pytest.mark.gpu
def test_gpu_auto_backend_serves_cuda_tensors():
    k_cache, v_cache, table, lens = make_paged([5, 50], 16, 2, 64, torch.bfloat16, device=CUDA)
    q = torch.randn(2, 8, 64, device=CUDA).bfloat16()
    args = prepare(q, k_cache, v_cache, table, lens)
    assert _backends.select(pa_op.OP, "auto", *args).backend in ("cuda", "triton")

"""The compiled decode kernel of paged_attention against the float64 reference over gathered pages.

CPU tests cover what ``supports`` declines and the split heuristic; everything that launches
the kernel is marked ``gpu``.
"""
from __future__ import annotations

import functools

import pytest
import torch

from lepton_kernels import _backends
from lepton_kernels.cuda import paged_attention as pa_cuda
from lepton_kernels.ops import paged_attention as pa_op
from lepton_kernels.reference.attention import attention_core
from lepton_kernels.reference.paged_attention import gather_pages
from lepton_kernels.reference.paged_attention import paged_attention as reference

from . import _attention
from ._attention import prepare, to_fp8
from ._utils import assert_close_fa_rule, call_with_poisoned_allocations

CUDA = torch.device("cuda")
FP8 = torch.float8_e4m3fn
make_paged = functools.partial(_attention.make_paged, device=CUDA)


# -- checks ----------------------------------------------------------------------------------------

def lowp_reference(args):
    """The reference's loop computed by torch in q's own dtype: the FlashAttention rule's baseline."""
    q, k_cache, v_cache, table, lens, _, _, scale, causal, left, right, softcap, k_scale, v_scale = args
    out = torch.zeros_like(q)
    for b, n in enumerate(lens.tolist()):
        k = gather_pages(k_cache, table[b], n, k_scale, q.dtype)
        v = gather_pages(v_cache, table[b], n, v_scale, q.dtype)
        o, _ = attention_core(q[None, b:b + 1], k[None], v[None], softmax_scale=scale, causal=causal,
                              window_left=left, window_right=right, softcap=softcap)
        out[b:b + 1] = o[0]
    return out


def check_result(args, out, lse):
    q = args[0]
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
    assert (out[empty] == 0).all(), "rows that see no key must be 0"


def check(args, **options):
    """Run the CUDA kernel on ``args`` (poisoned outputs) and hold it to the FlashAttention rule."""
    assert pa_cuda.supports(*args) is None
    out, lse = call_with_poisoned_allocations(pa_cuda.paged_attention, *args, **options)
    check_result(args, out, lse)
    return out, lse


# -- CPU: what the backend declines, the split heuristic -------------------------------------------

def cpu_args(hq=4, hkv=2, d=64, block_size=16, dtype=torch.float16, cu=None, max_q=None, **options):
    k_cache, v_cache, table, lens = make_paged([5, 40], block_size, hkv, d, dtype, device=torch.device("cpu"))
    q = torch.randn(2 if cu is None else int(cu[-1]), hq, d).to(dtype)
    return prepare(q, k_cache, v_cache, table, lens, cu, max_q, **options)


def test_supports_declines_varlen():
    cu = torch.tensor([0, 1, 4], dtype=torch.int32)
    reason = pa_cuda.supports(*cpu_args(cu=cu, max_q=3))
    assert reason is not None and "decode" in reason and "Triton" in reason
    assert _backends.implementations(pa_op.OP)["cuda"].supports(*cpu_args(cu=cu, max_q=3)) is not None


def test_supports_declines_cpu_tensors():
    reason = pa_cuda.supports(*cpu_args())
    assert reason is not None and "cpu" in reason and "CUDA" in reason
    assert _backends.implementations(pa_op.OP)["cuda"].supports(*cpu_args()) is not None
    k_cache, v_cache, table, lens = make_paged([5, 40], 16, 2, 64, torch.float16, device=torch.device("cpu"))
    q = torch.randn(2, 4, 64).half()
    with pytest.raises(_backends.BackendUnavailableError, match="cuda"):
        pa_op.paged_attention(q, k_cache, v_cache, table, lens, backend="cuda")
    # auto falls back to a backend that serves CPU tensors
    out = pa_op.paged_attention(q, k_cache, v_cache, table, lens)
    assert out.shape == q.shape


@pytest.mark.parametrize("case,words", [
    (dict(d=80), "head dims"),
    (dict(dtype=torch.float32), "float16 or bfloat16"),
    (dict(block_size=4), "block sizes"),
    (dict(block_size=512), "block sizes"),
    (dict(block_size=24), "block sizes"),
])
def test_supports_reasons(case, words):
    reason = pa_cuda.supports(*cpu_args(**case))
    assert reason is not None and words in reason


def test_supports_declines_misaligned_cache_strides():
    k = torch.randn(4, 16, 2, 64 + 4).half()[..., :64]  # head stride 136 bytes: not a multiple of 16
    v = torch.randn_like(k)
    table = torch.arange(4, dtype=torch.int32).view(1, 4)
    lens = torch.tensor([40], dtype=torch.int32)
    q = torch.randn(1, 4, 64).half()
    reason = pa_cuda.supports(*prepare(q, k, v, table, lens))
    assert reason is not None and "16-byte" in reason


def test_split_heuristic():
    choose = pa_cuda.choose_num_splits
    slots = 132 * 2
    assert choose(64 * 8, 4096, slots) == 1  # B=64, Hkv=8 fills the GPU
    assert choose(128 * 8, 16384, slots) == 1
    splits = choose(1 * 8, 32768, slots)  # B=1, L=32k: split to fill every SM
    assert 16 <= splits <= 128 and 8 * splits <= slots
    assert choose(16 * 8, 4096, slots) == 2  # two splits fill one wave
    assert choose(8, 64, slots) == 1  # too few keys to split
    assert choose(8, 32768, 10 ** 6) <= pa_cuda.MAX_SPLITS


# -- GPU ------------------------------------------------------------------------------------------

GPU_DECODE_LENS = [1, 37, 0, 300, 16, 129, 1000]  # not multiples of the block size; one empty
GPU_HEADS = [(32, 8), (8, 1), (4, 4), (40, 2)]  # GQA, MQA, MHA, a group of 20 (two head blocks)


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [8, 16, 128, 256])
@pytest.mark.parametrize("d,dtype", [(64, torch.bfloat16), (96, torch.float16), (128, torch.float16),
                                     (128, torch.bfloat16), (256, torch.bfloat16), (256, torch.float16)])
def test_gpu_decode_grid(d, dtype, block_size):
    for hq, hkv in GPU_HEADS:
        k_cache, v_cache, table, lens = make_paged(GPU_DECODE_LENS, block_size, hkv, d, dtype)
        q = torch.randn(len(GPU_DECODE_LENS), hq, d, device=CUDA).to(dtype)
        check(prepare(q, k_cache, v_cache, table, lens))


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [None, 1, 2, 7, 64, 128])
@pytest.mark.parametrize("block_size", [16, 128])
def test_gpu_decode_long_split_kv(num_splits, block_size):
    # Long sequences with the heuristic's split count and forced ones (many splits past the
    # end of the short sequences).
    seq_lens = [16411, 1, 9000, 0]
    k_cache, v_cache, table, lens = make_paged(seq_lens, block_size, 8, 128, torch.bfloat16)
    q = torch.randn(len(seq_lens), 32, 128, device=CUDA).bfloat16()
    check(prepare(q, k_cache, v_cache, table, lens), _num_splits=num_splits)


GPU_MASKS = {
    "noncausal": dict(causal=False),
    "window0": dict(window=(0, 0)),
    "window1": dict(window=(1, -1), causal=False),
    "window100": dict(window=(100, 0)),
    "window-both": dict(causal=False, window=(100, 50)),
    "softcap": dict(softcap=30.0),
    "softcap-small": dict(softcap=2.0),
    "window-softcap-scale": dict(window=(513, 0), softcap=5.0, softmax_scale=0.3),
}


@pytest.mark.gpu
@pytest.mark.parametrize("mask", list(GPU_MASKS))
@pytest.mark.parametrize("d,dtype,block_size", [(128, torch.bfloat16, 16), (64, torch.float16, 128),
                                                (256, torch.bfloat16, 8), (96, torch.bfloat16, 32)])
@pytest.mark.parametrize("num_splits", [None, 3])
def test_gpu_decode_masks(d, dtype, block_size, mask, num_splits):
    opts = GPU_MASKS[mask]
    for hq, hkv in ((32, 8), (8, 1)):
        k_cache, v_cache, table, lens = make_paged(GPU_DECODE_LENS, block_size, hkv, d, dtype)
        q = torch.randn(len(GPU_DECODE_LENS), hq, d, device=CUDA).to(dtype)
        check(prepare(q, k_cache, v_cache, table, lens, **opts), _num_splits=num_splits)


@pytest.mark.gpu
@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per_head", [False, True], ids=["per_tensor", "per_head"])
@pytest.mark.parametrize("d", [64, 96, 128, 256])
def test_gpu_fp8_cache(per_head, q_dtype, d):
    # The reference reads the same fp8 values: the error left is the kernel's arithmetic.
    hkv = 8
    shape = (hkv,) if per_head else ()
    k_scale = torch.rand(shape, device=CUDA) * 0.02 + 0.01
    v_scale = torch.rand(shape, device=CUDA) * 0.02 + 0.01
    for block_size in (8, 16, 128):
        k_cache, v_cache, table, lens = make_paged(GPU_DECODE_LENS, block_size, hkv, d, torch.float32)
        k8, v8 = to_fp8(k_cache, k_scale), to_fp8(v_cache, v_scale)
        q = torch.randn(len(GPU_DECODE_LENS), 32, d, device=CUDA).to(q_dtype)
        check(prepare(q, k8, v8, table, lens, k_scale=k_scale, v_scale=v_scale))
        check(prepare(q, k8, v8, table, lens, k_scale=k_scale, v_scale=v_scale, window=(200, 0), softcap=30.0),
              _num_splits=4)


@pytest.mark.gpu
def test_gpu_fp8_large_bf16_queries():
    # bfloat16 queries beyond fp16's range: computed in fp16 after a per-row power-of-two scale.
    k_scale = torch.tensor(0.01, device=CUDA)
    v_scale = torch.tensor(0.02, device=CUDA)
    k_cache, v_cache, table, lens = make_paged([100, 3], 16, 2, 128, torch.float32)
    k8, v8 = to_fp8(k_cache, k_scale), to_fp8(v_cache, v_scale)
    q = torch.randn(2, 8, 128, device=CUDA).bfloat16()
    q[0, 0] *= 1e6
    q[1, 3] *= 1e-6
    check(prepare(q, k8, v8, table, lens, k_scale=k_scale, v_scale=v_scale, softmax_scale=1e-6))


@pytest.mark.gpu
def test_gpu_strided_inputs():
    # Caches as views of a layer-interleaved store with padded heads, q with padded heads, and a
    # block table cut from a wider one.
    seq_lens = [77, 1, 300]
    block_size, hkv, d = 16, 4, 128
    k_cache, v_cache, table, lens = make_paged(seq_lens, block_size, hkv, d, torch.bfloat16)
    store = torch.zeros(2, 2, k_cache.shape[0], block_size, hkv, d + 64, device=CUDA, dtype=torch.bfloat16)
    k_view, v_view = store[1, 0, ..., :d], store[1, 1, ..., :d]
    k_view.copy_(k_cache)
    v_view.copy_(v_cache)
    wide = torch.randint(0, k_cache.shape[0], (3, table.shape[1] + 5), device=CUDA, dtype=torch.int32)
    wide[:, :table.shape[1]] = table
    q = torch.randn(3, 16, 2 * d, device=CUDA).bfloat16()[..., :d]
    check(prepare(q, k_view, v_view, wide[:, :table.shape[1]], lens))
    check(prepare(q, k_view, v_view, wide[:, :table.shape[1]], lens), _num_splits=5)


@pytest.mark.gpu
def test_gpu_public_api_and_auto_selection():
    k_cache, v_cache, table, lens = make_paged([5, 50], 16, 2, 128, torch.bfloat16)
    q = torch.randn(2, 8, 128, device=CUDA).bfloat16()
    args = prepare(q, k_cache, v_cache, table, lens)
    # 16-bit caches: "auto" prefers Triton (measured as fast or faster); "cuda" still runs.
    assert _backends.select(pa_op.OP, "auto", *args).backend == "triton"
    out, lse = pa_op.paged_attention(q, k_cache, v_cache, table, lens, return_lse=True, backend="cuda")
    check_result(args, out, lse)
    # The registered op (what torch.compile sees) gives what the eager call gives.
    op = _backends.implementations(pa_op.OP)["cuda"].fn
    op_out, op_lse = op(*args)
    torch.testing.assert_close(op_out, out, atol=0, rtol=0)
    torch.testing.assert_close(op_lse, lse, atol=0, rtol=0)
    # Mixed batches go to Triton.
    cu = torch.tensor([0, 1, 4], dtype=torch.int32, device=CUDA)
    q_mixed = torch.randn(4, 8, 128, device=CUDA).bfloat16()
    mixed = prepare(q_mixed, k_cache, v_cache, table, lens, cu, 3)
    assert _backends.select(pa_op.OP, "auto", *mixed).backend == "triton"


@pytest.mark.gpu
def test_gpu_auto_leaves_decode_to_triton():
    # The Triton kernel measured as fast or faster on every decode shape, fp8 caches included.
    def fp8_args(batch, seq_len):
        k_cache, v_cache, table, lens = make_paged([seq_len] * batch, 16, 8, 128, torch.bfloat16)
        scale = torch.ones(1, device=CUDA)
        q = torch.randn(batch, 32, 128, device=CUDA).bfloat16()
        return prepare(q, k_cache.to(torch.float8_e4m3fn), v_cache.to(torch.float8_e4m3fn), table, lens,
                       k_scale=scale, v_scale=scale)

    assert _backends.select(pa_op.OP, "auto", *fp8_args(256, 64)).backend == "triton"
    assert _backends.select(pa_op.OP, "auto", *fp8_args(1, 8192)).backend == "triton"
    assert _backends.select(pa_op.OP, "cuda", *fp8_args(256, 64)).backend == "cuda"


@pytest.mark.gpu
def test_gpu_cuda_graph_replay():
    # Capture once at the largest sizes, then change seq_lens and block_table in place and
    # replay: the split count and grid come from shapes only, the key ranges from the data.
    block_size, hkv, hq, d, max_blocks, batch = 16, 8, 32, 128, 256, 4
    num_blocks = batch * max_blocks
    k_cache = torch.randn(num_blocks, block_size, hkv, d, device=CUDA).bfloat16()
    v_cache = torch.randn_like(k_cache)
    table = torch.randperm(num_blocks, device=CUDA).to(torch.int32).view(batch, max_blocks)
    lens = torch.full((batch,), max_blocks * block_size, dtype=torch.int32, device=CUDA)
    q = torch.randn(batch, hq, d, device=CUDA).bfloat16()
    assert pa_cuda.plan(q, k_cache, table, -1).num_splits > 1  # the capture includes the combine

    def call():
        return pa_op.paged_attention(q, k_cache, v_cache, table, lens, return_lse=True, backend="cuda")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()  # first-call setup outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = call()

    for new_lens in ([4096, 64, 1, 30], [100, 3000, 0, 4000], [1, 1, 1, 1], [4096, 4096, 4096, 17]):
        lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        table.copy_(torch.randperm(num_blocks, device=CUDA).to(torch.int32).view(batch, max_blocks))
        q.copy_(torch.randn_like(q))
        graph.replay()
        torch.cuda.synchronize()
        check_result(prepare(q, k_cache, v_cache, table, lens), out, lse)


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    k_cache, v_cache, table, lens = make_paged([5, 300, 0], 16, 2, 128, torch.float16)
    q = torch.randn(3, 8, 128, device=CUDA).half()

    def attend(q, k_cache, v_cache, table, lens):
        out = pa_op.paged_attention(q, k_cache, v_cache, table, lens, softcap=10.0, backend="cuda")
        out2, lse = pa_op.paged_attention(q, k_cache, v_cache, table, lens, window=(40, 0), return_lse=True)
        return out, out2, lse

    args = (q, k_cache, v_cache, table, lens)
    compiled = torch.compile(attend, fullgraph=True, backend="eager")
    for got, want in zip(compiled(*args), attend(*args)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)

"""Triton flash_attention forward against the float64 torch reference.

On the CPU the kernel runs in Triton's interpreter (slow): a few small cases cover every code
path (masked/unmasked phases, GQA packing, varlen, kv_lens, strides). The full grid of head
dims, shapes and masks runs on a GPU (``gpu`` marker).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from ._attention import flash_args as _args, flash_lowp as _lowp
from ._utils import assert_close_fa_rule

triton = pytest.importorskip("triton")

from lepton_kernels import _backends  # noqa: E402
from lepton_kernels.ops import flash_attention as fa_op  # noqa: E402
from lepton_kernels.reference.attention import flash_attention as reference  # noqa: E402
from lepton_kernels.triton import flash_attention as fa_triton  # noqa: E402


# The "cpu" cases run on the GPU when there is one (the interpreter only runs without one).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")



def check(args, **kernel_options):
    """Run the Triton kernel on ``args`` and hold it to the FlashAttention rule."""
    out, lse = fa_triton.flash_attention(*args, **kernel_options)
    q = args[0]
    ref_args = tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    ref_out, ref_lse = reference(*ref_args)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
    assert_close_fa_rule(out, ref_out, _lowp(args))
    # Rows that see no key: lse -inf exactly where the reference has it, and out 0 there.
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty), "lse -inf pattern differs from the reference"
    assert not torch.isnan(lse).any()
    finite = ~empty
    torch.testing.assert_close(lse[finite], ref_lse[finite].float(), atol=2e-3, rtol=1e-3)
    return out, lse


def rand(*shape, dtype, device=DEVICE):
    return torch.randn(*shape, dtype=dtype, device=device)


def qkv(batch, sq, sk, hq, hkv, d, dtype, device=DEVICE):
    return (rand(batch, sq, hq, d, dtype=dtype, device=device), rand(batch, sk, hkv, d, dtype=dtype, device=device),
            rand(batch, sk, hkv, d, dtype=dtype, device=device))


def varlen_qkv(lens_q, lens_k, hq, hkv, d, dtype, device=DEVICE):
    cu_q = torch.tensor([0] + lens_q, device=device).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lens_k, device=device).cumsum(0).to(torch.int32)
    q = rand(sum(lens_q), hq, d, dtype=dtype, device=device)
    k = rand(sum(lens_k), hkv, d, dtype=dtype, device=device)
    v = rand(sum(lens_k), hkv, d, dtype=dtype, device=device)
    return q, k, v, dict(cu_q=cu_q, cu_k=cu_k, max_q=max(lens_q), max_k=max(lens_k))


# -- CPU (interpreter): one case per code path ------------------------------------------------------

CPU_CASES = [
    # (name, batch, Sq, Sk, Hq, Hkv, D, dtype, options)
    ("one-token", 1, 1, 1, 2, 2, 64, torch.float16, {}),
    ("ragged", 2, 113, 203, 2, 2, 64, torch.float16, {}),
    ("causal-fp32-d80-gqa", 1, 113, 203, 4, 2, 80, torch.float32, dict(causal=True)),
    ("causal-sq>sk", 1, 203, 113, 2, 1, 64, torch.float16, dict(causal=True)),
    ("window", 1, 113, 203, 4, 2, 80, torch.float16, dict(window=(32, 16))),
    ("causal-left-window", 1, 113, 203, 2, 2, 64, torch.float32, dict(causal=True, window=(40, -1))),
    ("softcap", 1, 113, 203, 2, 2, 64, torch.float16, dict(causal=True, softcap=5.0, scale=0.3)),
    ("bf16", 1, 113, 203, 2, 2, 64, torch.bfloat16, dict(causal=True)),
]


@pytest.mark.parametrize("name,batch,sq,sk,hq,hkv,d,dtype,options", CPU_CASES, ids=[c[0] for c in CPU_CASES])
def test_cpu_padded(name, batch, sq, sk, hq, hkv, d, dtype, options):
    q, k, v = qkv(batch, sq, sk, hq, hkv, d, dtype)
    check(_args(q, k, v, **options))


@pytest.mark.parametrize("pack_gqa", [True, False])
def test_cpu_decode_gqa(pack_gqa):
    # Short queries with GQA 4: the heads of a kv group share one program's rows when packed.
    q, k, v = qkv(2, 5, 70, 4, 1, 64, torch.float16)
    check(_args(q, k, v, causal=True), pack_gqa=pack_gqa)


def test_cpu_kv_lens():
    q, k, v = qkv(3, 17, 70, 2, 2, 64, torch.float16)
    kv_lens = torch.tensor([50, 0, 9], dtype=torch.int32, device=DEVICE)  # 0: every row empty; 9 < Sq: some rows empty
    out, _ = check(_args(q, k, v, causal=True, kv_lens=kv_lens))
    assert (out[1] == 0).all()


def test_cpu_varlen():
    # A zero-length and a one-token sequence among ragged ones; kv_lens trims some keys.
    q, k, v, cu = varlen_qkv([30, 0, 1, 17], [40, 0, 5, 12], 4, 2, 64, torch.float16)
    check(_args(q, k, v, causal=True, **cu))
    kv_lens = torch.tensor([33, 0, 5, 3], dtype=torch.int32, device=DEVICE)
    check(_args(q, k, v, window=(8, 4), kv_lens=kv_lens, **cu))


def test_cpu_transposed_inputs():
    # Hugging Face hands (B, H, S, D) tensors transposed to (B, S, H, D): no copy needed.
    q = rand(2, 2, 37, 64, dtype=torch.float16).transpose(1, 2)
    k = rand(2, 1, 45, 64, dtype=torch.float16).transpose(1, 2)
    v = rand(2, 1, 45, 64, dtype=torch.float16).transpose(1, 2)
    assert not q.is_contiguous()
    check(_args(q, k, v, causal=True))


HAS_DESCRIPTORS = hasattr(triton.language, "make_tensor_descriptor")  # triton >= 3.4


@pytest.mark.skipif(not HAS_DESCRIPTORS, reason="triton < 3.4: no tensor descriptors")
def test_cpu_tensor_descriptors():
    # K/V through per-sequence TMA descriptors (zero fill past the end) instead of masked loads.
    q, k, v, cu = varlen_qkv([30, 0, 17], [40, 0, 12], 4, 2, 80, torch.float16)
    kv_lens = torch.tensor([33, 0, 12], dtype=torch.int32, device=DEVICE)
    check(_args(q, k, v, causal=True, kv_lens=kv_lens, **cu), use_tma=True)


SPLIT_CASES = [
    # (name, Sq, Sk, Hq, Hkv, options): one query block per sequence, keys split in ranges
    ("decode", 1, 203, 4, 1, dict(causal=True)),
    ("decode-window-softcap", 1, 203, 4, 2, dict(window=(40, 0), softcap=5.0)),
    ("short-queries-causal", 3, 113, 4, 1, dict(causal=True)),
    ("window-both-sides", 2, 150, 2, 2, dict(window=(32, 8))),
]


@pytest.mark.parametrize("name,sq,sk,hq,hkv,options", SPLIT_CASES, ids=[c[0] for c in SPLIT_CASES])
@pytest.mark.parametrize("num_splits", [2, 5])
def test_cpu_split_kv(name, sq, sk, hq, hkv, options, num_splits):
    # Flash-decoding: more splits than some sequences have key blocks, so empty ranges occur.
    q, k, v = qkv(2, sq, sk, hq, hkv, 64, torch.float16)
    kv_lens = torch.tensor([sk, 7], dtype=torch.int32, device=DEVICE)
    check(_args(q, k, v, kv_lens=kv_lens, **options), num_splits=num_splits)


def test_cpu_split_kv_varlen():
    q, k, v, cu = varlen_qkv([1, 0, 2, 1], [90, 0, 33, 1], 4, 2, 64, torch.float16)
    check(_args(q, k, v, causal=True, **cu), num_splits=3)


def test_split_kv_needs_one_query_block():
    q, k, v = qkv(1, 40, 64, 2, 2, 64, torch.float16)
    with pytest.raises(ValueError, match="one query block per sequence"):
        fa_triton.flash_attention(*_args(q, k, v), num_splits=2)


def test_cpu_empty():
    q, k, v = qkv(2, 0, 5, 2, 2, 64, torch.float16)
    out, lse = fa_triton.flash_attention(*_args(q, k, v))
    assert out.shape == q.shape and lse.shape == (2, 2, 0)


def test_public_api_selects_triton():
    q, k, v = qkv(1, 20, 33, 4, 2, 64, torch.float16)
    out, lse = fa_op.flash_attention(q, k, v, causal=True, return_lse=True, backend="triton")
    ref_out, ref_lse = fa_op.flash_attention(q, k, v, causal=True, return_lse=True, backend="torch")
    torch.testing.assert_close(out, ref_out, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


def test_supports_reasons():
    q, k, v = qkv(1, 4, 4, 2, 2, 64, torch.float16)
    assert fa_triton.supports(*_args(q, k, v)) is None
    assert "float64" in fa_triton.supports(*_args(q.double(), k.double(), v.double()))
    q, k, v = qkv(1, 4, 4, 2, 2, 512, torch.float16)
    assert "head dims" in fa_triton.supports(*_args(q, k, v))
    assert "triton" in _backends.implementations(fa_op.OP)


_AOT_SCRIPT = """
import sys
try:
    from triton.compiler import ASTSource  # noqa: F401
    from triton.backends.compiler import GPUTarget  # noqa: F401
except ImportError:
    sys.exit(77)
import torch
from lepton_kernels.triton.flash_attention import compile_for_target
ptx = compile_for_target((9, 0), torch.bfloat16, 128).asm["ptx"]
print("wgmma", ptx.count("wgmma.mma_async"))
"""


def test_aot_compiles_to_wgmma_on_sm90():
    # The interpreter replaces @triton.jit kernels at import time, so compile in a fresh
    # process without TRITON_INTERPRET (ptxas from the triton wheel; no GPU needed).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=300)
    if result.returncode == 77:
        pytest.skip("this triton has no ASTSource/GPUTarget AOT API")
    assert result.returncode == 0, result.stderr[-3000:]
    count = int(result.stdout.split("wgmma")[-1])
    assert count > 0, "the sm_90 kernel does not use wgmma"


# -- GPU: the full grid -----------------------------------------------------------------------------

GPU_SHAPES = [(1, 1), (1, 128), (113, 203), (128, 128), (256, 512), (512, 256)]
GPU_HEADS = [(8, 8), (8, 2), (8, 1)]
GRID_HEADS = [(8, 8), (8, 2)]  # MQA (8/1) packs decode rows differently: its own tests below
CUDA = torch.device("cuda")


# Every head dim, each with one of the two 16-bit dtypes (both at D=128): compiles dominate the
# run time, and the dtype changes no index math.
GRID_DIMS = [(64, torch.bfloat16), (80, torch.float16), (96, torch.bfloat16), (128, torch.float16),
             (128, torch.bfloat16), (192, torch.float16), (256, torch.bfloat16)]


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d,dtype", GRID_DIMS)
def test_gpu_grid(d, dtype, causal):
    # Every shape with MHA and GQA (one kernel compile serves all prefill shapes).
    for sq, sk in GPU_SHAPES:
        for hq, hkv in GRID_HEADS:
            q, k, v = qkv(2, sq, sk, hq, hkv, d, dtype, device=CUDA)
            check(_args(q, k, v, causal=causal))


GPU_FEATURES = {
    "window-64-0": dict(window=(64, 0)),
    "window-32-32": dict(window=(32, 32)),
    "softcap": dict(causal=True, softcap=30.0),
    "kv_lens": dict(causal=True, kv_lens=[203, 0, 1, 150]),
    "transposed": dict(causal=True, transposed=True),
    "varlen": dict(causal=True, varlen=True),
    "varlen-window-kv_lens": dict(window=(32, 32), varlen=True, kv_lens=[150, 0, 1, 3, 299]),
}


@pytest.mark.gpu
@pytest.mark.parametrize("feature", list(GPU_FEATURES))
@pytest.mark.parametrize("d,dtype", [(64, torch.bfloat16), (80, torch.float16), (128, torch.bfloat16),
                                     (256, torch.float16)])
def test_gpu_features(d, dtype, feature):
    opts = dict(GPU_FEATURES[feature])
    varlen, transposed, kv_lens = opts.pop("varlen", False), opts.pop("transposed", False), opts.pop("kv_lens", None)
    for hq, hkv in GPU_HEADS:
        if varlen:
            # zero-length and one-token sequences among ragged ones
            q, k, v, cu = varlen_qkv([130, 0, 1, 1, 257], [200, 0, 1, 77, 300], hq, hkv, d, dtype, device=CUDA)
            opts.update(cu)
        elif transposed:
            q = rand(2, hq, 203, d, dtype=dtype, device=CUDA).transpose(1, 2)
            k = rand(2, hkv, 203, d, dtype=dtype, device=CUDA).transpose(1, 2)
            v = rand(2, hkv, 203, d, dtype=dtype, device=CUDA).transpose(1, 2)
        else:
            batch = 4 if kv_lens is not None else 2
            q, k, v = qkv(batch, 113, 203, hq, hkv, d, dtype, device=CUDA)
        lens = None if kv_lens is None else torch.tensor(kv_lens, dtype=torch.int32, device=CUDA)
        check(_args(q, k, v, kv_lens=lens, **opts))


@pytest.mark.gpu
@pytest.mark.parametrize("use_tma", [False, True])
@pytest.mark.parametrize("d", [80, 128, 256])
def test_gpu_both_load_paths(d, use_tma):
    # Pointer loads and TMA descriptors, whichever the heuristic picks for this head dim.
    if use_tma and not HAS_DESCRIPTORS:
        pytest.skip("triton < 3.4: no tensor descriptors")
    q, k, v, cu = varlen_qkv([130, 0, 1, 257], [200, 0, 1, 300], 8, 2, d, torch.bfloat16, device=CUDA)
    lens = torch.tensor([150, 0, 1, 299], dtype=torch.int32, device=CUDA)
    check(_args(q, k, v, causal=True, kv_lens=lens, **cu), use_tma=use_tma)
    q = rand(2, 8, 113, d, dtype=torch.bfloat16, device=CUDA).transpose(1, 2)  # (B, H, S, D) views
    k = rand(2, 2, 203, d, dtype=torch.bfloat16, device=CUDA).transpose(1, 2)
    v = rand(2, 2, 203, d, dtype=torch.bfloat16, device=CUDA).transpose(1, 2)
    check(_args(q, k, v, window=(64, 16)), use_tma=use_tma)


@pytest.mark.gpu
@pytest.mark.parametrize("sq", [1, 4])
def test_gpu_decode_long_kv(sq):
    # Decode shapes: a few queries against a long cache, GQA packed into one program.
    for hq, hkv in GPU_HEADS:
        q, k, v = qkv(3, sq, 4099, hq, hkv, 128, torch.bfloat16, device=CUDA)
        lens = torch.tensor([4099, 1, 2000], dtype=torch.int32, device=CUDA)
        check(_args(q, k, v, causal=True, kv_lens=lens))
        check(_args(q, k, v, causal=True, kv_lens=lens), num_splits=1)  # the unsplit kernel


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128, 256])
def test_gpu_decode_splits(d):
    # B=1 decode over a long cache: the heuristic splits the keys (and must still be exact).
    q, k, v = qkv(1, 1, 32768 + 77, 32, 8, d, torch.bfloat16, device=CUDA)
    args = _args(q, k, v, causal=True)
    assert fa_triton._num_splits(8, 32768 + 77, 1, fa_triton.attention_tiles(
        d, torch.bfloat16, torch.cuda.get_device_capability(), 4, False), -1, 0,
        torch.cuda.get_device_properties(0).multi_processor_count) > 1
    check(args)
    check(_args(q, k, v, window=(1000, 0), softcap=30.0))


@pytest.mark.gpu
def test_torch_compile_fullgraph_and_cuda_graph_gpu():
    """Selection and the registered op trace under torch.compile; the kernel replays in a graph."""
    import lepton_kernels as lk

    q = torch.randn(2, 128, 8, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 160, 2, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)

    def attend(q, k, v):
        return lk.flash_attention(q, k, v, causal=True, backend="triton")

    want = attend(q, k, v)
    got = torch.compile(attend, fullgraph=True)(q, k, v)
    torch.testing.assert_close(got, want, atol=0, rtol=0)

    graph = torch.cuda.CUDAGraph()
    attend(q, k, v)  # warm-up (compiles the kernel) outside capture
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        out = attend(q, k, v)
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, attend(q, k, v), atol=0, rtol=0)

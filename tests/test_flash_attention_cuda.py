"""The compiled (CUDA C++) attention forward against the float64 reference.

CPU tests cover the reasons the ``cuda`` backend gives for calls it does not serve; the grid of
head dims, shapes, masks and layouts runs on a GPU (``gpu`` marker) with a built extension.
"""
from __future__ import annotations

import pytest
import torch

from ._attention import flash_args as _args, flash_lowp as _lowp
from ._utils import assert_close_fa_rule
from lepton_kernels import _backends
from lepton_kernels.ops import flash_attention as fa_op
from lepton_kernels.reference.attention import flash_attention as reference

CUDA = torch.device("cuda")
HEAD_DIMS = (64, 80, 96, 128, 192, 256)
SHAPES = [(1, 1), (1, 128), (113, 203), (128, 128), (256, 512), (512, 256)]
HEADS = [(8, 8), (8, 2), (8, 1)]



def _poison_allocator(nbytes: int) -> None:
    # The launcher allocates out and lse itself; hand the caching allocator NaN-filled blocks
    # first so that elements the kernel fails to write show up as NaN.
    for _ in range(2):
        torch.full((nbytes // 4 + 1024,), float("nan"), device=CUDA)


def check(args, kernel="auto"):
    """Run the CUDA kernel on ``args`` and hold it to the FlashAttention rule."""
    from lepton_kernels.cuda import flash_attention as fa_cuda

    q = args[0]
    _poison_allocator(q.numel() * q.element_size())
    out, lse = fa_cuda.flash_attention(*args, kernel=kernel)
    ref_args = tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    ref_out, ref_lse = reference(*ref_args)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
    assert_close_fa_rule(out, ref_out, _lowp(args))
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty), "lse -inf pattern differs from the reference"
    assert not torch.isnan(lse).any()
    torch.testing.assert_close(lse[~empty], ref_lse[~empty].float(), atol=2e-3, rtol=1e-3)
    assert not out[empty.transpose(-1, -2) if q.dim() == 4 else empty.t()].any(), "rows with no key must be 0"
    return out, lse


def rand(*shape, dtype):
    return torch.randn(*shape, dtype=dtype, device=CUDA)


def qkv(batch, sq, sk, hq, hkv, d, dtype):
    return rand(batch, sq, hq, d, dtype=dtype), rand(batch, sk, hkv, d, dtype=dtype), rand(batch, sk, hkv, d, dtype=dtype)


def varlen_qkv(lens_q, lens_k, hq, hkv, d, dtype):
    cu_q = torch.tensor([0] + lens_q, device=CUDA).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lens_k, device=CUDA).cumsum(0).to(torch.int32)
    q, k, v = rand(sum(lens_q), hq, d, dtype=dtype), rand(sum(lens_k), hkv, d, dtype=dtype), rand(sum(lens_k), hkv, d, dtype=dtype)
    return q, k, v, dict(cu_q=cu_q, cu_k=cu_k, max_q=max(lens_q), max_k=max(lens_k))


def _cuda_ready() -> bool:
    from lepton_kernels.cuda import flash_attention as fa_cuda
    from lepton_kernels import cuda as lk_cuda

    return torch.cuda.is_available() and lk_cuda.unavailable_reason(CUDA) is None and fa_cuda.has_kernel()


needs_kernel = pytest.mark.skipif(not torch.cuda.is_available() or not _cuda_ready(),
                                  reason="needs a GPU and an extension built with the attention kernel")


@pytest.fixture(params=["mma_sync", "sm90"])
def kernel(request):
    """Each GPU test runs both compiled kernels: mma.sync everywhere, sm_90a where it can run."""
    return request.param


def skip_unless_runs(kernel: str, d: int, dtype=torch.bfloat16) -> None:
    from lepton_kernels.cuda import flash_attention as fa_cuda

    if kernel == "sm90":
        reason = fa_cuda.sm90_unsupported(d, dtype, CUDA)
        if reason:
            pytest.skip(reason)


# -- CPU: why the cuda backend declines ---------------------------------------------------------


def _reason(q, k=None, v=None):
    k = q if k is None else k
    v = k if v is None else v
    impl = _backends.implementations("flash_attention")["cuda"]
    return impl.supports(*_args(q, k, v))


def test_cpu_supports_reasons():
    q = torch.randn(1, 4, 2, 64)
    assert "float16 or bfloat16" in _reason(q)  # float32
    assert "float16 or bfloat16" in _reason(q.double())
    q72 = torch.randn(1, 4, 2, 72, dtype=torch.float16)
    assert "head dims 64, 80, 96, 128, 192, 256, got 72" in _reason(q72)
    q64 = torch.randn(1, 4, 2, 64, dtype=torch.bfloat16)
    assert "cpu" in _reason(q64)  # a served dtype and head dim, but CPU tensors


def test_cpu_explicit_cuda_backend_raises_with_reason():
    q = torch.randn(1, 4, 2, 64, dtype=torch.float16)
    with pytest.raises(_backends.BackendUnavailableError, match="backend 'cuda' cannot serve"):
        fa_op.flash_attention(q, q, q, backend="cuda")
    # auto still serves the call (on another backend)
    assert fa_op.flash_attention(q, q, q).shape == q.shape


def test_cpu_auto_preference_needs_a_gpu_and_triton():
    # Off the GPU nothing prefers Triton over the CUDA kernel for speed.
    assert fa_op._hopper_or_newer(torch.device("cpu")) is False
    q = torch.randn(1, 4, 2, 64, dtype=torch.float16)
    args = (q, q, q, False, 0.125, -1, -1, 0.0, None, None, 4, 4, None)
    assert fa_op._cuda_auto_supports(*args) in (None, "decode-shaped calls go to the Triton kernel's split-KV path")


# -- GPU ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_kernel
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_gpu_grid(d, dtype, causal, kernel):
    skip_unless_runs(kernel, d, dtype)
    for sq, sk in SHAPES:
        hq, hkv = HEADS[(sq + sk) % 3]  # each shape with one head layout; all three overall
        q, k, v = qkv(2, sq, sk, hq, hkv, d, dtype)
        check(_args(q, k, v, causal=causal), kernel)


FEATURES = {
    "window-64-0": dict(window=(64, 0)),
    "window-32-32": dict(window=(32, 32)),
    "causal-left-window": dict(causal=True, window=(40, -1)),
    "softcap": dict(softcap=30.0),
    "causal-softcap": dict(causal=True, softcap=30.0),
    "kv_lens": dict(causal=True, kv_lens=[203, 0, 1, 150]),
    "transposed": dict(causal=True, transposed=True),
    "varlen": dict(causal=True, varlen=True),
    "varlen-window-kv_lens": dict(window=(32, 32), varlen=True, kv_lens=[150, 0, 1, 3, 299]),
}


@pytest.mark.gpu
@needs_kernel
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_gpu_features(d, dtype, feature, kernel):
    skip_unless_runs(kernel, d, dtype)
    opts = dict(FEATURES[feature])
    varlen, transposed, kv_lens = opts.pop("varlen", False), opts.pop("transposed", False), opts.pop("kv_lens", None)
    for hq, hkv in HEADS:
        if varlen:  # zero-length and one-token sequences among ragged ones
            q, k, v, cu = varlen_qkv([130, 0, 1, 1, 257], [200, 0, 1, 77, 300], hq, hkv, d, dtype)
            opts.update(cu)
        elif transposed:  # (B, H, S, D) storage viewed as (B, S, H, D): no copy
            q = rand(2, hq, 203, d, dtype=dtype).transpose(1, 2)
            k = rand(2, hkv, 203, d, dtype=dtype).transpose(1, 2)
            v = rand(2, hkv, 203, d, dtype=dtype).transpose(1, 2)
        else:
            q, k, v = qkv(4 if kv_lens is not None else 2, 113, 203, hq, hkv, d, dtype)
        lens = None if kv_lens is None else torch.tensor(kv_lens, dtype=torch.int32, device=CUDA)
        check(_args(q, k, v, kv_lens=lens, **opts), kernel)


# Lengths one short of, at and one past the tile sizes (BLOCK_M 64/128, BLOCK_N 64/128), where a
# row tile of a warp or a whole warp falls past the sequence's end or outside the mask.
TILE_EDGE_SHAPES = [(1, 65), (63, 64), (65, 63), (127, 129), (129, 127), (191, 320), (257, 64), (320, 191)]
TILE_EDGE_MASKS = {
    "none": dict(),
    "causal": dict(causal=True),
    "window-16-0": dict(window=(16, 0)),   # narrow band: whole warps skip most key tiles
    "window-0-70": dict(window=(0, 70)),   # band above the diagonal only
}


@pytest.mark.gpu
@needs_kernel
@pytest.mark.parametrize("mask", list(TILE_EDGE_MASKS))
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_gpu_tile_edges(d, mask, kernel):
    skip_unless_runs(kernel, d)
    for i, (sq, sk) in enumerate(TILE_EDGE_SHAPES):
        hq, hkv = HEADS[i % 3]
        dtype = (torch.float16, torch.bfloat16)[i % 2]
        q, k, v = qkv(2, sq, sk, hq, hkv, d, dtype)
        check(_args(q, k, v, **TILE_EDGE_MASKS[mask]), kernel)


@pytest.mark.gpu
@needs_kernel
@pytest.mark.parametrize("scale", [0.0, -0.1])
def test_gpu_nonpositive_scale(scale, kernel):
    # The kernel folds a positive scale into the exponent; zero and negative scales (which
    # reorder the scores) take the other path.
    skip_unless_runs(kernel, 128)
    for d in (64, 128):
        q, k, v = qkv(2, 129, 200, 4, 2, d, torch.bfloat16)
        check(_args(q, k, v, causal=True, scale=scale), kernel)
        check(_args(q, k, v, window=(30, 30), scale=scale), kernel)


@pytest.mark.gpu
@needs_kernel
def test_gpu_odd_views_and_wide_windows(kernel):
    skip_unless_runs(kernel, 128)
    # A slice whose base is not 16-byte aligned (copied by the launcher), windows wider than
    # the sequences (treated as unbounded), and Sq > Sk under causal (leading rows see nothing).
    base = rand(2, 203, 4, 136, dtype=torch.bfloat16)
    q = base[..., 8:136]
    k = rand(2, 203, 2, 136, dtype=torch.bfloat16)[..., 3:131]
    v = rand(2, 203, 2, 128, dtype=torch.bfloat16)
    check(_args(q, k, v, causal=True), kernel)
    check(_args(q, k, v, window=(10**9, 10**9)), kernel)
    q, k, v = qkv(2, 300, 100, 8, 2, 128, torch.float16)
    check(_args(q, k, v, causal=True), kernel)


@pytest.mark.gpu
@needs_kernel
def test_gpu_public_op_selection():
    import lepton_kernels as lk

    q, k, v = qkv(2, 128, 160, 8, 2, 128, torch.bfloat16)
    out, lse = lk.flash_attention(q, k, v, causal=True, return_lse=True, backend="cuda")
    ref, ref_lse = lk.flash_attention(q, k, v, causal=True, return_lse=True, backend="torch")
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, ref_lse, atol=2e-3, rtol=1e-3)
    auto = _backends.select("flash_attention", "auto", *_args(q, k, v, causal=True))
    capability = torch.cuda.get_device_capability()
    # sm_90: the wgmma kernel; newer GPUs: Triton (the sm_90a code does not run there)
    assert auto.backend == ("triton" if capability > (9, 0) else "cuda")
    q64, k64, v64 = qkv(2, 128, 160, 8, 2, 64, torch.bfloat16)
    auto64 = _backends.select("flash_attention", "auto", *_args(q64, k64, v64, causal=True))
    assert auto64.backend == ("triton" if capability >= (9, 0) else "cuda")  # Triton as fast at D=64
    decode = _backends.select("flash_attention", "auto", *_args(q[:, :1], k, v, causal=True))
    assert decode.backend == "triton"  # split-KV decode


@pytest.mark.gpu
@needs_kernel
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_cuda_graph_and_compile(d):
    # D = 128 takes the sm_90a kernel on an H100/H200, with its tile counter allocated per call.
    import lepton_kernels as lk

    q, k, v = qkv(2, 128, 160, 8, 2, d, torch.bfloat16)

    def attend(q, k, v):
        return lk.flash_attention(q, k, v, causal=True, backend="cuda")

    want = attend(q, k, v)
    got = torch.compile(attend, fullgraph=True)(q, k, v)
    torch.testing.assert_close(got, want, atol=0, rtol=0)

    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        out = attend(q, k, v)
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, attend(q, k, v), atol=0, rtol=0)


@pytest.mark.gpu
@needs_kernel
def test_gpu_sm90_kernel_names_what_it_cannot_run():
    skip_unless_runs("sm90", 128)
    from lepton_kernels.cuda import flash_attention as fa_cuda

    q, k, v = qkv(1, 64, 64, 2, 2, 96, torch.bfloat16)
    with pytest.raises(RuntimeError, match="head dims 64, 128 and 256, got 96"):
        fa_cuda.flash_attention(*_args(q, k, v), kernel="sm90")
    check(_args(q, k, v))  # "auto" takes the mma.sync kernel for it

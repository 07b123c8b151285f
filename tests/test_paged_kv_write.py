"""paged_kv_write: every backend against the reference, odd shapes, strided views, bad input."""
import pytest
import torch

import lepton_kernels as lk
from lepton_kernels import _backends
from lepton_kernels.reference.paged_kv_write import to_cache_dtype
from lepton_kernels.triton import interpreting

from ._utils import DEVICES, poisoned

# Backends that can run on each device here (Triton on the CPU only through its interpreter).
CASES = [("cpu", "torch")] + ([("cpu", "triton")] if interpreting() else []) + (
    [("cuda", "torch"), ("cuda", "triton"), ("cuda", "cuda")] if torch.cuda.is_available() else []
)


def _make(T, H, D, num_blocks, block_size, dtype, device, cache_dtype=None, pad_fraction=0.2):
    k = torch.randn(T, H, D, dtype=dtype, device=device)
    v = torch.randn(T, H, D, dtype=dtype, device=device)
    slots = torch.randperm(num_blocks * block_size, device=device)[:T]
    slots[torch.rand(T, device=device) < pad_fraction] = -1  # padding tokens
    cache_dtype = cache_dtype or dtype
    k_cache = poisoned(num_blocks, block_size, H, D, dtype=cache_dtype, device=device)
    v_cache = poisoned(num_blocks, block_size, H, D, dtype=cache_dtype, device=device)
    return k, v, k_cache, v_cache, slots


def _expected(k, v, k_cache, v_cache, slots, k_scale=None, v_scale=None):
    """Independent check: loop over tokens, compare written rows; untouched slots stay poisoned."""
    bs = k_cache.shape[1]
    kc, vc = k_cache.clone(), v_cache.clone()
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            kc[s // bs, s % bs] = to_cache_dtype(k[t : t + 1], kc.dtype, k_scale)[0]
            vc[s // bs, s % bs] = to_cache_dtype(v[t : t + 1], vc.dtype, v_scale)[0]
    return kc, vc


def _same(a, b):
    # Compare bit patterns so NaN poison in untouched slots must also match.
    if a.dtype == torch.float8_e4m3fn:
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a.view(torch.int16 if a.element_size() == 2 else torch.int32),
                       b.view(torch.int16 if b.element_size() == 2 else torch.int32))


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize(
    "T,H,D,num_blocks,block_size",
    [(1, 1, 64, 2, 8), (17, 2, 80, 5, 16), (113, 8, 128, 16, 16), (33, 3, 96, 3, 128), (40, 1, 256, 7, 8)],
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_matches_token_loop(device, backend, T, H, D, num_blocks, block_size, dtype):
    if backend == "triton" and device == "cpu" and (T > 40 or D == 256):
        pytest.skip("interpreter: small shapes only")
    k, v, kc, vc, slots = _make(T, H, D, num_blocks, block_size, dtype, device)
    want_k, want_v = _expected(k, v, kc, vc, slots)
    lk.paged_kv_write(k, v, kc, vc, slots, backend=backend)
    assert _same(kc, want_k) and _same(vc, want_v)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("T,H,D", [(1, 8, 128), (4099, 8, 128), (257, 4, 64), (64, 2, 80), (31, 32, 256)])
@pytest.mark.parametrize("block_size", [16, 256])
def test_bf16_gpu(backend, T, H, D, block_size):
    num_blocks = (2 * T) // block_size + 2
    k, v, kc, vc, slots = _make(T, H, D, num_blocks, block_size, torch.bfloat16, "cuda")
    want_k, want_v = _expected(k, v, kc, vc, slots)
    lk.paged_kv_write(k, v, kc, vc, slots, backend=backend)
    torch.cuda.synchronize()
    assert _same(kc, want_k) and _same(vc, want_v)


@pytest.mark.parametrize("device,backend", CASES)
def test_strided_views(device, backend):
    """k/v sliced out of a fused qkv projection, and a cache that is a view of a bigger tensor."""
    T, H, D, nb, bs = 19, 2, 64, 6, 8
    qkv = torch.randn(T, 3 * H + 1, D, dtype=torch.float16, device=device)
    k, v = qkv[:, H : 2 * H], qkv[:, 2 * H : 3 * H]
    # [layers, 2, num_blocks, block_size, H, D] -> per-layer K and V views
    full = poisoned(2, 2, nb, bs, H, D, dtype=torch.float16, device=device)
    kc, vc = full[1, 0], full[1, 1]
    slots = torch.randperm(nb * bs, device=device)[:T]
    want_k, want_v = _expected(k, v, kc, vc, slots)
    lk.paged_kv_write(k, v, kc, vc, slots, backend=backend)
    assert _same(kc, want_k) and _same(vc, want_v)
    assert torch.isnan(full[0]).all(), "wrote outside the selected layer"


@pytest.mark.parametrize("device,backend", [c for c in CASES if c != ("cpu", "triton")])
@pytest.mark.parametrize("per_head", [False, True])
def test_fp8_cache(device, backend, per_head):
    if device == "cuda" and backend == "triton" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("Triton fp8 needs sm_89+")
    T, H, D, nb, bs = 50, 4, 128, 8, 16
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    k, v, kc, vc, slots = _make(T, H, D, nb, bs, dtype, device, cache_dtype=torch.float8_e4m3fn)
    k = k * 100  # some values past the e4m3 range after scaling: saturate, never NaN
    shape = (H,) if per_head else ()
    k_scale = torch.rand(shape, device=device) * 0.2 + 0.05
    v_scale = torch.rand(shape, device=device) * 0.2 + 0.05
    want_k, want_v = _expected(k, v, kc, vc, slots, k_scale, v_scale)
    lk.paged_kv_write(k, v, kc, vc, slots, k_scale=k_scale, v_scale=v_scale, backend=backend)
    assert _same(kc, want_k) and _same(vc, want_v)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_tokens(device):
    k = torch.randn(0, 2, 64, device=device)
    kc = poisoned(2, 8, 2, 64, dtype=torch.float32, device=device)
    lk.paged_kv_write(k, k, kc, kc.clone(), torch.empty(0, dtype=torch.int64, device=device))
    assert torch.isnan(kc).all()


def test_auto_prefers_fast_backends_and_env_override(monkeypatch):
    args, _ = _backends.example("paged_kv_write", torch.device("cpu"))
    assert _backends.select("paged_kv_write", "auto", *args, None, None).backend in ("torch", "triton")
    monkeypatch.setenv("LEPTON_KERNELS_BACKEND", "torch")
    assert _backends.select("paged_kv_write", "auto", *args, None, None).backend == "torch"
    monkeypatch.setenv("LEPTON_KERNELS_BACKEND", "nope")
    with pytest.raises(ValueError, match="known backends"):
        lk.paged_kv_write(*args)


def test_explicit_backend_that_cannot_serve_raises():
    if torch.cuda.is_available():
        pytest.skip("needs CPU-only machine")
    args, _ = _backends.example("paged_kv_write", torch.device("cpu"))
    with pytest.raises(lk.BackendUnavailableError, match="CUDA tensors"):
        lk.paged_kv_write(*args, backend="cuda")
    with pytest.raises(ValueError, match="known backends: auto, cuda, triton, torch"):
        lk.paged_kv_write(*args, backend="cudnn")


def _good(device="cpu"):
    k = torch.randn(4, 2, 64, device=device)
    return dict(k=k, v=torch.randn_like(k), k_cache=torch.zeros(3, 8, 2, 64, device=device),
                v_cache=torch.zeros(3, 8, 2, 64, device=device),
                slot_mapping=torch.tensor([0, 1, 9, -1], device=device))


def _call(**over):
    a = {**_good(), **over}
    scales = {n: a.pop(n) for n in ("k_scale", "v_scale") if n in a}
    lk.paged_kv_write(a["k"], a["v"], a["k_cache"], a["v_cache"], a["slot_mapping"], backend="torch", **scales)


@pytest.mark.parametrize(
    "over,exc,match",
    [
        (dict(k=torch.randn(4, 64)), ValueError, r"k must have 3 dimensions, got shape \(4, 64\)"),
        (dict(k=torch.randint(0, 3, (4, 2, 64))), TypeError, "k must have dtype in"),
        (dict(v=torch.randn(4, 2, 64, dtype=torch.float64)), TypeError, "v must have the same dtype as k"),
        (dict(v=torch.randn(5, 2, 64)), ValueError, r"v must have shape \(4, 2, 64\)"),
        (dict(k=torch.randn(4, 2, 128)[..., ::2]), ValueError, "k must be contiguous in its last dimension"),
        (dict(k_cache=torch.zeros(3, 8, 4, 64)), ValueError, r"k_cache must have shape \(\*, \*, 2, 64\)"),
        (dict(k_cache=torch.zeros(3, 8, 2, 64, dtype=torch.float16)), TypeError, "k_cache must have dtype in"),
        (dict(v_cache=torch.zeros(3, 4, 2, 64)), ValueError, "v_cache must have shape"),
        (dict(slot_mapping=torch.tensor([0, 1, 2, 3], dtype=torch.int32)), TypeError, "slot_mapping must have dtype"),
        (dict(slot_mapping=torch.tensor([0, 1, 2])), ValueError, r"slot_mapping must have shape \(4,\)"),
        (dict(slot_mapping=[0, 1, 2, 3]), TypeError, "slot_mapping must be a torch.Tensor, got list"),
        (dict(slot_mapping=torch.tensor([0, 1, 24, 3])), ValueError, r"slot_mapping\[2\] = 24 is out of range"),
        (dict(k_scale=torch.ones(())), ValueError, "apply only to float8_e4m3fn caches"),
        (dict(k_cache=torch.zeros(3, 8, 2, 64).to(torch.float8_e4m3fn),
              v_cache=torch.zeros(3, 8, 2, 64).to(torch.float8_e4m3fn)), ValueError, "k_scale and v_scale are required"),
        (dict(k_cache=torch.zeros(3, 8, 2, 64).to(torch.float8_e4m3fn),
              v_cache=torch.zeros(3, 8, 2, 64).to(torch.float8_e4m3fn),
              k_scale=torch.ones(3), v_scale=torch.ones(3)), ValueError, r"k_scale must hold one value .* \(2,\)"),
    ],
)
def test_bad_input(over, exc, match):
    with pytest.raises(exc, match=match):
        _call(**over)


def test_debug_mode_checks_slots_on_every_backend(monkeypatch):
    monkeypatch.setenv("LEPTON_KERNELS_DEBUG", "1")
    a = _good()
    with pytest.raises(ValueError, match=r"slot_mapping\[0\] = 100 is out of range .* \(max 23\)"):
        lk.paged_kv_write(a["k"], a["v"], a["k_cache"], a["v_cache"], torch.tensor([100, 0, 1, 2]), backend="torch")


@pytest.mark.gpu
def test_device_mismatch():
    a = _good("cuda")
    with pytest.raises(ValueError, match="v must be on cuda"):
        lk.paged_kv_write(a["k"], a["v"].cpu(), a["k_cache"], a["v_cache"], a["slot_mapping"])


def _compiled_write(k, v, kc, vc, slots):
    lk.paged_kv_write(k, v, kc, vc, slots)
    return kc.sum()


def test_torch_compile_fullgraph_cpu():
    args, _ = _backends.example("paged_kv_write", torch.device("cpu"))
    eager = [a.clone() for a in args]
    _compiled_write(*eager)
    compiled = torch.compile(_compiled_write, fullgraph=True, backend="eager")
    compiled(*args)
    assert torch.equal(args[2], eager[2]) and torch.equal(args[3], eager[3])


def test_fake_tensor_trace():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        args, _ = _backends.example("paged_kv_write", torch.device("cpu"))
        lk.paged_kv_write(*args, backend="torch")
        if interpreting():
            lk.paged_kv_write(*args, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_torch_compile_and_cuda_graph_gpu(backend):
    T, H, D, nb, bs = 64, 8, 128, 16, 16
    k, v, kc, vc, slots = _make(T, H, D, nb, bs, torch.bfloat16, "cuda", pad_fraction=0.0)
    kc.zero_(), vc.zero_()

    def step(k, v, kc, vc, slots):
        lk.paged_kv_write(k, v, kc, vc, slots, backend=backend)

    compiled = torch.compile(step, fullgraph=True)
    compiled(k, v, kc, vc, slots)
    torch.cuda.synchronize()
    want_k, want_v = _expected(k, v, torch.zeros_like(kc), torch.zeros_like(vc), slots)
    assert _same(kc, want_k) and _same(vc, want_v)

    # Capture once, replay with new data written into the same input buffers.
    graph = torch.cuda.CUDAGraph()
    step(k, v, kc, vc, slots)  # warm-up outside capture
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        step(k, v, kc, vc, slots)
    k.copy_(torch.randn_like(k))
    v.copy_(torch.randn_like(v))
    slots.copy_(torch.randperm(nb * bs, device="cuda")[:T])
    kc.zero_(), vc.zero_()
    graph.replay()
    torch.cuda.synchronize()
    want_k, want_v = _expected(k, v, torch.zeros_like(kc), torch.zeros_like(vc), slots)
    assert _same(kc, want_k) and _same(vc, want_v)

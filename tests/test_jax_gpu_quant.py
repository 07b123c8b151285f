"""lepton_kernels.jax quant_matmul on the Mosaic GPU kernel (backend="gpu").

* On a Hopper GPU (``-m gpu``): every scheme against the float32 matmul of the dequantized
  weight (w8a8/fp8: of the per-token quantized activations, the scheme's own rule), by the
  mean relative error (1e-3 for float16 activations, 4e-3 for bfloat16: the weight tile is
  rounded to 16 bits after its group scale, and the output to x's dtype), over decode and
  prefill M, odd N/K, bias, zero points and every group size.
* Anywhere: why calls fall back, config checks, and, where jax has the Mosaic GPU bindings,
  the kernel's barrier protocol and arithmetic in Pallas' Mosaic GPU interpreter (tiny cases;
  wgmma becomes a dot there) and its lowering for CUDA (``jax.export``, no GPU needed).
"""
from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from jax import export  # noqa: E402

import lepton_kernels.jax as lj  # noqa: E402
from lepton_kernels.jax.gpu import _mosaic  # noqa: E402
from lepton_kernels.jax.gpu import quant_matmul as gq  # noqa: E402
from lepton_kernels.jax.ops import quant_matmul as qm  # noqa: E402

S = jax.ShapeDtypeStruct
Config = gq.GpuQuantConfig

# scheme, group_size, symmetric
SCHEMES = [
    ("w8a16", -1, True),
    ("w8a8", -1, True),
    ("fp8", -1, True),
    ("w4a16", 32, True),
    ("w4a16", 64, False),
    ("w4a16", 128, True),
    ("w4a16", 128, False),
    ("w4a16", -1, True),
    ("w4a16", -1, False),
]


def scheme_id(s):
    scheme, group_size, symmetric = s
    return f"{scheme}-g{group_size}-{'sym' if symmetric else 'asym'}"


def require_hopper():
    reason = _mosaic.device_reason()
    if reason is not None:
        pytest.skip(reason)


def normal(seed, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def make_case(scheme, group_size, symmetric, m, n, k, dtype, with_bias, seed=0):
    qw = lj.quantize_weight(normal(seed, (n, k)), scheme, group_size=group_size, symmetric=symmetric)
    x = normal(seed + 1, (m, k), dtype)
    bias = normal(seed + 2, (n,), dtype) if with_bias else None
    return x, qw, bias


def float32_reference(x, qw, bias):
    """The scheme's rule in float32 throughout: dequantized weights (and, for w8a8/fp8, the
    per-token quantized activations), float32 accumulation and bias, no final rounding. On the
    CPU: on a GPU, XLA may rewrite the fp8 reference into a cuBLASLt fp8 matmul of its own."""
    cpu = jax.devices("cpu")[0]
    x, qw, bias = jax.device_put((x, qw, bias), cpu)
    with jax.default_device(cpu):
        return lj.quant_matmul_reference(x.astype(jnp.float32), qw, None if bias is None else bias.astype(jnp.float32))


def relative_error(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert not np.isnan(out).any(), "NaN in the output"
    return float(np.abs(out - ref).mean() / np.abs(ref).mean())


def tolerance(dtype):
    return {jnp.dtype(jnp.float16): 1e-3, jnp.dtype(jnp.bfloat16): 4e-3, jnp.dtype(jnp.float32): 1e-3}[jnp.dtype(dtype)]


# --------------------------------------------------------------------------------------------
# On a Hopper GPU
# --------------------------------------------------------------------------------------------

# N, K: multiples of the 128-channel tile that are not powers of two; K below, at and above
# one packed int4 tile (1024 rows) and, for the 8-bit schemes, not a multiple of 128.
SHAPES_INT4 = [(384, 1280), (1152, 3072), (4096, 4096)]
SHAPES_8BIT = [(384, 1000), (1152, 3072), (4096, 4096)]
GPU_MS = [1, 5, 16, 64, 200]


def gpu_cases():
    for s in SCHEMES:
        for i, m in enumerate(GPU_MS):
            shapes = SHAPES_INT4 if s[0] == "w4a16" else SHAPES_8BIT
            if s[1] == -1 and s[0] == "w4a16" and i == 0:
                shapes = [(384, 1000)]  # per-channel int4: K not a multiple of a packed tile
            n, k = shapes[i % len(shapes)]
            dtype, with_bias = (jnp.bfloat16, jnp.float16)[i % 2], i % 3 != 1
            name = f"{scheme_id(s)}-m{m}-n{n}-k{k}-{jnp.dtype(dtype).name}{'-bias' if with_bias else ''}"
            yield pytest.param(s, m, n, k, dtype, with_bias, id=name)


@pytest.mark.gpu
@pytest.mark.parametrize("s,m,n,k,dtype,with_bias", list(gpu_cases()))
def test_quant_matmul_gpu_matches_float32(s, m, n, k, dtype, with_bias):
    require_hopper()
    x, qw, bias = make_case(*s, m, n, k, dtype, with_bias)
    out = lj.quant_matmul(x, qw, bias, backend="gpu")
    assert out.shape == (m, n) and out.dtype == dtype
    err = relative_error(out, float32_reference(x, qw, bias))
    assert err < tolerance(dtype), f"mean relative error {err:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ["w8a8", "fp8"])
def test_quant_matmul_gpu_float32_activations(scheme):
    """w8a8/fp8 quantize x anyway: float32 x is served, with a float32 output."""
    require_hopper()
    x, qw, bias = make_case(scheme, -1, True, 24, 512, 768, jnp.float32, True)
    out = lj.quant_matmul(x, qw, bias, backend="gpu")
    assert out.dtype == jnp.float32
    assert relative_error(out, float32_reference(x, qw, bias)) < 1e-5


GPU_CONFIG_CASES = [
    # scheme, group, symmetric, M, N, K, config: the paths default configs may not take
    ("w8a16", -1, True, 200, 512, 1024, Config(128, 256, 64, 4, 1)),  # 256 channels, 2 M tiles
    ("w8a8", -1, True, 40, 256, 2048, Config(40, 128, 128, 3, 4)),  # odd block_m, split K
    ("w4a16", 64, False, 16, 256, 2048, Config(16, 128, 512, 2, 1)),  # 64 packed rows per step
    ("w4a16", 32, True, 64, 256, 2048, Config(64, 128, 128, 3, 2)),  # 16 packed rows per step
    ("w4a16", -1, False, 130, 384, 1024, Config(136, 128, 256, 2, 1)),  # per channel, 136 tokens
    ("fp8", -1, True, 256, 256, 512, Config(256, 128, 64, 2, 1)),  # 256 tokens (wgmma N max)
]


def config_case_id(c):
    config = c[6]
    return (f"{c[0]}-g{c[1]}-m{c[3]}-bm{config.block_m}-bn{config.block_n}-bk{config.block_k}"
            f"-s{config.num_stages}-split{config.split_k}")


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CONFIG_CASES, ids=config_case_id)
def test_quant_matmul_gpu_configs(case):
    require_hopper()
    scheme, group_size, symmetric, m, n, k, config = case
    x, qw, bias = make_case(scheme, group_size, symmetric, m, n, k, jnp.bfloat16, True)
    out = jax.jit(lambda x, qw, b: gq.quant_matmul_gpu(x, qw, b, config=config))(x, qw, bias)
    assert relative_error(out, float32_reference(x, qw, bias)) < 4e-3


@pytest.mark.gpu
def test_quant_matmul_gpu_batched_and_act_order():
    """x [..., K] and GPTQ act-order (x columns gathered before the kernel)."""
    require_hopper()
    x, qw, bias = make_case("w4a16", 128, False, 1, 512, 1024, jnp.float16, True)
    qw = dataclasses.replace(qw, perm=jnp.asarray(np.random.default_rng(0).permutation(1024).astype(np.int32)))
    x = normal(5, (2, 3, 1024), jnp.float16)
    out = lj.quant_matmul(x, qw, bias, backend="gpu")
    assert out.shape == (2, 3, 512)
    assert relative_error(out, float32_reference(x, qw, bias)) < 1e-3


@pytest.mark.gpu
def test_auto_uses_the_gpu_kernel_and_logs_fallbacks(caplog):
    require_hopper()
    if jax.default_backend() != "gpu":
        pytest.skip("jax's default backend is not the GPU")
    x, qw, bias = make_case("w8a16", -1, True, 4, 256, 512, jnp.bfloat16, True)
    np.testing.assert_array_equal(np.asarray(lj.quant_matmul(x, qw, bias)),
                                  np.asarray(lj.quant_matmul(x, qw, bias, backend="gpu")))
    with caplog.at_level(logging.WARNING, logger="lepton_kernels"):
        x32 = x.astype(jnp.float32)
        out = lj.quant_matmul(x32, qw, bias.astype(jnp.float32))  # not served: runs on the reference
    assert "float16/bfloat16" in caplog.text
    np.testing.assert_array_equal(np.asarray(out), np.asarray(
        lj.quant_matmul(x32, qw, bias.astype(jnp.float32), backend="reference")))


# --------------------------------------------------------------------------------------------
# Anywhere: fallbacks and configs
# --------------------------------------------------------------------------------------------

def _qw(scheme="w8a16", n=256, k=256, group_size=-1, symmetric=True):
    return lj.quantize_weight(jnp.ones((n, k), jnp.bfloat16), scheme, group_size=group_size, symmetric=symmetric)


@pytest.mark.parametrize("scheme,x_dtype,n,words", [
    ("w4a16", jnp.float32, 256, "float16/bfloat16 activations for w4a16"),
    ("w8a16", jnp.float32, 256, "float16/bfloat16 activations for w8a16"),
    ("w8a16", jnp.bfloat16, 200, "multiple of 128, got 200"),
    ("fp8", jnp.float16, 320, "multiple of 128, got 320"),
])
def test_gpu_fallback_reasons(scheme, x_dtype, n, words):
    qw = _qw(scheme, n=n, group_size=128 if scheme == "w4a16" else -1)
    assert words in gq.unavailable_reason(S((3, 256), x_dtype), qw, check_device=False)


@pytest.mark.parametrize("scheme,x_dtype", [("w8a8", jnp.float32), ("fp8", jnp.float32), ("w4a16", jnp.float16),
                                            ("w8a16", jnp.bfloat16)])
def test_gpu_serves(scheme, x_dtype):
    reason = gq.unavailable_reason(S((3, 256), x_dtype), _qw(scheme, group_size=64 if scheme == "w4a16" else -1),
                                   check_device=False)
    assert reason is None or reason == _mosaic.bindings_reason()


def test_explicit_gpu_backend_names_the_reason():
    x = jnp.zeros((2, 256), jnp.float32)
    with pytest.raises(lj.BackendUnavailableError, match="backend 'gpu' cannot serve.*float16/bfloat16"):
        lj.quant_matmul(x, _qw("w4a16", group_size=128), backend="gpu")
    if jax.default_backend() == "cpu":  # a served call still needs a Hopper GPU
        with pytest.raises(lj.BackendUnavailableError, match="backend 'gpu' cannot serve"):
            lj.quant_matmul(x.astype(jnp.bfloat16), _qw("w8a16"), backend="gpu")


def test_auto_on_a_gpu_host_falls_back_with_the_reason(monkeypatch, caplog):
    """Auto's choice on a GPU host, for a call the kernel does not serve: the reference, logged."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    x, qw, bias = make_case("w8a16", -1, True, 3, 200, 256, jnp.bfloat16, True)
    with caplog.at_level(logging.WARNING, logger="lepton_kernels"):
        out = lj.quant_matmul(x, qw, bias)
    assert "multiple of 128, got 200" in caplog.text
    np.testing.assert_array_equal(np.asarray(out), np.asarray(lj.quant_matmul(x, qw, bias, backend="reference")))


@pytest.mark.parametrize("kwargs,words", [
    (dict(block_m=12), "block_m must be a multiple of 8"),
    (dict(block_m=264), "block_m must be a multiple of 8"),
    (dict(block_n=192), "block_n must be 128 or 256"),
    (dict(block_k=96), "block_k must be a positive multiple of 64"),
    (dict(num_stages=1), "num_stages must be at least 2"),
    (dict(split_k=0), "split_k must be at least 1"),
])
def test_config_validation(kwargs, words):
    with pytest.raises(ValueError, match=words):
        Config(**kwargs)


@pytest.mark.parametrize("scheme,group_size,symmetric", SCHEMES, ids=[scheme_id(s) for s in SCHEMES])
@pytest.mark.parametrize("n,k", [(4096, 4096), (14336, 4096), (4096, 14336), (384, 1024)])
def test_default_configs_fit(scheme, group_size, symmetric, n, k):
    """Every default config fits shared memory, divides the stored K, and gives each split
    at least one pipeline's worth of steps; decode fills the SMs."""
    kp = -(-k // 1024) * 1024 if scheme == "w4a16" else -(-k // 128) * 128
    for m in (1, 5, 16, 64, 100, 256, 4096):
        c = gq.default_config(scheme, m, n, kp, group_size=group_size, symmetric=symmetric, sms=132)
        assert gq.smem_bytes(c, scheme, group_size=group_size, symmetric=symmetric) <= gq.SMEM_BYTES, c
        steps = kp // c.block_k
        assert kp % c.block_k == 0 and steps % c.split_k == 0 and c.num_stages <= max(2, steps // c.split_k), c
        assert n % c.block_n == 0 and c.block_m >= min(m, 8), c
        if scheme == "w4a16":
            rows = c.block_k // 8
            assert 128 % rows == 0 and rows % 16 == 0 and (group_size == -1 or group_size % rows == 0), c
        if m <= 16 and n >= 4096:
            blocks = n // c.block_n * c.split_k
            assert blocks / (-(-blocks // 132) * 132) >= 0.75, c


def test_wrapper_rejects_bad_configs():
    qw = _qw("w4a16", n=256, k=1024, group_size=32)
    x = jnp.zeros((4, 1024), jnp.bfloat16)
    with pytest.raises(ValueError, match="block_k/8 .* group size 32"):
        gq.quant_matmul_gpu(x, qw, config=Config(8, 128, 512, 2, 1))
    with pytest.raises(ValueError, match="N=384 must be a multiple of block_n=256"):
        gq.quant_matmul_gpu(x, _qw("w8a16", n=384, k=1024), config=Config(8, 256, 128, 2, 1))
    with pytest.raises(ValueError, match="must divide the stored K"):
        gq.quant_matmul_gpu(x, _qw("w8a16", n=256, k=1024), config=Config(8, 128, 128, 2, 3))
    with pytest.raises(ValueError, match="bytes of shared memory"):
        gq.quant_matmul_gpu(x, _qw("w8a16", n=256, k=1024), config=Config(256, 256, 256, 8, 1))


# --------------------------------------------------------------------------------------------
# Anywhere with the Mosaic GPU bindings: interpreter and CUDA lowering
# --------------------------------------------------------------------------------------------

INTERPRET_CASES = [
    # scheme, group, symmetric, M, N, K, x dtype, bias, config (one or two blocks each: the
    # interpreter's cost is mostly per block)
    # K padded (300 -> 384), 6 steps through 2 slots (refills, drain), M padded (5 -> 8)
    ("w8a16", -1, True, 5, 128, 300, jnp.bfloat16, True, Config(8, 128, 64, 2, 1)),
    # split K: float32 partials summed after the kernel, bias after the sum; float16 via bfloat16
    ("w8a16", -1, True, 3, 128, 256, jnp.float16, True, Config(8, 128, 128, 2, 2)),
    # float32 x, per-token scales
    ("w8a8", -1, True, 3, 128, 256, jnp.float32, True, Config(8, 128, 64, 2, 1)),
    # two M tiles (x rows, per-token scales and output rows offset), 256 channels per block
    ("fp8", -1, True, 20, 256, 128, jnp.bfloat16, False, Config(16, 256, 128, 2, 1)),
    # a group row per plane and step (32 packed rows = one group of 32), zero points, 4 steps
    ("w4a16", 32, False, 3, 128, 1024, jnp.bfloat16, True, Config(8, 128, 256, 2, 1)),
    # per channel with zero points, K padded (1000 -> 1024), float16, 64 packed rows per step
    ("w4a16", -1, False, 9, 128, 1000, jnp.float16, True, Config(16, 128, 512, 2, 1)),
    # symmetric groups of 128
    ("w4a16", 128, True, 2, 128, 1024, jnp.bfloat16, False, Config(8, 128, 512, 2, 1)),
]


def _interpret_params():
    params = _mosaic.interpret_params()
    if params is None or jax.default_backend() != "cpu":
        pytest.skip("needs a CPU jax with the Mosaic GPU bindings and interpreter")
    return params


@pytest.mark.parametrize("case", INTERPRET_CASES,
                         ids=lambda c: f"{scheme_id(c[:3])}-m{c[3]}-n{c[4]}-k{c[5]}-{jnp.dtype(c[6]).name}")
def test_quant_matmul_gpu_interpreted(case):
    """Barrier protocol, copies, dequantization and epilogue in Pallas' Mosaic GPU interpreter
    (uninitialized memory reads as NaN; wgmma becomes a dot)."""
    params = _interpret_params()
    scheme, group_size, symmetric, m, n, k, dtype, with_bias, config = case
    x, qw, bias = make_case(scheme, group_size, symmetric, m, n, k, dtype, with_bias)
    out = gq.quant_matmul_gpu(x, qw, bias, config=config, interpret=params)
    assert out.shape == (m, n) and out.dtype == dtype
    err = relative_error(out, float32_reference(x, qw, bias))
    assert err < tolerance(dtype), f"mean relative error {err:.3g}"


def _lowers(f, *args) -> bool:
    return "mosaic_gpu" in export.export(jax.jit(f), platforms=["cuda"])(*args).mlir_module()


LOWERING_SCHEMES = [("w8a16", -1, True), ("w8a8", -1, True), ("fp8", -1, True), ("w4a16", 32, True),
                    ("w4a16", -1, False)]  # other w4a16 variants lower in the tests below


@pytest.mark.parametrize("scheme,group_size,symmetric", LOWERING_SCHEMES,
                         ids=[scheme_id(s) for s in LOWERING_SCHEMES])
def test_quant_matmul_gpu_lowers_for_cuda(scheme, group_size, symmetric):
    """Pallas' Mosaic GPU lowering (layouts, wgmma shapes, copy sizes) of the default config
    at a decode shape (K split: float32 partials)."""
    if _mosaic.bindings_reason() is not None:
        pytest.skip(_mosaic.bindings_reason())
    dtype = jnp.float32 if scheme in ("w8a8", "fp8") else jnp.bfloat16
    qw = _qw(scheme, n=4096, k=4096, group_size=group_size, symmetric=symmetric)
    assert _lowers(lambda x, qw, b: gq.quant_matmul_gpu(x, qw, b), S((16, 4096), dtype), qw, S((4096,), dtype))


@pytest.mark.parametrize("scheme,group_size,symmetric,m,n,k", [
    ("w4a16", 128, False, 1, 14336, 4096),  # decode without a split: bias and 16-bit output in the kernel
    ("w8a8", -1, True, 2048, 4096, 1024),  # prefill: 128 tokens x 256 channels per block
])
def test_quant_matmul_gpu_default_paths_lower_for_cuda(scheme, group_size, symmetric, m, n, k):
    if _mosaic.bindings_reason() is not None:
        pytest.skip(_mosaic.bindings_reason())
    qw = _qw(scheme, n=n, k=k, group_size=group_size, symmetric=symmetric)
    assert gq.default_config(scheme, m, n, k, group_size=group_size, symmetric=symmetric, sms=132).split_k == 1
    assert _lowers(lambda x, qw, b: gq.quant_matmul_gpu(x, qw, b), S((m, k), jnp.bfloat16), qw,
                   S((n,), jnp.bfloat16))


@pytest.mark.parametrize("case", [GPU_CONFIG_CASES[i] for i in (0, 2, 3, 5)], ids=config_case_id)
def test_quant_matmul_gpu_configs_lower_for_cuda(case):
    if _mosaic.bindings_reason() is not None:
        pytest.skip(_mosaic.bindings_reason())
    scheme, group_size, symmetric, m, n, k, config = case
    qw = _qw(scheme, n=n, k=k, group_size=group_size, symmetric=symmetric)
    f = lambda x, qw, b: gq.quant_matmul_gpu(x, qw, b, config=config)  # noqa: E731
    assert _lowers(f, S((m, k), jnp.float16), qw, S((n,), jnp.float16))


def test_quant_matmul_gpu_backend_lowers_for_cuda():
    """What backend="gpu" runs (act-order gather, ``[..., K]`` input) lowers for CUDA; the
    public function itself refuses "gpu" without a Hopper device."""
    if _mosaic.bindings_reason() is not None:
        pytest.skip(_mosaic.bindings_reason())
    qw = dataclasses.replace(_qw("w4a16", n=512, k=1024, group_size=128, symmetric=False),
                             perm=jnp.arange(1024, dtype=jnp.int32)[::-1])
    assert _lowers(lambda x, qw: qm._run(x, qw, None, impl="gpu", block_sizes=None), S((2, 3, 1024), jnp.bfloat16), qw)

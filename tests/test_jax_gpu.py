"""lepton_kernels.jax Mosaic GPU kernels (backend="gpu").

* On a Hopper GPU (``-m gpu``): the kernel against the jnp reference in float32, with
  FlashAttention's tolerance rule (error at most 2x that of attention computed in the input
  dtype, + eps), on odd lengths, GQA, causal bottom-right alignment and lse.
* Anywhere: why a call falls back, and, where jax has the Mosaic GPU bindings, that every
  default configuration lowers for CUDA (``jax.export``, no GPU needed).
"""
from __future__ import annotations

import logging

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from jax import export  # noqa: E402

import lepton_kernels.jax as lj  # noqa: E402
from lepton_kernels.jax import _dispatch  # noqa: E402
from lepton_kernels.jax.gpu import _mosaic  # noqa: E402
from lepton_kernels.jax.gpu import flash_attention as gfa  # noqa: E402

S = jax.ShapeDtypeStruct


def require_hopper(masked: bool = True):
    reason = _mosaic.device_reason() or (_mosaic.masked_kernel_reason() if masked else None)
    if reason is not None:
        pytest.skip(reason)


def normal(seed, shape, dtype):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def attention_lowp(q, k, v, *, causal, scale):
    """Attention with every intermediate in the inputs' dtype (the baseline error of the rule)."""
    dtype = q.dtype
    sq, hq, sk, hkv = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    k, v = jnp.repeat(k, hq // hkv, axis=2), jnp.repeat(v, hq // hkv, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=dtype) * jnp.asarray(scale, dtype)
    if causal:
        s = jnp.where(jnp.arange(sk)[None, :] <= jnp.arange(sq)[:, None] + (sk - sq), s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v, preferred_element_type=dtype)


def max_err(a, b):
    return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


# --------------------------------------------------------------------------------------------
# On a Hopper GPU
# --------------------------------------------------------------------------------------------

GPU_CASES = [
    # B, Sq, Sk, Hq, Hkv, D, causal, dtype
    (1, 128, 128, 8, 2, 64, False, jnp.bfloat16),
    (2, 128, 128, 8, 2, 128, True, jnp.bfloat16),
    (2, 256, 256, 8, 2, 128, False, jnp.bfloat16),
    (1, 256, 256, 8, 2, 64, True, jnp.float16),
    (1, 1024, 1024, 8, 2, 128, True, jnp.bfloat16),
    (2, 1024, 1024, 8, 8, 64, False, jnp.bfloat16),
    (1, 1024, 1024, 8, 2, 64, True, jnp.bfloat16),
    # odd lengths: q padded to the tile, padded keys masked
    (1, 113, 113, 8, 2, 128, True, jnp.bfloat16),
    (2, 113, 113, 8, 2, 64, False, jnp.float16),
    # bottom-right alignment: Sq < Sk (chunked prefill), a decode row
    (1, 128, 1024, 8, 2, 128, True, jnp.bfloat16),
    (2, 100, 300, 8, 2, 64, True, jnp.bfloat16),
    (2, 1, 300, 8, 2, 128, False, jnp.bfloat16),
    # D = 256
    (1, 256, 300, 4, 2, 256, True, jnp.bfloat16),
    (2, 128, 128, 4, 1, 256, False, jnp.float16),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "-".join(map(str, c[:7])) + f"-{jnp.dtype(c[7]).name}")
def test_flash_attention_gpu_matches_reference(case):
    batch, sq, sk, hq, hkv, d, causal, dtype = case
    require_hopper(masked=causal or sk % gfa.DEFAULT_CONFIGS[d].block_kv != 0)
    q = normal(1, (batch, sq, hq, d), dtype)
    k, v = normal(2, (batch, sk, hkv, d), dtype), normal(3, (batch, sk, hkv, d), dtype)
    scale = d ** -0.5
    out, lse = lj.flash_attention(q, k, v, causal=causal, return_lse=True, backend="gpu")
    ref, ref_lse = lj.flash_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                      causal=causal, return_lse=True, backend="reference")
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == (batch, hq, sq)
    assert not bool(jnp.isnan(out).any()), "NaN in the output"
    err, base = max_err(out, ref), max_err(attention_lowp(q, k, v, causal=causal, scale=scale), ref)
    assert err <= 2 * base + 1e-5, f"max error {err:.3g} > 2 x {jnp.dtype(dtype).name} attention's {base:.3g}"
    # lse is f32 from the same f32 scores; approximate exp2/log leave ~1e-3
    assert max_err(lse, ref_lse) <= 1e-2, f"lse max error {max_err(lse, ref_lse):.3g}"


@pytest.mark.gpu
def test_flash_attention_gpu_without_lse_and_custom_scale():
    require_hopper(masked=False)
    q, k, v = (normal(i, (2, 256, 4, 128), jnp.bfloat16) for i in (4, 5, 6))
    out = lj.flash_attention(q, k, v, softmax_scale=0.3, backend="gpu")
    ref = lj.flash_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                             softmax_scale=0.3, backend="reference")
    base = max_err(attention_lowp(q, k, v, causal=False, scale=0.3), ref)
    assert max_err(out, ref) <= 2 * base + 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("config", [gfa.GpuFlashConfig(block_kv=64, num_stages=2),
                                    gfa.GpuFlashConfig(block_kv=64, num_stages=3)], ids=str)
def test_flash_attention_gpu_other_configs(config):
    """Tile sizes the benchmark tries: fewer KV blocks than stages for the first causal tiles."""
    require_hopper()
    q, k, v = (normal(i, (1, 384, 4, 128), jnp.bfloat16) for i in (7, 8, 9))
    for causal in (False, True):
        out = jax.jit(lambda q, k, v: gfa.flash_attention_gpu(q, k, v, scale=128 ** -0.5, causal=causal,
                                                              return_lse=False, config=config))(q, k, v)
        ref = lj.flash_attention_reference(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                           causal=causal)
        base = max_err(attention_lowp(q, k, v, causal=causal, scale=128 ** -0.5), ref)
        assert max_err(out, ref) <= 2 * base + 1e-5, f"causal={causal}"


@pytest.mark.gpu
def test_auto_uses_the_gpu_kernel_and_logs_fallbacks(caplog):
    require_hopper()
    if jax.default_backend() != "gpu":
        pytest.skip("jax's default backend is not the GPU")
    q, k, v = (normal(i, (1, 256, 4, 64), jnp.bfloat16) for i in (1, 2, 3))
    np.testing.assert_array_equal(np.asarray(lj.flash_attention(q, k, v, causal=True)),
                                  np.asarray(lj.flash_attention(q, k, v, causal=True, backend="gpu")))
    with caplog.at_level(logging.WARNING, logger="lepton_kernels"):
        out = lj.flash_attention(q, k, v, softcap=7.5)  # not served: runs on the reference
    assert "softcap" in caplog.text
    assert max_err(out, lj.flash_attention(q, k, v, softcap=7.5, backend="reference")) == 0.0


# --------------------------------------------------------------------------------------------
# Anywhere
# --------------------------------------------------------------------------------------------

def _reason(q_shape, k_shape, dtype=jnp.bfloat16, **options):
    args = dict(causal=False, window=(-1, -1), softcap=0.0, scale=0.1, kv_lens=None, varlen=False)
    args.update(options)
    return gfa.unavailable_reason(S(q_shape, dtype), S(k_shape, dtype), check_device=False, **args)


@pytest.mark.parametrize("q_shape,k_shape,dtype,options,words", [
    ((1, 64, 2, 128), (1, 64, 2, 128), jnp.float32, {}, "float16/bfloat16"),
    ((1, 64, 2, 96), (1, 64, 2, 96), jnp.bfloat16, {}, "head dims"),
    ((1, 64, 2, 128), (1, 32, 2, 128), jnp.bfloat16, dict(causal=True, window=(-1, 0)), "Sq (64) > Sk (32)"),
    ((1, 64, 2, 128), (1, 64, 2, 128), jnp.bfloat16, dict(window=(16, -1)), "sliding windows"),
    ((1, 64, 2, 128), (1, 64, 2, 128), jnp.bfloat16, dict(softcap=5.0), "softcap"),
    ((1, 64, 2, 128), (1, 64, 2, 128), jnp.bfloat16, dict(kv_lens=S((1,), jnp.int32)), "kv_lens"),
    ((64, 2, 128), (64, 2, 128), jnp.bfloat16, dict(varlen=True), "varlen"),
    ((1, 64, 2, 128), (1, 64, 2, 128), jnp.bfloat16, dict(scale=-1.0), "softmax_scale > 0"),
])
def test_gpu_fallback_reasons(q_shape, k_shape, dtype, options, words):
    assert words in _reason(q_shape, k_shape, dtype, **options)


def test_gpu_serves_causal_and_gqa_shapes():
    reason = _reason((2, 113, 8, 64), (2, 113, 2, 64), causal=True, window=(-1, 0))
    assert reason is None or reason == _mosaic.bindings_reason() or "CUDA runtime" in reason


def test_explicit_gpu_backend_names_the_reason():
    q = jnp.zeros((1, 8, 2, 64), jnp.float32)
    with pytest.raises(lj.BackendUnavailableError, match="backend 'gpu' cannot serve.*float16/bfloat16"):
        lj.flash_attention(q, q, q, backend="gpu")


def test_dispatch_gpu_rules(monkeypatch, caplog):
    assert _dispatch.select("op", "gpu", None, None) == "gpu"
    with pytest.raises(lj.BackendUnavailableError, match="because"):
        _dispatch.select("op", "gpu", None, lambda: "because")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert _dispatch.select("op", "auto", "tpu only", None) == "gpu"
    with caplog.at_level(logging.WARNING, logger="lepton_kernels"):
        assert _dispatch.select("op_gpu_logged", "auto", None, "no gpu kernel for this") == "reference"
    assert "no gpu kernel for this" in caplog.text
    assert _dispatch.select("op", "auto", None) == "reference"  # ops without a GPU kernel


@pytest.mark.parametrize("case", [
    # B, Sq, Sk, Hq, Hkv, D, causal, block_kv: the first consumer needs one KV block, the
    # second two (the first keeps releasing); odd lengths padded and masked, GQA
    (1, 128, 128, 2, 1, 64, True, 64),
    (1, 70, 100, 2, 1, 64, False, 64),
], ids=str)
def test_flash_attention_gpu_interpreted(case):
    """The kernel's barrier protocol and masking in Pallas' Mosaic GPU interpreter (a CPU host
    with the Mosaic GPU bindings); the wgmmas become dots there."""
    params = _mosaic.interpret_params()
    if params is None or jax.default_backend() != "cpu":
        pytest.skip("needs a CPU jax with the Mosaic GPU bindings and interpreter")
    batch, sq, sk, hq, hkv, d, causal, block_kv = case
    q = normal(1, (batch, sq, hq, d), jnp.float16)
    k, v = normal(2, (batch, sk, hkv, d), jnp.float16), normal(3, (batch, sk, hkv, d), jnp.float16)
    out, lse = gfa.flash_attention_gpu(q, k, v, scale=d ** -0.5, causal=causal, return_lse=True,
                                       config=gfa.GpuFlashConfig(block_kv=block_kv), interpret=params)
    ref, ref_lse = lj.flash_attention_reference(q.astype(jnp.float32), k.astype(jnp.float32),
                                                v.astype(jnp.float32), causal=causal, return_lse=True)
    assert max_err(out, ref) <= 2e-3 and max_err(lse, ref_lse) <= 1e-4


@pytest.mark.parametrize("head_dim", gfa.HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True])
def test_flash_attention_gpu_lowers_for_cuda(head_dim, causal):
    """Pallas' Mosaic GPU lowering (layouts, wgmma shapes, shared-memory budget) without a GPU."""
    if _mosaic.bindings_reason() is not None:
        pytest.skip(_mosaic.bindings_reason())
    args = [S((2, 300, 8, head_dim), jnp.bfloat16), S((2, 333, 2, head_dim), jnp.bfloat16),
            S((2, 333, 2, head_dim), jnp.bfloat16)]

    def f(q, k, v):
        return gfa.flash_attention_gpu(q, k, v, scale=0.1, causal=causal, return_lse=True)

    assert "mosaic_gpu" in export.export(jax.jit(f), platforms=["cuda"])(*args).mlir_module()

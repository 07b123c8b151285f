"""lepton_kernels.jax Mosaic GPU kernels (backend="gpu").

* On a Hopper GPU (``-m gpu``): the kernel against the jnp reference in float32, with
  FlashAttention's tolerance rule (error at most 2x that of attention computed in the input
  dtype, + eps), on odd lengths, GQA, causal bottom-right alignment, ``kv_lens``, sliding
  windows, softcap and lse.
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
from lepton_kernels.jax.ops import flash_attention as lj_ops  # noqa: E402

S = jax.ShapeDtypeStruct


def require_hopper(masked: bool = True):
    reason = _mosaic.device_reason() or (_mosaic.masked_kernel_reason() if masked else None)
    if reason is not None:
        pytest.skip(reason)


def normal(seed, shape, dtype):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def attention_lowp(q, k, v, *, causal, scale, window=(-1, -1), softcap=0.0, kv_lens=None):
    """Attention with every intermediate in the inputs' dtype (the baseline error of the rule)."""
    dtype = q.dtype
    batch, sq, hq, sk, hkv = q.shape[0], q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    k, v = jnp.repeat(k, hq // hkv, axis=2), jnp.repeat(v, hq // hkv, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=dtype) * jnp.asarray(scale, dtype)
    if softcap:
        s = jnp.asarray(softcap, dtype) * jnp.tanh(s / jnp.asarray(softcap, dtype))
    lens = jnp.full((batch,), sk, jnp.int32) if kv_lens is None else kv_lens
    v = jnp.where((jnp.arange(sk)[None, :] < lens[:, None])[:, :, None, None], v, jnp.zeros((), dtype))
    left, right = window
    mask = lj_ops.visible(jnp.arange(sq)[None, :, None], jnp.arange(sk)[None, None, :], sq, lens[:, None, None],
                          causal=causal, left=left, right=0 if causal else right)[:, None]
    p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
    p = jnp.where(mask.any(axis=-1, keepdims=True), p, 0.0)  # rows that see no key: 0, as the reference
    return jnp.einsum("bhqk,bkhd->bqhd", p, v, preferred_element_type=dtype)


def poison_past(x, kv_lens):
    """NaN in the keys/values at or past each sequence's length: the kernel must ignore them."""
    if kv_lens is None:
        return x
    past = jnp.arange(x.shape[1])[None, :] >= kv_lens[:, None]
    return jnp.where(past[:, :, None, None], jnp.nan, x).astype(x.dtype)


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


MASKED_CASES = [
    # B, Sq, Sk, Hq, Hkv, D, causal, window, softcap, kv_lens
    # kv_lens: a zero length, lengths off the KV block grid, rows that see no key (causal)
    (3, 300, 300, 8, 2, 128, False, (-1, -1), 0.0, (173, 0, 300)),
    (3, 128, 500, 8, 2, 64, True, (-1, 0), 0.0, (500, 77, 0)),
    (2, 1, 300, 8, 2, 256, False, (-1, -1), 0.0, (1, 299)),
    (2, 256, 384, 4, 1, 256, True, (-1, 0), 0.0, (200, 383)),
    # causal with Sq > Sk: the first rows see no key
    (1, 300, 100, 4, 2, 128, True, (-1, 0), 0.0, None),
    # softcap
    (1, 256, 256, 8, 2, 128, True, (-1, 0), 30.0, None),
    (2, 113, 200, 4, 1, 64, False, (-1, -1), 30.0, None),
    (1, 128, 300, 4, 2, 256, False, (-1, -1), 30.0, (250,)),
    # sliding windows: causal (64, 0), two-sided (32, 32), left only (16, -1)
    (1, 1024, 1024, 8, 2, 64, True, (64, 0), 0.0, None),
    (1, 512, 700, 8, 2, 128, True, (64, 0), 0.0, None),
    (2, 300, 300, 8, 2, 64, False, (32, 32), 0.0, None),
    (1, 256, 384, 4, 2, 256, False, (32, 32), 0.0, None),
    (1, 256, 384, 4, 2, 256, False, (16, -1), 0.0, None),
    (2, 200, 200, 8, 2, 128, False, (16, -1), 0.0, None),
    # everything at once
    (2, 200, 330, 8, 2, 128, False, (32, 32), 30.0, (330, 100)),
    (2, 256, 256, 4, 1, 256, True, (64, 0), 30.0, (200, 0)),
    (2, 130, 260, 8, 2, 64, False, (16, -1), 30.0, (3, 260)),
]


def _masked_id(case):
    batch, sq, sk, hq, hkv, d, causal, window, softcap, kv_lens = case
    lens = "" if kv_lens is None else "-lens" + "_".join(map(str, kv_lens))
    mask = f"{'causal' if causal else 'full'}-w{window[0]}_{window[1]}-c{softcap:g}{lens}"
    return f"{batch}-{sq}-{sk}-{hq}-{hkv}-{d}-{mask}"


@pytest.mark.gpu
@pytest.mark.parametrize("case", MASKED_CASES, ids=_masked_id)
def test_flash_attention_gpu_masked_variants(case):
    batch, sq, sk, hq, hkv, d, causal, window, softcap, kv_lens = case
    require_hopper()
    dtype = jnp.bfloat16
    q = normal(11, (batch, sq, hq, d), dtype)
    k, v = normal(12, (batch, sk, hkv, d), dtype), normal(13, (batch, sk, hkv, d), dtype)
    lens = None if kv_lens is None else jnp.asarray(kv_lens, jnp.int32)
    k, v = poison_past(k, lens), poison_past(v, lens)
    options = dict(causal=causal, window=window, softcap=softcap, kv_lens=lens, return_lse=True)
    out, lse = lj.flash_attention(q, k, v, backend="gpu", **options)
    ref, ref_lse = lj.flash_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                      backend="reference", **options)
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == (batch, hq, sq)
    assert not bool(jnp.isnan(out).any()) and not bool(jnp.isnan(lse).any()), "NaN in the output"
    base = max_err(attention_lowp(q, k, v, causal=causal, scale=d ** -0.5, window=window, softcap=softcap,
                                  kv_lens=lens), ref)
    err = max_err(out, ref)
    assert err <= 2 * base + 1e-5, f"max error {err:.3g} > 2 x {jnp.dtype(dtype).name} attention's {base:.3g}"
    seen = jnp.isfinite(ref_lse)
    assert bool(jnp.all(seen == jnp.isfinite(lse))), "rows that see no key must get lse -inf (and only they)"
    assert bool(jnp.all(jnp.where(seen[..., None].transpose(0, 2, 1, 3), True, out == 0))), "unseen rows not 0"
    lse_err = float(jnp.max(jnp.where(seen, jnp.abs(lse - ref_lse), 0.0)))
    assert lse_err <= 1e-2, f"lse max error {lse_err:.3g}"


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
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    with caplog.at_level(logging.WARNING, logger="lepton_kernels"):
        out = lj.flash_attention(q32, k32, v32, softcap=7.5)  # float32 is not served: the reference
    assert "float16/bfloat16" in caplog.text
    assert max_err(out, lj.flash_attention(q32, k32, v32, softcap=7.5, backend="reference")) == 0.0


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
    ((64, 2, 128), (64, 2, 128), jnp.bfloat16, dict(varlen=True), "varlen"),
    ((1, 64, 2, 128), (1, 64, 2, 128), jnp.bfloat16, dict(scale=-1.0), "softmax_scale > 0"),
])
def test_gpu_fallback_reasons(q_shape, k_shape, dtype, options, words):
    assert words in _reason(q_shape, k_shape, dtype, **options)


@pytest.mark.parametrize("q_shape,k_shape,options", [
    ((2, 113, 8, 64), (2, 113, 2, 64), dict(causal=True, window=(-1, 0))),
    ((1, 64, 2, 128), (1, 32, 2, 128), dict(causal=True, window=(-1, 0))),  # Sq > Sk: rows see no key
    ((1, 64, 2, 128), (1, 64, 2, 128), dict(window=(16, -1))),
    ((1, 64, 2, 128), (1, 64, 2, 128), dict(window=(32, 32))),
    ((1, 64, 2, 128), (1, 64, 2, 128), dict(causal=True, window=(64, 0))),
    ((1, 64, 2, 128), (1, 64, 2, 128), dict(softcap=5.0)),
    ((1, 64, 2, 128), (1, 64, 2, 128), dict(kv_lens=S((1,), jnp.int32))),
], ids=str)
def test_gpu_serves_masked_variants(q_shape, k_shape, options):
    reason = _reason(q_shape, k_shape, **options)
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
    # B, Sq, Sk, Hq, Hkv, D, causal, block_kv, window, softcap, kv_lens: the first consumer needs
    # one KV block, the second two (the first keeps releasing); odd lengths padded and masked, GQA
    (1, 128, 128, 2, 1, 64, True, 64, (-1, 0), 0.0, None),
    (1, 70, 100, 2, 1, 64, False, 64, (-1, -1), 0.0, None),
    # kv_lens off the block grid and 0; causal rows that see no key; a consumer of padding rows
    (2, 60, 150, 1, 1, 64, True, 64, (-1, 0), 0.0, (100, 0)),
    # softcap and a two-sided window: blocks left of the window are released
    (1, 128, 160, 1, 1, 64, False, 64, (24, 16), 5.0, None),
], ids=str)
def test_flash_attention_gpu_interpreted(case):
    """The kernel's barrier protocol and masking in Pallas' Mosaic GPU interpreter (a CPU host
    with the Mosaic GPU bindings); the wgmmas become dots there."""
    params = _mosaic.interpret_params()
    if params is None or jax.default_backend() != "cpu":
        pytest.skip("needs a CPU jax with the Mosaic GPU bindings and interpreter")
    batch, sq, sk, hq, hkv, d, causal, block_kv, window, softcap, kv_lens = case
    q = normal(1, (batch, sq, hq, d), jnp.float16)
    k, v = normal(2, (batch, sk, hkv, d), jnp.float16), normal(3, (batch, sk, hkv, d), jnp.float16)
    lens = None if kv_lens is None else jnp.asarray(kv_lens, jnp.int32)
    k, v = poison_past(k, lens), poison_past(v, lens)
    out, lse = gfa.flash_attention_gpu(q, k, v, lens, scale=d ** -0.5, causal=causal, window=window,
                                       softcap=softcap, return_lse=True,
                                       config=gfa.GpuFlashConfig(block_kv=block_kv), interpret=params)
    ref, ref_lse = lj.flash_attention_reference(q.astype(jnp.float32), k.astype(jnp.float32),
                                                v.astype(jnp.float32), causal=causal, window=window,
                                                softcap=softcap, kv_lens=lens, return_lse=True)
    seen = jnp.isfinite(ref_lse)
    assert bool(jnp.all(seen == jnp.isfinite(lse))), "rows that see no key must get lse -inf (and only they)"
    assert max_err(out, ref) <= 2e-3
    assert float(jnp.max(jnp.where(seen, jnp.abs(lse - ref_lse), 0.0))) <= 1e-4


LOWERING_CASES = [(d, dict(causal=causal)) for d in gfa.HEAD_DIMS for causal in (False, True)] + [
    (64, dict(causal=True, kv_lens=True)),
    (128, dict(causal=False, softcap=30.0)),
    (256, dict(causal=True, window=(64, 0))),
    (128, dict(causal=False, window=(32, 32), kv_lens=True)),
    (256, dict(causal=False, window=(16, -1), softcap=30.0, kv_lens=True)),
]


@pytest.mark.parametrize("head_dim,variant", LOWERING_CASES,
                         ids=lambda x: "-".join(f"{k}={v}" for k, v in x.items()) if isinstance(x, dict) else str(x))
def test_flash_attention_gpu_lowers_for_cuda(head_dim, variant):
    """Pallas' Mosaic GPU lowering (layouts, wgmma shapes, shared-memory budget) without a GPU."""
    if _mosaic.bindings_reason() is not None:
        pytest.skip(_mosaic.bindings_reason())
    options = dict(variant)
    args = [S((2, 300, 8, head_dim), jnp.bfloat16), S((2, 333, 2, head_dim), jnp.bfloat16),
            S((2, 333, 2, head_dim), jnp.bfloat16)]
    if options.pop("kv_lens", False):
        args.append(S((2,), jnp.int32))

    def f(q, k, v, kv_lens=None):
        return gfa.flash_attention_gpu(q, k, v, kv_lens, scale=0.1, return_lse=True, **options)

    assert "mosaic_gpu" in export.export(jax.jit(f), platforms=["cuda"])(*args).mlir_module()

"""lepton_kernels.jax: jnp references against naive float64 NumPy oracles, argument checks and
backend dispatch. (The Pallas kernels are tested against these references in test_jax_kernels.py.)"""
from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402

import lepton_kernels.jax as lj  # noqa: E402
from lepton_kernels.jax import _dispatch  # noqa: E402

# --------------------------------------------------------------------------------------------
# Oracles: loops over queries, written from the documented semantics, in float64
# --------------------------------------------------------------------------------------------


def f64(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x).astype(jnp.float32), dtype=np.float64)


def np_visible_keys(i, sq, sk, causal, left, right):
    """Keys query i of a (sq queries, sk keys) sequence sees, bottom-right aligned."""
    diag = i + sk - sq
    hi = diag if causal else (diag + right if right >= 0 else sk - 1)
    lo = diag - left if left >= 0 else 0
    return [j for j in range(sk) if lo <= j <= hi]


def np_attend(q, k, v, keys, scale, softcap):
    """q [Hq, D] over k/v [Sk, Hkv, D] restricted to ``keys``: (out [Hq, D], lse [Hq])."""
    hq, d = q.shape
    group = hq // k.shape[1]
    out, lse = np.zeros((hq, d)), np.full(hq, -np.inf)
    if not keys:
        return out, lse
    for h in range(hq):
        s = k[keys, h // group] @ q[h] * scale
        if softcap:
            s = softcap * np.tanh(s / softcap)
        m = s.max()
        p = np.exp(s - m)
        out[h] = p @ v[keys, h // group] / p.sum()
        lse[h] = m + np.log(p.sum())
    return out, lse


def np_attention(q, k, v, *, causal=False, window=(-1, -1), softcap=0.0, scale=None, kv_lens=None):
    """Padded layout: q [B, Sq, Hq, D] -> (out [B, Sq, Hq, D], lse [B, Hq, Sq])."""
    q, k, v = f64(q), f64(k), f64(v)
    batch, sq, hq, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    left, right = window
    out, lse = np.zeros_like(q), np.full((batch, hq, sq), -np.inf)
    for b in range(batch):
        sk = k.shape[1] if kv_lens is None else int(np.clip(kv_lens[b], 0, k.shape[1]))
        for i in range(sq):
            keys = np_visible_keys(i, sq, sk, causal, left, right)
            out[b, i], lse[b, :, i] = np_attend(q[b, i], k[b], v[b], keys, scale, softcap)
    return out, lse


def np_varlen_attention(q, k, v, cu_q, cu_k, **kw):
    """Packed layout: each sequence on its own; rows outside cu_q[0]:cu_q[-1] stay 0 / -inf."""
    out = np.zeros(q.shape)
    lse = np.full((q.shape[1], q.shape[0]), -np.inf)
    for b in range(len(cu_q) - 1):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        if cu_q[b + 1] == cu_q[b]:
            continue
        o, l = np_attention(q[None, qs], k[None, ks], v[None, ks], **kw)
        out[qs], lse[:, qs] = o[0], l[0]
    return out, lse


def np_paged_attention(q, k_cache, v_cache, block_table, seq_lens, cu_q=None, *, causal=True, window=(-1, -1),
                       softcap=0.0, scale=None, k_scale=None, v_scale=None):
    """Gathers each sequence's keys token by token through the block table."""
    q = f64(q)
    num_tokens, hq, d = q.shape
    hkv, block_size = k_cache.shape[2], k_cache.shape[1]
    scale = d ** -0.5 if scale is None else scale
    cu_q = np.arange(num_tokens + 1) if cu_q is None else np.asarray(cu_q)
    kc, vc = f64(k_cache), f64(v_cache)
    if k_scale is not None:
        kc = kc * np.broadcast_to(f64(k_scale).reshape(-1), (hkv,))[:, None]
        vc = vc * np.broadcast_to(f64(v_scale).reshape(-1), (hkv,))[:, None]
    out, lse = np.zeros(q.shape), np.full((num_tokens, hq), -np.inf)
    left, right = window
    for b in range(len(seq_lens)):
        sk, q_len = int(seq_lens[b]), int(cu_q[b + 1] - cu_q[b])
        slots = [(int(block_table[b, j // block_size]), j % block_size) for j in range(sk)]
        keys = np.stack([kc[blk, off] for blk, off in slots]) if slots else np.zeros((0, hkv, d))
        values = np.stack([vc[blk, off] for blk, off in slots]) if slots else np.zeros((0, hkv, d))
        for t in range(q_len):
            visible = np_visible_keys(t, q_len, sk, causal, left, right)
            row = cu_q[b] + t
            out[row], lse[row] = np_attend(q[row], keys, values, visible, scale, softcap)
    return out, lse


def np_stored_scale(scale32: np.ndarray, dtype) -> np.ndarray:
    """The torch API's rule: floor at the dtype's smallest normal, then round up to the dtype."""
    dtype = np.dtype(dtype)
    scale32 = np.maximum(scale32.astype(np.float32), np.float32(ml_dtypes.finfo(dtype).tiny))
    stored = scale32.astype(dtype)
    if dtype != np.float32:
        bumped = (stored.view(np.int16) + 1).view(dtype)
        stored = np.where(stored.astype(np.float32) < scale32, bumped, stored)
    return stored.astype(np.float32)


def np_quantize_dequantize(w, scheme, group_size=-1, symmetric=True) -> np.ndarray:
    """The real weight [N, K] float32 the torch API's quantization rules give."""
    dtype = np.dtype(jnp.dtype(w.dtype))
    w32 = np.asarray(jnp.asarray(w).astype(jnp.float32))
    n, k = w32.shape
    if scheme == "w4a16":
        g = k if group_size == -1 else group_size
        wg = w32.reshape(n, k // g, g)
        if symmetric:
            s = np_stored_scale(np.abs(wg).max(-1) / np.float32(7), dtype)[..., None]
            u = np.clip(np.round(wg / s), -8, 7) + 8
            zero = np.float32(8)
        else:
            lo, hi = np.minimum(wg.min(-1), 0), np.maximum(wg.max(-1), 0)
            s = np_stored_scale((hi - lo) / np.float32(15), dtype)[..., None]
            zero = np.clip(np.round(-lo[..., None] / s), 0, 15)
            u = np.clip(np.round(wg / s) + zero, 0, 15)
        return ((u - zero) * s).reshape(n, k).astype(np.float32)
    amax = np.abs(w32).max(1, keepdims=True)
    if scheme == "fp8":
        s = np_stored_scale(amax / np.float32(448), np.float32)
        q = np.clip(w32 / s, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    else:
        s = np_stored_scale(amax / np.float32(127), dtype if scheme == "w8a16" else np.float32)
        q = np.clip(np.round(w32 / s), -127, 127)
    return (q * s).astype(np.float32)


def np_quant_matmul(x, w_real, scheme, bias=None) -> np.ndarray:
    """float64 x @ w_real.T, with w8a8/fp8 activations quantized per token (float32 rules)."""
    x32 = np.asarray(jnp.asarray(x).astype(jnp.float32)).reshape(-1, w_real.shape[1])
    if scheme in ("w8a8", "fp8"):
        qmax = 127 if scheme == "w8a8" else 448
        s = np.maximum(np.abs(x32).max(1, keepdims=True) / np.float32(qmax), np.finfo(np.float32).tiny)
        if scheme == "w8a8":
            xq = np.clip(np.round(x32 / s), -127, 127)
        else:
            xq = np.clip(x32 / s, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
        x32 = xq.astype(np.float64) * s
    out = x32.astype(np.float64) @ w_real.astype(np.float64).T
    if bias is not None:
        out = out + f64(bias)
    return out.reshape(*x.shape[:-1], w_real.shape[0])


def normal(seed, shape, dtype=jnp.float32):
    """Fresh standard-normal data (NumPy's generator: no per-shape compilation)."""
    x = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    return jnp.asarray(x.astype(np.dtype(jnp.dtype(dtype))))


TOL = {jnp.float32: 2e-5, jnp.bfloat16: 1.6e-2, jnp.float16: 2e-3}  # outputs are O(1)


def assert_close(actual, expected, atol, what=""):
    actual = f64(actual)
    assert not np.isnan(actual).any(), f"{what}: NaN in output"
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(np.isfinite(actual), finite, err_msg=f"{what}: -inf pattern differs")
    err = np.abs(actual[finite] - expected[finite]).max(initial=0.0)
    assert err <= atol, f"{what}: max error {err:.3g} > {atol:.3g}"


# --------------------------------------------------------------------------------------------
# import hygiene
# --------------------------------------------------------------------------------------------


def test_import_does_not_load_torch():
    code = "import sys, lepton_kernels.jax; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------------
# flash_attention reference
# --------------------------------------------------------------------------------------------

FLASH_CASES = [
    # B, Sq, Sk, Hq, Hkv, D, options
    (2, 1, 113, 4, 2, 32, dict()),
    (1, 113, 113, 4, 1, 64, dict(causal=True)),
    (2, 37, 113, 6, 2, 16, dict(causal=True)),  # bottom-right alignment
    (2, 113, 37, 2, 2, 16, dict(causal=True)),  # leading queries see nothing
    (1, 50, 70, 4, 2, 16, dict(window=(9, 4))),
    (1, 50, 70, 4, 4, 16, dict(causal=True, window=(7, -1), softcap=5.0, softmax_scale=0.3)),
    (3, 29, 41, 4, 2, 16, dict(causal=True, kv_lens=[41, 17, 0])),
    (2, 29, 41, 2, 1, 16, dict(window=(-1, 3), kv_lens=[5, 40])),
]


@pytest.mark.parametrize("case,dtype", [(c, jnp.float32) for c in FLASH_CASES]
                         + [(FLASH_CASES[i], jnp.bfloat16) for i in (1, 5, 6)],
                         ids=lambda c: f"{c[:6]}-{sorted(c[6])}" if isinstance(c, tuple) else jnp.dtype(c).name)
def test_flash_attention_reference_matches_numpy(case, dtype):
    batch, sq, sk, hq, hkv, d, options = case
    options = dict(options)
    q = normal(1, (batch, sq, hq, d), dtype)
    k, v = normal(2, (batch, sk, hkv, d), dtype), normal(3, (batch, sk, hkv, d), dtype)
    kv_lens = options.pop("kv_lens", None)
    if kv_lens is not None:  # padding keys hold NaN: they must not leak
        pad = np.arange(sk)[None, :, None, None] >= np.array(kv_lens)[:, None, None, None]
        k, v = jnp.where(pad, jnp.nan, k).astype(dtype), jnp.where(pad, jnp.nan, v).astype(dtype)
    out, lse = lj.flash_attention(q, k, v, kv_lens=None if kv_lens is None else jnp.array(kv_lens, jnp.int32),
                                  return_lse=True, backend="reference", **options)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (batch, hq, sq) and lse.dtype == jnp.float32
    np_options = dict(options, scale=options.pop("softmax_scale", None))
    expected, expected_lse = np_attention(q, k, v, kv_lens=kv_lens, **np_options)
    assert_close(out, expected, TOL[dtype], "out")
    assert_close(lse, expected_lse, 1e-4, "lse")


def test_flash_attention_reference_varlen():
    cu_q, cu_k = [0, 1, 1, 40, 45], [0, 7, 20, 20, 61]  # a decode row, an empty query set, an empty key set
    tq, tk = 47, 61  # two padding rows past cu_q[-1]
    q, k, v = normal(4, (tq, 4, 32)), normal(5, (tk, 2, 32)), normal(6, (tk, 2, 32))
    for options in (dict(causal=True), dict(window=(5, 2), softcap=3.0)):
        out, lse = lj.flash_attention(q, k, v, cu_seqlens_q=jnp.array(cu_q, jnp.int32),
                                      cu_seqlens_k=jnp.array(cu_k, jnp.int32), return_lse=True,
                                      backend="reference", **options)
        expected, expected_lse = np_varlen_attention(q, k, v, cu_q, cu_k, **options)
        assert lse.shape == (4, tq)
        assert_close(out, expected, 2e-5, f"out {options}")
        assert_close(lse, expected_lse, 1e-4, f"lse {options}")
        assert np.all(f64(out)[45:] == 0) and np.all(np.isneginf(f64(lse)[:, 45:]))


def test_flash_attention_works_under_jit():
    q, k, v = normal(1, (2, 9, 4, 16)), normal(2, (2, 12, 2, 16)), normal(3, (2, 12, 2, 16))
    lens = jnp.array([12, 5], jnp.int32)
    f = jax.jit(lambda q, k, v, lens: lj.flash_attention(q, k, v, causal=True, kv_lens=lens, backend="reference"))
    expected, _ = np_attention(q, k, v, causal=True, kv_lens=[12, 5])
    assert_close(f(q, k, v, lens), expected, 2e-5)


# --------------------------------------------------------------------------------------------
# paged_attention reference
# --------------------------------------------------------------------------------------------


def _paged_inputs(seed, seq_lens, num_blocks=24, block_size=8, hkv=2, d=32, cache_dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    max_blocks = max(1, -(-max(seq_lens) // block_size)) + 1
    block_table = rng.permutation(num_blocks)[: len(seq_lens) * max_blocks].reshape(len(seq_lens), max_blocks)
    k_cache = np.array(normal(seed, (num_blocks, block_size, hkv, d)))
    v_cache = np.array(normal(seed + 1, (num_blocks, block_size, hkv, d)))
    for b, length in enumerate(seq_lens):  # slots past a sequence's end in its last page: NaN
        if length % block_size:
            last = block_table[b, length // block_size]
            k_cache[last, length % block_size:] = v_cache[last, length % block_size:] = np.nan
    cast = lambda x: jnp.asarray(x).astype(cache_dtype)  # noqa: E731
    return cast(k_cache), cast(v_cache), jnp.array(block_table, jnp.int32), jnp.array(seq_lens, jnp.int32)


@pytest.mark.parametrize("options", [dict(), dict(softcap=4.0, softmax_scale=0.2), dict(window=(5, -1))])
def test_paged_attention_reference_decode(options):
    seq_lens = [1, 17, 0, 40]
    k_cache, v_cache, table, lens = _paged_inputs(0, seq_lens)
    q = normal(9, (4, 4, 32))
    out, lse = lj.paged_attention(q, k_cache, v_cache, table, lens, return_lse=True, backend="reference", **options)
    np_options = dict(options, scale=options.get("softmax_scale"))
    np_options.pop("softmax_scale", None)
    expected, expected_lse = np_paged_attention(q, k_cache, v_cache, np.asarray(table), seq_lens, **np_options)
    assert lse.shape == (4, 4)
    assert_close(out, expected, 2e-5, "out")
    assert_close(lse, expected_lse, 1e-4, "lse")


@pytest.mark.parametrize("causal", [True, False])
def test_paged_attention_reference_ragged_fp8(causal):
    seq_lens, cu_q = [30, 9, 5, 0], [0, 12, 13, 18, 18]  # prefill chunk, decode, whole prompt, empty
    hkv = 2
    k_cache, v_cache, table, lens = _paged_inputs(1, seq_lens, hkv=hkv, cache_dtype=jnp.float8_e4m3fn)
    k_scale, v_scale = jnp.array([0.5, 2.0], jnp.float32), jnp.array([1.5, 0.75], jnp.float32)
    q = normal(3, (20, 6, 32), jnp.bfloat16)  # 2 trailing padding rows
    out, lse = lj.paged_attention(q, k_cache, v_cache, table, lens, cu_seqlens_q=jnp.array(cu_q, jnp.int32),
                                  causal=causal, k_scale=k_scale, v_scale=v_scale, return_lse=True,
                                  backend="reference")
    expected, expected_lse = np_paged_attention(q, k_cache, v_cache, np.asarray(table), seq_lens, cu_q,
                                                causal=causal, k_scale=k_scale, v_scale=v_scale)
    assert out.dtype == jnp.bfloat16 and lse.shape == (6, 20)
    assert_close(out, expected, 3e-2, "out")  # bf16 output of values up to ~3 (v_scale 1.5)
    assert_close(lse, expected_lse.T, 1e-4, "lse")


# --------------------------------------------------------------------------------------------
# paged_kv_write
# --------------------------------------------------------------------------------------------


def test_paged_kv_write_skips_negative_slots():
    k, v = normal(1, (5, 2, 16)), normal(2, (5, 2, 16))
    k_cache, v_cache = normal(3, (4, 8, 2, 16)), normal(4, (4, 8, 2, 16))
    slots = np.array([3, -1, 17, 31, -5])
    new_k, new_v = lj.paged_kv_write(k, v, k_cache, v_cache, jnp.array(slots, jnp.int32))
    for new, old, x in ((new_k, k_cache, k), (new_v, v_cache, v)):
        expected = np.array(f64(old)).reshape(32, 2, 16)
        for t, slot in enumerate(slots):
            if slot >= 0:
                expected[slot] = f64(x)[t]
        np.testing.assert_array_equal(f64(new), expected.reshape(4, 8, 2, 16))


@pytest.mark.parametrize("per_head", [False, True])
def test_paged_kv_write_fp8_donated(per_head):
    k, v = normal(1, (6, 2, 16), jnp.bfloat16) * 30, normal(2, (6, 2, 16), jnp.bfloat16)
    k = k.at[0, 0, 0].set(100.0)  # 100 / 0.05 saturates to 448
    k_cache = jnp.zeros((3, 4, 2, 16), jnp.float8_e4m3fn)
    v_cache = jnp.zeros((3, 4, 2, 16), jnp.float8_e4m3fn)
    k_scale = jnp.array([0.05, 0.1] if per_head else [0.05], jnp.float32)
    v_scale = jnp.array([0.01, 0.02] if per_head else [0.01], jnp.float32)
    slots = jnp.array([0, 5, -1, 11, 2, 7], jnp.int32)
    step = jax.jit(lambda k, v, kc, vc, s: lj.paged_kv_write(k, v, kc, vc, s, k_scale=k_scale, v_scale=v_scale),
                   donate_argnums=(2, 3))
    new_k, new_v = step(k, v, k_cache, v_cache, slots)
    for new, x, scale in ((new_k, k, k_scale), (new_v, v, v_scale)):
        flat = np.asarray(new.astype(jnp.float32)).reshape(12, 2, 16)
        s = np.broadcast_to(np.asarray(scale), (2,))[:, None]
        for t, slot in enumerate(np.asarray(slots)):
            if slot < 0:
                continue
            want = np.clip(f64(x)[t].astype(np.float32) / s.astype(np.float32), -448, 448)
            np.testing.assert_array_equal(flat[slot], want.astype(ml_dtypes.float8_e4m3fn).astype(np.float32))
    assert np.abs(np.asarray(new_k.astype(jnp.float32))).max() == 448


# --------------------------------------------------------------------------------------------
# quantize_weight / quant_matmul reference
# --------------------------------------------------------------------------------------------

QUANT_CASES = [
    ("w4a16", 32, True), ("w4a16", 64, False), ("w4a16", 128, True), ("w4a16", -1, True), ("w4a16", -1, False),
    ("w8a16", -1, True), ("w8a8", -1, True), ("fp8", -1, True),
]


@pytest.mark.parametrize("scheme,group_size,symmetric,dtype",
                         [c + (jnp.float32,) for c in QUANT_CASES]
                         + [QUANT_CASES[i] + (dtype,) for i in (1, 3, 5) for dtype in (jnp.bfloat16, jnp.float16)])
def test_quantize_weight_follows_the_rules(scheme, group_size, symmetric, dtype):
    n, k = 40, 384
    w = normal(7, (n, k), dtype) * jnp.linspace(0.01, 3.0, n, dtype=jnp.float32)[:, None].astype(dtype)
    w = w.at[3].set(0)  # an all-zero row: no inf/NaN scale
    qw = lj.quantize_weight(w, scheme, group_size=group_size, symmetric=symmetric)
    assert qw.shape == (n, k) and qw.symmetric == symmetric
    np.testing.assert_array_equal(np.asarray(qw.dequantize(jnp.float32)),
                                  np_quantize_dequantize(w, scheme, group_size, symmetric))
    err = np.abs(np.asarray(qw.dequantize(jnp.float32)) - f64(w)).max(1) / (np.abs(f64(w)).max(1) + 1e-30)
    assert err.max() < {"w4a16": 0.15, "fp8": 0.07}.get(scheme, 0.005)


@pytest.mark.parametrize("scheme,group_size,symmetric", QUANT_CASES)
def test_quant_matmul_reference_matches_numpy(scheme, group_size, symmetric):
    n, k = 72, 256
    w = normal(1, (n, k))
    x = normal(2, (3, 5, k), jnp.bfloat16)
    bias = normal(3, (n,), jnp.bfloat16)
    qw = lj.quantize_weight(w, scheme, group_size=group_size, symmetric=symmetric)
    out = lj.quant_matmul(x, qw, bias, backend="reference")
    assert out.shape == (3, 5, n) and out.dtype == jnp.bfloat16
    expected = np_quant_matmul(x, np_quantize_dequantize(w, scheme, group_size, symmetric), scheme, bias)
    bf16_ulp = 2.0 ** -8 * np.abs(expected).max()
    assert np.abs(f64(out) - expected).max() <= bf16_ulp
    # f32 activations: only float32 rounding of the sums remains
    out32 = lj.quant_matmul(x.astype(jnp.float32), qw, backend="reference")
    w_real = np_quantize_dequantize(w, scheme, group_size, symmetric)
    expected32 = np_quant_matmul(x.astype(jnp.float32), w_real, scheme)
    assert np.abs(f64(out32) - expected32).max() <= 1e-5 * np.abs(expected32).max()


def test_quantized_weight_is_a_pytree_and_jits():
    qw = lj.quantize_weight(normal(1, (64, 128)), "w4a16", group_size=64, symmetric=False)
    x = normal(2, (4, 128))
    f = jax.jit(lambda x, qw: lj.quant_matmul(x, qw, backend="reference"))
    np.testing.assert_allclose(np.asarray(f(x, qw)), np.asarray(lj.quant_matmul(x, qw, backend="reference")),
                               rtol=1e-6, atol=1e-6)
    leaves = jax.tree_util.tree_leaves(qw)
    assert len(leaves) == 3  # packed, scales, zeros


def test_from_packed_matches_the_torch_layout():
    """The torch API's layouts convert to the TPU layout with the same real weights."""
    torch = pytest.importorskip("torch")
    try:
        from lepton_kernels.quant.weight import quantize_weight as torch_quantize
    except ImportError as e:  # the torch quantization module is optional here
        pytest.skip(f"torch quantization API unavailable: {e}")
    w = np.random.default_rng(0).standard_normal((48, 256)).astype(np.float32)
    w_bf16 = torch.from_numpy(w).to(torch.bfloat16)  # scales are stored (rounded up) in bf16
    for scheme, group_size, symmetric in (("w4a16", 64, False), ("w8a16", -1, True), ("fp8", -1, True)):
        tq = torch_quantize(w_bf16, scheme, group_size=group_size, symmetric=symmetric)

        def arr(t):
            if t is None:
                return None
            if t.dtype == torch.float8_e4m3fn:
                return t.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
            return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()

        expected = tq.dequantize(torch.float32).numpy()
        qw = lj.QuantizedWeight.from_packed(arr(tq.packed), arr(tq.scales), arr(tq.zeros), scheme=scheme,
                                            group_size=group_size, shape=(48, 256), dtype=jnp.bfloat16)
        np.testing.assert_array_equal(np.asarray(qw.dequantize(jnp.float32)), expected)
        mine = lj.quantize_weight(jnp.asarray(w).astype(jnp.bfloat16), scheme, group_size=group_size,
                                  symmetric=symmetric)
        np.testing.assert_array_equal(np.asarray(mine.dequantize(jnp.float32)), expected)


def test_act_order_perm_gathers_activations():
    w = normal(1, (32, 128))
    qw = lj.quantize_weight(w, "w8a16")
    perm = np.random.default_rng(1).permutation(128).astype(np.int32)
    # Store the weight with its input channels permuted, as a GPTQ act-order import would.
    permuted = lj.quantize_weight(w[:, perm], "w8a16")
    import dataclasses
    permuted = dataclasses.replace(permuted, perm=jnp.asarray(perm))
    np.testing.assert_array_equal(np.asarray(permuted.dequantize()), np.asarray(qw.dequantize()))
    x = normal(2, (3, 128))
    np.testing.assert_allclose(np.asarray(lj.quant_matmul(x, permuted, backend="reference")),
                               np.asarray(lj.quant_matmul(x, qw, backend="reference")), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------

Z, I32, F8 = jnp.zeros, jnp.int32, jnp.float8_e4m3fn
Q, K = Z((2, 8, 4, 16)), Z((2, 8, 2, 16))
CACHE, TABLE, LENS = Z((5, 8, 2, 16)), Z((2, 3), I32), Z((2,), I32)


@pytest.mark.parametrize("call,error,words", [
    (lambda: lj.flash_attention(Q, K[..., :8], K), ValueError, ["k must have shape", "(2, 8, 2, 8)"]),
    (lambda: lj.flash_attention(Q, Z((2, 8, 3, 16)), Z((2, 8, 3, 16))), ValueError, ["multiple of num kv heads"]),
    (lambda: lj.flash_attention(Q, K.astype(jnp.bfloat16), K), TypeError, ["k must have the same dtype as q"]),
    (lambda: lj.flash_attention(Q.astype(I32), K, K), TypeError, ["q must have dtype", "int32"]),
    (lambda: lj.flash_attention(Q, K, K, causal=True, window=(4, 2)), ValueError, ["causal=True conflicts"]),
    (lambda: lj.flash_attention(Q, K, K, window=(-2, 0)), ValueError, ["window[0]"]),
    (lambda: lj.flash_attention(Q, K, K, softcap=-1.0), ValueError, ["softcap"]),
    (lambda: lj.flash_attention(Q, K, K, kv_lens=Z((3,), I32)), ValueError, ["kv_lens must have shape (2)", "(3,)"]),
    (lambda: lj.flash_attention(Q, K, K, kv_lens=Z((2,), jnp.float32)), TypeError, ["kv_lens must have dtype"]),
    (lambda: lj.flash_attention(Q[0], K[0], K[0]), ValueError, ["cu_seqlens_q"]),
    (lambda: lj.flash_attention(Q, K, K, backend="cuda"), ValueError, ["unknown backend", "reference"]),
    (lambda: lj.paged_attention(Z((3, 4, 16)), CACHE, CACHE, TABLE, LENS), ValueError, ["q.shape[0] (3)"]),
    (lambda: lj.paged_attention(Z((2, 4, 16)), CACHE.astype(jnp.bfloat16), CACHE.astype(jnp.bfloat16), TABLE, LENS),
     TypeError, ["k_cache must have dtype", "bfloat16"]),
    (lambda: lj.paged_attention(Z((2, 4, 16)), CACHE.astype(F8), CACHE.astype(F8), TABLE, LENS),
     ValueError, ["k_scale and v_scale are required"]),
    (lambda: lj.paged_kv_write(Z((3, 2, 16)), Z((3, 2, 16)), Z((4, 8, 2, 16)), Z((4, 8, 2, 16)), Z((4,), I32)),
     ValueError, ["slot_mapping must have shape (3)", "(4,)"]),
    (lambda: lj.paged_kv_write(Z((3, 2, 16)), Z((3, 2, 16)), Z((4, 8, 2, 16), F8), Z((4, 8, 2, 16), F8), Z((3,), I32)),
     ValueError, ["k_scale and v_scale are required"]),
    (lambda: lj.quantize_weight(Z((8, 100)), "w4a16", group_size=64), ValueError, ["group_size=64", "K=100"]),
    (lambda: lj.quantize_weight(Z((8, 128)), "w8a8", symmetric=False), ValueError, ["symmetric only"]),
    (lambda: lj.quantize_weight(Z((8, 128)), "int3"), ValueError, ["unknown scheme"]),
    (lambda: lj.quant_matmul(Z((2, 64)), lj.quantize_weight(jnp.ones((8, 128)), "w8a16")), ValueError, ["K=128"]),
    (lambda: lj.quant_matmul(Z((2, 128)), Z((8, 128))), TypeError, ["QuantizedWeight"]),
])
def test_argument_errors_name_the_argument(call, error, words):
    with pytest.raises(error) as info:
        call()
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


# --------------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------------


def test_dispatch_rules(monkeypatch, caplog):
    assert _dispatch.select("op", "reference", None) == "reference"
    assert _dispatch.select("op", "interpret", None) == "interpret"
    assert _dispatch.select("op", "tpu", None) == "tpu"  # traceable/exportable on any host
    with pytest.raises(lj.BackendUnavailableError, match="no Pallas Mosaic GPU kernel"):
        _dispatch.select("op", "gpu", None)
    with pytest.raises(lj.BackendUnavailableError, match="because"):
        _dispatch.select("op", "tpu", "because")
    with pytest.raises(ValueError, match="known backends"):
        _dispatch.select("op", "torch", None)
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert _dispatch.select("op", "auto", None) == "tpu"
    with caplog.at_level(logging.WARNING, logger="lepton_kernels"):
        assert _dispatch.select("op_logged", "auto", "no kernel for this") == "reference"
    assert "no kernel for this" in caplog.text
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert _dispatch.select("op", "auto", None) == "reference"
    monkeypatch.setenv(_dispatch.ENV_BACKEND, "interpret")
    assert _dispatch.select("op", "auto", None) == "interpret"
    monkeypatch.setenv(_dispatch.ENV_BACKEND, "bogus")
    with pytest.raises(ValueError, match=_dispatch.ENV_BACKEND):
        _dispatch.select("op", "auto", None)


def test_varlen_tpu_kernel_needs_max_seqlens():
    q, k = jnp.zeros((5, 2, 16)), jnp.zeros((5, 2, 16))
    cu = jnp.array([0, 5], jnp.int32)
    with pytest.raises(lj.BackendUnavailableError, match="max_seqlen_q/max_seqlen_k"):
        lj.flash_attention(q, k, k, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=5, backend="tpu")

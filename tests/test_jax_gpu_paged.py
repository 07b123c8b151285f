"""lepton_kernels.jax paged_attention on the Mosaic GPU kernels (backend="gpu"): decode, and
chunked prefill / mixed batches (``cu_seqlens_q``: decode rows, prefill chunks, full prefills
and zero-query sequences in one batch, causal or not).

* On a Hopper GPU (``-m gpu``): the kernel against the jnp reference in float32, with
  FlashAttention's tolerance rule (error at most 2x that of the same attention computed in the
  input dtype, + eps), over permuted block tables, lengths off the page size, lengths 1 and 0,
  GQA / MQA / MHA, head dims 64/128/256, page sizes 8 to 256, split-KV, fp8 caches, a left
  window, softcap and lse. Cache slots that hold no live token are NaN, and block-table entries
  past a sequence's pages point outside the cache, so reading either shows.
* Anywhere: why a call falls back; with jax's Mosaic GPU bindings, that every head dim, page
  size, split mode and cache dtype lowers for CUDA (``jax.export``, no GPU needed), and that
  the kernel's barrier protocol, page walk, masking and split merge are right in Pallas'
  Mosaic GPU interpreter.
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
from lepton_kernels.jax.gpu import paged_attention as gpa  # noqa: E402

S = jax.ShapeDtypeStruct
FP8 = jnp.float8_e4m3fn


def require_hopper():
    reason = _mosaic.device_reason() or _mosaic.masked_kernel_reason()
    if reason is not None:
        pytest.skip(reason)


def require_interpreter():
    if _mosaic.interpret_params() is None or jax.default_backend() != "cpu":
        pytest.skip("needs a CPU jax with the Mosaic GPU bindings and interpreter")


def paged_case(seed, batch, hq, hkv, d, block_size, lens, dtype, *, fp8=False, spare_blocks=3):
    """Random q and caches: each sequence's pages at random places of the cache, every slot
    that holds no live token NaN, table entries past a sequence's pages out of range."""
    rng = np.random.default_rng(seed)
    lens = np.asarray(lens, np.int32)
    max_blocks = max(1, -(-int(lens.max()) // block_size))
    num_blocks = batch * max_blocks + spare_blocks
    q = rng.standard_normal((batch, hq, d), np.float32)
    k = rng.standard_normal((num_blocks, block_size, hkv, d), np.float32)
    v = rng.standard_normal((num_blocks, block_size, hkv, d), np.float32)
    table = rng.permutation(num_blocks)[:batch * max_blocks].reshape(batch, max_blocks).astype(np.int32)
    live = np.zeros((num_blocks, block_size), bool)
    for b in range(batch):
        tokens = np.arange(lens[b])
        live[table[b, tokens // block_size], tokens % block_size] = True
        table[b, -(-lens[b] // block_size):] = num_blocks + 1000 + b  # never read
    k[~live], v[~live] = np.nan, np.nan
    scales = None
    if fp8:  # per-head scales of the stored values (real = stored * scale)
        k_scale, v_scale = (rng.uniform(0.5, 2.0, hkv).astype(np.float32) for _ in range(2))
        k, v = k / k_scale[:, None], v / v_scale[:, None]
        scales = jnp.asarray(k_scale), jnp.asarray(v_scale)
    cache_dtype = FP8 if fp8 else dtype
    return (jnp.asarray(q, dtype), jnp.asarray(k, cache_dtype), jnp.asarray(v, cache_dtype), jnp.asarray(table),
            jnp.asarray(lens), scales)


def decode_lowp(q, k_cache, v_cache, table, lens, *, scale, window=-1, softcap=0.0, scales=None):
    """Decode attention with every intermediate in q's dtype (the baseline error of the rule)."""
    dtype = q.dtype
    batch, hq, d = q.shape
    hkv = k_cache.shape[2]
    safe = jnp.clip(table, 0, k_cache.shape[0] - 1)

    def gather(cache, sc):
        x = cache[safe].astype(jnp.float32)
        if sc is not None:
            x = x * jnp.broadcast_to(sc.reshape(-1), (hkv,))[:, None]
        return jnp.repeat(x.reshape(batch, -1, hkv, d), hq // hkv, axis=2).astype(dtype)

    k = gather(k_cache, None if scales is None else scales[0])
    v = gather(v_cache, None if scales is None else scales[1])
    kpos = jnp.arange(k.shape[1])[None, :]
    mask = kpos < lens[:, None]
    if window >= 0:
        mask &= kpos >= lens[:, None] - 1 - window
    s = jnp.einsum("bhd,bkhd->bhk", q, k, preferred_element_type=dtype) * jnp.asarray(scale, dtype)
    if softcap:
        s = jnp.asarray(softcap, dtype) * jnp.tanh(s / jnp.asarray(softcap, dtype))
    s = jnp.where(mask[:, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    v = jnp.where(mask[:, :, None, None], v, jnp.zeros_like(v))
    out = jnp.einsum("bhk,bkhd->bhd", p, v, preferred_element_type=dtype)
    return jnp.where((lens > 0)[:, None, None], out, jnp.zeros_like(out))


def max_err(a, b):
    return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


def lse_err(a, b):
    both_inf = jnp.isneginf(a) & jnp.isneginf(b)
    return float(jnp.max(jnp.where(both_inf, 0.0, jnp.abs(a - b))))


def reference(q, k_cache, v_cache, table, lens, *, scale, window=-1, softcap=0.0, scales=None):
    k_scale, v_scale = scales or (None, None)
    return lj.paged_attention_reference(q.astype(jnp.float32), k_cache, v_cache, table, lens, softmax_scale=scale,
                                        window=(window, -1), softcap=softcap, k_scale=k_scale, v_scale=v_scale,
                                        return_lse=True)


# --------------------------------------------------------------------------------------------
# On a Hopper GPU
# --------------------------------------------------------------------------------------------

GPU_CASES = [
    # B, Hq, Hkv, D, block_size, lens, dtype, fp8, window, softcap
    (4, 32, 8, 128, 16, (1000, 17, 1, 256), jnp.bfloat16, False, -1, 0.0),  # GQA 32/8, length 1
    (3, 8, 1, 128, 128, (300, 0, 129), jnp.bfloat16, False, -1, 0.0),  # MQA 8/1, length 0, page > stage
    (2, 8, 8, 64, 16, (77, 500), jnp.float16, False, -1, 0.0),  # MHA, D 64 (128-key stages)
    (2, 16, 2, 256, 16, (333, 64), jnp.bfloat16, False, -1, 0.0),  # D 256
    (2, 16, 2, 256, 128, (1500, 3), jnp.float16, False, -1, 0.0),
    (1, 32, 8, 128, 16, (32768 - 5,), jnp.bfloat16, False, -1, 0.0),  # B=1 long context: split-KV
    (1, 32, 8, 128, 128, (20000,), jnp.bfloat16, False, -1, 0.0),
    (1, 8, 8, 64, 128, (9000,), jnp.float16, False, -1, 0.0),
    (2, 64, 8, 64, 8, (5000, 3001), jnp.bfloat16, False, -1, 0.0),  # G = 8, pages of 8
    (2, 28, 4, 128, 32, (2000, 1), jnp.bfloat16, False, -1, 0.0),  # G = 7
    (1, 128, 1, 128, 16, (1000,), jnp.bfloat16, False, -1, 0.0),  # G = 128: two head tiles
    (2, 4, 2, 128, 256, (700, 300), jnp.bfloat16, False, -1, 0.0),  # page of 4 stages
    (3, 32, 8, 128, 16, (700, 1, 0), jnp.bfloat16, True, -1, 0.0),  # fp8 caches
    (1, 32, 8, 128, 16, (30000,), jnp.bfloat16, True, -1, 0.0),
    (2, 8, 2, 256, 128, (900, 130), jnp.float16, True, -1, 0.0),
    (2, 16, 4, 64, 16, (1000, 60), jnp.float16, True, -1, 0.0),
    (2, 32, 8, 128, 16, (3000, 40), jnp.bfloat16, False, 100, 0.0),  # left window
    (1, 32, 8, 128, 16, (30000,), jnp.bfloat16, False, 1000, 30.0),  # window (split) + softcap
    (2, 32, 8, 128, 16, (3000, 40), jnp.bfloat16, False, -1, 30.0),  # softcap
]


def _case_id(c):
    batch, hq, hkv, d, bs, lens, dtype, fp8, window, softcap = c
    name = f"B{batch}-{hq}/{hkv}-D{d}-bs{bs}-L{max(lens)}-{jnp.dtype(dtype).name}" + ("-fp8" if fp8 else "")
    return name + (f"-w{window}" if window >= 0 else "") + (f"-cap{softcap:g}" if softcap else "")


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=_case_id)
def test_paged_attention_gpu_matches_reference(case):
    batch, hq, hkv, d, block_size, lens, dtype, fp8, window, softcap = case
    require_hopper()
    q, kc, vc, table, lens, scales = paged_case(1, batch, hq, hkv, d, block_size, lens, dtype, fp8=fp8)
    scale = d ** -0.5
    k_scale, v_scale = scales or (None, None)
    out, lse = lj.paged_attention(q, kc, vc, table, lens, window=(window, -1), softcap=softcap, k_scale=k_scale,
                                  v_scale=v_scale, return_lse=True, backend="gpu")
    ref, ref_lse = reference(q, kc, vc, table, lens, scale=scale, window=window, softcap=softcap, scales=scales)
    assert out.dtype == q.dtype and out.shape == q.shape and lse.shape == (batch, hq)
    assert not bool(jnp.isnan(out).any()), "NaN in the output"
    base = max_err(decode_lowp(q, kc, vc, table, lens, scale=scale, window=window, softcap=softcap,
                               scales=scales), ref)
    err = max_err(out, ref)
    assert err <= 2 * base + 1e-5, f"max error {err:.3g} > 2 x {jnp.dtype(dtype).name} attention's {base:.3g}"
    # lse is f32 from the same f32 scores; approximate exp2/log leave ~1e-3
    assert lse_err(lse, ref_lse) <= 1e-2, f"lse max error {lse_err(lse, ref_lse):.3g}"
    empty = np.asarray(lens) == 0
    assert np.all(np.asarray(out)[empty] == 0) and np.all(np.isneginf(np.asarray(lse)[empty]))


@pytest.mark.gpu
@pytest.mark.parametrize("config", [gpa.GpuPagedConfig(block_kv=64, num_stages=2, num_splits=1),
                                    gpa.GpuPagedConfig(block_kv=128, num_stages=2, num_splits=3),
                                    gpa.GpuPagedConfig(block_kv=64, num_stages=3, num_splits=7)], ids=str)
def test_paged_attention_gpu_configs(config):
    """Tile sizes and split counts the benchmark tries, under jax.jit."""
    require_hopper()
    q, kc, vc, table, lens, _ = paged_case(2, 3, 32, 8, 128, 16, (2500, 1, 700), jnp.bfloat16)
    fn = jax.jit(lambda *a: gpa.paged_attention_gpu(*a, scale=0.1, return_lse=True, config=config))
    out, lse = fn(q, kc, vc, table, lens)
    ref, ref_lse = reference(q, kc, vc, table, lens, scale=0.1)
    base = max_err(decode_lowp(q, kc, vc, table, lens, scale=0.1), ref)
    assert max_err(out, ref) <= 2 * base + 1e-5
    assert lse_err(lse, ref_lse) <= 1e-2


@pytest.mark.gpu
def test_auto_uses_the_gpu_kernel_and_logs_fallbacks(caplog):
    require_hopper()
    if jax.default_backend() != "gpu":
        pytest.skip("jax's default backend is not the GPU")
    q, kc, vc, table, lens, _ = paged_case(3, 2, 8, 2, 128, 16, (100, 37), jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(lj.paged_attention(q, kc, vc, table, lens)),
                                  np.asarray(lj.paged_attention(q, kc, vc, table, lens, backend="gpu")))
    cu = jnp.asarray([0, 1, 2], jnp.int32)  # the mixed-batch kernel
    np.testing.assert_array_equal(np.asarray(lj.paged_attention(q, kc, vc, table, lens, cu_seqlens_q=cu)),
                                  np.asarray(lj.paged_attention(q, kc, vc, table, lens, cu_seqlens_q=cu,
                                                                backend="gpu")))
    q32 = q.astype(jnp.float32)
    with caplog.at_level(logging.WARNING, logger="lepton_kernels"):
        out = lj.paged_attention(q32, kc.astype(jnp.float32), vc.astype(jnp.float32), table, lens)  # the reference
    assert "float16/bfloat16" in caplog.text
    assert not bool(jnp.isnan(out).any())


# --------------------------------------------------------------------------------------------
# Anywhere
# --------------------------------------------------------------------------------------------

def _reason(q_shape=(2, 8, 128), cache_shape=(10, 16, 2, 128), dtype=jnp.bfloat16, cache_dtype=None, blocks=4,
            **options):
    return gpa.unavailable_reason(S(q_shape, dtype), S(cache_shape, cache_dtype or dtype),
                                  S((q_shape[0], blocks), jnp.int32), check_device=False, **options)


@pytest.mark.parametrize("args,words", [
    (dict(dtype=jnp.float32), "float16/bfloat16"),
    (dict(cache_dtype=jnp.float16), "caches of q's dtype or float8_e4m3fn"),
    (dict(q_shape=(2, 8, 96), cache_shape=(10, 16, 2, 96)), "head dims"),
    (dict(cache_shape=(10, 12, 2, 128)), "multiple of 8"),
    (dict(cache_shape=(10, 4, 2, 128)), "multiple of 8"),
    (dict(cache_shape=(10, 96, 2, 128)), "divides 64 or is a multiple of it"),
    (dict(q_shape=(2, 96, 128), cache_shape=(10, 16, 1, 128)), "Hq/Hkv = 96"),
    (dict(blocks=0), "empty"),
    (dict(q_shape=(0, 8, 128)), "empty"),
    (dict(config=gpa.GpuPagedConfig(block_kv=128, num_stages=8)), "shared memory"),
])
def test_gpu_fallback_reasons(args, words):
    reason = _reason(**args)
    assert reason is not None and words in reason, reason


@pytest.mark.parametrize("q_shape,cache_shape,cache_dtype", [
    ((2, 32, 128), (10, 16, 8, 128), None),
    ((2, 8, 64), (10, 128, 1, 64), None),
    ((2, 8, 256), (10, 8, 8, 256), FP8),
    ((2, 128, 128), (10, 256, 1, 128), None),
])
def test_gpu_serves_decode_shapes(q_shape, cache_shape, cache_dtype):
    reason = _reason(q_shape, cache_shape, cache_dtype=cache_dtype)
    assert reason is None or reason == _mosaic.bindings_reason() or "CUDA runtime" in reason


def test_gpu_serves_mixed_batches():
    reason = _reason(cu_seqlens_q=S((3,), jnp.int32))
    assert reason is None or reason == _mosaic.bindings_reason() or "CUDA runtime" in reason
    empty = gpa.unavailable_reason(S((5, 8, 128), jnp.bfloat16), S((10, 16, 2, 128), jnp.bfloat16),
                                   S((0, 4), jnp.int32), cu_seqlens_q=S((1,), jnp.int32), check_device=False)
    assert empty is not None and "empty" in empty


def test_explicit_gpu_backend_names_the_reason():
    q = jnp.zeros((2, 8, 128), jnp.float32)
    cache = jnp.zeros((4, 16, 2, 128), jnp.float32)
    table, lens = jnp.zeros((2, 2), jnp.int32), jnp.ones((2,), jnp.int32)
    with pytest.raises(lj.BackendUnavailableError, match="backend 'gpu' cannot serve.*float16/bfloat16"):
        lj.paged_attention(q, cache, cache, table, lens, backend="gpu")


def test_choose_num_splits():
    # B=1, Hkv=8, 32k keys in 64-key stages on 132 SMs: 16 splits fill 128 SMs once.
    assert gpa.choose_num_splits(8, 512, 132) == 16
    assert gpa.choose_num_splits(128, 64, 132) == 1  # 128 programs already fill the GPU
    assert gpa.choose_num_splits(1024, 32, 132) == 1
    assert gpa.choose_num_splits(8, 3, 132) == 1  # too few stages to split
    for programs, stages in ((1, 1000), (5, 77), (40, 300)):
        splits = gpa.choose_num_splits(programs, stages, 132)
        assert 1 <= splits <= min(gpa.MAX_SPLITS, stages) and programs * splits <= 2 * 132


@pytest.mark.parametrize("left", [-1, 0, 5, 100])
@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_splits_share_out_the_visible_stages(left, num_splits):
    """The blocks of one sequence run every stage holding a visible key exactly once, and only
    those (with lengths past the table's capacity and lengths 0 included)."""
    capacity, block_kv = 1000, 64
    lens = jnp.arange(1100, dtype=jnp.int32)
    stage_range = jax.vmap(jax.vmap(
        lambda n, s: gpa._stage_range(n, s, left=left, capacity=capacity, block_kv=block_kv,
                                      num_splits=num_splits), (None, 0)), (0, None))
    start, steps, kv_len, lo = (np.asarray(x) for x in stage_range(lens, jnp.arange(num_splits, dtype=jnp.int32)))
    stages = np.arange(capacity // block_kv + 2)
    for n in range(0, 1100, 7):
        runs = np.zeros_like(stages)
        for s in range(num_splits):
            assert steps[n, s] >= 0
            runs[start[n, s]:start[n, s] + steps[n, s]] += 1
        keys_lo = max(n - 1 - left, 0) if left >= 0 else 0
        keys_hi = min(n, capacity)  # visible keys: [keys_lo, keys_hi)
        visible = (stages * block_kv < keys_hi) & ((stages + 1) * block_kv > keys_lo) & (keys_lo < keys_hi)
        np.testing.assert_array_equal(runs, visible.astype(runs.dtype), err_msg=f"seq_len {n}")
        assert kv_len[n, 0] == keys_hi and (lo[n, 0] == keys_lo or keys_lo >= keys_hi)


INTERPRETED = [
    # B, Hq, Hkv, D, block_size, lens, config, fp8, window, softcap
    # (each block costs the interpreter seconds, stages little: few blocks, several stages)
    # 4 pages per stage (the last stage's past the end: the last page re-read), NaN tails
    # zeroed, two splits of two stages merged, GQA 4/1
    (1, 4, 1, 64, 16, (250,), gpa.GpuPagedConfig(block_kv=64, num_stages=2, num_splits=2), False, -1, 0.0),
    # pages of two stages (row ranges of one page), MHA, an empty sequence (its block runs no
    # stage), a left window and softcap
    (2, 1, 1, 64, 128, (150, 0), gpa.GpuPagedConfig(block_kv=64, num_stages=2, num_splits=1), False, 70, 5.0),
    # fp8 pages widened in shared memory with per-head scales, G = 8 packed rows, 5 stages in
    # a 2-slot ring (the unmasked middle loop)
    (1, 8, 1, 64, 32, (300,), gpa.GpuPagedConfig(block_kv=64, num_stages=2, num_splits=1), True, -1, 0.0),
]


@pytest.mark.parametrize("case", INTERPRETED, ids=lambda c: f"B{c[0]}-{c[1]}/{c[2]}-bs{c[4]}-L{max(c[5])}"
                         + ("-fp8" if c[7] else "") + ("-window-softcap" if c[8] >= 0 else ""))
def test_paged_attention_gpu_interpreted(case):
    """The kernel in Pallas' Mosaic GPU interpreter (a CPU host with the Mosaic GPU bindings): the
    barrier protocol (every phase observed), the page walk through the block table (an entry
    past a sequence's pages would be an out-of-bounds read), masking and the split merge; the
    wgmmas become dots there."""
    require_interpreter()
    batch, hq, hkv, d, block_size, lens, config, fp8, window, softcap = case
    q, kc, vc, table, lens, scales = paged_case(4, batch, hq, hkv, d, block_size, lens, jnp.float16, fp8=fp8)
    k_scale, v_scale = scales or (None, None)
    out, lse = gpa.paged_attention_gpu(q, kc, vc, table, lens, k_scale, v_scale, scale=d ** -0.5,
                                       window=(window, -1), softcap=softcap, return_lse=True, config=config,
                                       interpret=_mosaic.interpret_params())
    ref, ref_lse = reference(q, kc, vc, table, lens, scale=d ** -0.5, window=window, softcap=softcap,
                             scales=scales)
    assert not bool(jnp.isnan(out).any())
    assert max_err(out, ref) <= 2e-3 and lse_err(lse, ref_lse) <= 1e-4


def test_public_function_routes_to_the_kernel(monkeypatch):
    """paged_attention(backend="gpu") -> the kernel, with the options passed through (here on
    the interpreter, as if this host were a Hopper GPU): fp8 per-tensor scales, softcap, lse."""
    require_interpreter()
    params = _mosaic.interpret_params()
    kernel = gpa.paged_attention_gpu
    monkeypatch.setattr(gpa, "unavailable_reason", lambda *args, **kwargs: None)
    monkeypatch.setattr(gpa, "paged_attention_gpu", lambda *args, **kwargs: kernel(*args, interpret=params, **kwargs))
    q, kc, vc, table, lens, _ = paged_case(5, 1, 4, 1, 64, 16, (70,), jnp.bfloat16, fp8=True)
    k_scale, v_scale = jnp.float32(1.5), jnp.float32(0.5)
    options = dict(softmax_scale=0.2, softcap=4.0, k_scale=k_scale, v_scale=v_scale, return_lse=True)
    out, lse = lj.paged_attention(q, kc, vc, table, lens, backend="gpu", **options)
    ref, ref_lse = lj.paged_attention(q.astype(jnp.float32), kc, vc, table, lens, backend="reference", **options)
    assert out.dtype == jnp.bfloat16 and lse.shape == (1, 4)
    assert max_err(out, ref) <= 1e-2 and lse_err(lse, ref_lse) <= 1e-4


LOWERED = [
    # D, block_size, cache dtype, splits (1: output in q's dtype; more: f32 partials)
    *[(d, bs, jnp.bfloat16, splits) for d in gpa.HEAD_DIMS for bs, splits in ((8, 1), (16, 4), (128, 1), (256, 4))],
    *[(d, 16, FP8, 2) for d in gpa.HEAD_DIMS],
]


@pytest.mark.parametrize("case", LOWERED, ids=lambda c: f"D{c[0]}-bs{c[1]}-{jnp.dtype(c[2]).name}-splits{c[3]}")
def test_paged_attention_gpu_lowers_for_cuda(case):
    """Pallas' Mosaic GPU lowering (layouts, wgmma shapes, TMA boxes) without a GPU."""
    if _mosaic.bindings_reason() is not None:
        pytest.skip(_mosaic.bindings_reason())
    head_dim, block_size, cache_dtype, splits = case
    fp8 = cache_dtype == FP8
    cache = S((50, block_size, 2, head_dim), cache_dtype)
    args = [S((3, 8, head_dim), jnp.bfloat16), cache, cache, S((3, 4096 // block_size), jnp.int32),
            S((3,), jnp.int32)]
    if fp8:
        args += [S((2,), jnp.float32), S((2,), jnp.float32)]
    config = dataclasses.replace(gpa.default_config(head_dim, cache_dtype), num_splits=splits)

    def f(q, k, v, table, lens, *scales):  # fp8 with softcap, 16-bit with a window
        return gpa.paged_attention_gpu(q, k, v, table, lens, *scales, scale=0.1, window=(-1 if fp8 else 300, -1),
                                       softcap=5.0 if fp8 else 0.0, return_lse=True, config=config)

    assert gpa.unavailable_reason(args[0], cache, args[3], config=config, check_device=False) in (
        None, _mosaic.masked_kernel_reason())
    assert "mosaic_gpu" in export.export(jax.jit(f), platforms=["cuda"])(*args).mlir_module()


# --------------------------------------------------------------------------------------------
# Chunked prefill / mixed batches (cu_seqlens_q)
# --------------------------------------------------------------------------------------------

def mixed_case(seed, hq, hkv, d, block_size, lens, q_lens, dtype, *, fp8=False, pad=1):
    """paged_case's caches, with packed queries: sequence b's last q_lens[b] positions, ``pad``
    padding tokens before the first sequence's and after the last's (they get 0)."""
    _, kc, vc, table, lens, scales = paged_case(seed, len(q_lens), hq, hkv, d, block_size, lens, dtype, fp8=fp8)
    rng = np.random.default_rng(seed + 100)
    q = jnp.asarray(rng.standard_normal((sum(q_lens) + 2 * pad, hq, d), np.float32), dtype)
    cu = jnp.asarray(np.concatenate([[pad], pad + np.cumsum(q_lens)]).astype(np.int32))
    return q, kc, vc, table, lens, cu, scales


def mixed_lowp(q, k_cache, v_cache, table, lens, cu, *, scale, causal, window, softcap, scales):
    """Mixed-batch attention with every intermediate in q's dtype (the baseline error of the
    rule), one sequence at a time."""
    from lepton_kernels.jax.ops.flash_attention import visible
    from lepton_kernels.jax.ops.paged_attention import gather_pages

    dtype = q.dtype
    hq, hkv = q.shape[1], k_cache.shape[2]
    safe = jnp.clip(table, 0, k_cache.shape[0] - 1)
    k_scale, v_scale = scales or (None, None)
    keys = jnp.repeat(gather_pages(k_cache, safe, k_scale), hq // hkv, axis=2).astype(dtype)
    values = jnp.repeat(gather_pages(v_cache, safe, v_scale), hq // hkv, axis=2).astype(dtype)
    out = jnp.zeros_like(q)
    cu_np, lens_np = np.asarray(cu), np.asarray(lens)
    left, right = window
    for b in range(len(lens_np)):
        lo, hi = int(cu_np[b]), int(cu_np[b + 1])
        if hi == lo:
            continue
        kpos = jnp.arange(keys.shape[1])
        mask = visible(jnp.arange(hi - lo)[:, None], kpos[None, :], hi - lo, int(lens_np[b]), causal=causal,
                       left=left, right=0 if causal else right)
        s = jnp.einsum("qhd,khd->hqk", q[lo:hi], keys[b], preferred_element_type=dtype) * jnp.asarray(scale, dtype)
        if softcap:
            s = jnp.asarray(softcap, dtype) * jnp.tanh(s / jnp.asarray(softcap, dtype))
        s = jnp.where(mask[None], s, -jnp.inf)
        p = jnp.nan_to_num(jax.nn.softmax(s, axis=-1))
        v = jnp.where(mask.any(0)[:, None, None], values[b], jnp.zeros_like(values[b]))
        out = out.at[lo:hi].set(jnp.einsum("hqk,khd->qhd", p, v, preferred_element_type=dtype))
    return out


MIXED_LENS = ((1000, 1, 300, 128, 50), (1, 1, 37, 128, 0))  # decode, 1 of 1, chunk, full prefill, none

MIXED_CASES = [
    # Hq, Hkv, D, block_size, (lens, q_lens), dtype, fp8, causal, window, softcap
    (32, 8, 128, 16, MIXED_LENS, jnp.bfloat16, False, True, (-1, -1), 0.0),  # GQA 32/8
    (8, 1, 128, 128, MIXED_LENS, jnp.bfloat16, False, True, (-1, -1), 0.0),  # MQA 8/1, page > stage
    (32, 8, 64, 16, MIXED_LENS, jnp.float16, False, True, (-1, -1), 0.0),  # D 64 (128-key stages)
    (16, 2, 256, 16, MIXED_LENS, jnp.bfloat16, False, True, (-1, -1), 0.0),  # D 256
    (16, 2, 256, 128, MIXED_LENS, jnp.float16, False, True, (-1, -1), 0.0),
    (32, 8, 128, 16, MIXED_LENS, jnp.bfloat16, False, False, (-1, -1), 0.0),  # not causal
    (8, 1, 64, 128, MIXED_LENS, jnp.float16, False, False, (-1, -1), 0.0),
    (32, 8, 128, 16, MIXED_LENS, jnp.bfloat16, True, True, (-1, -1), 0.0),  # fp8 caches
    (8, 2, 256, 128, MIXED_LENS, jnp.float16, True, False, (-1, -1), 0.0),
    (32, 8, 128, 16, MIXED_LENS, jnp.bfloat16, False, True, (100, -1), 0.0),  # left window
    (32, 8, 128, 16, MIXED_LENS, jnp.bfloat16, False, False, (50, 20), 30.0),  # two-sided window + softcap
    (32, 8, 128, 16, MIXED_LENS, jnp.bfloat16, False, True, (-1, -1), 30.0),  # softcap
    (128, 1, 128, 16, MIXED_LENS, jnp.bfloat16, False, True, (-1, -1), 0.0),  # G = 128: two head tiles
    (28, 4, 128, 8, MIXED_LENS, jnp.bfloat16, False, True, (-1, -1), 0.0),  # G = 7 (63 rows), pages of 8
    (4, 2, 128, 256, MIXED_LENS, jnp.bfloat16, False, True, (-1, -1), 0.0),  # page of 4 stages
    # several 64-row tiles per sequence (the reference gathers [Tq, L, Hkv, D] in f32: ~4 GB each here)
    (32, 8, 128, 16, ((1024, 900, 400), (200, 300, 400)), jnp.bfloat16, False, True, (-1, -1), 0.0),
]


def _mixed_id(c):
    hq, hkv, d, bs, (lens, q_lens), dtype, fp8, causal, window, softcap = c
    name = f"{hq}/{hkv}-D{d}-bs{bs}-L{max(lens)}-Q{sum(q_lens)}-{jnp.dtype(dtype).name}" + ("-fp8" if fp8 else "")
    name += "" if causal else "-noncausal"
    return name + (f"-w{window[0]},{window[1]}" if window != (-1, -1) else "") + (f"-cap{softcap:g}" if softcap else "")


@pytest.mark.gpu
@pytest.mark.parametrize("case", MIXED_CASES, ids=_mixed_id)
def test_paged_attention_gpu_mixed_batch_matches_reference(case):
    hq, hkv, d, block_size, (lens, q_lens), dtype, fp8, causal, window, softcap = case
    require_hopper()
    q, kc, vc, table, lens, cu, scales = mixed_case(6, hq, hkv, d, block_size, lens, q_lens, dtype, fp8=fp8)
    scale = d ** -0.5
    k_scale, v_scale = scales or (None, None)
    options = dict(cu_seqlens_q=cu, causal=causal, window=window, softcap=softcap, k_scale=k_scale,
                   v_scale=v_scale, return_lse=True)
    out, lse = lj.paged_attention(q, kc, vc, table, lens, backend="gpu", **options)
    ref, ref_lse = lj.paged_attention_reference(q.astype(jnp.float32), kc, vc, table, lens, softmax_scale=scale,
                                                **options)
    assert out.dtype == q.dtype and out.shape == q.shape and lse.shape == (hq, q.shape[0])
    assert not bool(jnp.isnan(out).any()), "NaN in the output"
    base = max_err(mixed_lowp(q, kc, vc, table, lens, cu, scale=scale, causal=causal, window=window,
                              softcap=softcap, scales=scales), ref)
    err = max_err(out, ref)
    assert err <= 2 * base + 1e-5, f"max error {err:.3g} > 2 x {jnp.dtype(dtype).name} attention's {base:.3g}"
    assert lse_err(lse, ref_lse) <= 1e-2, f"lse max error {lse_err(lse, ref_lse):.3g}"
    assert np.all(np.asarray(out)[[0, -1]] == 0) and np.all(np.isneginf(np.asarray(lse)[:, [0, -1]]))


def test_prefill_tiles_and_stage_bounds():
    """Every packed query lands in exactly one tile of its sequence; a tile's stages are those
    holding a key some row sees, and the unmasked ones those every row sees whole."""
    q_lens, lens, tokens_per_tile = np.array([1, 0, 37, 16, 17]), np.array([900, 5, 300, 16, 200]), 16
    cu = np.concatenate([[2], 2 + np.cumsum(q_lens)]).astype(np.int32)
    num_tiles = -(-int(cu[-1] + 3) // tokens_per_tile) + len(lens)
    tiles, first_token, _ = (np.asarray(x) for x in gpa.prefill_tiles(
        jnp.asarray(cu), jnp.asarray(lens, jnp.int32), tokens_per_tile=tokens_per_tile, num_tiles=num_tiles))
    seen = np.zeros(cu[-1], int)
    for (seq, pos0, nq), tok in zip(tiles.T, first_token):
        assert 0 <= nq <= tokens_per_tile
        for k in range(nq):
            seen[tok + k] += 1
            assert cu[seq] <= tok + k < cu[seq + 1] and pos0 + k == lens[seq] - q_lens[seq] + (tok + k - cu[seq])
    np.testing.assert_array_equal(seen[cu[0]:], 1)
    block_kv, kv_len = 64, 700
    for causal, left, right in ((True, -1, -1), (False, -1, -1), (True, 100, -1), (False, 30, 20), (True, 0, -1)):
        for pos0, nq in ((0, 1), (5, 16), (63, 2), (600, 64), (699, 1), (650, 0), (680, 16)):
            first, end, mid_lo, mid_hi = (int(x) for x in gpa._prefill_stage_bounds(
                jnp.int32(pos0), jnp.int32(nq), jnp.int32(kv_len), causal=causal, left=left, right=right,
                block_kv=block_kv))
            if nq == 0:
                assert first == end
                continue
            keys = np.arange(-(-kv_len // block_kv) * block_kv)
            qpos = np.arange(pos0, pos0 + nq)[:, None]
            reach = 0 if causal else right
            vis = (keys < kv_len) & ((keys <= qpos + reach) if reach >= 0 else True)
            vis = vis & ((keys >= qpos - left) if left >= 0 else True)
            vis = np.broadcast_to(vis, (nq, len(keys))).reshape(nq, -1, block_kv)
            stages = np.arange(vis.shape[1])
            np.testing.assert_array_equal((stages >= first) & (stages < end), vis.any(axis=(0, 2)),
                                          err_msg=str((causal, left, right, pos0, nq)))
            assert np.all(vis.all(axis=(0, 2))[(stages >= mid_lo) & (stages < mid_hi)])
            assert first <= mid_lo <= mid_hi <= end


MIXED_INTERPRETED = [
    # Hq, Hkv, D, block_size, lens, q_lens, fp8, causal, window, softcap
    # (each block costs the interpreter seconds: two or three tiles)
    # MHA, 64 queries a tile: a 37-query chunk and a decode row; 4 pages per stage, the page
    # walk past the last page, NaN tails
    (1, 1, 64, 16, (150, 40), (37, 1), False, True, (-1, -1), 0.0),
    # fp8 pages, G = 8 (8 queries a tile: two tiles of one sequence), not causal with a
    # two-sided window and softcap
    (8, 1, 64, 32, (300,), (12,), True, False, (40, 3), 5.0),
]


@pytest.mark.parametrize("case", MIXED_INTERPRETED, ids=lambda c: f"{c[0]}/{c[1]}-bs{c[3]}-Q{sum(c[5])}"
                         + ("-fp8" if c[6] else ""))
def test_paged_prefill_gpu_interpreted(case):
    """The mixed-batch kernel in the interpreter: tiles of one sequence, masks by position,
    the tile tables and the pre/post passes."""
    require_interpreter()
    hq, hkv, d, block_size, lens, q_lens, fp8, causal, window, softcap = case
    q, kc, vc, table, lens, cu, scales = mixed_case(7, hq, hkv, d, block_size, lens, q_lens, jnp.float16, fp8=fp8,
                                                    pad=len(lens) - 1)
    k_scale, v_scale = scales or (None, None)
    config = gpa.GpuPagedConfig(block_kv=64, num_stages=2)
    out, lse = gpa.paged_prefill_gpu(q, kc, vc, table, lens, cu, k_scale, v_scale, scale=d ** -0.5, causal=causal,
                                     window=window, softcap=softcap, return_lse=True, config=config,
                                     interpret=_mosaic.interpret_params())
    ref, ref_lse = lj.paged_attention_reference(q.astype(jnp.float32), kc, vc, table, lens, cu_seqlens_q=cu,
                                                softmax_scale=d ** -0.5, causal=causal, window=window,
                                                softcap=softcap, k_scale=k_scale, v_scale=v_scale, return_lse=True)
    assert not bool(jnp.isnan(out).any())
    assert max_err(out, ref) <= 2e-3 and lse_err(lse, ref_lse) <= 1e-4


@pytest.mark.parametrize("case", [(64, 16, 32, jnp.bfloat16), (128, 128, 8, jnp.bfloat16), (256, 16, 32, FP8),
                                  (128, 8, 128, jnp.bfloat16), (256, 16, 56, jnp.bfloat16)],
                         ids=lambda c: f"D{c[0]}-bs{c[1]}-Hq{c[2]}-{jnp.dtype(c[3]).name}")
def test_paged_prefill_gpu_lowers_for_cuda(case):
    if _mosaic.bindings_reason() is not None:
        pytest.skip(_mosaic.bindings_reason())
    head_dim, block_size, hq, cache_dtype = case
    fp8 = cache_dtype == FP8
    hkv = 1 if hq in (8, 128) else 8
    cache = S((50, block_size, hkv, head_dim), cache_dtype)
    args = [S((300, hq, head_dim), jnp.bfloat16), cache, cache, S((3, 4096 // block_size), jnp.int32),
            S((3,), jnp.int32), S((4,), jnp.int32)]
    if fp8:
        args += [S((hkv,), jnp.float32), S((hkv,), jnp.float32)]

    def f(q, k, v, table, lens, cu, *scales):  # fp8: non-causal, window, softcap; 16-bit: causal, window
        return gpa.paged_prefill_gpu(q, k, v, table, lens, cu, *scales, scale=0.1, causal=not fp8,
                                     window=(-1, 50) if fp8 else (100, -1), softcap=5.0 if fp8 else 0.0,
                                     return_lse=True)

    assert "mosaic_gpu" in export.export(jax.jit(f), platforms=["cuda"])(*args).mlir_module()

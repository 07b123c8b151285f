"""lepton_kernels.jax Pallas TPU kernels on a CPU host.

* Pallas' TPU interpreter runs each kernel against the jnp reference (itself checked against
  float64 NumPy in test_jax_reference.py). The interpreter fills uninitialized VMEM and
  out-of-bounds block reads with NaN, so a kernel that uses what it never wrote shows NaN.
* ``jax.export`` lowers each kernel for TPU with every default block configuration: this
  checks block shapes and Pallas' Mosaic lowering rules without a TPU (Mosaic's own layout
  passes run only in libtpu, on hardware).
"""
from __future__ import annotations

import functools

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from jax import export  # noqa: E402

import lepton_kernels.jax as lj  # noqa: E402
from lepton_kernels.jax.ops import flash_attention as fa  # noqa: E402
from lepton_kernels.jax.ops import quant_matmul as qm  # noqa: E402
from lepton_kernels.jax.ops import ragged_paged_attention as rpa  # noqa: E402

from .test_jax_reference import f64, normal  # noqa: E402

GENERATIONS = ("v5e", "v6e")
S = jax.ShapeDtypeStruct


def assert_matches(actual, expected, atol, what=""):
    """Same finite/-inf pattern, no NaN, max abs difference <= atol."""
    actual, expected = f64(actual), f64(expected)
    assert not np.isnan(actual).any(), f"{what}: NaN in kernel output (read of unwritten memory?)"
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(np.isfinite(actual), finite, err_msg=f"{what}: -inf pattern differs")
    err = np.abs(actual[finite] - expected[finite]).max(initial=0.0)
    assert err <= atol, f"{what}: max error {err:.3g} > {atol:.3g}"


def export_for_tpu(fn, *args) -> str:
    """Lower ``fn`` for TPU on this host; returns the StableHLO text."""
    exported = export.export(jax.jit(fn), platforms=["tpu"])(*args)
    return exported.mlir_module()


# --------------------------------------------------------------------------------------------
# flash_attention
# --------------------------------------------------------------------------------------------

FLASH_KERNEL_CASES = [
    # B, Sq, Sk, Hq, Hkv, D, dtype, options, (block_q, block_k)
    # D % 128 == 0: heads are column blocks of [B, S, H*D]; partial q and k tail blocks
    (1, 200, 300, 4, 2, 128, jnp.float32, dict(causal=True), (64, 128)),
    # D = 64: transposed layout; a two-sided window skips KV blocks on both sides; softcap
    (2, 100, 300, 2, 1, 64, jnp.bfloat16, dict(window=(40, 10), softcap=10.0), (32, 128)),
    # kv_lens with rows that see nothing (kv_len 25 < Sq, kv_len 0) and a short last block
    (3, 40, 260, 2, 2, 128, jnp.float32, dict(causal=True, kv_lens=[260, 25, 0]), (16, 128)),
    # one query (decode shape), MQA, kv_lens
    (2, 1, 300, 4, 1, 128, jnp.bfloat16, dict(kv_lens=[300, 129], softmax_scale=0.05), (16, 128)),
    # causal sliding window: the first visible KV block moves right
    (1, 300, 300, 1, 1, 128, jnp.bfloat16, dict(causal=True, window=(50, -1)), (64, 128)),
]


@pytest.mark.parametrize("case", FLASH_KERNEL_CASES, ids=lambda c: f"{c[:6]}-{sorted(c[7])}")
def test_flash_attention_interpret_matches_reference(case):
    batch, sq, sk, hq, hkv, d, dtype, options, blocks = case
    options = dict(options)
    kv_lens = options.pop("kv_lens", None)
    if kv_lens is not None:
        options["kv_lens"] = jnp.array(kv_lens, jnp.int32)
    q = normal(1, (batch, sq, hq, d), dtype)
    k, v = normal(2, (batch, sk, hkv, d), dtype), normal(3, (batch, sk, hkv, d), dtype)
    if kv_lens is not None:  # padding keys hold NaN: they must not leak
        pad = np.arange(sk)[None, :, None, None] >= np.array(kv_lens)[:, None, None, None]
        k, v = jnp.where(pad, jnp.nan, k).astype(dtype), jnp.where(pad, jnp.nan, v).astype(dtype)
    out, lse = lj.flash_attention(q, k, v, return_lse=True, backend="interpret",
                                  block_sizes=lj.FlashBlockSizes(*blocks), **options)
    ref, ref_lse = lj.flash_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                      return_lse=True, backend="reference", **options)
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == (batch, hq, sq)
    # bf16: the kernel rounds the probabilities to bf16 for the PV matmul, as FlashAttention does
    assert_matches(out, ref, 2e-5 if dtype == jnp.float32 else 2e-2, "out")
    assert_matches(lse, ref_lse, 1e-4 if dtype == jnp.float32 else 2e-2, "lse")


def test_flash_attention_varlen_interpret_matches_reference():
    """Packed sequences through the padded kernel: a decode row, an empty query set, an empty
    key set, and two padding rows past cu_seqlens_q[-1]; per-sequence bottom-right windows."""
    cu_q, cu_k = jnp.array([0, 1, 1, 40, 45], jnp.int32), jnp.array([0, 7, 20, 20, 61], jnp.int32)
    q, k, v = normal(4, (47, 4, 128)), normal(5, (61, 2, 128)), normal(6, (61, 2, 128))
    varlen = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True, window=(5, 2), softcap=3.0)
    out, lse = lj.flash_attention(q, k, v, max_seqlen_q=39, max_seqlen_k=41, backend="interpret",
                                  block_sizes=lj.FlashBlockSizes(16, 128), **varlen)
    ref, ref_lse = lj.flash_attention(q, k, v, backend="reference", **varlen)
    assert_matches(out, ref, 2e-5, "out")
    assert_matches(lse, ref_lse, 1e-4, "lse")


def test_flash_attention_interpret_without_lse_and_default_blocks():
    q, k, v = normal(1, (1, 33, 2, 128)), normal(2, (1, 45, 1, 128)), normal(3, (1, 45, 1, 128))
    out = lj.flash_attention(q, k, v, causal=True, backend="interpret")  # one block of the full sequence
    assert_matches(out, lj.flash_attention(q, k, v, causal=True, backend="reference"), 2e-5)


FLASH_EXPORT_OPTIONS = [
    dict(causal=True, return_lse=True),
    dict(window=(256, 0), softcap=30.0),
    dict(causal=True, kv_lens=True),
]


@pytest.mark.parametrize("generation", GENERATIONS)
@pytest.mark.parametrize("head_dim", [128, 64])
@pytest.mark.parametrize("options", FLASH_EXPORT_OPTIONS, ids=lambda o: "-".join(sorted(o)))
def test_flash_attention_exports_for_tpu(generation, head_dim, options):
    options = dict(options)
    batch, seq = 2, 2 * fa.DEFAULT_BLOCK_SIZES[generation].block_q + 100  # full and partial blocks
    args = [S((batch, seq, 8, head_dim), jnp.bfloat16), S((batch, seq, 2, head_dim), jnp.bfloat16),
            S((batch, seq, 2, head_dim), jnp.bfloat16)]
    if options.pop("kv_lens", False):
        args.append(S((batch,), jnp.int32))

    def f(q, k, v, kv_lens=None):
        return lj.flash_attention(q, k, v, kv_lens=kv_lens, backend="tpu",
                                  block_sizes=fa.DEFAULT_BLOCK_SIZES[generation], **options)

    assert "tpu_custom_call" in export_for_tpu(f, *args)


@pytest.mark.parametrize("generation", GENERATIONS)
def test_flash_attention_varlen_exports_for_tpu(generation):
    args = [S((3000, 8, 128), jnp.bfloat16), S((5000, 2, 128), jnp.bfloat16), S((5000, 2, 128), jnp.bfloat16),
            S((9,), jnp.int32), S((9,), jnp.int32)]
    f = functools.partial(lj.flash_attention, causal=True, max_seqlen_q=1024, max_seqlen_k=2048, return_lse=True,
                          backend="tpu", block_sizes=fa.DEFAULT_BLOCK_SIZES[generation])
    assert "tpu_custom_call" in export_for_tpu(lambda q, k, v, cq, ck: f(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck),
                                               *args)


@pytest.mark.parametrize("sq,sk,head_dim", [(1, 300, 128), (113, 113, 64), (300, 77, 256)])
def test_flash_attention_exports_short_sequences(sq, sk, head_dim):
    """Sequences shorter than a block run as one block of their full (odd) length."""
    args = [S((3, sq, 4, head_dim), jnp.bfloat16), S((3, sk, 2, head_dim), jnp.bfloat16),
            S((3, sk, 2, head_dim), jnp.bfloat16)]
    f = functools.partial(lj.flash_attention, causal=True, return_lse=True, backend="tpu")
    assert "tpu_custom_call" in export_for_tpu(f, *args)


# --------------------------------------------------------------------------------------------
# quant_matmul
# --------------------------------------------------------------------------------------------

QUANT_KERNEL_CASES = [
    # scheme, group_size, symmetric, M, K, N, x dtype, (block_m, block_n, block_k), bias/perm
    ("w8a16", -1, True, 5, 296, 300, jnp.bfloat16, (32, 128, 128), "bias"),  # K padded to 384, 3 K steps
    ("w8a8", -1, True, 70, 256, 200, jnp.float32, (32, 128, 128), None),  # partial M and N blocks
    ("fp8", -1, True, 3, 384, 130, jnp.bfloat16, (32, 128, 256), "perm"),  # block_k 256 doesn't divide 384
    ("w4a16", 32, False, 4, 2048, 256, jnp.bfloat16, (32, 128, 128), None),  # two packed tiles
    ("w4a16", 128, True, 9, 1280, 136, jnp.float32, (32, 128, 128), "bias"),  # padded groups
    ("w4a16", -1, False, 2, 1000, 128, jnp.bfloat16, (32, 128, 128), None),  # per channel, padded K
]


@pytest.mark.parametrize("case", QUANT_KERNEL_CASES, ids=lambda c: f"{c[0]}-g{c[1]}-{'sym' if c[2] else 'asym'}-{c[8]}")
def test_quant_matmul_interpret_matches_reference(case):
    scheme, group_size, symmetric, m, k, n, dtype, blocks, extra = case
    qw = lj.quantize_weight(normal(1, (n, k)), scheme, group_size=group_size, symmetric=symmetric)
    if extra == "perm":
        import dataclasses
        qw = dataclasses.replace(qw, perm=jnp.asarray(np.random.default_rng(0).permutation(k).astype(np.int32)))
    bias = normal(4, (n,), dtype) if extra == "bias" else None
    x = normal(2, (m, k), dtype)
    out = lj.quant_matmul(x, qw, bias, backend="interpret", block_sizes=lj.QuantBlockSizes(*blocks))
    ref = lj.quant_matmul(x, qw, bias, backend="reference")
    assert out.shape == (m, n) and out.dtype == dtype
    scale = np.abs(f64(ref)).max()
    if dtype == jnp.float32:
        tol = 2e-6 * scale
    elif scheme == "w4a16" and group_size != -1:
        tol = 2 ** -7 * scale  # the kernel rounds the group-scaled weights to bf16
    else:
        tol = 2 ** -8 * scale  # exact products, f32 sums: output rounding only
    assert_matches(out, ref, tol)


QUANT_EXPORT_CASES = [("w8a16", -1, True), ("w8a8", -1, True), ("fp8", -1, True), ("w4a16", 128, True),
                      ("w4a16", 32, False), ("w4a16", -1, False)]


@pytest.mark.parametrize("generation", GENERATIONS)
@pytest.mark.parametrize("scheme,group_size,symmetric", QUANT_EXPORT_CASES)
def test_quant_matmul_exports_for_tpu(generation, scheme, group_size, symmetric):
    n, k = 1024 + 256, 4096
    qw = lj.quantize_weight(jnp.ones((n, k), jnp.bfloat16), scheme, group_size=group_size, symmetric=symmetric)
    blocks = qm.DEFAULT_BLOCK_SIZES[generation]
    for m in (1, 2 * blocks.block_m + 8):  # decode; partial M blocks
        f = functools.partial(lj.quant_matmul, backend="tpu", block_sizes=blocks)
        assert "tpu_custom_call" in export_for_tpu(f, S((m, k), jnp.bfloat16), qw)
    # a small odd layer: N and K below one block, K padded in storage (296 = 8 x 37: per channel)
    small = lj.quantize_weight(jnp.ones((200, 296), jnp.bfloat16), scheme, group_size=-1, symmetric=symmetric)
    f = functools.partial(lj.quant_matmul, backend="tpu", block_sizes=blocks)
    assert "tpu_custom_call" in export_for_tpu(f, S((3, 296), jnp.bfloat16), small)


# --------------------------------------------------------------------------------------------
# paged_attention (ragged paged attention kernel)
# --------------------------------------------------------------------------------------------

def _pages(seed, seq_lens, *, block_size=16, hkv=2, d=128, cache_dtype=jnp.float32):
    """Caches of random pages and a shuffled block table whose unused entries are out of range."""
    rng = np.random.default_rng(seed)
    max_blocks = max(1, -(-max(seq_lens) // block_size)) + 1
    num_blocks = len(seq_lens) * max_blocks + 3
    table = rng.permutation(num_blocks)[: len(seq_lens) * max_blocks].reshape(len(seq_lens), max_blocks)
    used = np.arange(max_blocks)[None, :] < -(-np.asarray(seq_lens)[:, None] // block_size)
    table = np.where(used, table, 10**6)  # the kernel must never copy these
    k_cache = np.array(normal(seed, (num_blocks, block_size, hkv, d)))
    v_cache = np.array(normal(seed + 1, (num_blocks, block_size, hkv, d)))
    for b, length in enumerate(seq_lens):  # slots past a sequence's end in its last page: NaN
        if length % block_size:
            last = table[b, length // block_size]
            k_cache[last, length % block_size:] = v_cache[last, length % block_size:] = np.nan
    cast = lambda x: jnp.asarray(x).astype(cache_dtype)  # noqa: E731
    return cast(k_cache), cast(v_cache), jnp.array(table, jnp.int32), jnp.array(seq_lens, jnp.int32)


def _reference_table(table):
    """The reference gathers every table entry: point the unused ones at block 0."""
    return jnp.where(table >= 10**6, 0, table)


PAGED_KERNEL_CASES = [
    # name, seq_lens, cu_seqlens_q (None: decode), Hq, Hkv, q dtype, cache dtype, options, (block_q, block_kv)
    # prefill chunk, decode row, whole prompt, empty sequence, 2 queries of a long one; the q
    # blocks straddle sequences; 2 padding rows past cu[-1]
    ("ragged", [30, 9, 5, 0, 40], [0, 12, 13, 18, 18, 20], 6, 2, jnp.float32, jnp.float32,
     dict(causal=True), (16, 32)),
    # decode of 20 sequences (two q blocks, the second partial), fp8 pages with per-head scales
    ("decode-fp8", [1, 17, 0, 40, 33, 16, 5, 64, 2, 31, 30, 29, 48, 47, 1, 3, 9, 12, 60, 7], None, 4, 2,
     jnp.bfloat16, jnp.float8_e4m3fn, dict(window=(20, -1), softcap=8.0, k_scale=[0.5, 2.0], v_scale=[1.5, 0.25]),
     (16, 64)),
    # non-causal ragged, MQA
    ("ragged-noncausal", [50, 16, 33], [0, 20, 21, 30], 4, 1, jnp.bfloat16, jnp.bfloat16,
     dict(causal=False, softmax_scale=0.1), (16, 32)),
]


@pytest.mark.parametrize("case", PAGED_KERNEL_CASES, ids=lambda c: c[0])
def test_paged_attention_interpret_matches_reference(case):
    _, seq_lens, cu_q, hq, hkv, dtype, cache_dtype, options, blocks = case
    options = dict(options)
    for name in ("k_scale", "v_scale"):
        if name in options:
            options[name] = jnp.array(options[name], jnp.float32)
    k_cache, v_cache, table, lens = _pages(1, seq_lens, hkv=hkv, cache_dtype=cache_dtype)
    num_tokens = len(seq_lens) if cu_q is None else cu_q[-1] + 2
    q = normal(3, (num_tokens, hq, 128), dtype)
    cu = None if cu_q is None else jnp.array(cu_q, jnp.int32)
    out, lse = lj.paged_attention(q, k_cache, v_cache, table, lens, cu_seqlens_q=cu, return_lse=True,
                                  backend="interpret", block_sizes=lj.PagedBlockSizes(*blocks), **options)
    if cache_dtype != jnp.float8_e4m3fn:  # the f32 reference takes f32 pages (bf16 -> f32 is exact)
        k_cache, v_cache = k_cache.astype(jnp.float32), v_cache.astype(jnp.float32)
    ref, ref_lse = lj.paged_attention(q.astype(jnp.float32), k_cache, v_cache, _reference_table(table), lens,
                                      cu_seqlens_q=cu, return_lse=True, backend="reference", **options)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == ref_lse.shape
    assert_matches(out, ref, 2e-5 if dtype == jnp.float32 else 3e-2, "out")
    assert_matches(lse, ref_lse, 1e-4 if dtype == jnp.float32 else 2e-2, "lse")


def test_paged_attention_double_buffer_has_no_races():
    """Copies run eagerly, so reading a slot whose copy is still in flight would be a race."""
    try:
        from jax._src.pallas.mosaic.interpret import interpret_pallas_call as interpreter
    except ImportError:
        pytest.skip("this jax has no TPU interpreter race detector")
    from jax.experimental.pallas import tpu as pltpu

    seq_lens, cu_q = [30, 9, 5, 0, 40], [0, 12, 13, 18, 18, 20]
    k_cache, v_cache, table, lens = _pages(2, seq_lens)
    q = normal(4, (21, 4, 128))
    params = pltpu.InterpretParams(detect_races=True, dma_execution_mode="eager", uninitialized_memory="nan")
    run = jax.jit(functools.partial(rpa.ragged_paged_attention_tpu, scale=0.1, causal=True, window=(-1, -1),
                                    softcap=0.0, return_lse=False, max_seqlen_q=21,
                                    block_sizes=rpa.PagedBlockSizes(16, 32), interpret=params))
    out = jax.block_until_ready(run(q, k_cache, v_cache, table, lens, jnp.array(cu_q, jnp.int32), None, None))
    assert not interpreter.races.races_found
    ref = lj.paged_attention(q, k_cache, v_cache, _reference_table(table), lens,
                             cu_seqlens_q=jnp.array(cu_q, jnp.int32), softmax_scale=0.1, backend="reference")
    assert_matches(out, ref, 2e-5)


@pytest.mark.parametrize("generation", GENERATIONS)
@pytest.mark.parametrize("decode", [True, False], ids=["decode", "ragged"])
@pytest.mark.parametrize("cache_dtype", [jnp.bfloat16, jnp.float8_e4m3fn], ids=["bf16", "fp8"])
def test_paged_attention_exports_for_tpu(generation, decode, cache_dtype):
    batch, num_tokens = 64, 64 if decode else 1000
    args = [S((num_tokens, 32, 128), jnp.bfloat16), S((4096, 16, 8, 128), cache_dtype),
            S((4096, 16, 8, 128), cache_dtype), S((batch, 256), jnp.int32), S((batch,), jnp.int32),
            None if decode else S((batch + 1,), jnp.int32)]
    if cache_dtype == jnp.float8_e4m3fn:
        args += [S((8,), jnp.float32), S((8,), jnp.float32)]

    def f(q, kc, vc, table, lens, cu=None, k_scale=None, v_scale=None):
        return lj.paged_attention(q, kc, vc, table, lens, cu_seqlens_q=cu, k_scale=k_scale, v_scale=v_scale,
                                  window=(1000, -1), softcap=30.0, return_lse=True, backend="tpu",
                                  block_sizes=rpa.DEFAULT_BLOCK_SIZES[generation])

    assert "tpu_custom_call" in export_for_tpu(f, *args)


def test_paged_attention_shapes_without_a_kernel_fall_back():
    k_cache, v_cache, table, lens = _pages(0, [5, 9], d=64)
    q = normal(1, (2, 2, 64))
    with pytest.raises(lj.BackendUnavailableError, match="head_dim % 128"):
        lj.paged_attention(q, k_cache, v_cache, table, lens, backend="tpu")
    out = lj.paged_attention(q, k_cache, v_cache, _reference_table(table), lens)  # auto on CPU: reference
    assert out.shape == q.shape

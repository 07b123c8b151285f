"""Benchmark of ``paged_attention``: decode over a paged cache against SDPA on contiguous K/V.

Shapes: bf16, Hq=32, Hkv=8, D=128; decode (one query per sequence) at B in {16, 64, 128} x
L in {2k, 4k, 16k} plus B=1, L=32k, each with block sizes 16 and 128; an fp8 (e4m3, per-head
scales) cache at B=64, L=4k; and a chunked-prefill batch (B=4, 512 new queries per sequence over
2k cached keys + the 512 new ones). Anchors, timed in the same run on the same data and
reported as "n/a: <reason>" when they cannot run: SDPA's cuDNN backend (the main anchor) and
SDPA's FlashAttention-2 backend, both on the K/V laid out contiguous [B, Hkv, L, D]; for the
prefill row, our own ``flash_attention`` (Triton) on contiguous K/V of the same shapes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .harness import Harness, Row, Timing
from .report import PlotSpec

OP = "paged_attention"
Q_HEADS = 32
KV_HEADS = 8
HEAD_DIM = 128
BLOCK_SIZES = (16, 128)
DECODE_SHAPES = [(b, n) for b in (16, 64, 128) for n in (2048, 4096, 16384)] + [(1, 32768)]
QUICK_DECODE_SHAPES = [(64, 4096), (1, 32768)]
FP8_SHAPE = (64, 4096)
# Full runs also time other tile shapes and split counts here (block size 16), to check the
# heuristics: (BLOCK_N, num_warps, num_stages) and split counts relative to the chosen one.
TUNING_SHAPES = [(16, 4096), (64, 4096), (1, 32768)]
TUNING_TILES = [(64, 4, 5), (128, 4, 3), (32, 2, 5), (64, 8, 5)]
TUNING_SPLIT_FACTORS = (0.5, 2.0)
PLAN_COLUMN = "plan"
PREFILL = dict(batch=4, cached=2048, new=512)

ANCHOR_CUDNN = "anchor: SDPA cuDNN"
ANCHOR_FLASH = "anchor: SDPA flash (FA2)"
ANCHOR_PRIORITY = (ANCHOR_CUDNN, ANCHOR_FLASH)  # the first that runs is *the* anchor
ANCHOR_PREFILL = "anchor: flash_attention triton (contiguous K/V)"
RATIO_COLUMNS = {ANCHOR_CUDNN: "vs cuDNN", ANCHOR_FLASH: "vs SDPA flash"}
FP8_RATIO = "vs bf16 paged"
DIFF_COLUMN = "max |out - anchor's|"
EAGER_COLUMN = "eager µs/call"
# Serving engines replay decode steps as CUDA graphs, so decode rows (anchors included) are timed
# that way: the GPU's time, without the host's launch gaps (which EAGER_COLUMN shows).
DECODE_METHOD = "graph"
FP8 = torch.float8_e4m3fn

NOTES = [
    f"Decode: q [B, Hq={Q_HEADS}, D={HEAD_DIM}] bf16 (one query per sequence, sees all L keys); K/V caches "
    f"[num_blocks, block_size, Hkv={KV_HEADS}, D] whose blocks are a random permutation (block_table "
    "[B, L/block_size]); random data.",
    "Bytes counted: the K and V of every sequence read once, 2·B·L·Hkv·D·(2 bytes, 1 for fp8); q, out and the "
    "block table are left out (under 0.1%).",
    f"The SDPA anchors get the same K/V values copied to contiguous [B, Hkv, L, D] tensors and q as "
    f"[B, Hq, 1, D], with `enable_gqa=True` (K/V not repeated); on a torch without `enable_gqa` they get K/V "
    f"repeated to Hq heads (note in the row). *vs anchor* compares with `{ANCHOR_CUDNN}` (with SDPA flash where "
    "cuDNN cannot run); the `vs …` columns compare with each anchor (anchor time / our time, above 1: we are faster).",
    f"fp8 row: the same shape with an e4m3 cache and per-head float32 scales; `{FP8_RATIO}` = the bf16 paged "
    "time of the same shape and block size / the fp8 time; its *vs anchor* compares with the bf16 SDPA cuDNN row.",
    f"Chunked prefill: B={PREFILL['batch']} sequences of {PREFILL['cached']} cached + {PREFILL['new']} new tokens "
    f"(the new ones already written, so L={PREFILL['cached'] + PREFILL['new']} keys), {PREFILL['new']} queries each "
    "(varlen q with cu_seqlens_q), causal bottom-right; FLOPs = 4·Hq·D·(visible query-key pairs). Anchor: our "
    "`flash_attention(backend=\"triton\")` with the same q and contiguous [B, L, Hkv, D] K/V.",
    f"`{DIFF_COLUMN}`: the largest difference between our output and an anchor's on the first input set "
    "(a check that both compute the same attention; bf16 outputs). `plan`: the Triton kernel's split-KV count "
    "and tiles (BLOCK_M x BLOCK_N, warps, pipeline stages) for the row.",
    "`tuning: …` rows (full runs, block size 16): the Triton kernel on the same inputs with other tiles or split "
    "counts than its heuristics choose, called below the public API; they show whether the heuristics pick well.",
    "Decode rows, anchors included, are timed as CUDA graphs of back-to-back calls (how serving engines run "
    f"decode steps): GPU time without launch gaps. `{EAGER_COLUMN}` (block size 16): back-to-back eager calls "
    "of the public API; where it exceeds the median, the host's Python and launch cost limits an eager decode step.",
]

PLOT = PlotSpec(x="L", y="gbps", where={"B": 64, "cache": "bf16"},
                title=f"paged_attention decode, bf16, B=64, Hq={Q_HEADS}, Hkv={KV_HEADS}, D={HEAD_DIM}")


def _shape(batch: int, seq_len: int, cache: str = "bf16") -> Dict[str, Any]:
    return {"B": batch, "L": seq_len, "Hq": Q_HEADS, "Hkv": KV_HEADS, "D": HEAD_DIM, "cache": cache}


def _group(shape: Dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in shape.items())


def kv_bytes(batch: int, seq_len: int, elem: int = 2) -> int:
    return 2 * batch * seq_len * KV_HEADS * HEAD_DIM * elem


# -- inputs -----------------------------------------------------------------------------------------

@dataclass
class DecodeSet:
    """One input set: q, and K/V as contiguous [B, Hkv, L, D] (what the anchors read)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


def make_decode_set(batch: int, seq_len: int, device: torch.device) -> DecodeSet:
    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=torch.bfloat16)

    return DecodeSet(rand(batch, Q_HEADS, HEAD_DIM), rand(batch, KV_HEADS, seq_len, HEAD_DIM),
                     rand(batch, KV_HEADS, seq_len, HEAD_DIM))


def to_paged(x: torch.Tensor, block_size: int, table: torch.Tensor, heads_first: bool = True) -> torch.Tensor:
    """Contiguous K or V ([B, Hkv, L, D], or [B, L, Hkv, D] with ``heads_first=False``) scattered into
    a paged cache [num_blocks, block_size, Hkv, D] at the blocks ``table`` [B, L/block_size] names."""
    tokens = x.transpose(1, 2) if heads_first else x  # [B, L, Hkv, D]
    batch, seq_len, heads, dim = tokens.shape
    cache = torch.empty(table.numel(), block_size, heads, dim, device=x.device, dtype=x.dtype)
    cache[table.reshape(-1).long()] = tokens.reshape(batch * seq_len // block_size, block_size, heads, dim)
    return cache


def make_table(batch: int, seq_len: int, block_size: int, device: torch.device) -> torch.Tensor:
    """A random permutation of the cache's blocks: each sequence's pages are scattered."""
    if seq_len % block_size:
        raise ValueError(f"benchmark lengths must be multiples of the block size ({seq_len} % {block_size})")
    blocks = batch * (seq_len // block_size)
    return torch.randperm(blocks, device=device).to(torch.int32).view(batch, seq_len // block_size)


# -- our backends -----------------------------------------------------------------------------------

def _public(backend: str, **options) -> Callable:
    from ..ops.paged_attention import paged_attention

    def call(q, k_cache, v_cache, table, lens, *extra):
        return paged_attention(q, k_cache, v_cache, table, lens, backend=backend, **options)

    return call


def _our_backends(first: Tuple, harness: Harness, what: str, **options) -> List[str]:
    """Our backends (the torch reference excluded: a Python loop, not a contender) that serve
    ``first`` (the public call's arguments); the others are noted with their reason."""
    from .. import _backends
    from ..ops import paged_attention as op_module

    args = _schema_args(*first[:5], **options)
    impls = _backends.implementations(op_module.OP)
    runnable = []
    for backend in _backends.BACKENDS:
        if backend == "torch" or backend not in impls:
            continue
        reason = impls[backend].supports(*args)
        if reason is not None:
            harness.note(f"backend {backend} skipped ({what}): {reason}")
            continue
        runnable.append(backend)
    return runnable


# -- anchors ----------------------------------------------------------------------------------------

def _sdpa_takes_enable_gqa() -> bool:
    import torch.nn.functional as F

    return "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


def _sdpa(backend_name: str) -> Tuple[Callable, str]:
    """SDPA decode with one kernel backend forced: (fn(q, k, v), note)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)
    if _sdpa_takes_enable_gqa():
        def call(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q.unsqueeze(2), k, v, enable_gqa=True)
        return call, ""

    group = Q_HEADS // KV_HEADS

    def call_repeated(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q.unsqueeze(2), k.repeat_interleave(group, dim=1),
                                                  v.repeat_interleave(group, dim=1))
    return call_repeated, "this torch has no enable_gqa: K/V repeated to Hq heads inside the timed call"


def _na_row(label: str, shape: Dict[str, Any], exc: BaseException, **kwargs) -> Row:
    text = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
    note = "; ".join(n for n in (f"n/a: {type(exc).__name__}: {text}", kwargs.pop("note", "")) if n)
    return Row(op=OP, backend=label, shape=dict(shape), median_us=float("nan"), method="n/a", note=note, **kwargs)


def _time_or_na(harness: Harness, label: str, fn: Callable, inputs: List[Tuple], shape: Dict[str, Any],
                method: str = "auto", **row_kwargs) -> Tuple[Row, Optional[Timing]]:
    """Time ``fn``; an implementation that refuses the inputs gives an "n/a" row instead."""
    try:
        fn(*inputs[0])  # fails here when the backend refuses the inputs
        torch.cuda.synchronize()
        timing = harness.time(fn, inputs, method=method)
    except Exception as exc:  # reported, not fatal
        torch.cuda.synchronize()
        harness.log(f"    {label:<40} n/a ({type(exc).__name__}: {str(exc)[:100]})")
        return _na_row(label, shape, exc, **row_kwargs), None
    harness.log(f"    {label:<40} {timing.median_us:10.1f} µs  ({timing.method})")
    return Row.from_timing(OP, label, shape, timing, **row_kwargs), timing


def _max_diff(out: torch.Tensor, expected: torch.Tensor) -> str:
    """Largest elementwise difference of two bf16 outputs of the same attention (a sanity check
    that both sides computed the same thing; bf16 rounding alone gives ~1e-2 at most)."""
    return f"{(out.float() - expected.float()).abs().max().item():.2g}"


# -- decode -----------------------------------------------------------------------------------------

def _decode_case(harness: Harness, batch: int, seq_len: int, with_fp8: bool, quick: bool) -> List[Row]:
    device = harness.device
    shape = _shape(batch, seq_len)
    num_bytes = kv_bytes(batch, seq_len)
    # Each set holds contiguous K/V, one paged copy at a time, and q.
    n_sets = harness.rotation_sets(num_bytes, alloc_bytes=2 * num_bytes + num_bytes // 2)
    harness.log(f"  decode B={batch} L={seq_len}: {n_sets} input set(s)")
    sets = [make_decode_set(batch, seq_len, device) for _ in range(n_sets)]
    rows: List[Row] = []

    # Anchors first: our rows then use the anchor's timing method, so a shape compares like with like.
    anchor_times: Dict[str, float] = {}
    expected: Optional[torch.Tensor] = None  # an anchor's output on the first set: a sanity check
    method = DECODE_METHOD
    for label, backend_name in ((ANCHOR_CUDNN, "CUDNN_ATTENTION"), (ANCHOR_FLASH, "FLASH_ATTENTION")):
        try:
            fn, note = _sdpa(backend_name)
        except Exception as exc:
            rows.append(_na_row(label, shape, exc, bytes=num_bytes))
            continue
        row, timing = _time_or_na(harness, label, fn, [(s.q, s.k, s.v) for s in sets], shape, method=method,
                                  bytes=num_bytes, note=note)
        rows.append(row)
        if timing is not None:
            anchor_times[label] = timing.median_us
            if expected is None:
                expected = fn(sets[0].q, sets[0].k, sets[0].v)[:, :, 0]
    main = next((label for label in ANCHOR_PRIORITY if label in anchor_times), None)
    for row in rows:
        row.is_anchor = row.backend == main

    lens = torch.full((batch,), seq_len, dtype=torch.int32, device=device)
    ours: List[Row] = []
    block_sizes = (16,) if quick and batch == 1 else BLOCK_SIZES
    for block_size in block_sizes:
        paged = []
        for s in sets:
            table = make_table(batch, seq_len, block_size, device)
            paged.append((s.q, to_paged(s.k, block_size, table), to_paged(s.v, block_size, table), table, lens))
        for backend in _our_backends(paged[0], harness, f"B={batch}, L={seq_len}, block {block_size}"):
            label = f"{backend}, block {block_size}"
            row, timing = _time_or_na(harness, label, _public(backend), paged, shape, method=method, bytes=num_bytes)
            if timing is not None and expected is not None:
                row.extra[DIFF_COLUMN] = _max_diff(_public(backend)(*paged[0]), expected)
            if timing is not None and block_size == BLOCK_SIZES[0]:
                row.extra[EAGER_COLUMN] = harness.time(_public(backend), paged, method="eager loop").median_us
            if backend == "triton":
                row.extra[PLAN_COLUMN] = _describe_plan(paged[0])
            ours.append(row)
            if backend == "triton" and block_size == BLOCK_SIZES[0] and not quick and \
                    (batch, seq_len) in TUNING_SHAPES and timing is not None:
                ours += _tuning_rows(harness, paged, shape, num_bytes, method)
            if with_fp8 and block_size == BLOCK_SIZES[0] and timing is not None:
                ours += _fp8_rows(harness, backend, paged, shape, timing, method)
        del paged
        torch.cuda.empty_cache()

    for row in ours:
        for label, column in RATIO_COLUMNS.items():
            row.extra[column] = f"{anchor_times[label] / row.median_us:.2f}x" if label in anchor_times and \
                row.median_us == row.median_us else "n/a"
    del sets
    torch.cuda.empty_cache()
    return rows + ours


def _schema_args(q, k_cache, v_cache, table, lens, *extra, **options) -> tuple:
    from ..ops import paged_attention as op_module

    return op_module._prepare(q, k_cache, v_cache, table, lens, options.get("cu_seqlens_q"),
                              options.get("max_seqlen_q"), None, True, (-1, -1), 0.0, options.get("k_scale"),
                              options.get("v_scale"))


def _describe_plan(first: Tuple, **options) -> str:
    """The Triton kernel's split count and tiles for this call (from its heuristics)."""
    from ..triton import paged_attention as kernel

    args = _schema_args(*first, **options)
    p = kernel.launch_plan(args[0], args[1], args[3], args[5], args[6], args[9], args[10])
    t = p.tiles
    return f"splits {p.num_splits}, {t.block_m}x{t.block_n} w{t.num_warps} s{t.num_stages}"


def _tuning_rows(harness: Harness, paged: List[Tuple], shape: Dict[str, Any], num_bytes: int,
                 method: str) -> List[Row]:
    """The Triton kernel with other tiles and split counts than its heuristics pick (same data)."""
    from ..triton import paged_attention as kernel
    from ..triton.flash_attention_configs import AttentionTiles

    inputs = [_schema_args(*p) for p in paged]
    chosen = kernel.launch_plan(inputs[0][0], inputs[0][1], inputs[0][3], None, 1, -1, 0)
    variants = []
    for block_n, warps, stages in TUNING_TILES:
        tiles = AttentionTiles(chosen.tiles.block_m, block_n, warps, stages)
        if tiles != chosen.tiles:
            variants.append((f"BLOCK_N={block_n} w{warps} s{stages}", dict(_tiles=tiles)))
    for factor in TUNING_SPLIT_FACTORS:
        splits = max(1, int(round(chosen.num_splits * factor)))
        if chosen.num_splits == 1:
            splits = 3 if factor > 1 else 2
        if splits != chosen.num_splits:
            variants.append((f"splits {splits}", dict(_num_splits=splits)))
    tuning_shape = dict(shape, cache="bf16 (tuning)")  # kept off the plot; compared in the bf16 group
    rows = []
    for name, overrides in variants:
        def call(*args, overrides=overrides):
            return kernel.paged_attention(*args, **overrides)

        row, _ = _time_or_na(harness, f"tuning: triton, block {paged[0][1].shape[1]}, {name}", call, inputs,
                             tuning_shape, method=method, bytes=num_bytes, group=_group(shape))
        p = kernel.launch_plan(inputs[0][0], inputs[0][1], inputs[0][3], None, 1, -1, 0,
                               tiles=overrides.get("_tiles"), num_splits=overrides.get("_num_splits"))
        row.extra[PLAN_COLUMN] = (f"splits {p.num_splits}, {p.tiles.block_m}x{p.tiles.block_n} "
                                  f"w{p.tiles.num_warps} s{p.tiles.num_stages}")
        rows.append(row)
    return rows


def _fp8_rows(harness: Harness, backend: str, paged: List[Tuple], bf16_shape: Dict[str, Any], bf16: Timing,
              method: str) -> List[Row]:
    """The same decode with an e4m3 cache (per-head scales), compared with the bf16 paged row."""
    batch, seq_len = bf16_shape["B"], bf16_shape["L"]
    shape = _shape(batch, seq_len, "fp8_e4m3 (per-head scale)")
    num_bytes = kv_bytes(batch, seq_len, elem=1)
    fp8_sets = []
    for q, k_cache, v_cache, table, lens in paged:
        k_scale = k_cache.float().abs().amax(dim=(0, 1, 3)) / 448.0
        v_scale = v_cache.float().abs().amax(dim=(0, 1, 3)) / 448.0
        k8 = (k_cache.float() / k_scale[:, None]).to(FP8)
        v8 = (v_cache.float() / v_scale[:, None]).to(FP8)
        fp8_sets.append((q, k8, v8, table, lens, k_scale, v_scale))
    torch.cuda.empty_cache()

    def call(q, k8, v8, table, lens, k_scale, v_scale):
        from ..ops.paged_attention import paged_attention

        return paged_attention(q, k8, v8, table, lens, k_scale=k_scale, v_scale=v_scale, backend=backend)

    first = fp8_sets[0]
    if backend not in _our_backends(first, harness, "fp8 cache", k_scale=first[5], v_scale=first[6]):
        return []
    label = f"{backend}, block {first[1].shape[1]}"
    row, timing = _time_or_na(harness, label, call, fp8_sets, shape, method=method, bytes=num_bytes,
                              group=_group(bf16_shape))
    if timing is not None:
        row.extra[FP8_RATIO] = f"{bf16.median_us / timing.median_us:.2f}x"
    if backend == "triton":
        row.extra[PLAN_COLUMN] = _describe_plan(first, k_scale=first[5], v_scale=first[6])
    del fp8_sets
    return [row]


# -- chunked prefill --------------------------------------------------------------------------------

def _prefill_flops(batch: int, cached: int, new: int) -> int:
    # Query i of the new ones sits on key cached + i: it sees cached + i + 1 keys.
    pairs = batch * (new * cached + new * (new + 1) // 2)
    return 4 * Q_HEADS * HEAD_DIM * pairs


def _prefill_case(harness: Harness, quick: bool) -> List[Row]:
    from ..ops.flash_attention import flash_attention

    device = harness.device
    batch, cached, new = PREFILL["batch"], PREFILL["cached"], PREFILL["new"]
    seq_len = cached + new
    shape = {"B": batch, "L": seq_len, "Hq": Q_HEADS, "Hkv": KV_HEADS, "D": HEAD_DIM, "cache": "bf16",
             "new queries": new}
    flops = _prefill_flops(batch, cached, new)
    touched = kv_bytes(batch, seq_len) + 2 * batch * new * Q_HEADS * HEAD_DIM * 2
    n_sets = harness.rotation_sets(touched, alloc_bytes=2 * touched)
    harness.log(f"  chunked prefill B={batch}, {cached} cached + {new} new: {n_sets} input set(s)")

    def rand(*s):
        return torch.randn(*s, device=device, dtype=torch.bfloat16)

    sets = [(rand(batch, new, Q_HEADS, HEAD_DIM), rand(batch, seq_len, KV_HEADS, HEAD_DIM),
             rand(batch, seq_len, KV_HEADS, HEAD_DIM)) for _ in range(n_sets)]
    rows: List[Row] = []

    def contiguous(q, k, v):
        return flash_attention(q, k, v, causal=True, backend="triton")

    anchor, anchor_timing = _time_or_na(harness, ANCHOR_PREFILL, contiguous, sets, shape, flops=flops)
    anchor.is_anchor = anchor_timing is not None
    rows.append(anchor)
    method = anchor_timing.method if anchor_timing is not None else "auto"

    lens = torch.full((batch,), seq_len, dtype=torch.int32, device=device)
    cu = torch.arange(0, (batch + 1) * new, new, dtype=torch.int32, device=device)
    for block_size in ((16,) if quick else BLOCK_SIZES):
        paged = []
        for q, k, v in sets:
            table = make_table(batch, seq_len, block_size, device)
            paged.append((q.reshape(batch * new, Q_HEADS, HEAD_DIM), to_paged(k, block_size, table, heads_first=False),
                          to_paged(v, block_size, table, heads_first=False), table, lens))
        options = dict(cu_seqlens_q=cu, max_seqlen_q=new)
        for backend in _our_backends(paged[0], harness, f"chunked prefill, block {block_size}", **options):
            row, timing = _time_or_na(harness, f"{backend}, block {block_size}", _public(backend, **options), paged,
                                      shape, method=method, flops=flops)
            if backend == "triton":
                row.extra[PLAN_COLUMN] = _describe_plan(paged[0], **options)
            if anchor_timing is not None and timing is not None:
                row.extra["vs flash_attention (contiguous)"] = f"{anchor_timing.median_us / timing.median_us:.2f}x"
                expected = contiguous(*sets[0]).reshape(batch * new, Q_HEADS, HEAD_DIM)
                row.extra[DIFF_COLUMN] = _max_diff(_public(backend, **options)(*paged[0]), expected)
            rows.append(row)
        del paged
        torch.cuda.empty_cache()
    del sets
    torch.cuda.empty_cache()
    return rows


# -- run --------------------------------------------------------------------------------------------

PREFILL_CASE = "prefill"


def part_cases(quick: bool) -> List[Any]:
    """What ``run`` loops over, in order: the decode shapes (B, L), then the prefill batch."""
    return list(QUICK_DECODE_SHAPES if quick else DECODE_SHAPES) + [PREFILL_CASE]


def case_label(case: Any) -> str:
    if case == PREFILL_CASE:
        return "prefill B={batch} cached={cached} new={new}".format(**PREFILL)
    return f"decode B={case[0]} L={case[1]}"


# A part of the run (--part I/N) is a contiguous block of part_cases.
PART_CASES = part_cases
PART_WHAT = "decode shapes and prefill case"


def run(harness: Harness, quick: bool = False) -> List[Row]:
    rows: List[Row] = []
    for case in harness.part_of(part_cases(quick), what=PART_WHAT, label=case_label):
        if case == PREFILL_CASE:
            rows += _prefill_case(harness, quick)
        else:
            batch, seq_len = case
            rows += _decode_case(harness, batch, seq_len, with_fp8=(batch, seq_len) == FP8_SHAPE, quick=quick)
    return rows

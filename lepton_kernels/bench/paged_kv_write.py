"""Benchmark of ``paged_kv_write``: every backend against a plain contiguous copy of the same bytes.

Shapes: bf16 keys/values with Hkv=8, D=128, scattered by a random permutation of slots into a
cache with twice as many slots as tokens; block_size 16 over T tokens, one row with block_size
128 and one with an fp8 (e4m3, per-head scales) cache. At T up to ``DISPATCH_MAX_T`` the rows
also give the host's cost per eager call, through the public API, the raw ``torch.ops`` op and
the compiled wrapper without the dispatcher, to show the Python/dispatch overhead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .harness import Harness, Row
from .report import PlotSpec

OP = "paged_kv_write"
NUM_KV_HEADS = 8
HEAD_DIM = 128
TOKENS = (16, 256, 4096, 16384, 65536)
QUICK_TOKENS = (4096, 65536)
SPECIAL_TOKENS = 16384  # the block_size-128 row and the fp8 row
CACHE_SLOTS_PER_TOKEN = 2
DISPATCH_MAX_T = 4096
EAGER_COLUMN = "eager µs/call"
_FP8 = "fp8_e4m3 (per-head scale)"

NOTES = [
    f"k, v: bf16 [T, Hkv={NUM_KV_HEADS}, D={HEAD_DIM}], written into [num_blocks, block_size, Hkv, D] caches "
    f"holding {CACHE_SLOTS_PER_TOKEN}x T slots, at a random permutation of the slots.",
    "Bytes counted: read k and v + write them into the cache (2 bytes/element, 1 for an fp8 cache) + 8 bytes "
    "of slot_mapping per token. The anchor `torch copy_` copies k and v into contiguous buffers of the cache's "
    "dtype (the same bytes, without the slot mapping); for the fp8 row it is a bf16 -> fp8 cast copy without "
    "scales.",
    f"`{EAGER_COLUMN}` (T <= {DISPATCH_MAX_T}): back-to-back eager calls; where it exceeds the median "
    "(GPU time), the host's Python and dispatch cost is what limits the op at that size. "
    "`cuda (torch.ops)` calls `torch.ops.lepton_kernels.paged_kv_write_cuda` without the public API's checks "
    "and backend selection; `cuda (_C wrapper)` calls the compiled kernel's Python wrapper without the torch "
    "dispatcher.",
]

PLOT = PlotSpec(x="T", y="gbps", where={"block_size": 16, "cache": "bf16"},
                exclude_backends=("cuda (torch.ops)", "cuda (_C wrapper)"))


@dataclass(frozen=True)
class Case:
    tokens: int
    block_size: int = 16
    fp8: bool = False

    def shape(self) -> Dict[str, Any]:
        return {"T": self.tokens, "Hkv": NUM_KV_HEADS, "D": HEAD_DIM, "block_size": self.block_size,
                "cache": _FP8 if self.fp8 else "bf16"}

    @property
    def cache_dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn if self.fp8 else torch.bfloat16

    @property
    def elements(self) -> int:
        return self.tokens * NUM_KV_HEADS * HEAD_DIM

    def op_bytes(self) -> int:
        """k and v read (bf16) and written (cache dtype), plus the int64 slot of each token."""
        cache_elem = 1 if self.fp8 else 2
        scales = 2 * NUM_KV_HEADS * 4 if self.fp8 else 0
        return 2 * self.elements * (2 + cache_elem) + 8 * self.tokens + scales

    def anchor_bytes(self) -> int:
        cache_elem = 1 if self.fp8 else 2
        return 2 * self.elements * (2 + cache_elem)

    def alloc_bytes(self) -> int:
        cache_elem = 1 if self.fp8 else 2
        num_slots = self.num_blocks() * self.block_size
        return (2 * self.elements * 2 + 2 * num_slots * NUM_KV_HEADS * HEAD_DIM * cache_elem
                + 2 * self.elements * cache_elem + 8 * self.tokens)

    def num_blocks(self) -> int:
        return math.ceil(CACHE_SLOTS_PER_TOKEN * self.tokens / self.block_size)


def cases(quick: bool) -> List[Case]:
    out = [Case(t) for t in (QUICK_TOKENS if quick else TOKENS)]
    out.append(Case(SPECIAL_TOKENS, block_size=128))
    out.append(Case(SPECIAL_TOKENS, fp8=True))
    return out


def make_set(case: Case, device: torch.device) -> Dict[str, Optional[torch.Tensor]]:
    """One independent set of inputs and outputs for one call (random data, never zeros)."""
    shape = (case.tokens, NUM_KV_HEADS, HEAD_DIM)
    cache_shape = (case.num_blocks(), case.block_size, NUM_KV_HEADS, HEAD_DIM)
    k = torch.randn(shape, dtype=torch.bfloat16, device=device)
    v = torch.randn(shape, dtype=torch.bfloat16, device=device)
    slots = torch.randperm(case.num_blocks() * case.block_size, device=device)[: case.tokens]
    scale = None
    if case.fp8:
        scale = torch.rand(NUM_KV_HEADS, dtype=torch.float32, device=device) * 0.5 + 0.5
    return {
        "k": k, "v": v,
        # Only written: their prior contents do not matter.
        "k_cache": torch.empty(cache_shape, dtype=case.cache_dtype, device=device),
        "v_cache": torch.empty(cache_shape, dtype=case.cache_dtype, device=device),
        "slot_mapping": slots.contiguous(),
        "k_scale": scale, "v_scale": None if scale is None else scale.clone(),
        "k_dst": torch.empty(shape, dtype=case.cache_dtype, device=device),
        "v_dst": torch.empty(shape, dtype=case.cache_dtype, device=device),
    }


_OP_ARGS = ("k", "v", "k_cache", "v_cache", "slot_mapping", "k_scale", "v_scale")


def _op_inputs(sets: List[Dict[str, Any]]) -> List[Tuple]:
    return [tuple(s[name] for name in _OP_ARGS) for s in sets]


def _public(backend: str) -> Callable:
    import lepton_kernels

    def call(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale):
        lepton_kernels.paged_kv_write(k, v, k_cache, v_cache, slot_mapping, k_scale=k_scale, v_scale=v_scale,
                                      backend=backend)

    return call


def _anchor(k, v, k_dst, v_dst):
    k_dst.copy_(k)
    v_dst.copy_(v)


def _variants(case: Case, first: Tuple, harness: Harness) -> List[Tuple[str, Callable, bool]]:
    """(label, function of the op's arguments, can be graph-captured) for every runnable backend."""
    from .. import _backends
    from ..ops import paged_kv_write as _op_module  # registers the backends

    impls = _backends.implementations(_op_module.OP)
    out = []
    cuda_ok = False
    for backend in _backends.BACKENDS:
        impl = impls.get(backend)
        if impl is None:
            continue
        reason = impl.supports(*first)
        if reason is not None:
            harness.note(f"backend {backend} skipped ({'fp8 cache' if case.fp8 else 'bf16 cache'}): {reason}")
            continue
        cuda_ok = cuda_ok or backend == "cuda"
        # The torch reference syncs (boolean indexing): it cannot be captured in a graph.
        out.append((backend, _public(backend), backend != "torch"))
    if cuda_ok and case.tokens <= DISPATCH_MAX_T:
        from ..cuda import paged_kv_write as cuda_wrapper

        out.append(("cuda (torch.ops)", torch.ops.lepton_kernels.paged_kv_write_cuda, True))
        out.append(("cuda (_C wrapper)", cuda_wrapper.paged_kv_write, True))
    return out


def run(harness: Harness, quick: bool = False) -> List[Row]:
    rows: List[Row] = []
    for case in cases(quick):
        n_sets = harness.rotation_sets(case.op_bytes(), alloc_bytes=case.alloc_bytes())
        harness.log(f"  T={case.tokens} block_size={case.block_size} cache={case.shape()['cache']}: "
                    f"{n_sets} rotated input set(s)")
        sets = [make_set(case, harness.device) for _ in range(n_sets)]
        op_inputs = _op_inputs(sets)
        anchor_inputs = [(s["k"], s["v"], s["k_dst"], s["v_dst"]) for s in sets]
        eager = case.tokens <= DISPATCH_MAX_T

        # The anchor first: the backends then use its timing method where they can, so the
        # rows of one shape compare like with like.
        anchor_label = "anchor: torch copy_" + (" (bf16->fp8 cast)" if case.fp8 else "")
        variants = [(anchor_label, _anchor, anchor_inputs, True, case.anchor_bytes())]
        variants += [(label, fn, op_inputs, graph_ok, case.op_bytes())
                     for label, fn, graph_ok in _variants(case, op_inputs[0], harness)]
        method = "auto"
        for label, fn, inputs, graph_ok, num_bytes in variants:
            is_anchor = fn is _anchor
            timing = harness.time(fn, inputs, method=method if graph_ok else "auto", graph_ok=graph_ok)
            if is_anchor:
                method = timing.method
            row = Row.from_timing(OP, label, case.shape(), timing, bytes=num_bytes, is_anchor=is_anchor)
            if eager:
                row.extra[EAGER_COLUMN] = harness.time(fn, inputs, method="eager loop").median_us
            rows.append(row)
            harness.log(f"    {label:<38} {timing.median_us:10.2f} µs  ({timing.method})")

        del sets, op_inputs, anchor_inputs, variants
        torch.cuda.empty_cache()
    return rows

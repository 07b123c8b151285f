"""Tile shapes for the Triton attention forward, chosen by a table instead of autotuning.

Autotuning would benchmark on first call (slow, nondeterministic, and impossible under the
interpreter); a table keyed on (head dim, dtype, architecture) is cheap and reproducible.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch


@dataclass(frozen=True)
class AttentionTiles:
    block_m: int  # query rows per program (after GQA packing, query rows x heads)
    block_n: int  # keys per inner-loop step
    num_warps: int
    num_stages: int


# (BLOCK_D upper bound, block_m, block_n, num_warps, num_stages), first match wins.
# Hopper, measured on an H200 (bf16, H=32, B*S=16k, Triton 3.6): 8 warps (two warpgroups
# sharing the 128 query rows) beat 4 at every head dim; 4 warps with a 128x128 tile spill.
# D=128: 128x64 x3 stages 473/442 TFLOP/s (non-causal/causal, S=4k), 128x128 x3 482/413,
# 128x128 x2 463/403. D=64: 128x64 435/389, 128x128 358/317. D=256: 128x64 x2 504/422,
# 128x32 x3 452/424 (shared memory allows 2 stages of 64x256 K and V tiles).
_SM90_16BIT = (
    (64, 128, 64, 8, 3),
    (128, 128, 64, 8, 3),
    (256, 128, 64, 8, 2),
)
# Without masks (no causal/window) the wider key tile wins at D=128 (482 vs 473, 418 vs 405).
_SM90_16BIT_UNMASKED = (
    (64, 128, 64, 8, 3),
    (128, 128, 128, 8, 3),
    (256, 128, 64, 8, 2),
)
# Ampere/Ada: 164 KB (A100) or 100 KB (consumer) of shared memory, mma.sync; smaller N tiles.
_SM80_16BIT = (
    (64, 128, 64, 4, 3),
    (128, 128, 64, 4, 2),
    (256, 64, 32, 4, 2),
)
# fp32 operands: twice the bytes per tile, so half the tile.
_FP32 = (
    (64, 64, 32, 4, 2),
    (128, 64, 32, 4, 2),
    (256, 32, 32, 4, 1),
)
# The interpreter runs each program in numpy: few, mid-sized tiles keep it quick.
_INTERPRETER = AttentionTiles(32, 32, 4, 1)


def _lookup(table, block_d: int) -> AttentionTiles:
    for max_d, bm, bn, warps, stages in table:
        if block_d <= max_d:
            return AttentionTiles(bm, bn, warps, stages)
    raise ValueError(f"no tile config for padded head dim {block_d}")


def attention_tiles(
    block_d: int,
    dtype: torch.dtype,
    capability: Tuple[int, int],
    rows: int,
    interpreting: bool,
    masked: bool = True,
) -> AttentionTiles:
    """Pick tiles for one call.

    Args:
        block_d: head dim padded to a power of two.
        dtype: q/k/v dtype.
        capability: CUDA compute capability, e.g. (9, 0); ignored when interpreting.
        rows: the most query rows one program could have to cover (longest query sequence,
            times the packed GQA group); small counts shrink BLOCK_M so decode wastes less.
        interpreting: running under ``TRITON_INTERPRET=1``.
        masked: the call has a causal or window mask (diagonal blocks favour narrower key tiles).
    """
    if interpreting:
        tiles = _INTERPRETER
    elif dtype == torch.float32:
        tiles = _lookup(_FP32, block_d)
    elif capability >= (9, 0):
        tiles = _lookup(_SM90_16BIT if masked else _SM90_16BIT_UNMASKED, block_d)
    else:
        tiles = _lookup(_SM80_16BIT, block_d)
    # tl.dot needs M >= 16; a query block larger than the rows present only burns compute.
    block_m = max(16, min(tiles.block_m, _next_pow2(rows)))
    if block_m != tiles.block_m:
        # Short query blocks are bandwidth-bound on K/V: one warpgroup, longer key tiles.
        warps = 4 if block_m <= 64 else tiles.num_warps
        tiles = AttentionTiles(block_m, tiles.block_n, warps, tiles.num_stages)
    return tiles


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def shared_memory_budget(capability: Tuple[int, int]) -> int:
    """Usable shared memory per program: A100/H100-class parts have 164-227 KB, others ~100 KB."""
    if capability in ((8, 0), (8, 7)):
        return 160 * 1024
    if capability[0] in (9, 10):
        return 224 * 1024
    return 96 * 1024


def decode_tiles(block_d: int, block_m: int, cache_dtype: torch.dtype, q_dtype: torch.dtype,
                 capability: Tuple[int, int], interp: bool) -> AttentionTiles:
    """Tiles for one-query programs of the paged kernel: bandwidth-bound, so sized by the bytes
    of K/V in flight.

    Stages: the page lookup feeding each K/V address takes a pipeline stage of its own and the
    small-M dot (mma.sync) another, so Triton 3.6 keeps two K/V buffers in flight only at
    num_stages=5 (checked in the compiled IR: 3 or 4 stages give a single buffer).

    Hopper, one 16-row tile (GQA groups up to 16), swept on an H100 (Hq 32 / Hkv 8, D=128,
    B 1-128 x L 2k-32k, block sizes 16 and 128, CUDA-graph time):
      * 16-bit caches: 16K elements of K per tile (128 keys at D=128), two buffers: ~144 KB, one
        program per SM, split to about one per SM. 1.03-1.12x the 64-key tiles at three per SM
        on every shape (B=64, L=4k: 359 vs 400 us).
      * fp8 caches are converted in registers, so many small programs hide the conversion
        better than a few deep ones: 4K elements (32 keys at D=128), 2 warps, about four programs
        per SM (B=64, L=4k: 196 vs 250 us for the 16-bit tiles' shape).
    Elsewhere (and for larger row tiles or float32 queries): 8K elements per tile (64 keys at
    D=128), two buffers where they fit (~72 KB at 16 bits: three programs per H100 SM)."""
    if interp:
        return AttentionTiles(block_m, 16, 4, 1)
    elem = 4 if q_dtype == torch.float32 else cache_dtype.itemsize
    budget = shared_memory_budget(capability)
    if capability[0] == 9 and block_m <= 16 and q_dtype != torch.float32:
        if elem == 1:
            return AttentionTiles(block_m, max(16, min(128, 4096 // block_d)), 2, 5)
        block_n = max(16, min(128, 16384 // block_d))
        if 2 * 2 * block_n * block_d * elem + 16 * 1024 <= budget:
            return AttentionTiles(block_m, block_n, 4, 5)
    block_n = max(16, min(128, (4096 if elem == 4 else 8192) // block_d))
    warps = 4 if block_m <= 64 else 8
    two_buffers = 2 * 2 * block_n * block_d * elem + 16 * 1024
    stages = 5 if two_buffers <= budget else 3
    return AttentionTiles(block_m, block_n, warps, stages)


def decode_programs_per_sm(tiles: AttentionTiles, block_d: int, cache_dtype: torch.dtype, q_dtype: torch.dtype,
                           capability: Tuple[int, int]) -> int:
    """Resident one-query programs per SM that split-KV aims to fill: their K/V buffers (two at
    num_stages=5) plus ~8 KB of the rest against the shared memory, at most four (the fp8
    tiles: more splits than that only add partials)."""
    elem = 4 if q_dtype == torch.float32 else cache_dtype.itemsize
    buffers = 2 if tiles.num_stages >= 5 else 1
    per_program = buffers * 2 * tiles.block_n * block_d * elem + 8 * 1024
    return max(1, min(4, shared_memory_budget(capability) // per_program))

"""Spreading work over the GPU's SMs, for every backend: the device facts launch plans read (SM
count, compute capability; cached per device) and how many key ranges to split attention
programs into (flash-decoding). Shapes and device properties only, never
data, so a call's launch shape is fixed for CUDA-graph capture."""
from __future__ import annotations

import functools
from typing import Tuple

import torch

# At most this many splits, and resident decode programs per SM unless the caller knows better
# (sm_90 compile of 64-key tiles: ~72 KB of shared memory and ~120 registers per program).
MAX_SPLITS = 128
DECODE_PROGRAMS_PER_SM = 3
# Cost of a program besides its key tiles (Q load, epilogue, partial write), in tiles.
PROGRAM_OVERHEAD_TILES = 2
COMBINE_OVERHEAD_TILES = 1
# A split gets at least this many key tiles when its sequence is long enough.
MIN_TILES_PER_SPLIT = 2


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def current_sm_count(device: torch.device) -> int:
    return sm_count(_index(device))


@functools.lru_cache(maxsize=None)
def capability(device_index: int) -> Tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def current_capability(device: torch.device) -> Tuple[int, int]:
    return capability(_index(device))


def choose_num_splits(programs: int, max_tiles: int, sm_count: int, decode: bool,
                      programs_per_sm: int = DECODE_PROGRAMS_PER_SM) -> int:
    """How many ranges to split each program's keys into.

    ``programs``: (query block, head group) programs; ``max_tiles``: the most key tiles one of
    them can have (from the block table's capacity, or the window). Decode programs are
    bandwidth-bound: ``splits_for_slots`` with ``programs_per_sm`` resident per SM (what their
    tiles' shared memory allows). Query-block programs
    fill an SM alone and their split
    partials are large (rows x head dim in fp32): split only a GPU less than half busy, and
    only up to one wave."""
    if programs <= 0 or max_tiles <= MIN_TILES_PER_SPLIT:
        return 1
    limit = min(MAX_SPLITS, max_tiles // MIN_TILES_PER_SPLIT)
    if not decode:
        if 2 * programs > sm_count:
            return 1
        return max(1, min(sm_count // programs, limit))
    return splits_for_slots(programs, max_tiles, max(1, sm_count * programs_per_sm))


@functools.lru_cache(maxsize=4096)  # called on every launch: keep the loop off the hot path
def splits_for_slots(programs: int, max_tiles: int, slots: int) -> int:
    """Splits for bandwidth-bound programs of which ``slots`` fit the GPU at once: none when
    they fill most slots already; otherwise the count minimizing (waves of programs) x (tiles
    per split + overhead), fewer splits on ties."""
    if programs <= 0 or max_tiles <= MIN_TILES_PER_SPLIT or 5 * programs >= 4 * slots:
        return 1
    limit = min(MAX_SPLITS, max_tiles // MIN_TILES_PER_SPLIT)
    best, best_cost = 1, None
    for splits in range(1, limit + 1):
        waves = -(-programs * splits // slots)
        cost = waves * (-(-max_tiles // splits) + PROGRAM_OVERHEAD_TILES)
        if splits > 1:
            cost += COMBINE_OVERHEAD_TILES
        if best_cost is None or cost < best_cost:
            best, best_cost = splits, cost
    return best

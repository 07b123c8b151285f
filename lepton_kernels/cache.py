"""A paged KV cache: block allocation, sequence bookkeeping and the inputs of the paged kernels.

The cache stores keys and values in fixed-size blocks of ``block_size`` tokens, laid out
``[num_blocks, block_size, Hkv, D]`` per layer as ``paged_kv_write`` and ``paged_attention``
expect. A sequence owns an ordered list of blocks (its block table); token ``t`` lives in
block ``blocks[t // block_size]`` at offset ``t % block_size``, i.e. in slot
``blocks[t // block_size] * block_size + t % block_size``.

Blocks are reference counted so forked sequences (beam search, parallel sampling, a shared
system prompt) share their common prefix. Only full blocks are shared: ``fork`` copies a
partially filled last block, so a sequence always appends into a block nobody else reads.

All bookkeeping lives on the host; the tensors the kernels take (slot mapping, block tables,
sequence lengths) are built as Python lists and moved to the cache's device in one copy each.
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence as _SequenceABC
from typing import Dict, Iterable, List, Optional, Sequence, Union

import torch

from ._validate import FLOAT_DTYPES

KV_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn}
MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = 8, 256


class OutOfBlocksError(RuntimeError):
    """Not enough free cache blocks for a request; nothing was allocated.

    A scheduler catches it to preempt or delay sequences. ``requested`` and ``free`` say how
    many blocks were asked for and how many there were.
    """

    def __init__(self, requested: int, free: int, total: int):
        super().__init__(f"out of KV cache blocks: requested {requested}, only {free} of {total} free")
        self.requested, self.free, self.total = requested, free, total


def _check_int(name: str, value: object, minimum: int) -> int:
    # bool is an int subclass, but True as a block count is a bug, not a request for one block.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


class BlockAllocator:
    """Reference-counted allocator of ``num_blocks`` cache blocks, ids ``0 .. num_blocks - 1``.

    Every operation is O(1) per block. Allocation order is deterministic: fresh blocks come
    lowest id first, and a freed block is the next one handed out (still warm in caches).
    """

    def __init__(self, num_blocks: int):
        self.num_blocks = _check_int("num_blocks", num_blocks, 1)
        self._refcounts = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: pop() gives the lowest id first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_allocated(self) -> int:
        return self.num_blocks - len(self._free)

    def refcount(self, block: int) -> int:
        """How many owners ``block`` has (0 when free)."""
        return self._refcounts[self._check_block(block)]

    def allocate(self, n: int = 1) -> List[int]:
        """Take ``n`` free blocks (reference count 1 each).

        Raises:
            OutOfBlocksError: fewer than ``n`` blocks are free; nothing is allocated.
        """
        _check_int("n", n, 0)
        if n > len(self._free):
            raise OutOfBlocksError(n, len(self._free), self.num_blocks)
        blocks = [self._free.pop() for _ in range(n)]
        for block in blocks:
            self._refcounts[block] = 1
        return blocks

    def share(self, blocks: Iterable[int]) -> List[int]:
        """Add an owner to each allocated block (a second sequence now reads them); returns them."""
        blocks = list(blocks)
        for block in blocks:
            if self._refcounts[self._check_block(block)] == 0:
                raise ValueError(f"cannot share block {block}: it is not allocated")
        for block in blocks:
            self._refcounts[block] += 1
        return blocks

    fork = share

    def free(self, blocks: Iterable[int]) -> None:
        """Drop one owner of each block; a block with no owners left becomes free.

        Raises:
            ValueError: a block is not allocated (or would be freed more times than it has
                owners); nothing is freed.
        """
        blocks = list(blocks)
        # Validate the whole request first so a bad id leaves every count as it was.
        drops: Dict[int, int] = {}
        for block in blocks:
            self._check_block(block)
            drops[block] = drops.get(block, 0) + 1
            if drops[block] > self._refcounts[block]:
                what = "not allocated" if self._refcounts[block] == 0 else "already freed (double free)"
                raise ValueError(f"cannot free block {block}: it is {what}")
        for block in blocks:
            self._refcounts[block] -= 1
            if self._refcounts[block] == 0:
                self._free.append(block)

    def _check_block(self, block: object) -> int:
        if isinstance(block, bool) or not isinstance(block, int):
            raise TypeError(f"block ids must be ints, got {type(block).__name__}")
        if not 0 <= block < self.num_blocks:
            raise ValueError(f"block {block} is out of range [0, {self.num_blocks})")
        return block

    def __repr__(self) -> str:
        return f"BlockAllocator(num_blocks={self.num_blocks}, num_free={self.num_free})"


class _Sequence:
    __slots__ = ("blocks", "num_tokens")

    def __init__(self, blocks: List[int], num_tokens: int):
        self.blocks, self.num_tokens = blocks, num_tokens


class PagedKVCache:
    """Per-layer paged K/V caches, their block allocator and the sequences stored in them.

    Args:
        num_blocks: blocks per layer (every layer uses the same block ids).
        block_size: tokens per block, a power of two from 8 to 256.
        num_kv_heads, head_dim: ``Hkv`` and ``D`` of the keys and values.
        num_layers: caches to allocate, one pair per layer, all in one allocation.
        dtype: dtype of the keys, values and queries the cache is used with (float16,
            bfloat16 or float32); also the storage dtype unless ``kv_dtype`` says otherwise.
        kv_dtype: None (store ``dtype``) or "fp8_e4m3": store ``float8_e4m3fn`` holding
            ``value / scale`` with float32 per-kv-head scales ``k_scale[l]``/``v_scale[l]``
            (default 1.0; see ``set_scales``).
        device: where the caches live.

    Attributes:
        k_cache, v_cache: per-layer views ``[num_blocks, block_size, Hkv, D]``.
        k_scale, v_scale: per-layer float32 ``[Hkv]`` views (fp8 only, else None).
        allocator: the ``BlockAllocator``.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        num_layers: int = 1,
        dtype: torch.dtype = torch.bfloat16,
        kv_dtype: Optional[str] = None,
        device: Union[str, torch.device] = "cuda",
    ):
        _check_int("num_blocks", num_blocks, 1)
        _check_int("block_size", block_size, 1)
        if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE or block_size & (block_size - 1):
            raise ValueError(
                f"block_size must be a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}, got {block_size}"
            )
        _check_int("num_kv_heads", num_kv_heads, 1)
        _check_int("head_dim", head_dim, 1)
        _check_int("num_layers", num_layers, 1)
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of float16, bfloat16, float32, got {dtype}")
        if kv_dtype is not None and kv_dtype not in KV_DTYPES:
            known = ", ".join(["None"] + [repr(k) for k in KV_DTYPES])
            raise ValueError(f"kv_dtype must be one of {known}, got {kv_dtype!r}")
        try:
            device = torch.device(device)
        except (TypeError, RuntimeError) as e:
            raise ValueError(f"device {device!r} is not a valid torch device: {e}") from None

        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_kv_heads, self.head_dim, self.num_layers = num_kv_heads, head_dim, num_layers
        self.dtype, self.kv_dtype, self.device = dtype, kv_dtype, device
        self.cache_dtype = KV_DTYPES[kv_dtype] if kv_dtype is not None else dtype

        # One allocation for every layer's K and V. Zero-filled: kernels may load a whole block
        # and mask the unused slots, and 0 * NaN garbage would still be NaN.
        shape = (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
        self._storage = torch.zeros(shape, dtype=self.cache_dtype, device=device)
        self.k_cache: List[torch.Tensor] = [self._storage[layer, 0] for layer in range(num_layers)]
        self.v_cache: List[torch.Tensor] = [self._storage[layer, 1] for layer in range(num_layers)]
        self.k_scale: Optional[List[torch.Tensor]] = None
        self.v_scale: Optional[List[torch.Tensor]] = None
        if kv_dtype is not None:
            self._scales = torch.ones(num_layers, 2, num_kv_heads, dtype=torch.float32, device=device)
            self.k_scale = [self._scales[layer, 0] for layer in range(num_layers)]
            self.v_scale = [self._scales[layer, 1] for layer in range(num_layers)]

        self.allocator = BlockAllocator(num_blocks)
        self._seqs: Dict[Hashable, _Sequence] = {}

    # -- sizes -----------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    @property
    def nbytes(self) -> int:
        """Bytes of the K/V storage (all layers)."""
        return self._storage.numel() * self._storage.element_size()

    def blocks_needed(self, seq_id: Hashable, n: int) -> int:
        """New blocks that ``append_slots(seq_id, n)`` would allocate."""
        seq = self._get(seq_id)
        _check_int("n", n, 0)
        return self._blocks_for(seq.num_tokens + n) - len(seq.blocks)

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- sequences -------------------------------------------------------------------------------

    def add_sequence(self, seq_id: Hashable, num_tokens: int = 0) -> None:
        """Register a new sequence with room for its first ``num_tokens`` tokens (e.g. a prompt).

        Their slots are ``slot_mapping([seq_id], num_tokens)``. Raises ``OutOfBlocksError``
        (registering nothing) when the blocks are not there.
        """
        self._check_new_id("seq_id", seq_id)
        _check_int("num_tokens", num_tokens, 0)
        blocks = self.allocator.allocate(self._blocks_for(num_tokens))
        self._seqs[seq_id] = _Sequence(blocks, num_tokens)

    def append_slots(self, seq_id: Hashable, n: int = 1) -> torch.Tensor:
        """Reserve slots for ``n`` new tokens of a sequence, allocating blocks as needed.

        Returns:
            int64 ``[n]`` slots of the new tokens, on the cache's device.

        Raises:
            OutOfBlocksError: not enough free blocks; the sequence is left unchanged.
        """
        seq = self._get(seq_id)
        _check_int("n", n, 0)
        needed = self._blocks_for(seq.num_tokens + n) - len(seq.blocks)
        seq.blocks.extend(self.allocator.allocate(needed))  # raises before anything changes
        start = seq.num_tokens
        seq.num_tokens += n
        return self._to_device(self._slots(seq, start, seq.num_tokens), torch.int64)

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """Start ``child_id`` as a copy of ``parent_id``, sharing its full blocks.

        A partially filled last block is copied (all layers) into a new block of the child,
        so both sequences can keep appending without writing into a shared block.
        """
        parent = self._get(parent_id, "parent_id")
        self._check_new_id("child_id", child_id)
        blocks = list(parent.blocks)
        if parent.num_tokens % self.block_size:
            (copy,) = self.allocator.allocate(1)  # the only step that can fail: do it first
            self._storage[:, :, copy].copy_(self._storage[:, :, blocks[-1]])
            self.allocator.share(blocks[:-1])
            blocks[-1] = copy
        else:
            self.allocator.share(blocks)
        self._seqs[child_id] = _Sequence(blocks, parent.num_tokens)

    def free_sequence(self, seq_id: Hashable) -> None:
        """Forget a sequence and release its blocks (shared ones stay with their other owners)."""
        seq = self._get(seq_id)
        self.allocator.free(seq.blocks)
        del self._seqs[seq_id]

    def seq_len(self, seq_id: Hashable) -> int:
        return self._get(seq_id).num_tokens

    def block_table(self, seq_id: Hashable) -> List[int]:
        return list(self._get(seq_id).blocks)

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self._seqs

    def __len__(self) -> int:
        return len(self._seqs)

    @property
    def seq_ids(self) -> List[Hashable]:
        return list(self._seqs)

    # -- kernel inputs ---------------------------------------------------------------------------

    def slot_mapping(self, seq_ids: Sequence[Hashable], num_new_tokens: Union[int, Sequence[int]]) -> torch.Tensor:
        """int64 ``[T]`` slots of each sequence's last ``num_new_tokens`` tokens, concatenated.

        ``num_new_tokens`` is one count for every sequence or one per sequence.
        """
        seqs = self._get_many(seq_ids)
        if isinstance(num_new_tokens, int) and not isinstance(num_new_tokens, bool):
            counts = [num_new_tokens] * len(seqs)
        elif isinstance(num_new_tokens, _SequenceABC):
            counts = list(num_new_tokens)
            if len(counts) != len(seqs):
                raise ValueError(f"num_new_tokens must have one count per sequence ({len(seqs)}), "
                                 f"got {len(counts)}")
        else:
            raise TypeError(f"num_new_tokens must be an int or a sequence of ints, "
                            f"got {type(num_new_tokens).__name__}")
        slots: List[int] = []
        for seq_id, seq, count in zip(seq_ids, seqs, counts):
            _check_int("num_new_tokens", count, 0)
            if count > seq.num_tokens:
                raise ValueError(f"num_new_tokens ({count}) exceeds the length of sequence {seq_id!r} "
                                 f"({seq.num_tokens})")
            slots.extend(self._slots(seq, seq.num_tokens - count, seq.num_tokens))
        return self._to_device(slots, torch.int64)

    def block_tables(self, seq_ids: Sequence[Hashable], max_blocks: Optional[int] = None) -> torch.Tensor:
        """int32 ``[B, max_blocks]`` block tables, padded with 0.

        ``max_blocks`` fixes the width (e.g. for CUDA graphs); by default it is the longest
        table (at least 1).
        """
        seqs = self._get_many(seq_ids)
        longest = max((len(s.blocks) for s in seqs), default=0)
        if max_blocks is None:
            width = max(longest, 1)
        else:
            width = _check_int("max_blocks", max_blocks, 1)
            if longest > width:
                raise ValueError(f"max_blocks ({max_blocks}) is smaller than the longest block table ({longest})")
        rows: List[int] = []
        for seq in seqs:
            rows.extend(seq.blocks)
            rows.extend([0] * (width - len(seq.blocks)))
        return self._to_device(rows, torch.int32).view(len(seqs), width)

    def seq_lens(self, seq_ids: Sequence[Hashable]) -> torch.Tensor:
        """int32 ``[B]`` lengths (cached tokens, new ones included)."""
        return self._to_device([s.num_tokens for s in self._get_many(seq_ids)], torch.int32)

    # -- kernels ---------------------------------------------------------------------------------

    def set_scales(
        self,
        layer: int,
        k_scale: Union[float, torch.Tensor, None] = None,
        v_scale: Union[float, torch.Tensor, None] = None,
    ) -> None:
        """Set an fp8 cache's dequantization scales of one layer (a number or ``[Hkv]`` values).

        Set them before writing: stored values are ``x / scale`` of the scale at write time.
        """
        if self.k_scale is None:
            raise ValueError(f"set_scales applies only to fp8 caches; this cache stores {self.cache_dtype}")
        layer = self._check_layer(layer)
        for name, value, target in (("k_scale", k_scale, self.k_scale), ("v_scale", v_scale, self.v_scale)):
            if value is None:
                continue
            if isinstance(value, torch.Tensor):
                if value.numel() != 1 and tuple(value.shape) != (self.num_kv_heads,):
                    raise ValueError(f"{name} must hold one value or have shape ({self.num_kv_heads},), "
                                     f"got shape {tuple(value.shape)}")
            elif isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a float or a torch.Tensor, got {type(value).__name__}")
            target[layer].copy_(torch.as_tensor(value, dtype=torch.float32).reshape(-1).expand(self.num_kv_heads))

    def write(
        self,
        layer: int,
        k: torch.Tensor,
        v: torch.Tensor,
        slot_mapping: torch.Tensor,
        backend: str = "auto",
    ) -> None:
        """Write new keys/values ``[T, Hkv, D]`` of ``layer`` into their slots (``paged_kv_write``)."""
        from .ops.paged_kv_write import paged_kv_write

        layer = self._check_layer(layer)
        paged_kv_write(k, v, self.k_cache[layer], self.v_cache[layer], slot_mapping,
                       k_scale=self.k_scale[layer] if self.k_scale is not None else None,
                       v_scale=self.v_scale[layer] if self.v_scale is not None else None,
                       backend=backend)

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        seq_ids: Sequence[Hashable],
        *,
        max_blocks: Optional[int] = None,
        backend: str = "auto",
        **kwargs,
    ):
        """``paged_attention`` of ``q`` over ``layer``'s cache for the sequences ``seq_ids``.

        Decode: ``q`` is ``[B, Hq, D]``, one (already written) token per sequence. Other
        keyword arguments (``softmax_scale``, ``window``, ``softcap``, ``cu_seqlens_q``,
        ``return_lse`` ...) go to ``paged_attention``. Builds the block tables and lengths on
        every call; a CUDA-graph loop should build them once and call ``paged_attention``.
        """
        from .ops.paged_attention import paged_attention

        layer = self._check_layer(layer)
        for name in ("k_scale", "v_scale", "block_table", "seq_lens"):
            if name in kwargs:
                raise TypeError(f"attend() sets {name} from the cache; do not pass it")
        return paged_attention(q, self.k_cache[layer], self.v_cache[layer],
                               self.block_tables(seq_ids, max_blocks), self.seq_lens(seq_ids),
                               k_scale=self.k_scale[layer] if self.k_scale is not None else None,
                               v_scale=self.v_scale[layer] if self.v_scale is not None else None,
                               backend=backend, **kwargs)

    # -- helpers ---------------------------------------------------------------------------------

    def _slots(self, seq: _Sequence, start: int, end: int) -> List[int]:
        """Slots of tokens ``start .. end - 1``, one ``range`` per block touched."""
        slots: List[int] = []
        bs = self.block_size
        pos = start
        while pos < end:
            block_end = min(end, (pos // bs + 1) * bs)
            base = seq.blocks[pos // bs] * bs - (pos // bs) * bs
            slots.extend(range(base + pos, base + block_end))
            pos = block_end
        return slots

    def _to_device(self, values: List[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(self.device)

    def _get(self, seq_id: Hashable, name: str = "seq_id") -> _Sequence:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise ValueError(f"{name} {seq_id!r} is not a sequence of this cache") from None
        except TypeError:
            raise TypeError(f"{name} must be hashable, got {type(seq_id).__name__}") from None

    def _get_many(self, seq_ids: Sequence[Hashable]) -> List[_Sequence]:
        if isinstance(seq_ids, (str, bytes)) or not isinstance(seq_ids, _SequenceABC):
            raise TypeError(f"seq_ids must be a list or tuple of sequence ids, got {type(seq_ids).__name__}")
        return [self._get(seq_id, "seq_ids entry") for seq_id in seq_ids]

    def _check_new_id(self, name: str, seq_id: Hashable) -> None:
        if not isinstance(seq_id, Hashable):
            raise TypeError(f"{name} must be hashable, got {type(seq_id).__name__}")
        if seq_id in self._seqs:
            raise ValueError(f"{name} {seq_id!r} is already a sequence of this cache")

    def _check_layer(self, layer: object) -> int:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layer must be an int, got {type(layer).__name__}")
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer}")
        return layer

    def __repr__(self) -> str:
        return (f"PagedKVCache(num_blocks={self.num_blocks}, block_size={self.block_size}, "
                f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, num_layers={self.num_layers}, "
                f"cache_dtype={self.cache_dtype}, device={self.device}, sequences={len(self._seqs)}, "
                f"free_blocks={self.num_free_blocks})")

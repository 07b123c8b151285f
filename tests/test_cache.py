"""BlockAllocator and PagedKVCache bookkeeping, kernel inputs, and write/attend end to end (CPU)."""
from __future__ import annotations

import pytest
import torch

from lepton_kernels.cache import BlockAllocator, OutOfBlocksError, PagedKVCache
from lepton_kernels.ops.flash_attention import flash_attention

FP8 = torch.float8_e4m3fn


def make_cache(num_blocks=16, block_size=8, hkv=2, d=16, **kw):
    kw.setdefault("dtype", torch.float32)
    return PagedKVCache(num_blocks, block_size, hkv, d, device="cpu", **kw)


# -- BlockAllocator ------------------------------------------------------------------------------

def test_allocator_allocate_free_reuse():
    alloc = BlockAllocator(5)
    assert alloc.allocate(2) == [0, 1]
    assert alloc.allocate() == [2]
    assert (alloc.num_free, alloc.num_allocated) == (2, 3)
    assert [alloc.refcount(b) for b in range(5)] == [1, 1, 1, 0, 0]
    alloc.free([1])
    assert alloc.refcount(1) == 0 and alloc.num_free == 3
    assert alloc.allocate(2) == [1, 3]  # the freed block comes back first, then fresh ones in order
    assert alloc.allocate(0) == []


def test_allocator_exhaustion_raises_and_changes_nothing():
    alloc = BlockAllocator(4)
    alloc.allocate(3)
    with pytest.raises(OutOfBlocksError, match="requested 2.*1 of 4 free") as info:
        alloc.allocate(2)
    assert isinstance(info.value, RuntimeError)
    assert (info.value.requested, info.value.free) == (2, 1)
    assert alloc.num_free == 1 and alloc.refcount(3) == 0
    assert alloc.allocate(1) == [3]


def test_allocator_share_and_refcounts():
    alloc = BlockAllocator(4)
    blocks = alloc.allocate(2)
    assert alloc.share(blocks) == blocks
    assert alloc.refcount(0) == 2 and alloc.refcount(1) == 2
    alloc.free(blocks)
    assert alloc.refcount(0) == 1 and alloc.num_free == 2  # still owned once
    alloc.free(blocks)
    assert alloc.refcount(0) == 0 and alloc.num_free == 4
    with pytest.raises(ValueError, match="block 2.*not allocated"):
        alloc.share([2])


def test_allocator_bad_frees_name_the_block_and_change_nothing():
    alloc = BlockAllocator(4)
    a, b = alloc.allocate(2)
    with pytest.raises(ValueError, match="block 3.*not allocated"):
        alloc.free([a, 3])
    assert alloc.refcount(a) == 1  # validated before anything was freed
    with pytest.raises(ValueError, match=f"block {b}.*double free"):
        alloc.free([b, b])
    assert alloc.refcount(b) == 1
    alloc.free([a])
    with pytest.raises(ValueError, match=f"block {a}"):
        alloc.free([a])
    with pytest.raises(ValueError, match="block 9 is out of range"):
        alloc.free([9])
    with pytest.raises(TypeError, match="block ids must be ints"):
        alloc.free(["x"])


@pytest.mark.parametrize("bad,exc", [(0, ValueError), (-3, ValueError), (2.0, TypeError), (True, TypeError)])
def test_allocator_bad_num_blocks(bad, exc):
    with pytest.raises(exc, match="num_blocks"):
        BlockAllocator(bad)


# -- PagedKVCache construction -------------------------------------------------------------------

def test_cache_layout_one_allocation():
    cache = make_cache(num_blocks=6, block_size=16, hkv=3, d=8, num_layers=3, dtype=torch.bfloat16)
    assert len(cache.k_cache) == len(cache.v_cache) == 3
    base = cache.k_cache[0].untyped_storage().data_ptr()
    for layer in range(3):
        for c in (cache.k_cache[layer], cache.v_cache[layer]):
            assert c.shape == (6, 16, 3, 8) and c.dtype == torch.bfloat16 and c.is_contiguous()
            assert c.untyped_storage().data_ptr() == base
    assert cache.k_scale is None and cache.v_scale is None
    assert cache.nbytes == 3 * 2 * 6 * 16 * 3 * 8 * 2
    assert cache.allocator.num_free == 6


def test_cache_fp8_allocates_float8_with_scales():
    cache = make_cache(num_layers=2, hkv=4, kv_dtype="fp8_e4m3", dtype=torch.float16)
    assert cache.cache_dtype == FP8
    assert all(c.dtype == FP8 for c in cache.k_cache + cache.v_cache)
    for scale in cache.k_scale + cache.v_scale:
        assert scale.dtype == torch.float32 and scale.shape == (4,)
        assert torch.equal(scale, torch.ones(4))
    cache.set_scales(1, k_scale=0.5, v_scale=torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert torch.equal(cache.k_scale[1], torch.full((4,), 0.5))
    assert torch.equal(cache.v_scale[1], torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert torch.equal(cache.k_scale[0], torch.ones(4))
    with pytest.raises(ValueError, match="k_scale"):
        cache.set_scales(0, k_scale=torch.ones(3))
    with pytest.raises(ValueError, match="fp8"):
        make_cache().set_scales(0, k_scale=1.0)


@pytest.mark.parametrize("kwargs,exc,name", [
    (dict(block_size=12), ValueError, "block_size"),
    (dict(block_size=4), ValueError, "block_size"),
    (dict(block_size=512), ValueError, "block_size"),
    (dict(block_size=16.0), TypeError, "block_size"),
    (dict(num_blocks=0), ValueError, "num_blocks"),
    (dict(hkv=-1), ValueError, "num_kv_heads"),
    (dict(d=0), ValueError, "head_dim"),
    (dict(num_layers=0), ValueError, "num_layers"),
    (dict(kv_dtype="int8"), ValueError, "kv_dtype"),
    (dict(dtype=torch.int32), ValueError, "dtype"),
    (dict(dtype="float16"), TypeError, "dtype"),
])
def test_cache_bad_arguments(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        make_cache(**kwargs)


# -- sequences -----------------------------------------------------------------------------------

def test_append_across_block_boundaries():
    cache = make_cache(num_blocks=8, block_size=8)
    cache.add_sequence("a", 5)
    assert cache.block_table("a") == [0] and cache.seq_len("a") == 5
    slots = cache.append_slots("a", 6)  # positions 5..10: fills block 0, starts block 1
    assert slots.dtype == torch.int64
    assert slots.tolist() == [5, 6, 7, 8, 9, 10]
    cache.add_sequence("b", 3)  # takes block 2
    slots = cache.append_slots("a", 14)  # positions 11..24: rest of block 1, block 3, block 4
    assert cache.block_table("a") == [0, 1, 3, 4]
    assert slots.tolist() == [11, 12, 13, 14, 15] + list(range(24, 32)) + [32]
    assert cache.seq_len("a") == 25
    assert cache.append_slots("a", 0).tolist() == []
    assert cache.blocks_needed("a", 7) == 0 and cache.blocks_needed("a", 8) == 1


def test_append_out_of_blocks_is_all_or_nothing():
    cache = make_cache(num_blocks=3, block_size=8)
    cache.add_sequence(0, 10)  # 2 blocks
    with pytest.raises(OutOfBlocksError):
        cache.append_slots(0, 15)  # needs 2 more, 1 free
    assert cache.seq_len(0) == 10 and cache.block_table(0) == [0, 1] and cache.num_free_blocks == 1
    with pytest.raises(OutOfBlocksError):
        cache.add_sequence(1, 17)
    assert 1 not in cache and cache.num_free_blocks == 1
    assert cache.append_slots(0, 14).tolist() == list(range(10, 24))


def test_free_sequence_returns_blocks():
    cache = make_cache(num_blocks=4, block_size=8)
    cache.add_sequence("a", 20)
    assert cache.num_free_blocks == 1
    cache.free_sequence("a")
    assert cache.num_free_blocks == 4 and "a" not in cache and len(cache) == 0
    with pytest.raises(ValueError, match="'a'"):
        cache.seq_len("a")


def test_fork_shares_full_blocks_and_copies_partial_block():
    cache = make_cache(num_blocks=8, block_size=8, num_layers=2)
    cache._storage.copy_(torch.randn(cache._storage.shape))
    cache.add_sequence("p", 19)  # blocks 0, 1 full, 2 partial (3 tokens)
    cache.fork("p", "c")
    assert cache.block_table("p") == [0, 1, 2]
    assert cache.block_table("c") == [0, 1, 3]  # partial block copied into a fresh one
    assert [cache.allocator.refcount(b) for b in range(4)] == [2, 2, 1, 1]
    assert cache.seq_len("c") == 19
    for layer in range(2):
        assert torch.equal(cache.k_cache[layer][3], cache.k_cache[layer][2])
        assert torch.equal(cache.v_cache[layer][3], cache.v_cache[layer][2])
    # Appends go to each sequence's own block.
    assert cache.append_slots("p", 1).tolist() == [2 * 8 + 3]
    assert cache.append_slots("c", 1).tolist() == [3 * 8 + 3]

    cache.free_sequence("p")
    assert [cache.allocator.refcount(b) for b in range(4)] == [1, 1, 0, 1]
    cache.free_sequence("c")
    assert cache.num_free_blocks == 8


def test_fork_of_full_blocks_shares_everything():
    cache = make_cache(num_blocks=4, block_size=8)
    cache.add_sequence("p", 16)
    cache.fork("p", "c")
    assert cache.block_table("c") == [0, 1] and cache.num_free_blocks == 2
    assert cache.allocator.refcount(1) == 2
    assert cache.append_slots("c", 1).tolist() == [16]  # a new block, not the shared one
    assert cache.append_slots("p", 1).tolist() == [24]


def test_fork_out_of_blocks_changes_nothing():
    cache = make_cache(num_blocks=2, block_size=8)
    cache.add_sequence("p", 12)
    with pytest.raises(OutOfBlocksError):
        cache.fork("p", "c")
    assert "c" not in cache and cache.allocator.refcount(0) == 1


def test_sequence_argument_errors():
    cache = make_cache()
    cache.add_sequence("a")
    with pytest.raises(ValueError, match="seq_id 'a' is already"):
        cache.add_sequence("a")
    with pytest.raises(ValueError, match="child_id"):
        cache.fork("a", "a")
    with pytest.raises(ValueError, match="parent_id"):
        cache.fork("zz", "b")
    with pytest.raises(ValueError, match="num_tokens"):
        cache.add_sequence("b", -1)
    with pytest.raises(TypeError, match="n must be an int"):
        cache.append_slots("a", 1.5)
    with pytest.raises(TypeError, match="seq_id must be hashable"):
        cache.add_sequence(["x"])
    with pytest.raises(TypeError, match="seq_ids"):
        cache.seq_lens("a")
    with pytest.raises(ValueError, match="layer"):
        cache.write(3, torch.randn(1, 2, 16), torch.randn(1, 2, 16), torch.zeros(1, dtype=torch.int64))


# -- kernel inputs -------------------------------------------------------------------------------

def test_slot_mapping_block_tables_seq_lens():
    cache = make_cache(num_blocks=10, block_size=8)
    cache.add_sequence("a", 10)  # blocks 0, 1
    cache.add_sequence("b", 3)  # block 2
    cache.append_slots("a", 7)  # 17 tokens: block 3
    cache.append_slots("b", 1)

    sm = cache.slot_mapping(["a", "b"], 1)
    assert sm.dtype == torch.int64 and sm.tolist() == [3 * 8 + 0, 2 * 8 + 3]
    sm = cache.slot_mapping(["b", "a"], [4, 9])
    assert sm.tolist() == [16, 17, 18, 19] + [8, 9, 10, 11, 12, 13, 14, 15, 24]
    with pytest.raises(ValueError, match="num_new_tokens"):
        cache.slot_mapping(["b"], 5)
    with pytest.raises(ValueError, match="num_new_tokens"):
        cache.slot_mapping(["a", "b"], [1])

    bt = cache.block_tables(["a", "b"])
    assert bt.dtype == torch.int32 and bt.tolist() == [[0, 1, 3], [2, 0, 0]]
    assert cache.block_tables(["b", "a"], max_blocks=5).tolist() == [[2, 0, 0, 0, 0], [0, 1, 3, 0, 0]]
    with pytest.raises(ValueError, match="max_blocks"):
        cache.block_tables(["a"], max_blocks=2)
    cache.add_sequence("empty")
    assert cache.block_tables(["empty"]).tolist() == [[0]]

    sl = cache.seq_lens(["a", "b", "empty"])
    assert sl.dtype == torch.int32 and sl.tolist() == [17, 4, 0]
    with pytest.raises(ValueError, match="seq_ids entry 'nope'"):
        cache.seq_lens(["a", "nope"])


# -- end to end: write + attend against contiguous flash_attention ----------------------------------

def _grow(cache, store, seq_id, n, dtype):
    """Append ``n`` random tokens to a sequence: reserve, write every layer, remember them."""
    slots = cache.append_slots(seq_id, n)
    for layer in range(cache.num_layers):
        k = torch.randn(n, cache.num_kv_heads, cache.head_dim, dtype=dtype)
        v = torch.randn(n, cache.num_kv_heads, cache.head_dim, dtype=dtype)
        cache.write(layer, k, v, slots, backend="torch")
        ks, vs = store.setdefault((seq_id, layer), ([], []))
        ks.append(k)
        vs.append(v)


def _contiguous(store, seq_id, layer):
    ks, vs = store[(seq_id, layer)]
    return torch.cat(ks), torch.cat(vs)


@pytest.mark.parametrize("hq,hkv", [(8, 2), (4, 1)])
def test_write_attend_matches_flash_attention(hq, hkv):
    d, dtype = 32, torch.float32
    cache = make_cache(num_blocks=24, block_size=8, hkv=hkv, d=d, num_layers=2)
    cache._storage.fill_(float("nan"))  # unwritten slots must never be read
    store = {}
    cache.add_sequence("a")
    cache.add_sequence("b")
    # Interleave prefill chunks and decode steps so the two sequences' blocks alternate.
    for seq_id, n in [("a", 13), ("b", 5), ("a", 3), ("b", 30), ("a", 1), ("b", 1)]:
        _grow(cache, store, seq_id, n, dtype)
    # A fork continues from its parent's prefix (shared blocks + a copied partial block).
    cache.fork("a", "c")
    store[("c", 0)] = tuple(list(x) for x in store[("a", 0)])
    store[("c", 1)] = tuple(list(x) for x in store[("a", 1)])
    _grow(cache, store, "c", 4, dtype)
    _grow(cache, store, "a", 2, dtype)
    assert cache.seq_lens(["a", "b", "c"]).tolist() == [19, 36, 21]

    seq_ids = ["a", "b", "c"]
    for layer in range(2):
        q = torch.randn(len(seq_ids), hq, d, dtype=dtype)
        out, lse = cache.attend(layer, q, seq_ids, backend="torch", return_lse=True)
        assert out.shape == q.shape
        for i, seq_id in enumerate(seq_ids):
            k, v = _contiguous(store, seq_id, layer)
            ref, ref_lse = flash_attention(q[i:i + 1, None], k[None], v[None], causal=True, return_lse=True,
                                           backend="torch")
            torch.testing.assert_close(out[i], ref[0, 0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(lse[i], ref_lse.reshape(-1), atol=1e-5, rtol=1e-5)


def test_write_attend_fp8_uses_scales():
    hq, hkv, d = 4, 2, 32
    cache = make_cache(num_blocks=8, block_size=8, hkv=hkv, d=d, kv_dtype="fp8_e4m3", dtype=torch.float32)
    k_scale, v_scale = torch.tensor([0.5, 2.0]), torch.tensor([0.25, 1.5])
    cache.set_scales(0, k_scale=k_scale, v_scale=v_scale)
    cache.add_sequence(7)
    k = torch.randn(11, hkv, d)
    v = torch.randn(11, hkv, d)
    cache.write(0, k, v, cache.append_slots(7, 11), backend="torch")
    assert cache.k_cache[0].dtype == FP8

    def roundtrip(x, scale):  # what the fp8 cache holds, dequantized
        return (x / scale[:, None]).to(FP8).float() * scale[:, None]

    q = torch.randn(1, hq, d)
    out = cache.attend(0, q, [7], backend="torch")
    ref = flash_attention(q[:, None], roundtrip(k, k_scale)[None], roundtrip(v, v_scale)[None], backend="torch")
    torch.testing.assert_close(out, ref[:, 0], atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match="k_scale"):
        cache.attend(0, q, [7], k_scale=k_scale)

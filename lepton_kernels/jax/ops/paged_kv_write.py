"""``paged_kv_write`` for JAX: scatter new keys/values into a paged KV cache, functionally.

JAX arrays are immutable, so the op returns the updated ``(k_cache, v_cache)``. Under
``jax.jit`` with the caches donated (``donate_argnums``) XLA performs the scatter in place,
which is the TPU equivalent of the torch op's in-place write. Every backend uses the same XLA
scatter: it is a pure data movement of ``T*Hkv*D`` elements that XLA already does at memory
speed, so there is no Pallas kernel for it.
"""
from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from .. import _dispatch
from .. import _validate as V

OP = "paged_kv_write"


def to_cache_dtype(x, cache_dtype, scale: Optional[jax.Array]):
    """New keys/values ``[T, H, D]`` in the cache's dtype: fp8 caches store ``clip(x/scale, ±448)``
    with one scale per tensor or per kv head."""
    if jnp.dtype(cache_dtype) != V.FP8:
        return x.astype(cache_dtype)
    scale = V.per_head(scale, x.shape[1])[None, :, None]
    scaled = x.astype(jnp.float32) / scale
    return jnp.clip(scaled, -V.FP8_E4M3_MAX, V.FP8_E4M3_MAX).astype(cache_dtype)


def paged_kv_write_reference(k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
    """Returns the caches with token ``t`` written at slot ``slot_mapping[t]`` (negative: skipped)."""
    num_blocks, block_size = k_cache.shape[:2]
    num_slots = num_blocks * block_size
    # Negative slots would wrap around in jnp indexing: send them out of range and drop them.
    slots = jnp.where(slot_mapping < 0, num_slots, slot_mapping)

    def write(cache, x, scale):
        flat = cache.reshape(num_slots, *cache.shape[2:])
        flat = flat.at[slots].set(to_cache_dtype(x, cache.dtype, scale), mode="drop")
        return flat.reshape(cache.shape)

    return write(k_cache, k, k_scale), write(v_cache, v, v_scale)


@jax.jit
def _run(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale):
    return paged_kv_write_reference(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def paged_kv_write(
    k: jax.Array,
    v: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    slot_mapping: jax.Array,
    *,
    k_scale: Optional[jax.Array] = None,
    v_scale: Optional[jax.Array] = None,
    backend: str = "auto",
) -> Tuple[jax.Array, jax.Array]:
    """Write keys and values of new tokens into their cache slots; returns the new caches.

    Args:
        k, v: ``[T, Hkv, D]`` new keys and values (float16, bfloat16 or float32).
        k_cache, v_cache: ``[num_blocks, block_size, Hkv, D]``, the dtype of ``k`` or
            ``float8_e4m3fn``.
        slot_mapping: int32 ``[T]`` (int64 when x64 is enabled); token ``t`` goes to block
            ``slot // block_size``, offset ``slot % block_size``. A negative slot skips the
            token (padding); slots past the cache are dropped too. Slots must be distinct.
        k_scale, v_scale: float32 scales of an fp8 cache, one value or one per kv head
            (``[Hkv]``); the cache stores ``x / scale`` saturated to ±448. Required for fp8
            caches and rejected otherwise.
        backend: "auto", "tpu", "interpret", "gpu" or "reference": all run the same XLA scatter
            (there is no kernel to choose), but the name is still checked.

    Returns:
        ``(k_cache, v_cache)`` updated. Donate the input caches under ``jax.jit`` to update
        them in place::

            step = jax.jit(lambda k, v, kc, vc, s: paged_kv_write(k, v, kc, vc, s), donate_argnums=(2, 3))
    """
    k = V.check_array("k", k, ndim=3, dtypes=V.FLOAT_DTYPES)
    v = V.check_array("v", v, ndim=3)
    V.check_same_dtype("v", v, "k", k)
    V.check_shape("v", v, tuple(k.shape), "(the shape of k)")
    num_tokens, num_heads, head_dim = k.shape
    k_cache = V.check_array("k_cache", k_cache, ndim=4, dtypes=(k.dtype, V.FP8))
    V.check_shape("k_cache", k_cache, (None, None, num_heads, head_dim),
                  "[num_blocks, block_size, Hkv, D] with Hkv and D of k")
    v_cache = V.check_array("v_cache", v_cache, ndim=4)
    V.check_same_dtype("v_cache", v_cache, "k_cache", k_cache)
    V.check_shape("v_cache", v_cache, tuple(k_cache.shape), "(the shape of k_cache)")
    slot_mapping = V.check_array("slot_mapping", slot_mapping, ndim=1, dtypes=(jnp.int32, jnp.int64))
    V.check_shape("slot_mapping", slot_mapping, (num_tokens,), "(one slot per token of k)")
    k_scale, v_scale = V.check_cache_scales(k_cache.dtype, k_scale, v_scale, num_heads)
    _dispatch.requested_backend(backend)
    return _run(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)

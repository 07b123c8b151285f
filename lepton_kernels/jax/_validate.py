"""Argument checks for the JAX ops (shapes and dtypes only, so they also run on tracers).

Each check raises ``TypeError``/``ValueError`` naming the argument, what was expected and what
arrived. Values (lengths, slots) are never read: that would force a device sync and fail under
``jax.jit``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

# Shared with the torch API (re-exported: the ops call them as V.check_...).
from .._options import check_mask_options, check_max_seqlen, check_softmax_scale  # noqa: F401

FLOAT_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))
INDEX_DTYPES = (jnp.dtype(jnp.int32),)
FP8 = jnp.dtype(jnp.float8_e4m3fn)
FP8_E4M3_MAX = 448.0


def _dtype_names(dtypes: Sequence[np.dtype]) -> str:
    return ", ".join(jnp.dtype(d).name for d in dtypes)


def check_array(
    name: str,
    x: object,
    *,
    ndim: Union[int, Sequence[int], None] = None,
    dtypes: Optional[Sequence[np.dtype]] = None,
) -> jax.Array:
    """Check the type, rank and dtype of one array argument; NumPy arrays are converted."""
    if isinstance(x, np.ndarray):
        x = jnp.asarray(x)
    if not isinstance(x, jax.Array):
        raise TypeError(f"{name} must be a jax.Array, got {type(x).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.ndim not in allowed:
            want = " or ".join(str(n) for n in allowed)
            raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(x.shape)}")
    if dtypes is not None and jnp.dtype(x.dtype) not in tuple(jnp.dtype(d) for d in dtypes):
        raise TypeError(f"{name} must have dtype in ({_dtype_names(dtypes)}), got {jnp.dtype(x.dtype).name}")
    return x


def check_shape(name: str, x: jax.Array, expected: Sequence[Optional[int]], what: str = "") -> None:
    """Compare a shape against an expected one; ``None`` entries match any size."""
    ok = x.ndim == len(expected) and all(e is None or s == e for s, e in zip(x.shape, expected))
    if not ok:
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        suffix = f" {what}" if what else ""
        raise ValueError(f"{name} must have shape {want}{suffix}, got {tuple(x.shape)}")


def check_same_dtype(name: str, x: jax.Array, ref_name: str, ref: jax.Array) -> None:
    if jnp.dtype(x.dtype) != jnp.dtype(ref.dtype):
        raise TypeError(
            f"{name} must have the same dtype as {ref_name} ({jnp.dtype(ref.dtype).name}), "
            f"got {jnp.dtype(x.dtype).name}"
        )


def check_scale(name: str, scale: object, num_heads: int) -> Optional[jax.Array]:
    """A dequantization scale: float32, one value (shape () or (1,)) or one per kv head."""
    if scale is None:
        return None
    scale = check_array(name, scale, dtypes=(jnp.float32,))
    if scale.size != 1 and tuple(scale.shape) != (num_heads,):
        raise ValueError(
            f"{name} must hold one value (per tensor) or have shape ({num_heads},) (per kv head), "
            f"got shape {tuple(scale.shape)}"
        )
    return scale


def check_cache_scales(cache_dtype, k_scale, v_scale,
                       num_heads: int) -> Tuple[Optional[jax.Array], Optional[jax.Array]]:
    """fp8 caches need both scales (same granularity); other caches take none."""
    if jnp.dtype(cache_dtype) == FP8:
        if k_scale is None or v_scale is None:
            raise ValueError("k_scale and v_scale are required when the cache is float8_e4m3fn")
        k_scale = check_scale("k_scale", k_scale, num_heads)
        v_scale = check_scale("v_scale", v_scale, num_heads)
        if k_scale.size != v_scale.size:
            raise ValueError(
                f"k_scale and v_scale must both be per tensor or both per head, got shapes "
                f"{tuple(k_scale.shape)} and {tuple(v_scale.shape)}"
            )
        return k_scale, v_scale
    if k_scale is not None or v_scale is not None:
        raise ValueError(
            f"k_scale/v_scale apply only to float8_e4m3fn caches; the cache is {jnp.dtype(cache_dtype).name}"
        )
    return None, None


def per_head(scale: jax.Array, num_heads: int) -> jax.Array:
    """A per-tensor or per-head scale as float32 ``[num_heads]``."""
    return jnp.broadcast_to(scale.reshape(-1).astype(jnp.float32), (num_heads,))


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_heads(num_heads: int, kv_name: str, num_kv_heads: int) -> None:
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"num q heads ({num_heads}) must be a multiple of num kv heads ({num_kv_heads}, "
                         f"dim -2 of {kv_name})")

"""``paged_kv_write``: scatter new keys and values into a paged KV cache."""
from __future__ import annotations

from typing import Optional

import torch

from .. import _backends, _validate
from .. import cuda as _cuda
from .. import triton as _triton
from .._library import define_op, lazy

OP = "paged_kv_write"
_SCHEMA = (
    "(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping,"
    " Tensor? k_scale, Tensor? v_scale) -> ()"
)


def _fake(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale) -> None:
    return None


_torch_impl = lazy("lepton_kernels.reference.paged_kv_write", "paged_kv_write")
_triton_impl = lazy("lepton_kernels.triton.paged_kv_write", "paged_kv_write")
_cuda_impl = lazy("lepton_kernels.cuda.paged_kv_write", "paged_kv_write")
_torch_op = define_op(f"{OP}_torch", _SCHEMA, _torch_impl, _fake, "CompositeExplicitAutograd")
_triton_op = define_op(f"{OP}_triton", _SCHEMA, _triton_impl, _fake, "CompositeExplicitAutograd")
_cuda_op = define_op(f"{OP}_cuda", _SCHEMA, _cuda_impl, _fake, "CUDA")


def _triton_supports(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale) -> Optional[str]:
    return _triton.unavailable_reason(k.device, True, k_cache.dtype == torch.float8_e4m3fn)


def _cuda_supports(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale) -> Optional[str]:
    return _cuda.unavailable_reason(k.device)


_backends.register(OP, "torch", eager=_torch_impl)(_torch_op)
_backends.register(OP, "triton", _triton_supports, eager=_triton_impl)(_triton_op)
_backends.register(OP, "cuda", _cuda_supports, eager=_cuda_impl)(_cuda_op)


def paged_kv_write(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> None:
    """Write keys and values of new tokens into their cache slots, in place.

    Args:
        k, v: ``[T, Hkv, D]`` new keys and values (float16, bfloat16 or float32); any strides
            with the last dimension contiguous.
        k_cache, v_cache: ``[num_blocks, block_size, Hkv, D]``, the dtype of ``k`` or
            ``torch.float8_e4m3fn``; any strides with the last dimension contiguous.
        slot_mapping: int64 ``[T]``; token ``t`` goes to block ``slot // block_size``, offset
            ``slot % block_size``. A negative slot skips the token (padding). Slots must be
            distinct.
        k_scale, v_scale: float32 scales of an fp8 cache, one value or one per kv head
            (``[Hkv]``); the cache stores ``x / scale`` saturated to ±448. Required for fp8
            caches and rejected otherwise.
        backend: "auto" (default; ``LEPTON_KERNELS_BACKEND`` overrides), "cuda", "triton" or
            "torch".
    """
    _check_args(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    impl = _backends.select(OP, backend, k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    impl(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def _check_args(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale) -> None:
    check = _validate.check_tensor
    check("k", k, ndim=3, dtypes=_validate.FLOAT_DTYPES, last_dim_contiguous=True)
    device = k.device
    check("v", v, ndim=3, device=device, last_dim_contiguous=True)
    _validate.check_same_dtype("v", v, "k", k)
    _validate.check_shape("v", v, tuple(k.shape), "(the shape of k)")
    num_tokens, num_heads, head_dim = k.shape

    check("k_cache", k_cache, ndim=4, device=device, last_dim_contiguous=True,
          dtypes=(k.dtype, torch.float8_e4m3fn))
    _validate.check_shape("k_cache", k_cache, (None, None, num_heads, head_dim),
                          "[num_blocks, block_size, Hkv, D] with Hkv and D of k")
    check("v_cache", v_cache, ndim=4, device=device, last_dim_contiguous=True)
    _validate.check_same_dtype("v_cache", v_cache, "k_cache", k_cache)
    _validate.check_shape("v_cache", v_cache, tuple(k_cache.shape), "(the shape of k_cache)")

    check("slot_mapping", slot_mapping, ndim=1, dtypes=(torch.int64,), device=device)
    _validate.check_shape("slot_mapping", slot_mapping, (num_tokens,), "(one slot per token of k)")

    if k_cache.dtype == torch.float8_e4m3fn:
        if k_scale is None or v_scale is None:
            raise ValueError("k_scale and v_scale are required when the cache is float8_e4m3fn")
        _validate.check_scale("k_scale", k_scale, num_heads, device)
        _validate.check_scale("v_scale", v_scale, num_heads, device)
        if k_scale.numel() != v_scale.numel():
            raise ValueError(
                f"k_scale and v_scale must both be per tensor or both per head, got shapes "
                f"{tuple(k_scale.shape)} and {tuple(v_scale.shape)}"
            )
    elif k_scale is not None or v_scale is not None:
        raise ValueError(f"k_scale/v_scale apply only to float8_e4m3fn caches; the cache is {k_cache.dtype}")

    if _validate.debug_checks_enabled() and num_tokens > 0:
        _validate.check_index_range("slot_mapping", slot_mapping, k_cache.shape[0] * k_cache.shape[1],
                                    f"a cache of {k_cache.shape[0]} blocks x {k_cache.shape[1]} slots")


@_backends.register_example(OP)
def _example(device: torch.device):
    k = torch.randn(6, 2, 64, device=device, dtype=torch.float16)
    v = torch.randn_like(k)
    k_cache = torch.zeros(4, 16, 2, 64, device=device, dtype=torch.float16)
    v_cache = torch.zeros_like(k_cache)
    slot_mapping = torch.tensor([3, 17, -1, 40, 0, 63], device=device)
    return (k, v, k_cache, v_cache, slot_mapping), {}

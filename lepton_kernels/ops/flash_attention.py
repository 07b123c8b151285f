"""``flash_attention``: softmax attention over a padded or packed (varlen) batch.

Every backend implements the op schema ``_SCHEMA`` below and is called with arguments already
validated and normalized by ``_prepare``:

* ``causal`` is True exactly when the right edge of the visible band is the diagonal; then
  ``window_right`` is 0. Otherwise ``window_right`` is -1 (unbounded) or > 0.
* ``window_left`` is -1 (unbounded) or >= 0; ``softcap`` is 0 (off) or > 0;
  ``softmax_scale`` is a Python float.
* ``max_seqlen_q``/``max_seqlen_k`` bound the sequence lengths (in a padded call they are Sq
  and Sk; in a varlen call the caller's values or, by default, the packed totals Tq and Tk).

A backend's ``supports`` function takes the same positional arguments as its implementation.
"""
from __future__ import annotations

import functools

from typing import Optional, Tuple, Union

import torch

from .. import _backends, _validate
from .. import cuda as _cuda
from .._options import check_mask_options, check_max_seqlen, check_softmax_scale
from .. import triton as _triton
from .._library import define_op, lazy
from .._splits import current_capability

OP = "flash_attention"
ATTENTION_DTYPES = _validate.FLOAT_DTYPES + (torch.float64,)  # float64 only for the torch backend

_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, bool causal, float softmax_scale, int window_left,"
    " int window_right, float softcap, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k,"
    " int max_seqlen_q, int max_seqlen_k, Tensor? kv_lens) -> (Tensor out, Tensor lse)"
)


def _fake(q, k, v, causal, softmax_scale, window_left, window_right, softcap, cu_seqlens_q,
          cu_seqlens_k, max_seqlen_q, max_seqlen_k, kv_lens):
    out = q.new_empty(q.shape)
    if q.dim() == 4:  # padded: lse [B, Hq, Sq]
        lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    else:  # varlen: lse [Hq, Tq]
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    return out, lse


_torch_impl = lazy("lepton_kernels.reference.attention", "flash_attention")
_torch_op = define_op(f"{OP}_torch", _SCHEMA, _torch_impl, _fake, "CompositeExplicitAutograd")

# The reference serves every dtype, head dim, mask and layout that passes validation.
_backends.register(OP, "torch", eager=_torch_impl)(_torch_op)

_triton_impl = lazy("lepton_kernels.triton.flash_attention", "flash_attention")


def _triton_supports(q, *args) -> Optional[str]:
    # Checked first so a missing triton is a reason, not an ImportError from the kernel module.
    reason = _triton.unavailable_reason(q.device)
    if reason is not None:
        return reason
    # An import statement, not lazy(): torch.compile traces selection, and dynamo runs import
    # statements but refuses importlib.import_module (a first call under compile would fail).
    from ..triton.flash_attention import supports

    return supports(q, *args)


_triton_op = define_op(f"{OP}_triton", _SCHEMA, _triton_impl, _fake, "CompositeExplicitAutograd")
_backends.register(OP, "triton", _triton_supports, eager=_triton_impl)(_triton_op)

_cuda_impl = lazy("lepton_kernels.cuda.flash_attention", "flash_attention")


def _cuda_supports(q, *args) -> Optional[str]:
    # Import statement, not lazy(): see _triton_supports. The module imports only torch.
    from ..cuda import flash_attention as kernel

    if q.dtype not in kernel.DTYPES:
        return f"the CUDA kernel takes float16 or bfloat16, got {q.dtype}"
    if q.shape[-1] not in kernel.HEAD_DIMS:
        dims = ", ".join(str(d) for d in kernel.HEAD_DIMS)
        return f"the CUDA kernel takes head dims {dims}, got {q.shape[-1]}"
    reason = _cuda.unavailable_reason(q.device)
    if reason is not None:
        return reason
    if not kernel.has_kernel():
        return "the compiled extension was built without the flash_attention kernel (rebuild the package)"
    return None


@_backends.trace_as_constant
def _hopper_or_newer(device: torch.device) -> bool:
    if device.type != "cuda" or torch.version.hip is not None:
        return False
    return current_capability(device) >= (9, 0)


# Decode-shaped calls (this many queries per sequence or fewer) go to Triton's split-KV path.
CUDA_MIN_AUTO_QUERIES = 17
# Head dims where the sm_90a kernel measured faster than Triton on an H100 (at D = 64 they are
# about even, and Triton keeps it).
SM90_AUTO_HEAD_DIMS = (128, 256)


@_backends.trace_as_constant
def _sm90_kernel_runs(device: torch.device, head_dim: int, dtype: torch.dtype) -> bool:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _sm90_kernel_runs_on(index, head_dim, dtype)


@functools.lru_cache(maxsize=None)
def _sm90_kernel_runs_on(index: int, head_dim: int, dtype: torch.dtype) -> bool:  # asked once per key
    from ..cuda import flash_attention as kernel

    return kernel.has_kernel() and kernel.sm90_unsupported(head_dim, dtype, torch.device("cuda", index)) is None


def _cuda_auto_supports(q, *args) -> Optional[str]:
    """Calls the CUDA kernel serves but "auto" leaves to Triton, where Triton measured faster."""
    if _triton_supports(q, *args) is not None:
        return None  # nothing better to go to
    max_seqlen_q = args[9]
    if max_seqlen_q < CUDA_MIN_AUTO_QUERIES:
        return "decode-shaped calls go to the Triton kernel's split-KV path"
    if _hopper_or_newer(q.device):
        head_dim = q.shape[-1]
        if head_dim in SM90_AUTO_HEAD_DIMS and _sm90_kernel_runs(q.device, head_dim, q.dtype):
            return None
        return ("on Hopper the Triton kernel is faster than the CUDA mma.sync kernel; the sm_90a one "
                f"serves head dims {', '.join(map(str, SM90_AUTO_HEAD_DIMS))} on compute capability 9.0 "
                "(pass backend='cuda' to run it anyway)")
    return None


_cuda_op = define_op(f"{OP}_cuda", _SCHEMA, _cuda_impl, _fake, "CUDA")
_backends.register(OP, "cuda", _cuda_supports, eager=_cuda_impl, auto_supports=_cuda_auto_supports)(_cuda_op)


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    window: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    kv_lens: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Softmax attention, FlashAttention layouts and semantics.

    Args:
        q: ``[B, Sq, Hq, D]`` (padded batch) or ``[Tq, Hq, D]`` (varlen, packed sequences).
        k, v: ``[B, Sk, Hkv, D]`` or ``[Tk, Hkv, D]``, with ``Hq % Hkv == 0`` (GQA/MQA: query
            head ``h`` reads kv head ``h // (Hq // Hkv)``; K/V are never repeated in memory).
            q, k, v share dtype (float16, bfloat16; float32 and float64 on the torch backend)
            and device, and may have any strides with the last dimension contiguous (so a
            ``(B, H, S, D)`` tensor transposed to ``(B, S, H, D)`` works without a copy).
        causal: mask keys after each query. When ``Sq != Sk`` the mask is aligned to the
            bottom right: query ``i`` sees key ``j`` iff ``j <= i + Sk - Sq``.
        softmax_scale: multiplies ``q @ k^T``; default ``1 / sqrt(D)``.
        window: ``(left, right)`` sliding window, -1 = unbounded: key ``j`` is visible to query
            ``i`` iff ``i + Sk - Sq - left <= j <= i + Sk - Sq + right``. ``causal=True`` sets
            ``right = 0`` and conflicts with ``right > 0``.
        softcap: when > 0, the scaled scores ``s`` become ``softcap * tanh(s / softcap)``
            before masking and softmax.
        cu_seqlens_q, cu_seqlens_k: int32 ``[B+1]`` prefix sums of the sequence lengths of a
            varlen call (both or neither); zero-length sequences are allowed.
        max_seqlen_q, max_seqlen_k: varlen only: upper bounds of the sequence lengths, which
            let kernels size their grids without reading ``cu_seqlens``. Default: ``Tq`` and
            ``Tk`` (always valid, but pass the real maxima to avoid idle programs).
        kv_lens: int32 ``[B]``: sequence ``b`` uses only its first ``kv_lens[b]`` keys (right
            padding); this is also its ``Sk`` for causal and window alignment.
        return_lse: also return the log-sum-exp of each query's scaled scores.
        backend: "auto" (default; ``LEPTON_KERNELS_BACKEND`` overrides), "cuda", "triton" or
            "torch". On Hopper and newer GPUs "auto" prefers Triton to the CUDA kernel (an
            Ampere-style ``mma.sync`` kernel).

    Returns:
        ``out`` with q's shape and dtype, or ``(out, lse)`` with ``lse`` float32 (natural log)
        ``[B, Hq, Sq]`` (padded) or ``[Hq, Tq]`` (varlen). A query that sees no key gets
        ``out = 0`` and ``lse = -inf``.

    Data-dependent checks (``cu_seqlens`` monotone and ending at ``T``, ``kv_lens`` in range,
    ``max_seqlen_*`` large enough) read the device and run only with ``LEPTON_KERNELS_DEBUG=1``.
    """
    args = _prepare(q, k, v, causal, softmax_scale, window, softcap, cu_seqlens_q, cu_seqlens_k,
                    max_seqlen_q, max_seqlen_k, kv_lens)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    impl = _backends.select(OP, backend, *args)
    out, lse = impl(*args)
    return (out, lse) if return_lse else out


# -- argument checks shared with paged_attention -------------------------------------------------


def check_heads(q: torch.Tensor, q_head_dim: int, k_name: str, k: torch.Tensor, k_head_dim: int) -> None:
    """Same head dim, and query heads a multiple of kv heads."""
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"{k_name} head dim ({k.shape[-1]}) must equal q's head dim ({q.shape[-1]}); "
            f"shapes q {tuple(q.shape)}, {k_name} {tuple(k.shape)}"
        )
    num_q_heads, num_kv_heads = q.shape[q_head_dim], k.shape[k_head_dim]
    if num_kv_heads == 0 or num_q_heads % num_kv_heads != 0:
        raise ValueError(
            f"num q heads ({num_q_heads}) must be a multiple of num kv heads ({num_kv_heads}) of "
            f"{k_name}; shapes q {tuple(q.shape)}, {k_name} {tuple(k.shape)}"
        )


def check_cu_seqlens(name: str, cu_seqlens: object, device: torch.device) -> torch.Tensor:
    _validate.check_tensor(name, cu_seqlens, ndim=1, dtypes=(torch.int32,), device=device)
    if cu_seqlens.shape[0] < 1:
        raise ValueError(f"{name} must have shape (B+1,) with B >= 0, got {tuple(cu_seqlens.shape)}")
    return cu_seqlens


def check_cu_seqlens_data(name: str, cu_seqlens: torch.Tensor, total: int, total_name: str) -> torch.Tensor:
    """Debug mode: start at 0, never decrease, end at ``total``. Returns the lengths [B]."""
    values = cu_seqlens.tolist()
    if values[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {values[0]}")
    lengths = torch.diff(cu_seqlens.to(torch.int64))
    if bool((lengths < 0).any()):
        i = int((lengths < 0).nonzero()[0, 0])
        raise ValueError(f"{name} must be non-decreasing, but {name}[{i + 1}] = {values[i + 1]} < "
                         f"{name}[{i}] = {values[i]}")
    if values[-1] != total:
        raise ValueError(f"{name}[-1] must equal {total_name} ({total}), got {values[-1]}")
    return lengths


def check_max_seqlen_data(name: str, max_seqlen: int, lengths: torch.Tensor, what: str) -> None:
    """Debug mode: the declared bound must cover the longest sequence."""
    longest = int(lengths.max()) if lengths.numel() else 0
    if max_seqlen < longest:
        raise ValueError(f"{name} ({max_seqlen}) is smaller than the longest {what} ({longest})")


# -- flash_attention's own checks ------------------------------------------------------------------

def _prepare(q, k, v, causal, softmax_scale, window, softcap, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
             max_seqlen_k, kv_lens) -> tuple:
    """Validate the public arguments; return the op schema's arguments."""
    check = _validate.check_tensor
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    if varlen and (cu_seqlens_q is None or cu_seqlens_k is None):
        missing = "cu_seqlens_k" if cu_seqlens_k is None else "cu_seqlens_q"
        raise ValueError(f"a varlen call needs both cu_seqlens_q and cu_seqlens_k; {missing} is None")

    check("q", q, dtypes=ATTENTION_DTYPES, last_dim_contiguous=True)
    if varlen and q.dim() != 3:
        raise ValueError(f"with cu_seqlens (varlen) q must be [Tq, Hq, D] (3 dimensions), got shape "
                         f"{tuple(q.shape)}")
    if not varlen and q.dim() != 4:
        raise ValueError(f"q must be [B, Sq, Hq, D] (4 dimensions), got shape {tuple(q.shape)}"
                         + ("; a packed [Tq, Hq, D] q needs cu_seqlens_q and cu_seqlens_k" if q.dim() == 3 else ""))
    device, ndim = q.device, q.dim()
    layout = "[Tk, Hkv, D]" if varlen else "[B, Sk, Hkv, D]"
    check("k", k, ndim=ndim, device=device, last_dim_contiguous=True)
    _validate.check_same_dtype("k", k, "q", q)
    check("v", v, ndim=ndim, device=device, last_dim_contiguous=True)
    _validate.check_same_dtype("v", v, "q", q)
    _validate.check_shape("v", v, tuple(k.shape), f"(the shape of k, {layout})")
    check_heads(q, -2, "k", k, -2)
    if not varlen and k.shape[0] != q.shape[0]:
        raise ValueError(f"k must have the batch size of q ({q.shape[0]}), got shape {tuple(k.shape)}")

    causal, window_left, window_right, softcap = check_mask_options(causal, window, softcap)
    softmax_scale = check_softmax_scale(softmax_scale, q.shape[-1])

    if varlen:
        check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, device)
        check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, device)
        if cu_seqlens_k.shape[0] != cu_seqlens_q.shape[0]:
            raise ValueError(f"cu_seqlens_k must have the length of cu_seqlens_q ({cu_seqlens_q.shape[0]}, "
                             f"one more than the batch size), got {cu_seqlens_k.shape[0]}")
        batch = cu_seqlens_q.shape[0] - 1
        max_seqlen_q = check_max_seqlen("max_seqlen_q", max_seqlen_q, q.shape[0])
        max_seqlen_k = check_max_seqlen("max_seqlen_k", max_seqlen_k, k.shape[0])
    else:
        for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
            if value is not None:
                raise ValueError(f"{name} applies only to varlen calls (with cu_seqlens); a padded call "
                                 f"takes its lengths from the shapes")
        batch = q.shape[0]
        max_seqlen_q, max_seqlen_k = q.shape[1], k.shape[1]

    if kv_lens is not None:
        check("kv_lens", kv_lens, ndim=1, dtypes=(torch.int32,), device=device)
        _validate.check_shape("kv_lens", kv_lens, (batch,), "(one key count per sequence)")

    if _validate.debug_checks_enabled():
        _check_data(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, kv_lens)
    return (q, k, v, causal, softmax_scale, window_left, window_right, softcap, cu_seqlens_q, cu_seqlens_k,
            max_seqlen_q, max_seqlen_k, kv_lens)


def _check_data(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, kv_lens) -> None:
    """Debug mode: the checks that read tensor data (a device sync each)."""
    if cu_seqlens_q is not None:
        lengths_q = check_cu_seqlens_data("cu_seqlens_q", cu_seqlens_q, q.shape[0], "Tq = q.shape[0]")
        lengths_k = check_cu_seqlens_data("cu_seqlens_k", cu_seqlens_k, k.shape[0], "Tk = k.shape[0]")
        check_max_seqlen_data("max_seqlen_q", max_seqlen_q, lengths_q, "query sequence")
        check_max_seqlen_data("max_seqlen_k", max_seqlen_k, lengths_k, "key sequence")
    else:
        lengths_k = torch.full((q.shape[0],), k.shape[1], dtype=torch.int64, device=q.device)
    if kv_lens is not None:
        bad = (kv_lens < 0) | (kv_lens.to(torch.int64) > lengths_k)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"kv_lens[{i}] = {int(kv_lens[i])} must be in [0, {int(lengths_k[i])}] "
                             f"(the keys sequence {i} has)")


@_backends.register_example(OP)
def _example(device: torch.device):
    q = torch.randn(2, 16, 4, 64, device=device, dtype=torch.float16)
    k = torch.randn(2, 24, 2, 64, device=device, dtype=torch.float16)
    v = torch.randn_like(k)
    return (q, k, v), {"causal": True}

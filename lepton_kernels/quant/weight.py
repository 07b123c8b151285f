"""Quantized weights: :class:`QuantizedWeight` and :func:`quantize_weight`.

A ``QuantizedWeight`` stands for a linear layer's weight ``W [N, K]`` (N output channels, K
input channels; ``y = x @ W^T``). Schemes:

* ``"w4a16"``: 4-bit integers, one scale (and, asymmetric, one zero point) per group of
  ``group_size`` consecutive input channels (32, 64 or 128) or per output channel
  (``group_size=-1``); activations stay in 16 bits.
* ``"w8a16"``: int8, symmetric, one scale per output channel; activations in 16 bits.
* ``"w8a8"``: weights as w8a16; activations quantized to int8 per token on the fly.
* ``"fp8"``: float8 e4m3 weights with one scale per output channel; activations quantized to
  e4m3 per token on the fly.

Storage (``layout`` names it; a kernel that wants another arrangement gets a new layout name
and a repack, never a silent change of an existing one). With ``G`` groups per row
(``G = K // group_size``, or 1 per output channel):

``layout="int4_k8"`` (w4a16)
    ``packed``: int32 ``[N, K // 8]``, row-major. Word ``j`` of row ``n`` holds the eight
    consecutive input channels ``8j .. 8j+7`` of output channel ``n``; channel ``8j + i`` sits
    in bits ``4i .. 4i+3`` as an unsigned value ``u`` in [0, 15]. A row is contiguous along K,
    so four words (32 values, one 16-byte load) never straddle a group.
    ``scales``: ``[N, G]`` in the weight's dtype (float16, bfloat16 or float32).
    ``zeros``: uint8 ``[N, G]`` (asymmetric) or ``None`` (symmetric, where the zero point is
    implicitly 8, i.e. the stored nibble is the signed value + 8). Zero points are in
    [0, 16]: GPTQ v1 checkpoints can encode 16 (see :mod:`.importers`), so a kernel must not
    assume they fit in 4 bits.
    Dequantized value: ``(u - zero) * scale`` for the channel's group.

``layout="rowmajor"`` (w8a16, w8a8, fp8)
    ``packed``: ``[N, K]`` row-major, int8 (w8a16, w8a8; values in [-127, 127]) or
    ``torch.float8_e4m3fn`` (fp8). ``scales``: ``[N, 1]`` — in the weight's dtype for w8a16,
    float32 for w8a8 and fp8 (they are applied in the fp32 epilogue together with the
    activation scale). ``zeros``: ``None``. Dequantized value: ``q * scale``.

``perm`` (optional, int32 ``[K]``): the stored input channels are a permutation of the
original ones — stored channel ``j`` is original channel ``perm[j]``. Only GPTQ act-order
imports set it; ``quant_matmul`` gathers the activation columns ``x[..., perm]`` once per call
(never the weight), ``dequantize()`` returns the original order.

Quantization (round to nearest even, computed in float32). Each scale is computed in float32,
floored at the smallest normal number of its storage dtype (an all-zero group or row gets that
floor: no inf/NaN, no denormal a flush-to-zero kernel would read as 0), then rounded *up* to its
storage dtype, and the values are quantized against that stored scale. Hence no value needs
clamping beyond its range and ``|w - dequantize(w)| <= scale / 2`` elementwise (up to float32
rounding of ``w / scale``):

* w4a16 symmetric: ``scale = max|w| / 7``, ``q = clamp(round(w / scale), -8, 7)``,
  stored ``u = q + 8``.
* w4a16 asymmetric: the group's range is widened to include 0 (``lo = min(min w, 0)``,
  ``hi = max(max w, 0)``) so a zero point in [0, 15] always exists;
  ``scale = (hi - lo) / 15``, ``zero = round(-lo / scale)``,
  ``u = clamp(round(w / scale) + zero, 0, 15)``.
* w8a16, w8a8: ``scale = max|w_row| / 127`` (the inverse of ``s = 127 / max|w|``),
  ``q = clamp(round(w / scale), -127, 127)``.
* fp8: ``scale = max|w_row| / 448``, ``q = e4m3(clamp(w / scale, -448, 448))``.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple, Union

import torch

from .packing import pack_int4, unpack_int4

SCHEMES: Tuple[str, ...] = ("w4a16", "w8a16", "w8a8", "fp8")
W4_GROUP_SIZES: Tuple[int, ...] = (32, 64, 128, -1)
LAYOUT_INT4_K8 = "int4_k8"
LAYOUT_ROWMAJOR = "rowmajor"
LAYOUTS: Dict[str, Tuple[str, ...]] = {  # scheme -> layouts it can be stored in
    "w4a16": (LAYOUT_INT4_K8,),
    "w8a16": (LAYOUT_ROWMAJOR,),
    "w8a8": (LAYOUT_ROWMAJOR,),
    "fp8": (LAYOUT_ROWMAJOR,),
}
FORMAT_VERSION = 1  # of state_dict(); bump when its keys or encoding change
INT4_SYMMETRIC_ZERO = 8
INT8_MAX = 127.0
FP8_E4M3_MAX = 448.0
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_scheme(scheme: object) -> str:
    if not isinstance(scheme, str) or scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; known schemes: {', '.join(SCHEMES)}")
    return scheme


def num_groups(group_size: int, k: int) -> int:
    """Groups per output channel: ``K // group_size``, or 1 when ``group_size == -1``."""
    return 1 if group_size == -1 else k // group_size


def dequantize_packed(
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    scheme: str,
    layout: str,
    group_size: int,
    n: int,
    k: int,
) -> torch.Tensor:
    """The float32 weight ``[N, K]`` in *stored* channel order (``perm`` not undone).

    Exact: ``(u - zero)`` is a small integer and the scale has at most 24 significant bits, so
    the float32 product is the real value of ``(u - zero) * scale``.
    """
    if layout == LAYOUT_INT4_K8:
        g = k if group_size == -1 else group_size
        groups = k // g
        u = unpack_int4(packed, dim=1, dtype=torch.int32).view(n, groups, g)
        zero = INT4_SYMMETRIC_ZERO if zeros is None else zeros.to(torch.int32).unsqueeze(-1)
        w = (u - zero).to(torch.float32) * scales.to(torch.float32).unsqueeze(-1)
        return w.reshape(n, k)
    if layout == LAYOUT_ROWMAJOR:
        return packed.to(torch.float32) * scales.to(torch.float32)
    raise ValueError(f"unknown layout {layout!r} for scheme {scheme!r}")


class QuantizedWeight:
    """A quantized ``[N, K]`` weight in a kernel-native layout (see the module docstring).

    Build one with :func:`quantize_weight`, :meth:`from_gptq`, :meth:`from_awq` or
    :meth:`from_state_dict`; the constructor only checks that the parts fit together.

    Attributes:
        packed, scales, zeros, perm: the stored tensors (``zeros`` and ``perm`` may be None).
        scheme: one of :data:`SCHEMES`. layout: the storage layout's name.
        group_size: input channels per scale, or -1 for one scale per output channel.
        dtype: dtype of the weight it was made from, and the default of :meth:`dequantize`.
    """

    def __init__(
        self,
        packed: torch.Tensor,
        scales: torch.Tensor,
        zeros: Optional[torch.Tensor] = None,
        *,
        scheme: str,
        group_size: int,
        shape: Tuple[int, int],
        dtype: torch.dtype,
        layout: Optional[str] = None,
        perm: Optional[torch.Tensor] = None,
    ):
        self.scheme = check_scheme(scheme)
        self.layout = layout if layout is not None else LAYOUTS[scheme][0]
        self.group_size = int(group_size)
        self.n, self.k = (int(s) for s in shape)
        self.dtype = dtype
        self.packed, self.scales, self.zeros, self.perm = packed, scales, zeros, perm
        self._check()

    # -- consistency -------------------------------------------------------------------------
    def _check(self) -> None:
        n, k, scheme = self.n, self.k, self.scheme
        if self.layout not in LAYOUTS[scheme]:
            raise ValueError(f"layout {self.layout!r} is not a layout of {scheme} "
                             f"(known: {', '.join(LAYOUTS[scheme])})")
        if self.dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be one of float16, bfloat16, float32, got {self.dtype}")
        if n < 1 or k < 1:
            raise ValueError(f"shape must be positive (N, K), got {(n, k)}")
        for name in ("packed", "scales"):
            if not isinstance(getattr(self, name), torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(getattr(self, name)).__name__}")
        device = self.packed.device

        if scheme == "w4a16":
            if self.group_size not in W4_GROUP_SIZES:
                raise ValueError(f"w4a16 group_size must be one of {W4_GROUP_SIZES}, got {self.group_size}")
            need = 8 if self.group_size == -1 else self.group_size
            if k % need:
                raise ValueError(f"K={k} must be a multiple of {need} for w4a16 with group_size={self.group_size}")
            want_packed, packed_dtypes = (n, k // 8), (torch.int32,)
        else:
            if self.group_size != -1:
                raise ValueError(f"{scheme} has one scale per output channel: group_size must be -1, "
                                 f"got {self.group_size}")
            want_packed = (n, k)
            packed_dtypes = (torch.float8_e4m3fn,) if scheme == "fp8" else (torch.int8,)
        groups = num_groups(self.group_size, k)
        _check_part("packed", self.packed, want_packed, packed_dtypes, device)
        scale_dtypes = FLOAT_DTYPES if scheme in ("w4a16", "w8a16") else (torch.float32,)
        _check_part("scales", self.scales, (n, groups), scale_dtypes, device)
        if self.zeros is not None:
            if scheme != "w4a16":
                raise ValueError(f"{scheme} is symmetric: zeros must be None")
            _check_part("zeros", self.zeros, (n, groups), (torch.uint8,), device)
        if self.perm is not None:
            _check_part("perm", self.perm, (k,), (torch.int32,), device)

    # -- properties --------------------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        """``(N, K)`` of the original weight."""
        return torch.Size((self.n, self.k))

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @property
    def nbytes(self) -> int:
        """Bytes a matmul reads for the weight: packed values + scales + zeros (not ``perm``)."""
        parts = [self.packed, self.scales] + ([self.zeros] if self.zeros is not None else [])
        return sum(t.numel() * t.element_size() for t in parts)

    def __repr__(self) -> str:
        extra = "" if self.perm is None else ", act_order"
        return (f"QuantizedWeight(scheme={self.scheme}, shape=({self.n}, {self.k}), group_size={self.group_size}, "
                f"symmetric={self.symmetric}, layout={self.layout}, dtype={_dtype_name(self.dtype)}, "
                f"device={self.device}{extra})")

    # -- conversions -------------------------------------------------------------------------
    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The weight ``[N, K]`` (original channel order) in ``dtype`` (default: :attr:`dtype`)."""
        w = dequantize_packed(self.packed, self.scales, self.zeros, self.scheme, self.layout,
                              self.group_size, self.n, self.k)
        if self.perm is not None:
            unpermuted = torch.empty_like(w)
            unpermuted[:, self.perm.long()] = w
            w = unpermuted
        return w.to(dtype or self.dtype)

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "QuantizedWeight":
        """A new QuantizedWeight with ``fn`` applied to each stored tensor (same metadata)."""
        opt = lambda t: None if t is None else fn(t)  # noqa: E731
        return QuantizedWeight(fn(self.packed), fn(self.scales), opt(self.zeros), scheme=self.scheme,
                               group_size=self.group_size, shape=(self.n, self.k), dtype=self.dtype,
                               layout=self.layout, perm=opt(self.perm))

    def to(self, device: Union[str, torch.device], non_blocking: bool = False) -> "QuantizedWeight":
        """A copy on ``device`` (dtypes are part of the format and never change)."""
        return self.map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def cuda(self, device=None) -> "QuantizedWeight":
        return self.map_tensors(lambda t: t.cuda(device))

    def cpu(self) -> "QuantizedWeight":
        return self.map_tensors(lambda t: t.cpu())

    # -- serialization -----------------------------------------------------------------------
    def state_dict(self) -> Dict[str, torch.Tensor]:
        """A flat ``{name: tensor}`` dict that survives ``safetensors.torch.save_file``.

        Keys: ``packed``, ``scales``, ``zeros`` and ``perm`` (when present), and metadata as
        small CPU tensors: ``scheme``, ``layout``, ``dtype`` (uint8 bytes of the name) and
        ``meta`` (int64 ``[format_version, group_size, N, K]``).
        """
        sd = {"packed": self.packed, "scales": self.scales}
        if self.zeros is not None:
            sd["zeros"] = self.zeros
        if self.perm is not None:
            sd["perm"] = self.perm
        sd["scheme"] = _encode(self.scheme)
        sd["layout"] = _encode(self.layout)
        sd["dtype"] = _encode(_dtype_name(self.dtype))
        sd["meta"] = torch.tensor([FORMAT_VERSION, self.group_size, self.n, self.k], dtype=torch.int64)
        return sd

    @classmethod
    def from_state_dict(cls, sd: Dict[str, torch.Tensor]) -> "QuantizedWeight":
        """Rebuild from :meth:`state_dict` output (tensors stay on the devices they are on)."""
        missing = [key for key in ("packed", "scales", "scheme", "layout", "dtype", "meta") if key not in sd]
        if missing:
            raise ValueError(f"state dict lacks {', '.join(missing)} (has: {', '.join(sorted(sd))})")
        meta = sd["meta"].tolist()
        if len(meta) != 4:
            raise ValueError(f"state dict 'meta' must hold 4 integers, got {meta}")
        version, group_size, n, k = meta
        if version > FORMAT_VERSION:
            raise ValueError(f"state dict has format version {version}; this version reads up to {FORMAT_VERSION}")
        dtype_name = _decode(sd["dtype"])
        dtype = getattr(torch, dtype_name, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"state dict names an unknown dtype {dtype_name!r}")
        return cls(sd["packed"], sd["scales"], sd.get("zeros"), scheme=_decode(sd["scheme"]),
                   group_size=group_size, shape=(n, k), dtype=dtype, layout=_decode(sd["layout"]),
                   perm=sd.get("perm"))

    # -- importers (see .importers) ----------------------------------------------------------
    @classmethod
    def from_gptq(cls, qweight, qzeros, scales, g_idx=None, *, bits: int = 4) -> "QuantizedWeight":
        """Import a GPTQ (v1) checkpoint's tensors exactly; see :func:`.importers.from_gptq`."""
        from .importers import from_gptq

        return from_gptq(qweight, qzeros, scales, g_idx, bits=bits)

    @classmethod
    def from_awq(cls, qweight, qzeros, scales) -> "QuantizedWeight":
        """Import an AWQ (GEMM) checkpoint's tensors exactly; see :func:`.importers.from_awq`."""
        from .importers import from_awq

        return from_awq(qweight, qzeros, scales)


def _check_part(name, t, shape, dtypes, device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in ({', '.join(map(_dtype_name, dtypes))}), got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device} (where packed is), got {t.device}")


def _encode(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("ascii")), dtype=torch.uint8)


def _decode(t: torch.Tensor) -> str:
    return bytes(t.to(torch.uint8).tolist()).decode("ascii")


# -- quantization -----------------------------------------------------------------------------

def stored_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float32 scales -> ``dtype``: floored at its smallest normal number, rounded up.

    Rounding up (never down) keeps ``|w| / stored_scale`` within the integer range, so the
    clamps in the quantizers never cost more than half a step.
    """
    scale = scale.to(torch.float32).clamp_min(torch.finfo(dtype).tiny)
    stored = scale.to(dtype)
    if dtype != torch.float32:
        # The next representable value up: positive floats order like their bit patterns.
        bumped = (stored.view(torch.int16) + 1).view(dtype)
        stored = torch.where(stored.to(torch.float32) < scale, bumped, stored)
    return stored


def quantize_weight(
    w: torch.Tensor, scheme: str, *, group_size: int = 128, symmetric: bool = True
) -> QuantizedWeight:
    """Quantize a linear layer's weight ``w [N, K]`` (round to nearest).

    Args:
        w: float16, bfloat16 or float32 ``[N, K]`` (N output channels, K input channels).
        scheme: "w4a16", "w8a16", "w8a8" or "fp8" (see the module docstring for the formulas
            and the storage layout).
        group_size: w4a16 only: input channels per scale, 32, 64 or 128, or -1 for one scale
            per output channel; must divide K (and K must be a multiple of 8). The 8-bit and
            fp8 schemes always use one scale per output channel: leave it at its default or
            pass -1.
        symmetric: w4a16 may be asymmetric (unsigned values with a zero point per group); the
            8-bit and fp8 schemes are symmetric only.

    Returns:
        A :class:`QuantizedWeight` on ``w``'s device.
    """
    scheme = check_scheme(scheme)
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D [N, K] (N output, K input channels), got shape {tuple(w.shape)}")
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"w must have dtype in (float16, bfloat16, float32), got {w.dtype}")
    n, k = w.shape
    if n == 0 or k == 0:
        raise ValueError(f"w must not be empty, got shape {tuple(w.shape)}")
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool, got {type(symmetric).__name__}")
    if not isinstance(group_size, int) or isinstance(group_size, bool):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")

    w = w.detach()  # a Parameter may come in: the quantized tensors are plain data
    if scheme == "w4a16":
        return _quantize_w4(w, group_size, symmetric)
    if group_size not in (-1, 128):  # 128 is the signature's default: accepted and ignored
        raise ValueError(f"{scheme} quantizes per output channel; group_size must be -1 (or left at its "
                         f"default), got {group_size}")
    if not symmetric:
        raise ValueError(f"asymmetric quantization is not supported for {scheme} (symmetric only)")
    w32 = w.to(torch.float32)
    amax = w32.abs().amax(dim=1, keepdim=True)
    if scheme == "fp8":
        scale = stored_scale(amax / FP8_E4M3_MAX, torch.float32)
        q = (w32 / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    else:
        scale = stored_scale(amax / INT8_MAX, w.dtype if scheme == "w8a16" else torch.float32)
        q = torch.round(w32 / scale.to(torch.float32)).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return QuantizedWeight(q, scale, None, scheme=scheme, group_size=-1, shape=(n, k), dtype=w.dtype)


def _quantize_w4(w: torch.Tensor, group_size: int, symmetric: bool) -> QuantizedWeight:
    n, k = w.shape
    if group_size not in W4_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {', '.join(map(str, W4_GROUP_SIZES))} for w4a16, "
                         f"got {group_size}")
    g = k if group_size == -1 else group_size
    if k % g or k % 8:
        raise ValueError(f"group_size={group_size} must divide K={k} (the columns of w), and K must be a "
                         "multiple of 8")
    w32 = w.to(torch.float32).view(n, k // g, g)
    if symmetric:
        scale = stored_scale(w32.abs().amax(dim=-1) / 7.0, w.dtype)
        s = scale.to(torch.float32).unsqueeze(-1)
        u = torch.round(w32 / s).clamp(-8, 7) + INT4_SYMMETRIC_ZERO
        zeros = None
    else:
        lo = w32.amin(dim=-1).clamp(max=0.0)
        hi = w32.amax(dim=-1).clamp(min=0.0)
        scale = stored_scale((hi - lo) / 15.0, w.dtype)
        s = scale.to(torch.float32)
        zero = torch.round(-lo / s).clamp(0, 15)
        u = (torch.round(w32 / s.unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(0, 15)
        zeros = zero.to(torch.uint8)
    packed = pack_int4(u.to(torch.int32).view(n, k), dim=1)
    return QuantizedWeight(packed, scale, zeros, scheme="w4a16", group_size=group_size, shape=(n, k),
                           dtype=w.dtype)

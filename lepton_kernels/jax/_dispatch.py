"""Which implementation of a JAX op runs: the Mosaic TPU kernel, its interpreter, or plain jnp.

``backend`` takes the same role as in the torch API, with JAX's names:

* ``"auto"`` (default; ``LEPTON_KERNELS_JAX_BACKEND`` overrides it) follows
  ``jax.default_backend()``: on TPU the Mosaic TPU kernel, on GPU the Mosaic GPU kernel, when
  it serves the call; otherwise (and on CPU) the jnp reference. When a kernel has to be
  skipped the reason is logged once.
* ``"tpu"``: the Mosaic TPU kernel. Compiling it needs a TPU, but it can be traced and
  exported anywhere (``jax.export.export(..., platforms=["tpu"])``), so it is not refused on
  other hosts.
* ``"interpret"``: the same kernel run by Pallas' TPU interpreter (any host; slow; for tests).
* ``"gpu"``: the Pallas Mosaic GPU kernel (Hopper; ``lepton_kernels.jax.gpu``), for the ops
  that have one.
* ``"reference"``: the jnp reference.

An explicit backend that cannot serve the call raises :class:`BackendUnavailableError` with
the reason; an unknown name raises ``ValueError`` listing the known ones. Selection looks only at
shapes, dtypes and static options, never at data, so it is safe under ``jax.jit``.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Callable, Optional, Tuple, Union

import jax

logger = logging.getLogger("lepton_kernels")

BACKENDS: Tuple[str, ...] = ("tpu", "gpu", "interpret", "reference")
ENV_BACKEND = "LEPTON_KERNELS_JAX_BACKEND"

# TPU generations with tuned block-size defaults, and the device_kind strings that map to them.
GENERATIONS: Tuple[str, ...] = ("v5e", "v6e")


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot serve the given inputs."""


def requested_backend(backend: str) -> str:
    """Resolve the user's ``backend`` argument: the env var replaces "auto"; names are checked."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    source = ""
    if backend == "auto":
        backend = os.environ.get(ENV_BACKEND, "auto").strip() or "auto"
        source = f" (from {ENV_BACKEND})"
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(
            f"unknown backend {backend!r}{source}; known backends: auto, {', '.join(BACKENDS)}"
        )
    return backend


NO_GPU_KERNEL = "no Pallas Mosaic GPU kernel yet"

Reason = Union[Optional[str], Callable[[], Optional[str]]]


def select(op: str, backend: str, tpu_reason: Optional[str], gpu_reason: Reason = NO_GPU_KERNEL) -> str:
    """Pick "tpu", "interpret", "gpu" or "reference" for one call of ``op``.

    ``tpu_reason`` is None when the Pallas TPU kernel can serve this call, else a sentence
    saying why not (it applies to "tpu" and "interpret" alike: they run the same kernel).
    ``gpu_reason`` is the same for the Mosaic GPU kernel; it may be a function returning it,
    called only when the GPU kernel is a candidate (it may import Mosaic GPU).
    """
    backend = requested_backend(backend)
    if backend == "reference":
        return backend
    if backend in ("tpu", "interpret"):
        if tpu_reason is not None:
            raise BackendUnavailableError(f"{op}: backend {backend!r} cannot serve this call: {tpu_reason}")
        return backend
    if backend == "gpu":
        reason = gpu_reason() if callable(gpu_reason) else gpu_reason
        if reason is not None:
            raise BackendUnavailableError(f"{op}: backend 'gpu' cannot serve this call: {reason}")
        return backend
    platform = jax.default_backend()
    if platform == "tpu":
        if tpu_reason is None:
            return "tpu"
        _log_fallback_once(op, f"tpu: {tpu_reason}")
    elif platform == "gpu":
        reason = gpu_reason() if callable(gpu_reason) else gpu_reason
        if reason is None:
            return "gpu"
        _log_fallback_once(op, f"gpu: {reason}")
    return "reference"


@functools.lru_cache(maxsize=None)
def _log_fallback_once(op: str, reason: str) -> None:
    logger.warning("%s runs on the jnp reference (skipped %s)", op, reason)


def tpu_generation() -> str:
    """The TPU generation whose block sizes to use by default: "v5e" or "v6e".

    On a TPU host it is read from the device kind (v6e and later, with their 256-wide MXU, get
    the v6e sizes; v4/v5e/v5p the v5e ones). Elsewhere (e.g. exporting for TPU from a CPU host)
    it is "v5e", whose smaller blocks also fit every later generation; pass block sizes
    explicitly to target another one.
    """
    if jax.default_backend() != "tpu":
        return "v5e"
    kind = jax.devices()[0].device_kind.lower()
    for newer in ("v6", "7"):
        if newer in kind:
            return "v6e"
    return "v5e"


def interpret_params():
    """Interpreter settings for backend="interpret": uninitialized memory (scratch, and the
    padding of partial edge blocks) reads as NaN, so a kernel that uses what it never wrote shows
    it in its output; an out-of-bounds DMA raises."""
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.InterpretParams(uninitialized_memory="nan")

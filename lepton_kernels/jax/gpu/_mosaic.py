"""Whether this process can build Pallas Mosaic GPU kernels, and why not when it cannot.

Mosaic GPU is imported lazily: on a CPU-only jax (or one without ``absl`` or the CUDA plugin's
Mosaic GPU bindings) importing ``lepton_kernels.jax`` must keep working, and the dispatcher
needs a sentence to log or raise instead of an ImportError.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import jax

# ptxas in CUDA 12.8.0 - 12.9.0 miscompiles masked (causal) Mosaic GPU attention kernels.
_PTXAS_BAD_CAUSAL = (12080, 12091)


@functools.lru_cache(maxsize=None)
def _import_plgpu() -> Tuple[object, Optional[str]]:
    try:
        from jax.experimental.pallas import mosaic_gpu as plgpu
        from jax._src.lib import mosaic_gpu as _bindings  # noqa: F401  (needs the CUDA plugin)
    except Exception as e:  # ImportError, or a plugin that fails to load
        return None, f"Pallas Mosaic GPU is unavailable in jax {jax.__version__} ({type(e).__name__}: {e})"
    return plgpu, None


def plgpu():
    """``jax.experimental.pallas.mosaic_gpu``; raises ImportError with the reason if missing."""
    module, reason = _import_plgpu()
    if module is None:
        raise ImportError(reason)
    return module


def bindings_reason() -> Optional[str]:
    """None when Mosaic GPU kernels can be traced and lowered here (possibly for export only)."""
    return _import_plgpu()[1]


@functools.lru_cache(maxsize=None)
def device_reason() -> Optional[str]:
    """None when the default device is a Hopper GPU (the kernels use wgmma: sm_90a only)."""
    reason = bindings_reason()
    if reason is not None:
        return reason
    try:
        devices = jax.devices("gpu")
    except Exception:  # RuntimeError: no such platform; a CUDA plugin without a GPU may raise others
        devices = []
    if not devices:
        return f"jax has no GPU backend here (default backend: {jax.default_backend()})"
    capability = getattr(devices[0], "compute_capability", None)
    if capability is not None and not str(capability).startswith("9."):
        return f"the kernels use Hopper wgmma (sm_90a); this GPU has compute capability {capability}"
    return None


@functools.lru_cache(maxsize=None)
def cuda_runtime_version() -> Optional[int]:
    try:
        from jax._src.lib import cuda_versions
        return int(cuda_versions.cuda_runtime_get_version())
    except Exception:  # no CUDA plugin, or a jaxlib that moved it: assume a good toolkit
        return None


def masked_kernel_reason() -> Optional[str]:
    """None unless this CUDA toolkit is known to miscompile masked attention kernels."""
    version = cuda_runtime_version()
    if version is not None and _PTXAS_BAD_CAUSAL[0] <= version < _PTXAS_BAD_CAUSAL[1]:
        return f"CUDA runtime {version} (12.8.0 - 12.9.0) miscompiles masked Mosaic GPU attention; use 12.9.1+"
    return None


def interpret_params():
    """Parameters for Pallas' Mosaic GPU interpreter (CPU; simulates warpgroups, barriers and
    TMA, and checks that every barrier phase is observed), or None where jax lacks it."""
    if bindings_reason() is not None:
        return None
    try:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError:  # a private module: it may move between jax releases
        return None
    return InterpretGPUParams()

"""Which implementations exist for each op, whether they can serve a call, and which one runs.

Each op registers one implementation per backend together with a ``supports`` function that
inspects the (already validated) arguments and returns ``None`` when it can serve them, or a
sentence saying why not. Selection:

* ``backend="auto"`` (the default, overridable with ``LEPTON_KERNELS_BACKEND``) walks the
  backends in order of speed — compiled CUDA, Triton, torch — and takes the first that serves
  the call. When it has to skip a faster one it says why, once, through ``logging``. A
  backend may also register ``auto_supports``: a check that only "auto" applies, for calls it
  could serve but where a later backend was measured faster (skipped silently: no fallback).
* An explicit backend that cannot serve the call raises ``BackendUnavailableError`` with the
  reason. An unknown name raises ``ValueError`` listing the known ones.

Selection looks only at tensor metadata (device, dtype, shape), never at data, so it is safe
under ``torch.compile`` and CUDA graph capture.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

logger = logging.getLogger("lepton_kernels")

BACKENDS: Tuple[str, ...] = ("cuda", "triton", "torch")  # fastest first
ENV_BACKEND = "LEPTON_KERNELS_BACKEND"

SupportsFn = Callable[..., Optional[str]]


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot serve the given inputs."""


@dataclass(frozen=True)
class Implementation:
    op: str
    backend: str
    fn: Callable  # the torch.library op: what torch.compile and fake-tensor tracing see
    supports: SupportsFn
    eager: Optional[Callable] = None  # the same function without the dispatcher hop
    auto_supports: Optional[SupportsFn] = None  # "auto" only: None, or why another backend is better

    def __call__(self, *args):
        # The dispatcher round trip into a Python kernel costs tens of microseconds per call;
        # skip it unless something is tracing (dynamo, fake tensors, make_fx), which must see
        # the registered op.
        if self.eager is not None and not _tracing():
            return self.eager(*args)
        return self.fn(*args)


_REGISTRY: Dict[str, Dict[str, Implementation]] = {}
_EXAMPLES: Dict[str, Callable[[torch.device], Tuple[tuple, dict]]] = {}


def register(op: str, backend: str, supports: Optional[SupportsFn] = None, eager: Optional[Callable] = None,
             auto_supports: Optional[SupportsFn] = None):
    """Decorator: make ``fn`` (a torch.library op) the ``backend`` implementation of ``op``.

    ``supports(*args)`` returns ``None`` when the backend can serve the call, else the reason;
    ``eager`` is the plain Python function behind ``fn``, called directly when not tracing;
    ``auto_supports(*args)`` (same arguments) returns a reason to leave a call it can serve to
    the next backend under "auto" (an explicit request still gets this backend).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known backends: {', '.join(BACKENDS)}")

    def wrap(fn: Callable) -> Callable:
        _REGISTRY.setdefault(op, {})[backend] = Implementation(op, backend, fn, supports or _always, eager,
                                                               auto_supports)
        return fn

    return wrap


def register_example(op: str):
    """Decorator: ``fn(device) -> (args, kwargs)`` builds a small valid call of ``op``'s
    public function (without ``backend``).

    ``lepton-kernels info`` uses it to say which backend each op would pick, and the self-check
    to run every available backend against the reference.
    """

    def wrap(fn: Callable[[torch.device], Tuple[tuple, dict]]):
        _EXAMPLES[op] = fn
        return fn

    return wrap


def example(op: str, device: torch.device) -> Tuple[tuple, dict]:
    if op not in _EXAMPLES:
        raise ValueError(f"op {op!r} has no registered example")
    return _EXAMPLES[op](device)


def _always(*args, **kwargs) -> Optional[str]:
    return None


def implementations(op: str) -> Dict[str, Implementation]:
    if op not in _REGISTRY:
        raise ValueError(f"unknown op {op!r}; known ops: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[op]


def ops() -> Tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def requested_backend(backend: str) -> str:
    """Resolve the user's ``backend`` argument: the env var replaces "auto"; names are checked."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend == "auto":
        backend = os.environ.get(ENV_BACKEND, "auto").strip() or "auto"
        source = f" (from {ENV_BACKEND})"
    else:
        source = ""
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(
            f"unknown backend {backend!r}{source}; known backends: auto, {', '.join(BACKENDS)}"
        )
    return backend


class SelectionCaptured(Exception):
    """Raised by ``select`` inside ``capture_selection``: the call stops before any kernel."""

    def __init__(self, op: str, args: tuple, kwargs: dict):
        super().__init__(op)
        self.op, self.args, self.kwargs = op, args, kwargs


_capture = threading.local()


@contextlib.contextmanager
def capture_selection():
    """Public calls made inside stop at backend selection, raising ``SelectionCaptured`` with
    the validated, normalized arguments every backend (and its ``supports``) would receive."""
    _capture.active = True
    try:
        yield
    finally:
        _capture.active = False


def select(op: str, backend: str, *args, **kwargs) -> Implementation:
    """Pick the implementation of ``op`` that runs for these arguments."""
    if getattr(_capture, "active", False):
        raise SelectionCaptured(op, args, kwargs)
    impls = implementations(op)
    backend = requested_backend(backend)
    if backend != "auto":
        impl = impls.get(backend)
        if impl is None:
            have = ", ".join(b for b in BACKENDS if b in impls)
            raise BackendUnavailableError(f"{op} has no {backend} implementation (it has: {have})")
        reason = impl.supports(*args, **kwargs)
        if reason is not None:
            raise BackendUnavailableError(f"{op}: backend {backend!r} cannot serve this call: {reason}")
        return impl

    skipped = []  # backends that cannot serve the call, with why
    for name in BACKENDS:
        impl = impls.get(name)
        if impl is None:
            continue
        reason = impl.supports(*args, **kwargs)
        if reason is None and impl.auto_supports is not None and impl.auto_supports(*args, **kwargs) is not None:
            continue  # a preference, not a limitation: nothing to warn about
        if reason is None:
            if skipped and not is_compiling():
                _log_fallback_once(op, name, tuple(skipped))
            return impl
        skipped.append(f"{name}: {reason}")
    raise BackendUnavailableError(f"{op}: no backend can serve this call ({'; '.join(skipped)})")


@functools.lru_cache(maxsize=None)
def _log_fallback_once(op: str, chosen: str, skipped: Tuple[str, ...]) -> None:
    logger.warning("%s runs on the %s backend (skipped %s)", op, chosen, "; ".join(skipped))


def explain(op: str, *args, auto: bool = False, **kwargs) -> Dict[str, Optional[str]]:
    """For ``lepton-kernels info``: each backend of ``op`` and why it cannot serve a call
    (``auto=True``: also why "auto" would leave it to another backend)."""
    out = {}
    for name, impl in implementations(op).items():
        reason = impl.supports(*args, **kwargs)
        if auto and reason is None and impl.auto_supports is not None:
            preference = impl.auto_supports(*args, **kwargs)
            reason = None if preference is None else f"(auto only) {preference}"
        out[name] = reason
    return out


def trace_as_constant(fn: Callable) -> Callable:
    """Let torch.compile run ``fn`` at trace time and bake its result into the graph.

    For availability checks that read device properties or the compiled extension's build
    info (pybind calls dynamo cannot trace): with ``fullgraph=True`` they would otherwise
    break the graph. Their arguments must be constants (devices, dtypes, flags), not tensors.
    """
    import torch._dynamo

    marker = getattr(torch._dynamo, "assume_constant_result", None)
    return marker(fn) if marker is not None else fn


_dispatch_stack_len = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 0)


def _tracing() -> bool:
    return is_compiling() or _dispatch_stack_len() > 0


def is_compiling() -> bool:
    fn = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(fn()) if fn is not None else False

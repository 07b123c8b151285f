"""torch.library registration of every kernel, so torch.compile(fullgraph=True) and CUDA graph
capture see each one as a single opaque op with a known schema (mutations annotated) and a
fake implementation for tracing."""
from __future__ import annotations

from typing import Callable, Optional

import torch

NAMESPACE = "lepton_kernels"
_LIB = torch.library.Library(NAMESPACE, "DEF")


def define_op(name: str, schema: str, impl: Callable, fake: Callable, dispatch_key: str) -> Callable:
    """Define ``lepton_kernels::name``; return the ``torch.ops`` callable.

    ``dispatch_key`` is "CUDA" for compiled kernels and "CompositeExplicitAutograd" for code
    that runs wherever its inputs live (the torch reference, Triton under its interpreter).
    """
    _LIB.define(f"{name}{schema}")
    _LIB.impl(name, impl, dispatch_key)
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_LIB)
    return getattr(getattr(torch.ops, NAMESPACE), name)


def lazy(module: str, attr: str) -> Callable:
    """Import a backend's function on first call, so importing the package stays cheap."""
    fn: Optional[Callable] = None

    def call(*args, **kwargs):
        nonlocal fn
        if fn is None:
            import importlib

            fn = getattr(importlib.import_module(module), attr)
        return fn(*args, **kwargs)

    return call

"""Helpers shared by the tests."""
from __future__ import annotations

import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def poisoned(*shape, dtype, device) -> torch.Tensor:
    """A tensor full of NaN (or the dtype's max for types without NaN): unwritten elements show."""
    if dtype.is_floating_point and dtype != torch.float8_e4m3fn:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    if dtype == torch.float8_e4m3fn:
        return torch.full(shape, float("nan"), device=device).to(dtype)  # e4m3fn has a NaN code
    return torch.full(shape, torch.iinfo(dtype).max, dtype=dtype, device=device)


def call_with_poisoned_allocations(fn, *args, **kwargs):
    """Call ``fn`` with every floating-point buffer it allocates through ``torch.empty``
    (outputs, workspaces) filled with NaN, so an element it forgets to write shows."""
    empty = torch.empty

    def nan_empty(*shape, **kw):
        x = empty(*shape, **kw)
        if x.is_floating_point():
            x.fill_(float("nan"))
        return x

    torch.empty = nan_empty
    try:
        return fn(*args, **kwargs)
    finally:
        torch.empty = empty


def assert_close_fa_rule(out: torch.Tensor, ref64: torch.Tensor, torch_lowp: torch.Tensor, eps: float = 1e-5,
                         factor: float = 2.0) -> None:
    """FlashAttention's rule: the kernel's max error against the float64 reference is at most
    ``factor`` x the error of the same computation done by torch in the kernel's dtype, + eps."""
    assert not torch.isnan(out).any(), "output has NaN (unwritten elements?)"
    err = (out.double() - ref64).abs().max().item()
    base = (torch_lowp.double() - ref64).abs().max().item()
    assert err <= factor * base + eps, f"max error {err:.3g} > {factor} x torch's {base:.3g} + {eps}"

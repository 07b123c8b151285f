"""Benchmark of ``flash_attention`` (prefill / encoder shapes) against PyTorch's attention kernels.

Shapes: bf16, H=32, D=128, B·S = 16k tokens with S in {1k, 4k, 16k}, causal and not; plus
D=64, D=256, GQA 32/8 and a varlen batch of mixed lengths (100–4000). Anchors, each timed in
the same run and reported as "n/a: <reason>" when it cannot run: SDPA's FlashAttention-2
backend, SDPA's cuDNN backend (the run's main anchor: the strongest of the three on Hopper), and
FlexAttention compiled with ``torch.compile`` (a causal or document block mask).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Tuple

import torch

from .harness import Harness, Row
from .report import PlotSpec

OP = "flash_attention"
TOKENS = 16 * 1024
HEADS = 32
HEAD_DIM = 128
SEQ_LENS = (1024, 4096, 16384)
QUICK_SEQ_LENS = (1024, 4096)
VARLEN_RANGE = (100, 4000)
VARLEN_SEED = 0
# Decode over a contiguous cache (what a patched Hugging Face model does each step): (B, keys).
DECODE_SHAPES = ((1, 32768), (16, 4096))

ANCHOR_FLASH = "anchor: SDPA flash (FA2)"
ANCHOR_CUDNN = "anchor: SDPA cuDNN"
ANCHOR_FLEX = "anchor: FlexAttention (compiled)"
ANCHOR_PRIORITY = (ANCHOR_CUDNN, ANCHOR_FLASH, ANCHOR_FLEX)  # the first that runs is *the* anchor
RATIO_COLUMNS = {ANCHOR_FLASH: "vs SDPA flash", ANCHOR_CUDNN: "vs cuDNN", ANCHOR_FLEX: "vs Flex"}

NOTES = [
    "Inputs: bf16 q/k/v in FlashAttention's [B, S, H, D] layout (random data); the SDPA anchors get "
    "the same tensors as [B, H, S, D] views (no copy).",
    "FLOPs counted: 4·B·H·Sq·Sk·D (two matmuls), halved when causal; varlen sums 4·H·L²·D over "
    "its sequences.",
    f"*vs anchor* compares with `{ANCHOR_CUDNN}` (with SDPA flash where cuDNN cannot run); the `vs …` "
    "columns of our rows compare with each anchor (anchor time / our time, above 1: we are faster).",
    "SDPA takes no cu_seqlens: its flash row for varlen calls `aten._flash_attention_forward` (the varlen "
    "entry point nested-tensor SDPA uses); FlexAttention packs the batch into one sequence with a document mask.",
    "Decode rows (S = 1×L: one query over L cached keys, GQA 32/8, causal = the query sees every key): timed as "
    "CUDA graphs of back-to-back calls (how decode loops run), anchors included; GB/s counts K and V once "
    "(2·B·L·Hkv·D·2 bytes). Our kernel splits the keys over programs (flash-decoding) when one program per "
    "(sequence, kv head) would leave the GPU idle.",
]

PLOT = PlotSpec(x="S", y="tflops", where={"D": HEAD_DIM, "Hkv": HEADS, "causal": False, "varlen": False},
                title="flash_attention, bf16, H=32, D=128, B·S=16k, non-causal")


@dataclass(frozen=True)
class Case:
    seq_len: int  # S (padded), or the longest sequence (varlen)
    causal: bool
    head_dim: int = HEAD_DIM
    kv_heads: int = HEADS
    varlen_lens: Tuple[int, ...] = field(default=())
    decode_batch: int = 0  # > 0: decode, that many sequences of one query over seq_len keys

    @property
    def varlen(self) -> bool:
        return bool(self.varlen_lens)

    @property
    def decode(self) -> bool:
        return self.decode_batch > 0

    @property
    def query_len(self) -> int:
        return 1 if self.decode else self.seq_len

    @property
    def batch(self) -> int:
        if self.decode:
            return self.decode_batch
        return len(self.varlen_lens) if self.varlen else max(1, TOKENS // self.seq_len)

    def shape(self) -> Dict[str, Any]:
        seq = f"{min(self.varlen_lens)}–{max(self.varlen_lens)}" if self.varlen else self.seq_len
        if self.decode:
            seq = f"1×{self.seq_len}"
        return {"B": self.batch, "S": seq, "H": HEADS, "Hkv": self.kv_heads, "D": self.head_dim,
                "causal": self.causal, "varlen": self.varlen}

    def flops(self) -> int:
        if self.decode:
            return 4 * self.batch * HEADS * self.seq_len * self.head_dim
        lens = self.varlen_lens if self.varlen else (self.seq_len,) * self.batch
        total = sum(4 * HEADS * n * n * self.head_dim for n in lens)
        return total // 2 if self.causal else total

    def kv_bytes(self) -> int:
        return 2 * self.batch * self.seq_len * self.kv_heads * self.head_dim * 2

    def tokens(self) -> int:
        return sum(self.varlen_lens) if self.varlen else self.batch * self.query_len

    def touched_bytes(self) -> int:
        q_and_out = 2 * self.tokens() * HEADS * self.head_dim * 2
        kv = self.kv_bytes() if self.decode else 2 * self.tokens() * self.kv_heads * self.head_dim * 2
        return q_and_out + kv


def _varlen_lengths() -> Tuple[int, ...]:
    """Mixed lengths drawn from VARLEN_RANGE until they fill TOKENS (fixed seed: same every run)."""
    rng = random.Random(VARLEN_SEED)
    lens: List[int] = []
    while sum(lens) < TOKENS:
        lens.append(rng.randint(*VARLEN_RANGE))
    lens[-1] -= sum(lens) - TOKENS
    if lens[-1] < VARLEN_RANGE[0]:
        lens.pop()
    return tuple(lens)


def cases(quick: bool) -> List[Case]:
    out = [Case(s, c) for s in (QUICK_SEQ_LENS if quick else SEQ_LENS) for c in (False, True)]
    if quick:
        return out + [Case(32768, True, kv_heads=8, decode_batch=1)]
    lens = _varlen_lengths()
    for variant in (dict(head_dim=64), dict(head_dim=256), dict(kv_heads=8), dict(varlen_lens=lens)):
        seq_len = max(lens) if "varlen_lens" in variant else 4096
        out += [Case(seq_len, c, **variant) for c in (False, True)]
    return out + [Case(seq_len, True, kv_heads=8, decode_batch=batch) for batch, seq_len in DECODE_SHAPES]


def make_set(case: Case, device: torch.device) -> Dict[str, Any]:
    """q/k/v (random data), and for varlen the cu_seqlens."""
    def rand(heads):
        if case.varlen:
            return torch.randn(case.tokens(), heads, case.head_dim, device=device, dtype=torch.bfloat16)
        return torch.randn(case.batch, case.seq_len, heads, case.head_dim, device=device, dtype=torch.bfloat16)

    inputs: Dict[str, Any] = {"q": rand(HEADS), "k": rand(case.kv_heads), "v": rand(case.kv_heads)}
    if case.decode:
        inputs["q"] = torch.randn(case.batch, 1, HEADS, case.head_dim, device=device, dtype=torch.bfloat16)
    if case.varlen:
        lens = torch.tensor((0,) + case.varlen_lens, device=device)
        inputs["cu_seqlens"] = lens.cumsum(0).to(torch.int32)
        inputs["max_seqlen"] = max(case.varlen_lens)
    return inputs


# -- our backends -----------------------------------------------------------------------------------

def _ours(case: Case, backend: str) -> Callable:
    from ..ops.flash_attention import flash_attention

    if case.varlen:
        def call(s):
            return flash_attention(
                s["q"], s["k"], s["v"], causal=case.causal, cu_seqlens_q=s["cu_seqlens"], cu_seqlens_k=s["cu_seqlens"],
                max_seqlen_q=s["max_seqlen"], max_seqlen_k=s["max_seqlen"], backend=backend)
    else:
        def call(s):
            return flash_attention(s["q"], s["k"], s["v"], causal=case.causal, backend=backend)
    return call


def _our_backends(case: Case, first: Dict[str, Any], harness: Harness) -> List[str]:
    from .. import _backends
    from ..ops import flash_attention as op_module

    try:  # make sure the Triton backend is registered (a no-op once the op module did it)
        from ..triton.flash_attention import register
    except ImportError:
        pass
    else:
        register()
    impls = _backends.implementations(op_module.OP)
    runnable = []
    for backend in _backends.BACKENDS:
        if backend == "torch" or backend not in impls:
            continue  # the torch reference materializes S x S scores: not a contender at these sizes
        q, k, v = first["q"], first["k"], first["v"]
        cu = first.get("cu_seqlens")
        max_len = first.get("max_seqlen", 0)
        if cu is not None:
            args = (q, k, v, case.causal, HEAD_DIM ** -0.5, -1, 0 if case.causal else -1, 0.0, cu, cu,
                    max_len, max_len, None)
        else:
            args = (q, k, v, case.causal, HEAD_DIM ** -0.5, -1, 0 if case.causal else -1, 0.0, None, None,
                    q.shape[1], k.shape[1], None)
        reason = impls[backend].supports(*args)
        if reason is not None:
            harness.note(f"backend {backend} skipped ({case.shape()}): {reason}")
            continue
        runnable.append(backend)
    return runnable


# -- anchors ----------------------------------------------------------------------------------------

def _bhsd(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)  # [B, S, H, D] -> [B, H, S, D] view


def _sdpa(case: Case, backend_name: str) -> Callable:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    backend = getattr(SDPBackend, backend_name)
    gqa = {"enable_gqa": True} if case.kv_heads != HEADS else {}

    if case.varlen:
        if backend_name != "FLASH_ATTENTION":
            raise NotImplementedError("SDPA takes no cu_seqlens; only its flash kernel has a varlen entry point")

        def call(s):
            # SDPA's flash kernel through its varlen entry point (what nested-tensor SDPA calls).
            return torch.ops.aten._flash_attention_forward(
                s["q"], s["k"], s["v"], s["cu_seqlens"], s["cu_seqlens"], s["max_seqlen"], s["max_seqlen"],
                0.0, case.causal, False)
        return call

    # SDPA's is_causal is top-left aligned: a decode query would see key 0 only. Bottom-right
    # causal (ours) lets it see every key, which is SDPA without a mask.
    causal = case.causal and not case.decode

    def call(s):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(_bhsd(s["q"]), _bhsd(s["k"]), _bhsd(s["v"]),
                                                  is_causal=causal, **gqa)
    return call


def _flex(case: Case, first: Dict[str, Any]) -> Callable:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # A fresh compile per shape: past dynamo's recompile limit (8) flex_attention would
    # silently fall back to its unfused eager version and time that instead.
    torch._dynamo.reset()
    flex = torch.compile(flex_attention, dynamic=False)
    device = first["q"].device
    gqa = case.kv_heads != HEADS

    if case.varlen:
        # One packed sequence of length T with a document mask (plus causal).
        doc = torch.repeat_interleave(torch.arange(case.batch, device=device),
                                      torch.tensor(case.varlen_lens, device=device))
        causal = case.causal

        def mask_mod(b, h, q_idx, kv_idx):
            same = doc[q_idx] == doc[kv_idx]
            return same & (q_idx >= kv_idx) if causal else same

        total = case.tokens()
        block_mask = create_block_mask(mask_mod, None, None, total, total, device=device)

        def call(s):
            q, k, v = (x.unsqueeze(0).transpose(1, 2) for x in (s["q"], s["k"], s["v"]))
            return flex(q, k, v, block_mask=block_mask, enable_gqa=gqa)
        return call

    block_mask = None
    if case.causal and not case.decode:  # a decode query sees every key (bottom-right causal)
        def causal_mask(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

        block_mask = create_block_mask(causal_mask, None, None, case.seq_len, case.seq_len, device=device)

    def call(s):
        return flex(_bhsd(s["q"]), _bhsd(s["k"]), _bhsd(s["v"]), block_mask=block_mask, enable_gqa=gqa)
    return call


def _anchor_fns(case: Case, first: Dict[str, Any]) -> List[Tuple[str, Callable[[], Callable]]]:
    return [
        (ANCHOR_FLASH, lambda: _sdpa(case, "FLASH_ATTENTION")),
        (ANCHOR_CUDNN, lambda: _sdpa(case, "CUDNN_ATTENTION")),
        (ANCHOR_FLEX, lambda: _flex(case, first)),
    ]


def _na_row(label: str, case: Case, exc: BaseException) -> Row:
    reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''}"
    return Row(op=OP, backend=label, shape=case.shape(), median_us=float("nan"), method="n/a",
               flops=case.flops(), is_anchor=False, note=f"n/a: {reason}")


# -- run --------------------------------------------------------------------------------------------

def case_label(case: Case) -> str:
    return ", ".join(f"{k}={v}" for k, v in case.shape().items())


# A part of the run (--part I/N) is a contiguous block of cases().
PART_CASES = cases
PART_WHAT = "cases"


def run(harness: Harness, quick: bool = False) -> List[Row]:
    rows: List[Row] = []
    for case in harness.part_of(cases(quick), what=PART_WHAT, label=case_label):
        n_sets = harness.rotation_sets(case.touched_bytes())
        harness.log(f"  {case.shape()}: {n_sets} input set(s)")
        sets = [make_set(case, harness.device) for _ in range(n_sets)]
        inputs = [(s,) for s in sets]
        case_rows: List[Row] = []

        # Decode steps run as CUDA graphs in serving loops: time GPU work without launch gaps.
        method = "graph" if case.decode else "auto"
        row_kwargs = dict(flops=case.flops(), bytes=case.kv_bytes() if case.decode else None)
        for backend in _our_backends(case, sets[0], harness):
            timing = harness.time(_ours(case, backend), inputs, method=method)
            case_rows.append(Row.from_timing(OP, backend, case.shape(), timing, **row_kwargs))
            harness.log(f"    {backend:<34} {timing.median_us:10.1f} µs")

        anchor_times: Dict[str, float] = {}
        for label, build in _anchor_fns(case, sets[0]):
            try:
                fn = build()
                fn(sets[0])  # fails here when the backend refuses the inputs
                torch.cuda.synchronize()
                timing = harness.time(fn, inputs, method=method)
            except Exception as exc:  # an anchor that cannot run is reported, not fatal
                torch.cuda.synchronize()
                case_rows.append(_na_row(label, case, exc))
                harness.log(f"    {label:<34} n/a ({type(exc).__name__})")
                continue
            anchor_times[label] = timing.median_us
            case_rows.append(Row.from_timing(OP, label, case.shape(), timing, **row_kwargs))
            harness.log(f"    {label:<34} {timing.median_us:10.1f} µs")
        main = next((label for label in ANCHOR_PRIORITY if label in anchor_times), None)
        for row in case_rows:
            row.is_anchor = row.backend == main

        for row in case_rows:
            if row.backend.startswith("anchor"):
                continue
            for label, column in RATIO_COLUMNS.items():
                if label in anchor_times:
                    row.extra[column] = f"{anchor_times[label] / row.median_us:.2f}x"
                else:
                    row.extra[column] = "n/a"
        rows += case_rows
        del sets, inputs
        torch.cuda.empty_cache()
    return rows

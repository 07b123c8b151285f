"""Reference attention: the mask and softmax math every attention backend must reproduce.

``attention_core`` holds the semantics (bottom-right causal alignment, sliding window, softcap,
GQA head mapping, fully masked rows); ``flash_attention`` and the paged reference only arrange
their inputs into it.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate in float32, or float64 when the inputs are float64 (for tests)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def visible_keys(
    num_queries: int,
    num_keys: int,
    kv_lens: torch.Tensor,
    causal: bool,
    window_left: int,
    window_right: int,
) -> torch.Tensor:
    """Bool mask [B, Sq, Sk]: may query ``i`` of sequence ``b`` attend to key ``j``?

    Queries are the last ``num_queries`` positions of a sequence of ``kv_lens[b]`` keys, so
    query ``i`` sits on key position ``diag = i + kv_lens[b] - num_queries`` (bottom-right
    alignment). Key ``j`` is visible iff ``j < kv_lens[b]`` and
    ``diag - window_left <= j <= diag + window_right`` (a bound of -1 is unbounded; causal
    means a right bound of 0).
    """
    device = kv_lens.device
    kv_lens = kv_lens.to(torch.int64).view(-1, 1, 1)
    q_pos = torch.arange(num_queries, device=device).view(1, -1, 1)
    k_pos = torch.arange(num_keys, device=device).view(1, 1, -1)
    diag = q_pos + kv_lens - num_queries
    visible = k_pos < kv_lens
    right = 0 if causal else window_right
    if right >= 0:
        visible = visible & (k_pos <= diag + right)
    if window_left >= 0:
        visible = visible & (k_pos >= diag - window_left)
    return visible


def attention_core(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float,
    causal: bool,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    kv_lens: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention over a padded batch, computed in the dtype of the inputs.

    Args:
        q: [B, Sq, Hq, D]. k, v: [B, Sk, Hkv, D] with Hq % Hkv == 0; query head ``h`` reads
            kv head ``h // (Hq // Hkv)``.
        kv_lens: optional integer [B]: sequence ``b`` has only its first ``kv_lens[b]`` keys
            (the rest is padding); it is also the key length used for causal alignment.

    Returns:
        out [B, Sq, Hq, D] and lse [B, Hq, Sq] (natural log), both in q's dtype. A query with
        no visible key gets out = 0 and lse = -inf.
    """
    batch, num_queries, num_q_heads, _ = q.shape
    num_keys, num_kv_heads = k.shape[1], k.shape[2]
    group = num_q_heads // num_kv_heads
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)

    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * softmax_scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)

    if kv_lens is None:
        kv_lens = torch.full((batch,), num_keys, device=q.device)
    else:
        # Padding keys may hold garbage (even NaN), which 0 * NaN would carry into the output.
        padding = torch.arange(num_keys, device=q.device) >= kv_lens.to(torch.int64)[:, None]
        v = v.masked_fill(padding[:, :, None, None], 0.0)
    visible = visible_keys(num_queries, num_keys, kv_lens, causal, window_left, window_right)
    scores = scores.masked_fill(~visible.unsqueeze(1), float("-inf"))

    lse = torch.logsumexp(scores, dim=-1)  # -inf where a row sees no key
    # Subtracting -inf would give NaN; those rows' scores are all -inf, so exp() makes them 0.
    probs = torch.exp(scores - lse.masked_fill(torch.isneginf(lse), 0.0).unsqueeze(-1))
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    return out, lse


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    cu_seqlens_q: Optional[torch.Tensor],
    cu_seqlens_k: Optional[torch.Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    kv_lens: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The torch backend of ``flash_attention`` (arguments as in its op schema).

    Padded: q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] -> out like q, lse float32 [B, Hq, Sq].
    Varlen: q [Tq, Hq, D], k/v [Tk, Hkv, D], cu_seqlens int32 [B+1] -> out like q,
    lse float32 [Hq, Tq]. ``max_seqlen_*`` only size kernel grids; this loop ignores them.
    """
    dtype = compute_dtype(q.dtype)
    options = dict(softmax_scale=softmax_scale, causal=causal, window_left=window_left,
                   window_right=window_right, softcap=softcap)
    if cu_seqlens_q is None:
        out, lse = attention_core(q.to(dtype), k.to(dtype), v.to(dtype), kv_lens=kv_lens, **options)
        return out.to(q.dtype), lse.float()

    # Tokens outside every sequence (not allowed, but unchecked outside debug mode) stay 0/-inf.
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    used_k = kv_lens.tolist() if kv_lens is not None else None
    for b in range(len(starts_q) - 1):
        q0, q1 = starts_q[b], starts_q[b + 1]
        k0, k1 = starts_k[b], starts_k[b + 1]
        if used_k is not None:
            k1 = k0 + used_k[b]
        if q1 == q0:
            continue
        out_b, lse_b = attention_core(q[None, q0:q1].to(dtype), k[None, k0:k1].to(dtype),
                                      v[None, k0:k1].to(dtype), **options)
        out[q0:q1] = out_b[0].to(q.dtype)
        lse[:, q0:q1] = lse_b[0].float()
    return out, lse

"""Reference paged attention: gather each sequence's pages, dequantize, run the shared core."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .attention import attention_core, compute_dtype


def gather_pages(
    cache: torch.Tensor,
    block_row: torch.Tensor,
    seq_len: int,
    scale: Optional[torch.Tensor],
    dtype: torch.dtype,
) -> torch.Tensor:
    """The first ``seq_len`` tokens [seq_len, Hkv, D] of one sequence, as ``dtype``.

    ``block_row`` lists the sequence's blocks in order; an fp8 cache holds ``value / scale``,
    with one scale per tensor or per kv head.
    """
    block_size = cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    blocks = block_row[:num_blocks].to(torch.int64)
    tokens = cache[blocks].flatten(0, 1)[:seq_len].to(dtype)
    if scale is not None:
        tokens = tokens * scale.to(dtype).reshape(-1, 1)  # [1 or Hkv, 1] broadcasts over heads
    return tokens


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: Optional[torch.Tensor],
    max_seqlen_q: int,
    softmax_scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    k_scale: Optional[torch.Tensor],
    v_scale: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The torch backend of ``paged_attention`` (arguments as in its op schema).

    Decode (``cu_seqlens_q`` None): q [B, Hq, D] -> out like q, lse float32 [B, Hq].
    Varlen: q [Tq, Hq, D] -> out like q, lse float32 [Hq, Tq]; sequence ``b``'s queries are
    the last positions of its ``seq_lens[b]`` cached tokens. ``max_seqlen_q`` only sizes
    kernel grids; this loop ignores it.
    """
    dtype = compute_dtype(q.dtype)
    num_tokens, num_q_heads, _ = q.shape
    lengths = seq_lens.tolist()
    if cu_seqlens_q is None:
        starts = list(range(len(lengths) + 1))  # decode: one query per sequence
    else:
        starts = cu_seqlens_q.tolist()

    # Tokens outside every sequence (not allowed, but unchecked outside debug mode) stay 0/-inf.
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.full((num_q_heads, num_tokens), float("-inf"), dtype=torch.float32, device=q.device)
    for b, seq_len in enumerate(lengths):
        q0, q1 = starts[b], starts[b + 1]
        if q1 == q0:
            continue
        k = gather_pages(k_cache, block_table[b], seq_len, k_scale, dtype)
        v = gather_pages(v_cache, block_table[b], seq_len, v_scale, dtype)
        out_b, lse_b = attention_core(
            q[None, q0:q1].to(dtype), k[None], v[None], softmax_scale=softmax_scale, causal=causal,
            window_left=window_left, window_right=window_right, softcap=softcap,
        )
        out[q0:q1] = out_b[0].to(q.dtype)
        lse[:, q0:q1] = lse_b[0].float()
    if cu_seqlens_q is None:
        lse = lse.t().contiguous()  # decode returns [B, Hq]
    return out, lse

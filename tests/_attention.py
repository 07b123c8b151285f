"""Inputs and baselines shared by the attention tests of every backend."""
from __future__ import annotations

import math

import torch

from lepton_kernels.ops import paged_attention as pa_op
from lepton_kernels.reference.attention import attention_core

FP8 = torch.float8_e4m3fn


# -- flash_attention ---------------------------------------------------------------------------------

def flash_args(q, k, v, causal=False, window=(-1, -1), softcap=0.0, scale=None, cu_q=None, cu_k=None,
          max_q=None, max_k=None, kv_lens=None):
    """The op schema's positional arguments, normalized like the public op does."""
    left, right = window
    causal = causal or right == 0
    right = 0 if causal else right
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if cu_q is None:
        max_q, max_k = q.shape[1], k.shape[1]
    return (q, k, v, causal, scale, left, right, softcap, cu_q, cu_k, max_q, max_k, kv_lens)


def flash_lowp(args):
    """torch's attention in the inputs' own dtype: the FlashAttention rule's error baseline."""
    q, k, v, causal, scale, left, right, softcap, cu_q, cu_k, _, _, kv_lens = args
    opts = dict(softmax_scale=scale, causal=causal, window_left=left, window_right=right, softcap=softcap)
    if cu_q is None:
        return attention_core(q, k, v, kv_lens=kv_lens, **opts)[0]
    out = torch.zeros_like(q)
    sq, sk = cu_q.tolist(), cu_k.tolist()
    for b in range(len(sq) - 1):
        k1 = sk[b + 1] if kv_lens is None else sk[b] + int(kv_lens[b])
        if sq[b + 1] > sq[b]:
            out[sq[b]:sq[b + 1]] = attention_core(q[None, sq[b]:sq[b + 1]], k[None, sk[b]:k1],
                                                  v[None, sk[b]:k1], **opts)[0][0]
    return out


# -- paged_attention ---------------------------------------------------------------------------------

def make_paged(seq_lens, block_size, hkv, d, dtype, device, spare_blocks=3):
    """Random caches and a block table whose used entries are a random permutation of the
    cache's blocks; entries past a sequence's last block point at random valid blocks, so
    reading them by mistake changes the result."""
    needed = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(needed) + spare_blocks
    max_blocks = max(needed, default=0) + 1
    k_cache = torch.randn(num_blocks, block_size, hkv, d, device=device).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, hkv, d, device=device).to(dtype)
    order = iter(torch.randperm(num_blocks).tolist())
    table = torch.randint(0, num_blocks, (len(seq_lens), max_blocks))
    for b, count in enumerate(needed):
        for j in range(count):
            table[b, j] = next(order)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    return k_cache, v_cache, table.to(torch.int32).to(device), lens


def to_fp8(cache, scale):
    """An fp8 cache holding cache / scale (scale per tensor or per kv head)."""
    return (cache.float() / scale.reshape(-1, 1)).clamp(-448, 448).to(FP8)


def prepare(q, k_cache, v_cache, table, lens, cu=None, max_q=None, **options):
    """The op schema's positional arguments, validated and normalized by the public op."""
    return pa_op._prepare(q, k_cache, v_cache, table, lens, cu, max_q, options.get("softmax_scale"),
                          options.get("causal", True), options.get("window", (-1, -1)), options.get("softcap", 0.0),
                          options.get("k_scale"), options.get("v_scale"))

// Decode attention over a paged KV cache: one query token per sequence (flash-decoding).
//
//   q:                [B, Hq, D]                      (any strides, last dim contiguous)
//   k_cache, v_cache: [num_blocks, block_size, Hkv, D] (any strides, last dim contiguous,
//                      16-byte aligned rows), q's dtype or fp8 e4m3 holding value / scale
//   block_table:      int32 [B, max_blocks]; seq_lens: int32 [B]
//   out:              [B, Hq, D] in q's dtype;  lse: float32 [B, Hq] (natural log)
//
// Each CTA owns one (sequence, kv head, group of <= 16 query heads, split). With
// num_splits > 1 every split writes its normalized partial output and log-sum-exp to the
// workspace (ws_out [B, Hq, num_splits, D], ws_lse [B, Hq, num_splits], both float32) and a
// combine kernel merges them. Key ranges of the splits are computed on the device from
// seq_lens, so a launch never reads device data on the host (CUDA-graph safe).
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

#include "common/dtype.h"
#include "common/status.h"

namespace lepton {

struct PagedDecodeParams {
  const void* q = nullptr;
  const void* k_cache = nullptr;
  const void* v_cache = nullptr;
  const int32_t* block_table = nullptr;
  const int32_t* seq_lens = nullptr;
  const float* k_scale = nullptr;  // fp8 caches only
  const float* v_scale = nullptr;
  int64_t scale_head_stride = 0;   // 0: one scale for all kv heads; 1: one per kv head

  void* out = nullptr;
  float* lse = nullptr;
  float* ws_out = nullptr;  // num_splits > 1 only
  float* ws_lse = nullptr;

  int64_t batch = 0, num_q_heads = 0, num_kv_heads = 0, head_dim = 0, block_size = 0;
  int64_t num_splits = 1;
  // Strides in elements.
  int64_t q_stride_b = 0, q_stride_h = 0;
  int64_t out_stride_b = 0, out_stride_h = 0;
  int64_t lse_stride_b = 0, lse_stride_h = 0;
  int64_t k_stride_block = 0, k_stride_token = 0, k_stride_head = 0;
  int64_t v_stride_block = 0, v_stride_token = 0, v_stride_head = 0;
  int64_t bt_stride_b = 0, bt_stride_j = 0;

  float softmax_scale = 1.f;
  float softcap = 0.f;       // > 0: s <- softcap * tanh(s / softcap)
  int64_t window_left = -1;  // >= 0: keys at positions >= seq_len - 1 - window_left only
  // (A decode query is the last position: causal and right windows never hide a key.)

  DType q_dtype = DType::kBFloat16;
  DType cache_dtype = DType::kBFloat16;
};

// Head dims with a compiled kernel.
inline bool paged_decode_head_dim_supported(int64_t d) { return d == 64 || d == 96 || d == 128 || d == 256; }

Status paged_attention_decode(const PagedDecodeParams& p, cudaStream_t stream);

// Dynamic shared memory one decode CTA needs (bytes), for checking a device's opt-in limit.
Status paged_attention_decode_smem_bytes(int64_t head_dim, DType cache_dtype, int* bytes);

// Resident CTAs per SM of the decode kernel for this head dim and cache dtype on the current
// device (the split heuristic's unit of parallelism).
Status paged_attention_decode_ctas_per_sm(int64_t head_dim, DType cache_dtype, int* ctas);

}  // namespace lepton

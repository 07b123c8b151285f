// Scatter new keys/values into a paged KV cache.
//
//   k, v:             [T, H, D]                     (any strides, last dim contiguous)
//   k_cache, v_cache: [num_blocks, block_size, H, D] (any strides, last dim contiguous)
//   slot_mapping:     int64 [T]; slot = block * block_size + offset, negative = skip token
//
// With an fp8 cache, the stored value is fp8(x / scale) with float32 scales that are either
// per tensor (scale_head_stride = 0) or per kv head.
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

#include "common/dtype.h"
#include "common/status.h"

namespace lepton {

struct PagedKVWriteParams {
  const void* k = nullptr;
  const void* v = nullptr;
  void* k_cache = nullptr;
  void* v_cache = nullptr;
  const int64_t* slot_mapping = nullptr;
  const float* k_scale = nullptr;  // fp8 caches only
  const float* v_scale = nullptr;
  int64_t scale_head_stride = 0;   // 0: one scale for all heads; 1: one per head

  int64_t num_tokens = 0, num_heads = 0, head_dim = 0, block_size = 0;
  // Strides in elements.
  int64_t k_stride_token = 0, k_stride_head = 0;
  int64_t v_stride_token = 0, v_stride_head = 0;
  int64_t kc_stride_block = 0, kc_stride_offset = 0, kc_stride_head = 0;
  int64_t vc_stride_block = 0, vc_stride_offset = 0, vc_stride_head = 0;

  DType src_dtype = DType::kBFloat16;
  DType cache_dtype = DType::kBFloat16;
};

Status paged_kv_write(const PagedKVWriteParams& p, cudaStream_t stream);

}  // namespace lepton

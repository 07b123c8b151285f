// Weight-only quantized matmul for a few tokens: out[M, N] = x[M, K] @ W^T (+ bias), M <= 16.
//
//   x:      [M, K] float16 or bfloat16, rows 16-byte aligned (x_stride % 8 == 0), last dim contiguous
//   w4a16:  packed int32 [N, K / 8] ("int4_k8": nibble i of word j = input channel 8j + i, unsigned,
//           value = (u - zero) * scale); K % 32 == 0, w_stride % 4 == 0 (words), 16-byte aligned
//   w8a16:  packed int8 [N, K] ("rowmajor"); K % 16 == 0, w_stride % 16 == 0 (bytes), 16-byte aligned
//   scales: [N, G] float16, bfloat16 or float32 (G = K / group_size, or 1 per output channel)
//   zeros:  uint8 [N, G] zero points in [0, 16], or null (w4a16 symmetric: zero point 8)
//   bias:   [N] in x's dtype, or null
//   out:    [M, N] in x's dtype, rows out_stride elements apart
//   Limits: N * row bytes < 64 GiB, K < 2^31; w4a16 scales and zero points span < 2^31 elements.
//
// Memory-bound: every weight byte is read once. The product runs on the tensor cores transposed
// (weights are mma's 16-row operand, tokens its 8-wide one), with K split across the warps of a
// block and, when the output rows alone cannot fill the GPU, across blocks: each block then stores
// an fp32 partial and the last block of a row tile sums the partials in split order (deterministic)
// and resets its counter, so one launch does it all and CUDA graphs can replay it.
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

#include "common/dtype.h"
#include "common/status.h"

namespace lepton {

constexpr int kQuantGemvMaxM = 16;

struct QuantGemvParams {
  const void* x = nullptr;
  int64_t x_stride = 0;  // elements between token rows
  const void* w = nullptr;
  int64_t w_stride = 0;  // int32 words (w4a16) or bytes (w8a16) between weight rows
  const void* scales = nullptr;
  int64_t scale_stride_n = 0, scale_stride_g = 0;
  DType scale_dtype = DType::kFloat16;
  const uint8_t* zeros = nullptr;  // w4a16 only; null: symmetric
  int64_t zero_stride_n = 0, zero_stride_g = 0;
  const void* bias = nullptr;
  int64_t bias_stride = 0;
  void* out = nullptr;
  int64_t out_stride = 0;
  float* workspace = nullptr;  // splits * M * N floats when splits > 1
  int* counters = nullptr;     // row_tiles ints, zero before the launch and left at zero after it

  int64_t m = 0, n = 0, k = 0;
  int group_size = -1;  // 32, 64, 128, or -1 (one scale per output channel; always -1 for w8a16)
  bool int4 = true;     // w4a16 (int4_k8) or w8a16 (rowmajor int8)
  DType dtype = DType::kBFloat16;  // of x, bias and out
};

// Each warp owns quant_gemv_rows_per_warp(M, int4) weight rows and walks K in
// steps of 128 input channels. How a call is cut into blocks is the caller's choice (the Python
// launcher's heuristic, tunable without a rebuild); it sizes the workspace (splits * M * N
// floats) and the counters (row_tiles ints) from it.
struct QuantGemvPlan {
  int warps_n = 1;               // of a block's 8 warps, how many sit side by side along N (1, 2, 4, 8);
                                 // the others split the block's K range
  int64_t row_tiles = 0;         // blocks along N: ceil(N / (rows_per_warp * warps_n))
  int splits = 1;                // blocks along K
  int64_t steps_per_split = 0;   // 128-channel steps per block along K
  bool prefetch = true;          // load a step's weights while the previous step computes
};

constexpr int kQuantGemvStepK = 128;
inline int quant_gemv_rows_per_warp(int64_t m, bool int4) { return (m <= 8 ? 64 : 32) / (int4 ? 1 : 2); }

Status quant_gemv(const QuantGemvParams& p, const QuantGemvPlan& plan, cudaStream_t stream);

}  // namespace lepton

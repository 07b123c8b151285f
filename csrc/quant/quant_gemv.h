// Quantized matmul for a few tokens: out[M, N] = x[M, K] @ W^T (+ bias), M <= 16. Weight-only
// (w4a16, w8a16), or with activations quantized per token (w8a8, fp8: quantize_rows below).
//
//   x:      [M, K] float16 or bfloat16, rows 16-byte aligned (x_stride % 8 == 0), last dim contiguous;
//           w8a8/fp8: the float16 values of quantize_rows' xq (its ints, or e4m3 values), x_scales
//           their per-token fp32 scales
//   w4a16:  packed int32 [N, K / 8] ("int4_k8": nibble i of word j = input channel 8j + i, unsigned,
//           value = (u - zero) * scale); K % 32 == 0, w_stride % 4 == 0 (words), 16-byte aligned
//   w8a16, w8a8:  packed int8 [N, K] ("rowmajor"); K % 16 == 0, w_stride % 16 == 0 (bytes), 16-byte
//           aligned
//   fp8:    packed e4m3 [N, K] ("rowmajor"), as int8 (sm_89 or newer)
//   scales: [N, G] float16, bfloat16 or float32 (G = K / group_size, or 1 per output channel)
//   zeros:  uint8 [N, G] zero points in [0, 16], or null (w4a16 symmetric: zero point 8)
//   bias:   [N] in `dtype` (x's, or w8a8/fp8: that of the activations before quantization), or null
//   out:    [M, N] in `dtype`, rows out_stride elements apart
//   out[m, n] = x_scales[m] * scales[n] * sum_k x[m, k] w[n, k] (+ bias) for w8a8/fp8: their int8
//   and e4m3 values are all exact in float16, so both run on float16 tensor cores, fp32 sums.
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
  bool int4 = true;     // w4a16 (int4_k8) or 8-bit rowmajor weights
  DType dtype = DType::kBFloat16;  // of bias and out, and of x unless x_scales is set
  // w8a8 / fp8: x is float16 (quantized per token), these are its fp32 scales [M]; null otherwise.
  const float* x_scales = nullptr;
  bool fp8 = false;  // with x_scales: e4m3 weights, else int8
  int l2_steps = 0;  // the plan's when its launch is programmatic (quant_gemv sets it for the kernel)
};

// Each warp owns rows_per_warp weight rows (one of quant_gemv_rows_per_warp_choices) and walks K
// in steps of 128 input channels. How a call is cut into blocks is the caller's choice (the Python
// launcher's heuristic, tunable without a rebuild); it sizes the workspace (splits * M * N
// floats) and the counters (row_tiles ints) from it.
struct QuantGemvPlan {
  int rows_per_warp = 0;         // 16-row tiles a warp owns x 16 (quant_gemv_rows_per_warp_choices)
  int warps_n = 1;               // of a block's 8 warps, how many sit side by side along N (1, 2, 4, 8);
                                 // the others split the block's K range
  int64_t row_tiles = 0;         // blocks along N: ceil(N / (rows_per_warp * warps_n))
  int splits = 1;                // blocks along K
  int64_t steps_per_split = 0;   // 128-channel steps per block along K
  bool prefetch = true;          // load a step's weights while the previous step computes
  // w8a8 / fp8 on sm_90: a programmatic dependent launch, so the kernel's blocks start (and
  // issue their first weight loads) while quantize_rows, launched just before on the stream,
  // finishes; they wait for it before reading x. Elsewhere an ordinary launch.
  bool pdl = false;
  // With pdl: each warp also asks L2 for this many of its next steps' weights before it waits,
  // so that HBM stays busy through the wait.
  int l2_steps = 0;
};

constexpr int kQuantGemvStepK = 128;
// Rows per warp the kernel is built for: the first is the most a warp's registers hold (int4
// 64 x 8 tokens or 32 x 16; 8-bit weights, twice the bytes per row, 32 x 8 or 16 tokens); a
// warp may also own half as many (int4: up to 8 tokens), so that a weight of few rows still
// spreads over the SMs without splitting K.
struct QuantGemvRowChoices {
  int most, fewer;  // fewer == most: no second choice
};
inline QuantGemvRowChoices quant_gemv_rows_per_warp_choices(int64_t m, bool int4) {
  if (!int4) return {32, 16};
  return {m <= 8 ? 64 : 32, 32};
}

Status quant_gemv(const QuantGemvParams& p, const QuantGemvPlan& plan, cudaStream_t stream);

// The activations of w8a8 and fp8, quantized per token as lepton_kernels.reference.quant_matmul's
// quantize_rows_int8 / quantize_rows_fp8 do, bit for bit:
//   s[m] = max(float(double(max_k |x[m, k]|) / qmax), FLT_MIN)    (qmax 127, or 448 for e4m3)
//   int8: xq = clamp(rint(x / s), -127, 127);  fp8: xq = e4m3_rn(clamp(x / s, -448, 448))
// with IEEE division, written as float16 values (exact) for quant_gemv's x.
struct QuantizeRowsParams {
  const void* x = nullptr;  // [M, K] float16 or bfloat16, rows 16-byte aligned, last dim contiguous
  int64_t x_stride = 0;
  DType dtype = DType::kBFloat16;
  void* xq = nullptr;       // [M, K] float16, contiguous, 16-byte aligned
  float* scales = nullptr;  // [M]
  int64_t m = 0, k = 0;     // K % 8 == 0
  bool fp8 = false;         // e4m3 (sm_89 or newer), else int8
};

Status quantize_rows(const QuantizeRowsParams& p, cudaStream_t stream);

}  // namespace lepton

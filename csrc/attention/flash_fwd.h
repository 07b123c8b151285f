// Attention forward. flash_fwd() runs the Hopper kernel (flash_fwd_sm90.h: TMA + wgmma) on
// compute capability 9.0 when the build has sm_90a code and the head dim is 64, 128 or 256, and
// the FlashAttention-2 style mma.sync kernel (flash_fwd_kernel.h) otherwise.
//
//   q:   [B, Sq, Hq, D] or packed [Tq, Hq, D] (varlen, cu_seqlens_q)   any strides, last dim contiguous
//   k,v: [B, Sk, Hkv, D] or packed [Tk, Hkv, D] (varlen, cu_seqlens_k), Hq % Hkv == 0
//   out: q's shape; lse: float32 [B, Hq, Sq] or [Hq, Tq], natural log, -inf for rows that see no key.
//
// Query i of a sequence sees key j iff j < Sk and, with diag = Sk - Sq (bottom-right aligned),
// i + diag - window_left <= j (window_left >= 0) and j <= i + diag + window_right
// (window_right >= 0; causal is window_right = 0). Sk is min(kv_lens[b], the sequence's keys).
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

#include "common/dtype.h"
#include "common/status.h"

namespace lepton {

// Which kernel runs a call: kAuto takes the sm_90a one (flash_fwd_sm90.h) where it can run and
// the mma.sync one otherwise; the others force one (an error if the sm_90a kernel cannot run).
enum class FlashKernel : int { kAuto = 0, kMmaSync = 1, kSm90 = 2 };

struct FlashFwdParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;
  const int32_t* cu_seqlens_q = nullptr;  // varlen only: [B + 1]
  const int32_t* cu_seqlens_k = nullptr;
  const int32_t* kv_lens = nullptr;       // optional: [B]
  // Optional zeroed int32 the sm_90a kernel counts work tiles with (its CTAs then take tiles
  // dynamically, which balances causal and windowed calls); one per launch.
  int32_t* tile_counter = nullptr;

  // Strides in elements; batch strides are 0 in a varlen call. Every stride (and every base
  // pointer) must be a multiple of 8 elements: tiles move in 16-byte copies.
  int64_t q_stride_b = 0, q_stride_s = 0, q_stride_h = 0;
  int64_t k_stride_b = 0, k_stride_s = 0, k_stride_h = 0;
  int64_t v_stride_b = 0, v_stride_s = 0, v_stride_h = 0;
  int64_t o_stride_b = 0, o_stride_s = 0, o_stride_h = 0;
  int64_t lse_stride_b = 0, lse_stride_h = 0, lse_stride_s = 0;

  int batch = 0, num_heads_q = 0, num_heads_k = 0, head_dim = 0;
  int seqlen_q = 0, seqlen_k = 0;  // padded: Sq, Sk; varlen: upper bounds (grid sizing only)
  int64_t total_q = 0, total_k = 0;  // varlen: rows of the packed q and k/v (bounds of TMA loads)

  float softmax_scale = 0.f;
  float softcap = 0.f;             // 0: off
  int window_left = -1;            // -1: unbounded
  int window_right = -1;           // -1: unbounded; 0 under causal

  DType dtype = DType::kBFloat16;
  FlashKernel kernel = FlashKernel::kAuto;
};

// Head dims with a compiled kernel (each a multiple of 16, so no padding of the K dimension).
bool flash_fwd_supports_head_dim(int head_dim);

Status flash_fwd(const FlashFwdParams& p, cudaStream_t stream);

}  // namespace lepton

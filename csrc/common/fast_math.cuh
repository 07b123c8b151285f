// Device helpers shared by the attention kernels: the MUFU exponent and tanh they use in the
// softmax, and packing two fp32 values into one register of 16-bit pairs (the low half holds
// the first, as mma and wgmma operands expect).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace lepton {

__device__ __forceinline__ float exp2_approx(float x) {  // exp2(-inf) = +0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// tanh(x) = 1 - 2 / (2^(2 x log2 e) + 1): two MUFU operations instead of tanhf's long
// sequence (whose temporaries spill in the attention kernels). Absolute error ~1e-7, which is
// what matters once the result is scaled by softcap and fed to the softmax; +-inf limits come
// out exact.
__device__ __forceinline__ float tanh_fast(float x) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;\n" : "=f"(r) : "f"(exp2_approx(x * (2.f * 1.4426950408889634f)) + 1.f));
  return 1.f - 2.f * r;
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

}  // namespace lepton

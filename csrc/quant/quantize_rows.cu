// quantize_rows (see quant_gemv.h): the per-token activation quantization of w8a8 and fp8, ahead
// of quant_gemv. One block per token row (M <= 16 in practice: a short, latency-bound kernel):
// the row's max |x| (on the 16-bit patterns, exact), then x / s rounded, written as float16.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cfloat>
#include <cstdint>
#include <string>

#include "common/device.h"
#include "quant/quant_gemv.h"

namespace lepton {
namespace {

using u32 = uint32_t;

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
// 16-byte chunks (8 values) a thread keeps in registers between the max and the division: rows
// of up to kHeld * 8 * kThreads = 16384 channels are read once.
constexpr int kHeld = 4;

template <typename T>
struct Pairs;

// A word of two values as floats (lower value first); a 16-bit pattern as a float.
template <>
struct Pairs<__half> {
  static __device__ __forceinline__ float2 to_float2(u32 w) {
    return __half22float2(*reinterpret_cast<__half2*>(&w));
  }
  static __device__ __forceinline__ float from_bits(u32 bits) { return __half2float(__ushort_as_half(bits)); }
};

template <>
struct Pairs<__nv_bfloat16> {
  static __device__ __forceinline__ float2 to_float2(u32 w) {
    return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xFFFF0000u));
  }
  static __device__ __forceinline__ float from_bits(u32 bits) { return __uint_as_float(bits << 16); }
};

// The |x| bit patterns of a chunk's 8 values, folded into m two at a time. For non-negative
// floats the integer order is the numeric order (and a NaN sorts above infinity, so it reaches
// the scale and every output of its row, as in the reference).
__device__ __forceinline__ u32 max_abs(u32 m, const uint4& v) {
  m = __vmaxu2(m, v.x & 0x7FFF7FFFu);
  m = __vmaxu2(m, v.y & 0x7FFF7FFFu);
  m = __vmaxu2(m, v.z & 0x7FFF7FFFu);
  return __vmaxu2(m, v.w & 0x7FFF7FFFu);
}

// Two values over s, quantized, as a pair of halves (lower value in the lower half). IEEE
// division, as the reference.
template <bool kFp8>
__device__ __forceinline__ u32 quantize_pair(float2 v, float s) {
  const float a = __fdiv_rn(v.x, s), b = __fdiv_rn(v.y, s);
  __half2_raw h;
  if (kFp8) {
    // satfinite: values past +-448 become +-448 (the reference's clamp), then rounded to
    // nearest even; back to f16 exactly.
    const __nv_fp8x2_storage_t q = __nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3);
    h = __nv_cvt_fp8x2_to_halfraw2(q, __NV_E4M3);
  } else {
    // rint: round half to even (torch.round); the integers up to 127 are exact in f16.
    const __half2 r =
        __floats2half2_rn(fminf(fmaxf(rintf(a), -127.f), 127.f), fminf(fmaxf(rintf(b), -127.f), 127.f));
    h = *reinterpret_cast<const __half2_raw*>(&r);
  }
  return static_cast<u32>(h.x) | (static_cast<u32>(h.y) << 16);
}

template <typename T, bool kFp8>
__device__ __forceinline__ uint4 quantize_chunk(const uint4& v, float s) {
  auto q = [s](u32 w) { return quantize_pair<kFp8>(Pairs<T>::to_float2(w), s); };
  return make_uint4(q(v.x), q(v.y), q(v.z), q(v.w));
}

template <typename T, bool kFp8>
__global__ void __launch_bounds__(kThreads) quantize_rows_kernel(const QuantizeRowsParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // quant_gemv, launched next as a programmatic dependent, may start its weight loads now; it
  // waits for this grid to finish before it reads xq and the scales.
  asm volatile("griddepcontrol.launch_dependents;");
#endif
  __shared__ u32 warp_max[kWarps];
  const int64_t row = blockIdx.x;
  const uint4* x = reinterpret_cast<const uint4*>(static_cast<const T*>(p.x) + row * p.x_stride);
  uint4* xq = reinterpret_cast<uint4*>(static_cast<__half*>(p.xq) + row * p.k);
  const int chunks = static_cast<int>(p.k / 8);
  const int tid = threadIdx.x;

  uint4 held[kHeld];
  u32 m2 = 0;
#pragma unroll
  for (int i = 0; i < kHeld; ++i) {
    const int c = tid + i * kThreads;
    held[i] = c < chunks ? __ldg(x + c) : make_uint4(0, 0, 0, 0);
    m2 = max_abs(m2, held[i]);
  }
  for (int c = tid + kHeld * kThreads; c < chunks; c += kThreads) m2 = max_abs(m2, __ldg(x + c));

  u32 bits = __reduce_max_sync(0xFFFFFFFFu, max(m2 & 0xFFFFu, m2 >> 16));
  if ((tid & 31) == 0) warp_max[tid >> 5] = bits;
  __syncthreads();
#pragma unroll
  for (int w = 0; w < kWarps; ++w) bits = max(bits, warp_max[w]);

  // As the reference: the quotient in double rounded once to float, then at least FLT_MIN (a
  // NaN stays NaN).
  const float amax = Pairs<T>::from_bits(bits);
  float s = static_cast<float>(static_cast<double>(amax) / (kFp8 ? 448.0 : 127.0));
  if (s < FLT_MIN) s = FLT_MIN;
  if (tid == 0) p.scales[row] = s;

#pragma unroll
  for (int i = 0; i < kHeld; ++i) {
    const int c = tid + i * kThreads;
    if (c < chunks) xq[c] = quantize_chunk<T, kFp8>(held[i], s);
  }
  for (int c = tid + kHeld * kThreads; c < chunks; c += kThreads)
    xq[c] = quantize_chunk<T, kFp8>(__ldg(x + c), s);
}

template <typename T, bool kFp8>
Status launch(const QuantizeRowsParams& p, cudaStream_t stream) {
  quantize_rows_kernel<T, kFp8><<<static_cast<unsigned>(p.m), kThreads, 0, stream>>>(p);
  LEPTON_RETURN_IF_CUDA_ERROR(cudaGetLastError());
  return Status::Ok();
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace

Status quantize_rows(const QuantizeRowsParams& p, cudaStream_t stream) {
  const std::string who = "quantize_rows: ";
  if (p.m < 1 || p.m > 0x7fffffff || p.k < 8 || p.k % 8 != 0 || p.k >= (int64_t{1} << 34))
    return Status::Error(who + "need 1 <= M < 2^31 and K a positive multiple of 8 below 2^34, got M=" +
                         std::to_string(p.m) + ", K=" + std::to_string(p.k));
  if (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16)
    return Status::Error(who + "x must be float16 or bfloat16, got " + dtype_name(p.dtype));
  if (!aligned16(p.x) || !aligned16(p.xq) || (p.m > 1 && p.x_stride % 8 != 0) || p.scales == nullptr)
    return Status::Error(who + "x rows and xq must be 16-byte aligned, and the scales given");
  if (p.fp8) {
    int device = 0;
    const DeviceInfo* info = cudaGetDevice(&device) == cudaSuccess ? cached_device_info(device) : nullptr;
    if (info == nullptr || 10 * info->major + info->minor < 89)
      return Status::Error(who + "e4m3 needs compute capability 8.9 or newer");
  }
  const bool half = p.dtype == DType::kFloat16;
  if (p.fp8) return half ? launch<__half, true>(p, stream) : launch<__nv_bfloat16, true>(p, stream);
  return half ? launch<__half, false>(p, stream) : launch<__nv_bfloat16, false>(p, stream);
}

}  // namespace lepton

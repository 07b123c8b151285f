// Decode attention entry points: argument checks, dispatch by cache dtype, and the kernel that
// merges split-KV partials.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <string>

#include "paged/paged_attention.h"
#include "paged/paged_attention_decode.cuh"

namespace lepton {
namespace {

constexpr int kCombineWarps = 4;
constexpr int kMaxHeadDim = 256;

// One warp per (sequence, query head): lse = log sum_s exp(lse_s), out = sum_s exp(lse_s - lse)
// out_s. Splits that saw no key (lse_s = -inf, e.g. past the end of a short sequence) are
// skipped without reading their partial output.
__global__ void __launch_bounds__(kCombineWarps * 32) combine_kernel(const PagedDecodeParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kCombineWarps + threadIdx.x / 32;
  if (row >= p.batch * p.num_q_heads) return;
  const int64_t b = row / p.num_q_heads, head = row % p.num_q_heads;
  const int splits = static_cast<int>(p.num_splits);
  const int d_count = static_cast<int>(p.head_dim);
  const float* lse_s = p.ws_lse + row * splits;

  float m = -INFINITY;
  for (int s = lane; s < splits; s += 32) m = fmaxf(m, lse_s[s]);
#pragma unroll
  for (int o = 16; o > 0; o /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  const float m_safe = m == -INFINITY ? 0.f : m;
  float denom = 0.f;
  for (int s = lane; s < splits; s += 32) denom += __expf(lse_s[s] - m_safe);
#pragma unroll
  for (int o = 16; o > 0; o /= 2) denom += __shfl_xor_sync(0xffffffffu, denom, o);

  float acc[kMaxHeadDim / 32];
#pragma unroll
  for (int k = 0; k < kMaxHeadDim / 32; ++k) acc[k] = 0.f;
  if (m != -INFINITY) {
    for (int s = 0; s < splits; ++s) {
      const float ls = lse_s[s];
      if (ls == -INFINITY) continue;
      const float w = __expf(ls - m_safe);
      const float* part = p.ws_out + (row * splits + s) * d_count;
#pragma unroll
      for (int k = 0; k < kMaxHeadDim / 32; ++k) {
        const int d = lane + 32 * k;
        if (d < d_count) acc[k] += w * part[d];
      }
    }
  }
  const float inv = denom > 0.f ? 1.f / denom : 0.f;
  const int64_t out_off = b * p.out_stride_b + head * p.out_stride_h;
#pragma unroll
  for (int k = 0; k < kMaxHeadDim / 32; ++k) {
    const int d = lane + 32 * k;
    if (d >= d_count) continue;
    if (p.q_dtype == DType::kBFloat16) {
      static_cast<__nv_bfloat16*>(p.out)[out_off + d] = __float2bfloat16_rn(acc[k] * inv);
    } else {
      static_cast<__half*>(p.out)[out_off + d] = __float2half_rn(acc[k] * inv);
    }
  }
  if (lane == 0) p.lse[b * p.lse_stride_b + head * p.lse_stride_h] = denom > 0.f ? m_safe + logf(denom) : -INFINITY;
}

bool is_power_of_two(int64_t x) { return x > 0 && (x & (x - 1)) == 0; }

Status check(const PagedDecodeParams& p) {
  if (p.q_dtype != DType::kFloat16 && p.q_dtype != DType::kBFloat16)
    return Status::Error(std::string("paged_attention: queries must be float16 or bfloat16, got ") +
                         dtype_name(p.q_dtype));
  if (p.cache_dtype != p.q_dtype && p.cache_dtype != DType::kFloat8E4M3)
    return Status::Error(std::string("paged_attention: a ") + dtype_name(p.cache_dtype) + " cache with " +
                         dtype_name(p.q_dtype) + " queries is not supported");
  if (p.cache_dtype == DType::kFloat8E4M3 && (p.k_scale == nullptr || p.v_scale == nullptr))
    return Status::Error("paged_attention: an fp8 cache needs k_scale and v_scale");
  if (!paged_decode_head_dim_supported(p.head_dim))
    return Status::Error("paged_attention: head dim must be 64, 96, 128 or 256, got " + std::to_string(p.head_dim));
  if (!is_power_of_two(p.block_size) || p.block_size < 8 || p.block_size > 256)
    return Status::Error("paged_attention: block size must be a power of two from 8 to 256, got " +
                         std::to_string(p.block_size));
  if (p.num_kv_heads <= 0 || p.num_q_heads % p.num_kv_heads != 0)
    return Status::Error("paged_attention: query heads must be a multiple of kv heads");
  if (p.num_splits < 1 || (p.num_splits > 1 && (p.ws_out == nullptr || p.ws_lse == nullptr)))
    return Status::Error("paged_attention: num_splits > 1 needs the split workspace");
  const int elem = dtype_size(p.cache_dtype);
  for (int64_t s : {p.k_stride_block, p.k_stride_token, p.k_stride_head, p.v_stride_block, p.v_stride_token,
                    p.v_stride_head})
    if (s * elem % 16 != 0) return Status::Error("paged_attention: cache strides must be multiples of 16 bytes");
  if (reinterpret_cast<uintptr_t>(p.k_cache) % 16 || reinterpret_cast<uintptr_t>(p.v_cache) % 16)
    return Status::Error("paged_attention: caches must be 16-byte aligned");
  return Status::Ok();
}

}  // namespace

Status paged_attention_decode(const PagedDecodeParams& p, cudaStream_t stream) {
  Status status = check(p);
  if (!status.ok) return status;
  if (p.batch == 0 || p.num_q_heads == 0) return Status::Ok();
  switch (p.cache_dtype) {
    case DType::kBFloat16: status = paged_decode::launch_bf16(p, stream); break;
    case DType::kFloat16: status = paged_decode::launch_fp16(p, stream); break;
    default: status = paged_decode::launch_fp8(p, stream); break;
  }
  if (!status.ok || p.num_splits == 1) return status;
  const int64_t rows = p.batch * p.num_q_heads;
  const int64_t blocks = (rows + kCombineWarps - 1) / kCombineWarps;
  if (blocks > 0x7fffffff) return Status::Error("paged_attention: too many rows to combine");
  combine_kernel<<<static_cast<unsigned>(blocks), kCombineWarps * 32, 0, stream>>>(p);
  LEPTON_RETURN_IF_CUDA_ERROR(cudaGetLastError());
  return Status::Ok();
}

Status paged_attention_decode_ctas_per_sm(int64_t head_dim, DType cache_dtype, int* ctas) {
  if (!paged_decode_head_dim_supported(head_dim))
    return Status::Error("paged_attention: head dim must be 64, 96, 128 or 256, got " + std::to_string(head_dim));
  switch (cache_dtype) {
    case DType::kBFloat16: return paged_decode::ctas_bf16(head_dim, ctas);
    case DType::kFloat16: return paged_decode::ctas_fp16(head_dim, ctas);
    case DType::kFloat8E4M3: return paged_decode::ctas_fp8(head_dim, ctas);
    default: return Status::Error("paged_attention: no decode kernel for float32 caches");
  }
}

namespace {

template <typename Cache>
int smem_for(int64_t head_dim) {
  switch (head_dim) {
    case 64: return paged_decode::Config<64, Cache>::kSmemBytes;
    case 96: return paged_decode::Config<96, Cache>::kSmemBytes;
    case 128: return paged_decode::Config<128, Cache>::kSmemBytes;
    default: return paged_decode::Config<256, Cache>::kSmemBytes;
  }
}

}  // namespace

Status paged_attention_decode_smem_bytes(int64_t head_dim, DType cache_dtype, int* bytes) {
  if (!paged_decode_head_dim_supported(head_dim))
    return Status::Error("paged_attention: head dim must be 64, 96, 128 or 256, got " + std::to_string(head_dim));
  switch (cache_dtype) {
    case DType::kBFloat16: *bytes = smem_for<__nv_bfloat16>(head_dim); return Status::Ok();
    case DType::kFloat16: *bytes = smem_for<__half>(head_dim); return Status::Ok();
    case DType::kFloat8E4M3: *bytes = smem_for<__nv_fp8_e4m3>(head_dim); return Status::Ok();
    default: return Status::Error("paged_attention: no decode kernel for float32 caches");
  }
}

}  // namespace lepton

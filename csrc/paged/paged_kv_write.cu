#include "paged/paged_kv_write.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <string>

namespace lepton {
namespace {

template <typename T>
__device__ __forceinline__ float to_float(T x) { return static_cast<float>(x); }
template <>
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// VEC elements of type T packed so one load or store moves them together.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Same dtype in and out: a straight vectorized copy; fp8 out: scale and convert in registers.
template <typename Src, typename Dst>
struct Store {
  template <int VEC>
  __device__ __forceinline__ static void run(const Pack<Src, VEC>& in, Dst* out, float inv_scale) {
    Pack<Dst, VEC> o;
#pragma unroll
    for (int i = 0; i < VEC; ++i) o.v[i] = Dst(to_float(in.v[i]) * inv_scale);  // satfinite
    *reinterpret_cast<Pack<Dst, VEC>*>(out) = o;
  }
};
template <typename T>
struct Store<T, T> {
  template <int VEC>
  __device__ __forceinline__ static void run(const Pack<T, VEC>& in, T* out, float) {
    *reinterpret_cast<Pack<T, VEC>*>(out) = in;
  }
};

// Work item: one VEC-wide chunk of one (token, head) row, for K and for V alike. Consecutive
// items walk the head dim, then heads, then tokens, so every warp reads and writes contiguous
// runs. Each thread takes kUnroll items a block-width apart and issues all their loads (data
// and fp8 scales) before any store: the stores may alias anything (fp8 is a char type), so a
// load placed after one could not be hoisted above it.
constexpr int kThreads = 256;
constexpr int kDefaultUnroll = 1;

template <typename Src, typename Dst, int VEC, int kUnroll>
__global__ void __launch_bounds__(kThreads)
paged_kv_write_kernel(PagedKVWriteParams p, int64_t chunks_per_row, int64_t chunks_per_token,
                      int64_t total_chunks) {
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads * kUnroll + threadIdx.x;
  Pack<Src, VEC> kin[kUnroll], vin[kUnroll];
  Dst* kdst[kUnroll];
  Dst* vdst[kUnroll];
  float k_inv[kUnroll], v_inv[kUnroll];

#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    kdst[u] = nullptr;
    const int64_t idx = first + static_cast<int64_t>(u) * kThreads;
    if (idx >= total_chunks) continue;
    const int64_t token = idx / chunks_per_token;
    const int64_t rem = idx - token * chunks_per_token;
    const int64_t head = rem / chunks_per_row;
    const int64_t d = (rem - head * chunks_per_row) * VEC;

    const int64_t slot = __ldg(p.slot_mapping + token);
    if (slot < 0) continue;  // padding token
    const int64_t block = slot / p.block_size;
    const int64_t offset = slot - block * p.block_size;

    const Src* k = static_cast<const Src*>(p.k) + token * p.k_stride_token + head * p.k_stride_head + d;
    const Src* v = static_cast<const Src*>(p.v) + token * p.v_stride_token + head * p.v_stride_head + d;
    kdst[u] = static_cast<Dst*>(p.k_cache) + block * p.kc_stride_block + offset * p.kc_stride_offset +
              head * p.kc_stride_head + d;
    vdst[u] = static_cast<Dst*>(p.v_cache) + block * p.vc_stride_block + offset * p.vc_stride_offset +
              head * p.vc_stride_head + d;
    k_inv[u] = v_inv[u] = 1.f;
    if (p.k_scale != nullptr) {
      k_inv[u] = 1.f / __ldg(p.k_scale + head * p.scale_head_stride);
      v_inv[u] = 1.f / __ldg(p.v_scale + head * p.scale_head_stride);
    }
    // Streaming loads: new K/V are read once and should not evict lines others still need.
    if constexpr (sizeof(Pack<Src, VEC>) == 16) {
      *reinterpret_cast<int4*>(&kin[u]) = __ldcs(reinterpret_cast<const int4*>(k));
      *reinterpret_cast<int4*>(&vin[u]) = __ldcs(reinterpret_cast<const int4*>(v));
    } else {
      kin[u] = *reinterpret_cast<const Pack<Src, VEC>*>(k);
      vin[u] = *reinterpret_cast<const Pack<Src, VEC>*>(v);
    }
  }

#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    if (kdst[u] == nullptr) continue;
    Store<Src, Dst>::template run<VEC>(kin[u], kdst[u], k_inv[u]);
    Store<Src, Dst>::template run<VEC>(vin[u], vdst[u], v_inv[u]);
  }
}

bool aligned(const void* ptr, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

// Widest vector (in elements) that every pointer, stride and the head dim allow.
template <typename Src, typename Dst>
int pick_vec(const PagedKVWriteParams& p) {
  for (int vec = 16 / static_cast<int>(sizeof(Src)); vec > 1; vec /= 2) {
    const int64_t sb = vec * sizeof(Src), db = vec * sizeof(Dst);
    bool ok = p.head_dim % vec == 0 && aligned(p.k, sb) && aligned(p.v, sb) &&
              aligned(p.k_cache, db) && aligned(p.v_cache, db);
    for (int64_t s : {p.k_stride_token, p.k_stride_head, p.v_stride_token, p.v_stride_head})
      ok = ok && s % vec == 0;
    for (int64_t s : {p.kc_stride_block, p.kc_stride_offset, p.kc_stride_head, p.vc_stride_block,
                      p.vc_stride_offset, p.vc_stride_head})
      ok = ok && s % vec == 0;
    if (ok) return vec;
  }
  return 1;
}

template <typename Src, typename Dst, int VEC, int kUnroll>
Status launch(const PagedKVWriteParams& p, cudaStream_t stream) {
  const int64_t chunks_per_row = p.head_dim / VEC;
  const int64_t chunks_per_token = chunks_per_row * p.num_heads;
  const int64_t total = chunks_per_token * p.num_tokens;
  const int64_t per_block = static_cast<int64_t>(kThreads) * kUnroll;
  const int64_t blocks = (total + per_block - 1) / per_block;
  if (blocks > 0x7fffffff) return Status::Error("paged_kv_write: too many tokens for one launch");
  paged_kv_write_kernel<Src, Dst, VEC, kUnroll><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      p, chunks_per_row, chunks_per_token, total);
  LEPTON_RETURN_IF_CUDA_ERROR(cudaGetLastError());
  return Status::Ok();
}

// Items per thread for the 16-byte path: 0 in the params means "choose".
int pick_unroll(const PagedKVWriteParams& p) {
  if (p.unroll == 1 || p.unroll == 2 || p.unroll == 4) return p.unroll;
  return kDefaultUnroll;
}

template <typename Src, typename Dst, int VEC>
Status launch_unrolled(const PagedKVWriteParams& p, cudaStream_t stream) {
  switch (pick_unroll(p)) {
    case 4: return launch<Src, Dst, VEC, 4>(p, stream);
    case 2: return launch<Src, Dst, VEC, 2>(p, stream);
    default: return launch<Src, Dst, VEC, 1>(p, stream);
  }
}

template <typename Src, typename Dst>
Status dispatch_vec(const PagedKVWriteParams& p, cudaStream_t stream) {
  constexpr int kWidest = 16 / sizeof(Src);
  const int vec = pick_vec<Src, Dst>(p);
  if (vec == kWidest) return launch_unrolled<Src, Dst, kWidest>(p, stream);
  // Misaligned views: narrower accesses, one item per thread.
  switch (vec) {
    case 4: return launch<Src, Dst, (kWidest > 4 ? 4 : 1), 1>(p, stream);
    case 2: return launch<Src, Dst, 2, 1>(p, stream);
    default: return launch<Src, Dst, 1, 1>(p, stream);
  }
}

template <typename Src>
Status dispatch_cache(const PagedKVWriteParams& p, cudaStream_t stream) {
  if (p.cache_dtype == p.src_dtype) return dispatch_vec<Src, Src>(p, stream);
  if (p.cache_dtype == DType::kFloat8E4M3) {
    if (p.k_scale == nullptr || p.v_scale == nullptr)
      return Status::Error("paged_kv_write: an fp8 cache needs k_scale and v_scale");
    return dispatch_vec<Src, __nv_fp8_e4m3>(p, stream);
  }
  return Status::Error(std::string("paged_kv_write: cannot write ") + dtype_name(p.src_dtype) +
                       " keys into a " + dtype_name(p.cache_dtype) + " cache");
}

}  // namespace

Status paged_kv_write(const PagedKVWriteParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0 || p.num_heads == 0 || p.head_dim == 0) return Status::Ok();
  switch (p.src_dtype) {
    case DType::kFloat16: return dispatch_cache<__half>(p, stream);
    case DType::kBFloat16: return dispatch_cache<__nv_bfloat16>(p, stream);
    case DType::kFloat32: return dispatch_cache<float>(p, stream);
    default:
      return Status::Error(std::string("paged_kv_write: unsupported key dtype ") + dtype_name(p.src_dtype));
  }
}

}  // namespace lepton

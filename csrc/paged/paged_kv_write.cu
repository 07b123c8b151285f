#include "paged/paged_kv_write.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <algorithm>
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

// One thread moves one VEC-wide chunk of one (token, head) row of K and the same chunk of V:
// two independent 16-byte loads in flight per thread. The block is 3-D — x: chunks of a row,
// y: heads, z: tokens — so no thread divides to find its work (64-bit division by a runtime
// value costs ~70 instructions, which showed at large T). Consecutive threads walk the head
// dim, then heads, so every warp reads and writes contiguous runs. (Giving each thread 2 or
// 4 chunks measured slower on an H200 at every T: fewer blocks in flight.)
// All loads, fp8 scales included, come before the stores: an fp8 store may alias anything
// (a char type), so a load placed after it could not be hoisted above it.
template <typename Src, typename Dst, int VEC>
__global__ void __launch_bounds__(256)
paged_kv_write_kernel(PagedKVWriteParams p, int block_size_log2) {
  const int64_t token = static_cast<int64_t>(blockIdx.x) * blockDim.z + threadIdx.z;
  const int64_t head = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
  if (token >= p.num_tokens || head >= p.num_heads) return;

  const int64_t slot = __ldg(p.slot_mapping + token);
  if (slot < 0) return;  // padding token
  // Power-of-two block sizes (the usual case) shift instead of dividing.
  const int64_t block = block_size_log2 >= 0 ? slot >> block_size_log2 : slot / p.block_size;
  const int64_t offset = slot - block * p.block_size;

  // One pass over the row unless the head dim is wider than 256 chunks (narrow, misaligned
  // vectors only).
  for (int64_t d = static_cast<int64_t>(threadIdx.x) * VEC; d < p.head_dim; d += blockDim.x * VEC) {
    const Src* k = static_cast<const Src*>(p.k) + token * p.k_stride_token + head * p.k_stride_head + d;
    const Src* v = static_cast<const Src*>(p.v) + token * p.v_stride_token + head * p.v_stride_head + d;
    Pack<Src, VEC> kin, vin;
    if constexpr (sizeof(Pack<Src, VEC>) == 16) {
      // Streaming loads: new K/V are read once and should not evict lines others still need.
      *reinterpret_cast<int4*>(&kin) = __ldcs(reinterpret_cast<const int4*>(k));
      *reinterpret_cast<int4*>(&vin) = __ldcs(reinterpret_cast<const int4*>(v));
    } else {
      kin = *reinterpret_cast<const Pack<Src, VEC>*>(k);
      vin = *reinterpret_cast<const Pack<Src, VEC>*>(v);
    }
    float k_inv = 1.f, v_inv = 1.f;
    if (p.k_scale != nullptr) {
      k_inv = 1.f / __ldg(p.k_scale + head * p.scale_head_stride);
      v_inv = 1.f / __ldg(p.v_scale + head * p.scale_head_stride);
    }

    Dst* kc = static_cast<Dst*>(p.k_cache) + block * p.kc_stride_block + offset * p.kc_stride_offset +
              head * p.kc_stride_head + d;
    Dst* vc = static_cast<Dst*>(p.v_cache) + block * p.vc_stride_block + offset * p.vc_stride_offset +
              head * p.vc_stride_head + d;
    Store<Src, Dst>::template run<VEC>(kin, kc, k_inv);
    Store<Src, Dst>::template run<VEC>(vin, vc, v_inv);
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

template <typename Src, typename Dst, int VEC>
Status launch(const PagedKVWriteParams& p, cudaStream_t stream) {
  // x covers one row; y as many heads as fit in 256 threads; z tokens until >= 128 threads.
  const int64_t row_threads = std::min<int64_t>(256, (p.head_dim + VEC - 1) / VEC);
  const int64_t heads = std::min<int64_t>(p.num_heads, 256 / row_threads);
  const int64_t tokens = std::max<int64_t>(1, std::min<int64_t>(64, 128 / (row_threads * heads)));
  const dim3 block(static_cast<unsigned>(row_threads), static_cast<unsigned>(heads), static_cast<unsigned>(tokens));
  const int64_t grid_x = (p.num_tokens + tokens - 1) / tokens;
  const int64_t grid_y = (p.num_heads + heads - 1) / heads;
  if (grid_x > 0x7fffffff || grid_y > 65535)
    return Status::Error("paged_kv_write: too many tokens or heads for one launch");
  int block_size_log2 = -1;
  if ((p.block_size & (p.block_size - 1)) == 0) {
    block_size_log2 = 0;
    while ((int64_t{1} << block_size_log2) < p.block_size) ++block_size_log2;
  }
  paged_kv_write_kernel<Src, Dst, VEC><<<dim3(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y)), block, 0, stream>>>(
      p, block_size_log2);
  LEPTON_RETURN_IF_CUDA_ERROR(cudaGetLastError());
  return Status::Ok();
}

template <typename Src, typename Dst>
Status dispatch_vec(const PagedKVWriteParams& p, cudaStream_t stream) {
  switch (pick_vec<Src, Dst>(p)) {
    case 8: return launch<Src, Dst, 8>(p, stream);
    case 4: return launch<Src, Dst, 4>(p, stream);
    case 2: return launch<Src, Dst, 2>(p, stream);
    default: return launch<Src, Dst, 1>(p, stream);
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

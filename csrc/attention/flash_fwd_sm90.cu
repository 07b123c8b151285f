// Host side of the Hopper attention forward: can the call run here, the TMA descriptors, and
// the instantiation for the dtype and head dim (compiled in flash_fwd_sm90_hdim<D>.cu).
#include "attention/flash_fwd_sm90.h"
#include "common/device.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cudaTypedefs.h>

#include <cstdint>

namespace lepton {
namespace flash90 {
template <typename T, int D>
Status launch_flash_fwd_sm90(const Sm90Params& params, cudaStream_t stream);
}  // namespace flash90

namespace {

constexpr int kBoxCols = 64;  // one 128-byte swizzled row of 16-bit elements

// cuTensorMapEncodeTiled comes from the driver; the runtime hands out its entry point, so the
// extension needs no link against libcuda.
PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult found{};
#if CUDART_VERSION >= 12050
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &found) !=
        cudaSuccess)
      ptr = nullptr;
#else
    if (cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &ptr, cudaEnableDefault, &found) != cudaSuccess)
      ptr = nullptr;
#endif
    return found == cudaDriverEntryPointSuccess ? reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr) : nullptr;
  }();
  return fn;
}

// A [batch, rows, heads, d] tensor (strides in elements) as a rank-4 map with dims innermost
// first; boxes of 64 x box_rows x 1 x 1.
Status make_map(CUtensorMap* map, const void* base, DType dtype, int d, int64_t rows, int heads, int batch,
                int64_t stride_s, int64_t stride_h, int64_t stride_b, int box_rows) {
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(d), static_cast<cuuint64_t>(rows),
                              static_cast<cuuint64_t>(heads), static_cast<cuuint64_t>(batch)};
  // A varlen call is one batch entry; its stride is never stepped but must still be valid.
  if (batch == 1) stride_b = stride_s * rows;
  const cuuint64_t strides[3] = {static_cast<cuuint64_t>(stride_s * 2), static_cast<cuuint64_t>(stride_h * 2),
                                 static_cast<cuuint64_t>(stride_b * 2)};
  const cuuint32_t box[4] = {kBoxCols, static_cast<cuuint32_t>(box_rows), 1, 1};
  const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  const CUresult r = encode_fn()(
      map, dtype == DType::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4,
      const_cast<void*>(base), dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
      CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    return Status::Error("flash_attention: cuTensorMapEncodeTiled failed with error " + std::to_string(r));
  return Status::Ok();
}

// How many (sequence, head) pairs' K and V fit in half of L2 (a power of two, at least 1).
int section_pairs(const FlashFwdParams& p) {
  int device = 0;
  cudaGetDevice(&device);
  const DeviceInfo* info = cached_device_info(device);
  const int64_t l2_bytes = info != nullptr && info->l2_bytes > 0 ? info->l2_bytes : 50 << 20;
  const int64_t group = p.num_heads_q / p.num_heads_k;
  const int64_t kv_bytes = 2ll * p.seqlen_k * p.head_dim * 2;  // K and V of one kv head
  const int64_t per_pair = (kv_bytes + group - 1) / group;     // the q heads of a group share it
  const int64_t fit = per_pair > 0 ? (l2_bytes / 2) / per_pair : 1;
  const int64_t pairs = static_cast<int64_t>(p.batch) * p.num_heads_q;
  int sp = 1;
  while (2ll * sp <= fit && 2ll * sp <= pairs) sp *= 2;
  return sp;
}

template <typename T>
Status dispatch_head_dim(const Sm90Params& params, cudaStream_t stream) {
  switch (params.p.head_dim) {
    case 64: return flash90::launch_flash_fwd_sm90<T, 64>(params, stream);
    case 128: return flash90::launch_flash_fwd_sm90<T, 128>(params, stream);
    case 256: return flash90::launch_flash_fwd_sm90<T, 256>(params, stream);
    default: return Status::Error("flash_attention: the sm_90a kernel has no head dim " + std::to_string(params.p.head_dim));
  }
}

}  // namespace

std::string flash_fwd_sm90_unsupported(const FlashFwdParams& p) {
#if !defined(LEPTON_BUILD_SM90A)
  (void)p;
  return "the extension was built without sm_90a code (LEPTON_CUDA_ARCHS lacks 90a)";
#else
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return "no current CUDA device";
  const DeviceInfo* info = cached_device_info(device);
  // sm_90a code runs on compute capability 9.0 only
  if (info == nullptr || info->major != 9 || info->minor != 0) return "the sm_90a kernel needs a compute capability 9.0 GPU";
  if (p.head_dim != 64 && p.head_dim != 128 && p.head_dim != 256)
    return "the sm_90a kernel takes head dims 64, 128 and 256, got " + std::to_string(p.head_dim);
  if (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) return "the sm_90a kernel takes float16 or bfloat16";
  if (encode_fn() == nullptr) return "the CUDA driver offers no cuTensorMapEncodeTiled";
  return {};
#endif
}

Status flash_fwd_sm90(const FlashFwdParams& p, cudaStream_t stream) {
  Sm90Params params{};
  params.p = p;
  const bool varlen = p.cu_seqlens_q != nullptr;
  const int batch = varlen ? 1 : p.batch;
  const int64_t rows_q = varlen ? p.total_q : p.seqlen_q, rows_k = varlen ? p.total_k : p.seqlen_k;
  if (rows_q <= 0 || rows_k <= 0) return Status::Error("flash_attention: empty q or k rows for the sm_90a kernel");
  const Sm90Tile tile = flash_fwd_sm90_tile(p.head_dim);
  Status s = make_map(&params.q_map, p.q, p.dtype, p.head_dim, rows_q, p.num_heads_q, batch, p.q_stride_s,
                      p.q_stride_h, p.q_stride_b, tile.block_m);
  if (!s.ok) return s;
  const int block_n = tile.block_n;
  s = make_map(&params.k_map, p.k, p.dtype, p.head_dim, rows_k, p.num_heads_k, batch, p.k_stride_s, p.k_stride_h,
               p.k_stride_b, block_n);
  if (!s.ok) return s;
  s = make_map(&params.v_map, p.v, p.dtype, p.head_dim, rows_k, p.num_heads_k, batch, p.v_stride_s, p.v_stride_h,
               p.v_stride_b, block_n);
  if (!s.ok) return s;
  params.section_pairs = section_pairs(p);
  return p.dtype == DType::kFloat16 ? dispatch_head_dim<__half>(params, stream)
                                    : dispatch_head_dim<__nv_bfloat16>(params, stream);
}

}  // namespace lepton

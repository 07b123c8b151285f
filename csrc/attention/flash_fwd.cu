// Host entry of the attention forward: checks what would otherwise fault, then picks the
// instantiation for the dtype and head dim (compiled in flash_fwd_hdim<D>.cu).
#include "attention/flash_fwd.h"
#include "attention/flash_fwd_sm90.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <string>

namespace lepton {
namespace flash {
template <typename T, int D>
Status launch_flash_fwd(const FlashFwdParams& p, cudaStream_t stream);
}  // namespace flash

namespace {

template <typename T>
Status dispatch_head_dim(const FlashFwdParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return flash::launch_flash_fwd<T, 64>(p, stream);
    case 80: return flash::launch_flash_fwd<T, 80>(p, stream);
    case 96: return flash::launch_flash_fwd<T, 96>(p, stream);
    case 128: return flash::launch_flash_fwd<T, 128>(p, stream);
    case 192: return flash::launch_flash_fwd<T, 192>(p, stream);
    case 256: return flash::launch_flash_fwd<T, 256>(p, stream);
    default: return Status::Error("flash_attention: no kernel for head dim " + std::to_string(p.head_dim));
  }
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace

bool flash_fwd_supports_head_dim(int head_dim) {
  switch (head_dim) {
    case 64: case 80: case 96: case 128: case 192: case 256: return true;
    default: return false;
  }
}

Status flash_fwd(const FlashFwdParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.num_heads_q == 0 || p.seqlen_q == 0) return Status::Ok();
  if (!flash_fwd_supports_head_dim(p.head_dim))
    return Status::Error("flash_attention: no kernel for head dim " + std::to_string(p.head_dim));
  if (p.num_heads_k <= 0 || p.num_heads_q % p.num_heads_k != 0)
    return Status::Error("flash_attention: num_heads_q must be a multiple of num_heads_k");
  if (p.batch > 65535 || p.num_heads_q > 65535)
    return Status::Error("flash_attention: batch and num_heads_q must be at most 65535");
  // Tiles move in 16-byte copies: every base and row/head/batch stride must be 8 elements.
  if (!aligned16(p.q) || !aligned16(p.k) || !aligned16(p.v) || !aligned16(p.out))
    return Status::Error("flash_attention: q, k, v and out must be 16-byte aligned");
  for (int64_t s : {p.q_stride_b, p.q_stride_s, p.q_stride_h, p.k_stride_b, p.k_stride_s, p.k_stride_h,
                    p.v_stride_b, p.v_stride_s, p.v_stride_h, p.o_stride_b, p.o_stride_s, p.o_stride_h})
    if (s % 8 != 0) return Status::Error("flash_attention: strides must be multiples of 8 elements");
  if ((p.cu_seqlens_q == nullptr) != (p.cu_seqlens_k == nullptr))
    return Status::Error("flash_attention: cu_seqlens_q and cu_seqlens_k go together");
  if (p.kernel != FlashKernel::kMmaSync) {
    const std::string why = flash_fwd_sm90_unsupported(p);
    if (why.empty()) return flash_fwd_sm90(p, stream);
    if (p.kernel == FlashKernel::kSm90) return Status::Error("flash_attention: " + why);
  }
  switch (p.dtype) {
    case DType::kFloat16: return dispatch_head_dim<__half>(p, stream);
    case DType::kBFloat16: return dispatch_head_dim<__nv_bfloat16>(p, stream);
    default:
      return Status::Error(std::string("flash_attention: the CUDA kernel takes float16 or bfloat16, got ") +
                           dtype_name(p.dtype));
  }
}

}  // namespace lepton

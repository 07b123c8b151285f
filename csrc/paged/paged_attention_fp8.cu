// Decode kernels for fp8 caches (one file per cache dtype keeps each nvcc job small).
#include "paged/paged_attention_decode.cuh"

namespace lepton {
namespace paged_decode {

Status launch_fp8(const PagedDecodeParams& p, cudaStream_t stream) { return launch_for_dtype<__nv_fp8_e4m3>(p, stream); }
Status ctas_fp8(int64_t head_dim, int* ctas) { return ctas_for_dtype<__nv_fp8_e4m3>(head_dim, ctas); }

}  // namespace paged_decode
}  // namespace lepton

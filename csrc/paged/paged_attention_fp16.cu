// Decode kernels for fp16 caches (one file per cache dtype keeps each nvcc job small).
#include "paged/paged_attention_decode.cuh"

namespace lepton {
namespace paged_decode {

Status launch_fp16(const PagedDecodeParams& p, cudaStream_t stream) { return launch_for_dtype<__half>(p, stream); }
Status ctas_fp16(int64_t head_dim, int* ctas) { return ctas_for_dtype<__half>(head_dim, ctas); }

}  // namespace paged_decode
}  // namespace lepton

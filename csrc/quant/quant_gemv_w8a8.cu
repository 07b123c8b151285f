// w8a8 of quant_gemv: int8 weights x activations quantized per token (float16 values), both
// output dtypes (compiled apart from the weight-only halves, in parallel).
#include "quant/quant_gemv_kernel.cuh"

namespace lepton {
namespace qgemv {

Status launch_w8a8(const QuantGemvParams& p, const QuantGemvPlan& plan, cudaStream_t stream) {
  if (p.dtype == DType::kFloat16) return launch_prequant_typed<__half, Prequant::kInt8>(p, plan, stream);
  return launch_prequant_typed<__nv_bfloat16, Prequant::kInt8>(p, plan, stream);
}

}  // namespace qgemv
}  // namespace lepton

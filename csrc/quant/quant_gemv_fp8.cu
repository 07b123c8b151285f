// fp8 of quant_gemv: e4m3 weights x activations quantized per token to e4m3 (float16 values),
// both output dtypes (sm_89 and newer; compiled apart from the weight-only halves, in parallel).
#include "quant/quant_gemv_kernel.cuh"

namespace lepton {
namespace qgemv {

Status launch_fp8(const QuantGemvParams& p, const QuantGemvPlan& plan, cudaStream_t stream) {
  if (p.dtype == DType::kFloat16) return launch_prequant_typed<__half, Prequant::kE4M3>(p, plan, stream);
  return launch_prequant_typed<__nv_bfloat16, Prequant::kE4M3>(p, plan, stream);
}

}  // namespace qgemv
}  // namespace lepton

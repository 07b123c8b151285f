// The float16 half of quant_gemv (the bfloat16 half compiles in parallel).
#include "quant/quant_gemv_kernel.cuh"

namespace lepton {
namespace qgemv {

template Status launch_typed<__half>(const QuantGemvParams&, const QuantGemvPlan&, cudaStream_t);

}  // namespace qgemv
}  // namespace lepton

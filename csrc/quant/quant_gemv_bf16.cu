// The bfloat16 half of quant_gemv (the float16 half compiles in parallel).
#include "quant/quant_gemv_kernel.cuh"

namespace lepton {
namespace qgemv {

template Status launch_typed<__nv_bfloat16>(const QuantGemvParams&, const QuantGemvPlan&, cudaStream_t);

}  // namespace qgemv
}  // namespace lepton

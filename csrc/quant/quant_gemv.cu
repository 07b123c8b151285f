// Host side of quant_gemv: checks the contract of quant_gemv.h (the Python launcher already
// guarantees it; a C++ caller gets an error instead of a fault) and picks the dtype half, or the
// w8a8 / fp8 kernels.
#include "quant/quant_gemv.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <string>

#include "common/device.h"

namespace lepton {
namespace qgemv {
template <typename T>
Status launch_typed(const QuantGemvParams& p, const QuantGemvPlan& plan, cudaStream_t stream);
Status launch_w8a8(const QuantGemvParams& p, const QuantGemvPlan& plan, cudaStream_t stream);  // quant_gemv_w8a8.cu
Status launch_fp8(const QuantGemvParams& p, const QuantGemvPlan& plan, cudaStream_t stream);   // quant_gemv_fp8.cu
}  // namespace qgemv

namespace {

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

Status check(const QuantGemvParams& p, const QuantGemvPlan& plan) {
  const std::string who = "quant_gemv: ";
  if (p.m < 1 || p.m > kQuantGemvMaxM)
    return Status::Error(who + "M must be in [1, " + std::to_string(kQuantGemvMaxM) + "], got " + std::to_string(p.m));
  if (p.n < 1 || p.k < 1) return Status::Error(who + "N and K must be positive");
  if (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16)
    return Status::Error(who + "x must be float16 or bfloat16, got " + dtype_name(p.dtype));
  if (p.scale_dtype == DType::kFloat8E4M3) return Status::Error(who + "scales must be float16, bfloat16 or float32");
  if (p.fp8 && p.x_scales == nullptr)
    return Status::Error(who + "e4m3 weights come with per-token quantized activations (x_scales)");
  if (p.x_scales != nullptr && p.int4)
    return Status::Error(who + "per-token quantized activations go with 8-bit weights (w8a8, fp8), not int4");
  if (p.int4) {
    if (p.k % 32 != 0) return Status::Error(who + "int4 weights need K % 32 == 0, got K=" + std::to_string(p.k));
    if (p.w_stride % 4 != 0) return Status::Error(who + "int4 weight rows must be 16-byte aligned");
    if (p.group_size != -1 && p.group_size != 32 && p.group_size != 64 && p.group_size != 128)
      return Status::Error(who + "group_size must be 32, 64, 128 or -1, got " + std::to_string(p.group_size));
    if (p.group_size > 0 && p.k % p.group_size != 0) return Status::Error(who + "group_size must divide K");
  } else {
    if (p.k % 16 != 0) return Status::Error(who + "8-bit weights need K % 16 == 0, got K=" + std::to_string(p.k));
    if (p.w_stride % 16 != 0) return Status::Error(who + "8-bit weight rows must be 16-byte aligned");
    if (p.group_size != -1 || p.zeros != nullptr)
      return Status::Error(who + "8-bit weights have one scale per output channel and no zero points");
  }
  // The kernel addresses weight rows in 32-bit units of 16 bytes and counts channels in 32 bits.
  if (p.n * (p.w_stride / (p.int4 ? 4 : 16)) >= (int64_t{1} << 32) || p.k >= (int64_t{1} << 31))
    return Status::Error(who + "the weight is too large (64 GiB of rows, 2^31 input channels at most)");
  if (p.int4) {
    // The kernel addresses scales and zero points by 32-bit element offsets from the row.
    const int64_t last_group = p.group_size > 0 ? p.k / p.group_size - 1 : 0;
    const auto fits = [&](int64_t stride_n, int64_t stride_g) {
      return stride_n >= 0 && stride_g >= 0 && (p.n - 1) * stride_n + last_group * stride_g < (int64_t{1} << 31);
    };
    if (!fits(p.scale_stride_n, p.scale_stride_g) || (p.zeros != nullptr && !fits(p.zero_stride_n, p.zero_stride_g)))
      return Status::Error(who + "scales and zero points must span fewer than 2^31 elements, with non-negative strides");
  }
  if (!aligned16(p.w) || !aligned16(p.x) || (p.m > 1 && p.x_stride % 8 != 0))
    return Status::Error(who + "x rows and weights must be 16-byte aligned");
  if (plan.warps_n != 1 && plan.warps_n != 2 && plan.warps_n != 4 && plan.warps_n != 8)
    return Status::Error(who + "warps_n must be 1, 2, 4 or 8, got " + std::to_string(plan.warps_n));
  const QuantGemvRowChoices rows = quant_gemv_rows_per_warp_choices(p.m, p.int4);
  if (plan.rows_per_warp != rows.most && plan.rows_per_warp != rows.fewer)
    return Status::Error(who + "rows_per_warp must be " + std::to_string(rows.most) +
                         (rows.fewer != rows.most ? " or " + std::to_string(rows.fewer) : std::string()) +
                         " for M=" + std::to_string(p.m) + ", got " + std::to_string(plan.rows_per_warp));
  const int64_t rows_per_block = static_cast<int64_t>(plan.rows_per_warp) * plan.warps_n;
  const int64_t steps = (p.k + kQuantGemvStepK - 1) / kQuantGemvStepK;
  if (plan.row_tiles != (p.n + rows_per_block - 1) / rows_per_block)
    return Status::Error(who + "row_tiles must be ceil(N / rows per block)");
  if (plan.splits < 1 || plan.steps_per_split < 1 || (plan.splits - 1) * plan.steps_per_split >= steps ||
      plan.splits * plan.steps_per_split < steps)
    return Status::Error(who + "splits x steps_per_split must cover K's steps with no empty split");
  if (plan.row_tiles * plan.splits > 0x7fffffff) return Status::Error(who + "too many blocks for one launch");
  if (plan.l2_steps < 0) return Status::Error(who + "l2_steps must be >= 0, got " + std::to_string(plan.l2_steps));
  if (plan.splits > 1 && (p.workspace == nullptr || p.counters == nullptr))
    return Status::Error(who + "split K needs a workspace and counters");
  return Status::Ok();
}

// Compute capability of the current device as 10 * major + minor (0 when unknown).
int current_capability() {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  const DeviceInfo* info = cached_device_info(device);
  return info == nullptr ? 0 : 10 * info->major + info->minor;
}

}  // namespace

Status quant_gemv(const QuantGemvParams& p, const QuantGemvPlan& plan, cudaStream_t stream) {
  Status status = check(p, plan);
  if (!status.ok) return status;
  if (p.x_scales == nullptr) {
    if (p.dtype == DType::kFloat16) return qgemv::launch_typed<__half>(p, plan, stream);
    return qgemv::launch_typed<__nv_bfloat16>(p, plan, stream);
  }
  const int cc = current_capability();
  if (p.fp8 && cc < 89)
    return Status::Error("quant_gemv: e4m3 weights need compute capability 8.9 or newer, got " +
                         std::to_string(cc / 10) + "." + std::to_string(cc % 10));
  QuantGemvPlan launch_plan = plan;
  launch_plan.pdl = plan.pdl && cc >= 90;  // griddepcontrol: sm_90 and newer
  QuantGemvParams params = p;
  params.l2_steps = launch_plan.pdl ? plan.l2_steps : 0;
  if (p.fp8) return qgemv::launch_fp8(params, launch_plan, stream);
  return qgemv::launch_w8a8(params, launch_plan, stream);
}

}  // namespace lepton

// Hopper kernel, head dim 128 (one translation unit per head dim keeps parallel builds short).
#include "attention/flash_fwd_sm90_kernel.h"

namespace lepton {
namespace flash90 {

template Status launch_flash_fwd_sm90<__half, 128>(const Sm90Params&, cudaStream_t);
template Status launch_flash_fwd_sm90<__nv_bfloat16, 128>(const Sm90Params&, cudaStream_t);

}  // namespace flash90
}  // namespace lepton

// Head dim 256: one translation unit per head dim keeps parallel builds short.
#include "attention/flash_fwd_kernel.h"

namespace lepton {
namespace flash {

template Status launch_flash_fwd<__half, 256>(const FlashFwdParams&, cudaStream_t);
template Status launch_flash_fwd<__nv_bfloat16, 256>(const FlashFwdParams&, cudaStream_t);

}  // namespace flash
}  // namespace lepton

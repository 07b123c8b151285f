// The Hopper (sm_90a) attention forward: same contract as flash_fwd.h, for head dims 64, 128
// and 256 in fp16/bf16. flash_fwd() calls it on sm_90 devices when the extension carries sm_90a
// code; flash_fwd_sm90_unsupported() says why a call has to take the mma.sync kernel instead.
#pragma once
#include <cuda.h>
#include <cuda_runtime.h>

#include <string>

#include "attention/flash_fwd.h"
#include "common/status.h"

namespace lepton {

// Kernel parameters: the call plus TMA descriptors of q, k and v as rank-4 tensors
// (d, row, head, batch) in 64-element boxes (128-byte swizzled rows).
struct Sm90Params {
  CUtensorMap q_map;
  CUtensorMap k_map;
  CUtensorMap v_map;
  FlashFwdParams p;
  int section_pairs = 1;  // (sequence, head) pairs whose K and V share L2 under causal or window masks
};

// Keys per tile of the kernel for a head dim (its Config<D>::kBlockN); also the TMA box height
// of K and V. (160-key tiles for D = 128, which fit the consumers' registers, measured no faster
// on an H100.)
constexpr int flash_fwd_sm90_block_n(int head_dim) { return head_dim <= 128 ? 128 : 64; }

// Empty when the Hopper kernel can run `p` on the current device, else the reason it cannot.
std::string flash_fwd_sm90_unsupported(const FlashFwdParams& p);

Status flash_fwd_sm90(const FlashFwdParams& p, cudaStream_t stream);

}  // namespace lepton

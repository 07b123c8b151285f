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

// The kernel's tile for a head dim (its Config<D, BM, BN>): query rows per work tile, 64 per
// consumer warpgroup, and keys per K/V tile; also the TMA box heights. The S accumulator
// (BN / 2 registers per thread), P (BN / 4) and O (D / 2) must fit a consumer's registers, and Q
// plus two stages of K and V 227 KiB of shared memory (D = 256: 64 + 4 x 32 KiB). Measured on
// an H100 and not taken: 160-key tiles at D = 128 (no faster); 192-row tiles (three consumers)
// at D = 64: 192 x 96 gained 7% at S = 16k but lost 8-13% at S = 1k/4k, 192 x 64 lost everywhere.
struct Sm90Tile {
  int block_m, block_n;
};
constexpr Sm90Tile flash_fwd_sm90_tile(int head_dim) {
  return head_dim > 128 ? Sm90Tile{128, 64} : Sm90Tile{128, 128};
}

// Empty when the Hopper kernel can run `p` on the current device, else the reason it cannot.
std::string flash_fwd_sm90_unsupported(const FlashFwdParams& p);

// Runs `p` on the Hopper kernel; the caller has checked flash_fwd_sm90_unsupported(p).
Status flash_fwd_sm90(const FlashFwdParams& p, cudaStream_t stream);

}  // namespace lepton

// Hopper (sm_90a) building blocks of the attention forward: mbarriers, TMA tile loads, wgmma
// shared-memory descriptors and issue/wait, named barriers and register reallocation.
//
// Everything here compiles only into sm_90a code (`__CUDA_ARCH_FEAT_SM90_ALL`); other targets
// of the same translation unit get the kernel as a stub (see flash_fwd_sm90_kernel.h), because
// wgmma and setmaxnreg do not exist outside sm_90a.
//
// wgmma accumulator layout (m64nN, fp32), for thread t of the warpgroup, w = t / 32, g = t % 32 / 4,
// q = t % 4: d[4 c + 2 h + e] is row 16 w + g + 8 h, column 8 c + 2 q + e. This is the mma.sync
// m16n8 C fragment repeated over N / 8 column tiles, warp w owning rows 16 w .. 16 w + 15, and the
// register A operand of m64nNk16 is the m16n8k16 A fragment of the same rows, so P goes from the
// S accumulator to the A operand of O += P V in registers.
#pragma once
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace lepton {
namespace sm90 {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// -- mbarrier -----------------------------------------------------------------------------------
// A barrier completes a phase when `count` threads have arrived and the bytes announced with
// expect_tx have landed; waiters poll the parity of the phase they wait for.
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count));
}
// Makes initialized barriers visible to the async (TMA) proxy and to the other threads.
__device__ __forceinline__ void mbarrier_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "wait_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n"
      "}\n" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
}

// -- TMA ----------------------------------------------------------------------------------------
__device__ __forceinline__ void tma_prefetch_descriptor(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}
// Loads the box at coordinates (c0 innermost .. c3) of a rank-4 map into shared memory and
// counts its bytes on `bar`. Elements outside the tensor arrive as zeros.
__device__ __forceinline__ void tma_load_4d(const CUtensorMap* map, uint64_t* bar, void* dst, int c0, int c1, int c2,
                                            int c3, uint64_t cache_hint) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint"
      " [%0], [%1, {%2, %3, %4, %5}], [%6], %7;\n" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(smem_addr(bar)), "l"(cache_hint)
      : "memory");
}
// L2 eviction hints (createpolicy.fractional encodings, as CUTLASS's TMA::CacheHintSm90 names them):
// K and V tiles are re-read by every query block of their head, Q is read once.
constexpr uint64_t kEvictFirst = 0x12F0000000000000ull;
constexpr uint64_t kEvictLast = 0x14F0000000000000ull;

// -- wgmma --------------------------------------------------------------------------------------
// Shared-memory matrix descriptor for a tile stored in 128-byte swizzled rows (what a TMA box of
// 64 16-bit elements with CU_TENSOR_MAP_SWIZZLE_128B writes): start address >> 4 in bits 0-13,
// leading byte offset >> 4 in 16-29 (the step between 64-element column blocks of an N-major
// operand; ignored for K-major), stride byte offset >> 4 in 32-45 (1024: the step between groups
// of 8 rows), swizzle mode 1 (128 B) in 62-63. Tiles start 1024-byte aligned, so the base-offset
// field stays 0, and a k-step inside a 128-byte row is a plain +32 bytes on the start address:
// the hardware applies the swizzle to the final address bits.
__device__ __forceinline__ uint64_t smem_descriptor(uint32_t addr, uint32_t leading_bytes) {
  uint64_t desc = (addr & 0x3FFFFu) >> 4;
  desc |= static_cast<uint64_t>((leading_bytes >> 4) & 0x3FFFu) << 16;
  desc |= static_cast<uint64_t>(1024 >> 4) << 32;
  desc |= 1ull << 62;
  return desc;
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// After wgmma_wait the compiler must not move reads of the accumulators above the wait:
// "+f" on every register ties them to this point.
template <int N>
__device__ __forceinline__ void fence_registers(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

template <typename T>
struct Wgmma;
#include "attention/sm90_wgmma.inc"

// -- Warpgroup coordination ---------------------------------------------------------------------
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
template <int N>
__device__ __forceinline__ void registers_grow() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void registers_shrink() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}

}  // namespace sm90
}  // namespace lepton

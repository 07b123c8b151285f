// The Hopper attention forward (sm_90a): TMA loads by a producer warp, wgmma by two or three
// consumer warpgroups, softmax overlapped with the previous tile's P V product.
//
// A work tile is BM query rows (flash_fwd_sm90_tile) of one (sequence, query head); persistent
// CTAs (one per SM) walk the work tiles (see the launcher), each CTA with these warpgroups:
// * warpgroup 0, the producer: one thread issues the TMA loads of Q (once per work tile) and of
//   each K and V tile into a two-stage ring of shared buffers, each stage guarded by a "full"
//   mbarrier (bytes landed) and an "empty" one (every consumer is done reading). The warpgroup
//   gives most of its registers back (setmaxnreg) to
// * warpgroups 1.., the consumers, each owning 64 of the rows. Per key tile j a consumer
//   issues S(j) = Q K(j)^T (both operands in shared memory) and O += P(j-1) V(j-1) (P from
//   registers), then runs the online softmax of S(j) while the tensor cores are still busy with
//   P V, and finally rescales O once P V has landed. Named barriers make the consumers take
//   turns issuing their matrix products ("ping-pong"), so one warpgroup's softmax runs under the
//   other's products.
//
// Tiles are 64-element-wide column blocks with 128-byte rows swizzled by the TMA (the layout
// wgmma reads): a [rows, D] tile is D / 64 blocks of rows x 128 bytes. K is a K-major operand
// of S = Q K^T; V is the N-major ("transposed") operand of O = P V, which wgmma takes for 16-bit
// types, so neither needs a transpose in shared memory.
//
// Masking follows flash_fwd.h. Only key tiles that some row of the CTA can see are loaded, and
// only the tiles that cross a sequence end, the causal diagonal or a window edge pay for the
// mask.
#pragma once
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cmath>
#include <cstdint>

#include "attention/flash_fwd.h"
#include "attention/flash_fwd_sm90.h"
#include "attention/sm90_primitives.h"
#include "common/device.h"
#include "common/fast_math.cuh"

#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define LEPTON_SM90_STUB 1  // device pass for another target: the kernel body is not compiled
#endif

namespace lepton {
namespace flash90 {

using namespace sm90;

constexpr int kStages = 2;             // K and V ring depth
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Named barrier ids (0 is __syncthreads): the consumers' turns.
constexpr int kTurnBarrier = 1;

template <int D, int BM, int BN>
struct Config {
  static_assert(D % 64 == 0, "tiles are made of 64-column blocks");
  static constexpr int kColBlocks = D / 64;
  static constexpr int kBlockM = BM;  // query rows per work tile
  static constexpr int kConsumers = kBlockM / 64;             // consumer warpgroups, 64 rows each
  static constexpr int kThreads = 128 * (kConsumers + 1);     // plus the producer warpgroup
  static constexpr int kConsumerWarps = 4 * kConsumers;       // each arrives on the "empty" barriers
  static constexpr int kBlockN = BN;  // keys per K/V tile
  static constexpr int kQBytes = kBlockM * D * 2;
  static constexpr int kKVBytes = kBlockN * D * 2;
  static constexpr int kColBlockQ = kBlockM * 128;  // bytes of one 64-column block
  static constexpr int kColBlockKV = kBlockN * 128;
  // Registers per thread after setmaxnreg. The CTA starts with 64 K / threads each (in steps of
  // 8) and the consumers' increase waits until the producer has given back as many, so the
  // totals must stay within the start. The producer's tile scheduler runs without spills at
  // 40 (32 with three consumers); D = 256's O needs consumers at 240 (its producer then spills
  // a few bytes outside the loads).
  static constexpr int kEntryRegisters = 65536 / kThreads / 8 * 8;
  static constexpr int kProducerRegisters = kConsumers == 3 ? 32 : D <= 128 ? 40 : 24;
  static constexpr int kConsumerRegisters = kConsumers == 3 ? 160 : D <= 128 ? 232 : 240;
  static_assert(128 * kProducerRegisters + 128 * kConsumers * kConsumerRegisters <= kThreads * kEntryRegisters,
                "setmaxnreg would deadlock");
  static constexpr int kSmemBytes = kQBytes + 2 * kStages * kKVBytes + 1024 /* barriers */ + 1024 /* alignment */;
};

struct SharedBarriers {
  // The producer picks each CTA's next work tile and hands its index to the consumers through
  // a two-slot ring.
  uint64_t tile_full[2], tile_empty[2];
  int tile_index[2];
  uint64_t q_full, q_empty;
  uint64_t k_full[kStages], k_empty[kStages];
  uint64_t v_full[kStages], v_empty[kStages];
};

// The online softmax state of one consumer thread: two rows (g and g + 8 of its warp's 16).
template <int BN>
struct Softmax {
  float row_max[2] = {-INFINITY, -INFINITY};  // of the scores as the softmax sees them
  float row_sum[2] = {0.f, 0.f};              // this thread's columns only

  // Turns scores s (an accumulator of BN columns) into unnormalized probabilities in place and
  // returns the factors that rescale what was accumulated under the previous maxima.
  __device__ __forceinline__ void step(float (&s)[BN / 2], float exp_scale, float (&alpha)[2]) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float mx = row_max[h];
#pragma unroll
      for (int c = 0; c < BN / 8; ++c) mx = fmaxf(mx, fmaxf(s[4 * c + 2 * h], s[4 * c + 2 * h + 1]));
      // A row's columns live in the 4 threads of a quad.
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      // A row with nothing visible yet keeps max -inf; subtracting 0 instead keeps p and alpha
      // at 0 rather than NaN (-inf - -inf).
      const float base = mx == -INFINITY ? 0.f : mx * exp_scale;
      alpha[h] = exp2_approx(row_max[h] * exp_scale - base);
      row_max[h] = mx;
      float sum = 0.f;
#pragma unroll
      for (int c = 0; c < BN / 8; ++c) {
        s[4 * c + 2 * h] = exp2_approx(fmaf(s[4 * c + 2 * h], exp_scale, -base));
        s[4 * c + 2 * h + 1] = exp2_approx(fmaf(s[4 * c + 2 * h + 1], exp_scale, -base));
        sum += s[4 * c + 2 * h] + s[4 * c + 2 * h + 1];
      }
      row_sum[h] = row_sum[h] * alpha[h] + sum;
    }
  }
};

// The part of a key tile's scores this thread holds, transformed and masked in place.
struct ScoreMask {
  float pre, post;       // softcap: post * tanh(s * pre); else s * pre unless folded (pre = 1)
  bool use_softcap, scale_scores;
  // Visible keys of row g, relative to the thread's first column (2q) of a tile at key 0:
  // [first_rel, min(last_rel, key_end_rel)].
  int first_rel, last_rel, key_end_rel;

  template <int BN>
  __device__ __forceinline__ void apply(float (&s)[BN / 2], int n0, bool need_mask) const {
    if (use_softcap) {
#pragma unroll
      for (int i = 0; i < BN / 2; ++i) s[i] = post * tanh_fast(s[i] * pre);
    } else if (scale_scores) {
#pragma unroll
      for (int i = 0; i < BN / 2; ++i) s[i] *= pre;
    }
    if (!need_mask) return;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      // Row g + 8h sees the columns [first, last] of the tile (relative to the thread's 2q).
      const int first = first_rel + 8 * h - n0;
      const int last = min(key_end_rel - n0, last_rel + 8 * h - n0);
#pragma unroll
      for (int c = 0; c < BN / 8; ++c)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int key = 8 * c + e;
          if (key < first || key > last) s[4 * c + 2 * h + e] = -INFINITY;
        }
    }
  }
};

// One unit of work: 128 query rows of one (sequence, query head), and the key tiles they see.
struct WorkTile {
  bool valid;  // false: past the end of a shorter sequence (varlen), nothing to do
  int batch, head, m0;
  int q_start, k_start, seqlen_q, seqlen_k;
  int n_first, num_tiles;  // key tiles [n_first, n_first + num_tiles * kBlockN)
};

// Work tiles are numbered for a static round robin over persistent CTAs. The CTAs running at
// once must share K and V in L2: every row block reads all of its head's keys, at about 128
// FLOPs per byte, which HBM alone cannot feed. Without causal or window masks the row blocks of
// one head are consecutive. With them, row blocks differ in length, so the longest go first
// (the last row blocks of a section's (sequence, head) pairs, then the second-to-last ones...)
// within sections of `section_pairs` pairs whose K and V fit in L2 together.
template <int BM, int BN>
__device__ __forceinline__ WorkTile make_work_tile(const FlashFwdParams& p, int t, int num_m_blocks_max,
                                                   bool longest_first, int section_pairs) {
  WorkTile w;
  const int pairs = p.batch * p.num_heads_q;
  int m_rev, pair;
  if (longest_first) {
    const int section = t / (section_pairs * num_m_blocks_max), rem = t % (section_pairs * num_m_blocks_max);
    const int in_section = min(section_pairs, pairs - section * section_pairs);  // the last one may be short
    m_rev = rem / in_section, pair = section * section_pairs + rem % in_section;
  } else {
    m_rev = t % num_m_blocks_max, pair = t / num_m_blocks_max;
  }
  w.batch = pair / p.num_heads_q;
  w.head = pair % p.num_heads_q;
  w.q_start = 0, w.k_start = 0, w.seqlen_q = p.seqlen_q, w.seqlen_k = p.seqlen_k;
  if (p.cu_seqlens_q != nullptr) {
    w.q_start = p.cu_seqlens_q[w.batch];
    w.seqlen_q = p.cu_seqlens_q[w.batch + 1] - w.q_start;
    w.k_start = p.cu_seqlens_k[w.batch];
    w.seqlen_k = p.cu_seqlens_k[w.batch + 1] - w.k_start;
  }
  if (p.kv_lens != nullptr) w.seqlen_k = max(0, min(w.seqlen_k, p.kv_lens[w.batch]));
  const int num_m_blocks = (w.seqlen_q + BM - 1) / BM;
  w.valid = m_rev < num_m_blocks;
  w.m0 = (num_m_blocks - 1 - m_rev) * BM;
  // Keys any row of the tile sees: [key_lo, key_hi). Query i sees key j iff
  // i + diag - left <= j <= i + diag + right (bottom-right aligned; -1 = unbounded).
  const int diag = w.seqlen_k - w.seqlen_q, wl = p.window_left, wr = p.window_right;
  const int m_last = min(w.m0 + BM, w.seqlen_q) - 1;
  const int key_lo = wl >= 0 ? max(0, w.m0 + diag - wl) : 0;
  const int key_hi = wr >= 0 ? min(w.seqlen_k, m_last + diag + wr + 1) : w.seqlen_k;
  w.n_first = key_lo / BN * BN;
  w.num_tiles = w.valid && key_hi > key_lo ? (key_hi - w.n_first + BN - 1) / BN : 0;
  return w;
}

// Persistent: each CTA walks work tiles blockIdx.x, + gridDim.x, ... The producer runs ahead
// into the next work tile (its first K tile, then Q once the consumers are done with the old
// one) while the consumers finish the last product and store the outputs of the current one.
template <typename T, int D, int BLOCK_M, int BLOCK_N>
__global__ void __launch_bounds__(Config<D, BLOCK_M, BLOCK_N>::kThreads, 1)
    flash_fwd_sm90_kernel(const __grid_constant__ Sm90Params params) {
#ifdef LEPTON_SM90_STUB
  __trap();
#else
  using C = Config<D, BLOCK_M, BLOCK_N>;
  constexpr int BN = C::kBlockN, kColBlocks = C::kColBlocks;
  const FlashFwdParams& p = params.p;

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  // 128-byte swizzled tiles must start 1024-byte aligned (the wgmma descriptors' base offset is 0).
  unsigned char* smem = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  unsigned char* sQ = smem;
  unsigned char* sK = sQ + C::kQBytes;                 // kStages x [kColBlocks][BN][128 B]
  unsigned char* sV = sK + kStages * C::kKVBytes;
  SharedBarriers& bars = *reinterpret_cast<SharedBarriers*>(sV + kStages * C::kKVBytes);

  const int num_m_blocks_max = (p.seqlen_q + C::kBlockM - 1) / C::kBlockM;
  const int num_work = num_m_blocks_max * p.batch * p.num_heads_q;
  const bool longest_first = p.window_left >= 0 || p.window_right >= 0;
  const int group = p.num_heads_q / p.num_heads_k;
  const bool varlen = p.cu_seqlens_q != nullptr;

  if (threadIdx.x == 0) {
    for (int s = 0; s < 2; ++s) {
      mbarrier_init(&bars.tile_full[s], 1);
      mbarrier_init(&bars.tile_empty[s], C::kConsumerWarps);  // every consumer warp arrives
    }
    mbarrier_init(&bars.q_full, 1);
    mbarrier_init(&bars.q_empty, C::kConsumerWarps);
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(&bars.k_full[s], 1);
      mbarrier_init(&bars.v_full[s], 1);
      mbarrier_init(&bars.k_empty[s], C::kConsumerWarps);
      mbarrier_init(&bars.v_empty[s], C::kConsumerWarps);
    }
    mbarrier_init_fence();
  }
  __syncthreads();

  const int warpgroup = threadIdx.x / 128;
  if (warpgroup == 0) {
    // -- Producer ----------------------------------------------------------------------------
    registers_shrink<C::kProducerRegisters>();
    if (threadIdx.x != 0) return;
    tma_prefetch_descriptor(&params.q_map);
    tma_prefetch_descriptor(&params.k_map);
    tma_prefetch_descriptor(&params.v_map);
    // A fresh barrier counts as having completed the phase before its first, so the first
    // pass through each "empty" barrier does not wait.
    int ring = 0, q_loads = 0;  // K/V tiles and Q tiles loaded so far, over all work tiles
    auto load_kv = [&](const CUtensorMap* map, uint64_t* full, uint64_t* empty, unsigned char* dst, int it, int row,
                       int kv_head, int map_batch) {
      const int stage = it % kStages;
      mbarrier_wait(&empty[stage], ((it / kStages) & 1) ^ 1);
      mbarrier_arrive_expect_tx(&full[stage], C::kKVBytes);
#pragma unroll
      for (int b = 0; b < kColBlocks; ++b)
        tma_load_4d(map, &full[stage], dst + stage * C::kKVBytes + b * C::kColBlockKV, 64 * b, row, kv_head,
                    map_batch, kEvictLast);
    };
    for (int t = blockIdx.x, n = 0;; ++n) {
      const int slot = n % 2;
      mbarrier_wait(&bars.tile_empty[slot], ((n / 2) & 1) ^ 1);
      bars.tile_index[slot] = t;
      mbarrier_arrive(&bars.tile_full[slot]);
      if (t >= num_work) break;
      // With a counter, the next tile goes to whichever CTA asks first (the producer asks once
      // this tile's loads are issued, a little before its consumers finish it).
      const int next = p.tile_counter != nullptr ? gridDim.x + atomicAdd(p.tile_counter, 1) : t + gridDim.x;
      const WorkTile w = make_work_tile<C::kBlockM, BN>(p, t, num_m_blocks_max, longest_first, params.section_pairs);
      t = next;
      if (w.num_tiles == 0) continue;
      const int kv_head = w.head / group, map_batch = varlen ? 0 : w.batch;  // varlen maps are one batch
      const int row0 = w.k_start + w.n_first;
      load_kv(&params.k_map, bars.k_full, bars.k_empty, sK, ring, row0, kv_head, map_batch);
      mbarrier_wait(&bars.q_empty, (q_loads & 1) ^ 1);
      mbarrier_arrive_expect_tx(&bars.q_full, C::kQBytes);
#pragma unroll
      for (int b = 0; b < kColBlocks; ++b)
        tma_load_4d(&params.q_map, &bars.q_full, sQ + b * C::kColBlockQ, 64 * b, w.q_start + w.m0, w.head, map_batch,
                    kEvictFirst);
      ++q_loads;
      load_kv(&params.v_map, bars.v_full, bars.v_empty, sV, ring, row0, kv_head, map_batch);
      for (int j = 1; j < w.num_tiles; ++j) {
        load_kv(&params.k_map, bars.k_full, bars.k_empty, sK, ring + j, row0 + j * BN, kv_head, map_batch);
        load_kv(&params.v_map, bars.v_full, bars.v_empty, sV, ring + j, row0 + j * BN, kv_head, map_batch);
      }
      ring += w.num_tiles;
    }
    return;
  }

  // -- Consumers -------------------------------------------------------------------------------
  registers_grow<C::kConsumerRegisters>();
  const int consumer = warpgroup - 1;
  const int tid = threadIdx.x % 128, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, q2 = 2 * (lane % 4);
  const int wg_row0 = 64 * consumer;          // this warpgroup's rows, relative to m0
  const int row_g = wg_row0 + 16 * warp + g;  // this thread's rows: row_g and row_g + 8

  const bool use_softcap = p.softcap > 0.f;
  // Scores in log2 units, as in flash_fwd_kernel.h: with a positive scale and no softcap the
  // scale folds into the exponent (one FFMA per score).
  const float pre = use_softcap ? p.softmax_scale / p.softcap : p.softmax_scale * kLog2e;
  const bool fold_scale = !use_softcap && pre > 0.f;
  const float exp_scale = fold_scale ? pre : 1.f;
  const int wl = p.window_left, wr = p.window_right;

  const uint32_t q_addr = smem_addr(sQ) + wg_row0 * 128;
  const uint32_t k_addr = smem_addr(sK), v_addr = smem_addr(sV);

  float o[D / 2];  // the m64nD accumulator of O (column block b holds o[32 b .. 32 b + 31])
  float s[BN / 2];
  uint32_t pa[BN / 16][4];  // P(j - 1) as the A operand of O += P V

  // S = Q K(stage)^T: D / 16 k-steps, four per 64-column block (32 bytes each in a 128-byte row).
  auto issue_qk = [&](int stage) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint32_t offset_q = (kk / 4) * C::kColBlockQ + (kk % 4) * 32;
      const uint32_t offset_k = stage * C::kKVBytes + (kk / 4) * C::kColBlockKV + (kk % 4) * 32;
      Wgmma<T>::ss(s, smem_descriptor(q_addr + offset_q, 0), smem_descriptor(k_addr + offset_k, 0), kk > 0);
    }
  };
  // O += P V(stage): per 16 keys (2 KiB of 128-byte rows) one m64nDk16 product; its B operand
  // steps from one 64-column block of V to the next by the descriptor's leading byte offset.
  // (One product per k-step rather than one per column block: P, the register operand, is
  // read once.)
  auto issue_pv = [&](int stage) {
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      const uint32_t offset_v = stage * C::kKVBytes + kk * 16 * 128;
      Wgmma<T>::rs(o, pa[kk], smem_descriptor(v_addr + offset_v, C::kColBlockKV), 1);
    }
  };
  auto pack_p = [&] {
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      pa[kk][0] = pack2<T>(s[8 * kk + 0], s[8 * kk + 1]);
      pa[kk][1] = pack2<T>(s[8 * kk + 2], s[8 * kk + 3]);
      pa[kk][2] = pack2<T>(s[8 * kk + 4], s[8 * kk + 5]);
      pa[kk][3] = pack2<T>(s[8 * kk + 6], s[8 * kk + 7]);
    }
  };
  auto rescale_o = [&](const float (&alpha)[2]) {
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] *= alpha[(i >> 1) & 1];
  };
  auto release = [&](uint64_t* bar) {
    if (lane == 0) mbarrier_arrive(bar);
  };
  // Ping-pong: a consumer issues its products only on its turn, then hands the turn to the
  // next one (round robin; each barrier joins a consumer and its predecessor).
  auto wait_turn = [&] { named_barrier_sync(kTurnBarrier + consumer, 256); };
  auto pass_turn = [&] { named_barrier_arrive(kTurnBarrier + (consumer + 1) % C::kConsumers, 256); };
  if (consumer == C::kConsumers - 1) pass_turn();  // consumer 0 goes first

  int ring = 0, q_loads = 0;  // as the producer counts them
  for (int n = 0;; ++n) {
    const int slot = n % 2;
    mbarrier_wait(&bars.tile_full[slot], (n / 2) & 1);
    const int t = *reinterpret_cast<volatile int*>(&bars.tile_index[slot]);
    __syncwarp();
    release(&bars.tile_empty[slot]);
    if (t >= num_work) break;
    const WorkTile w = make_work_tile<C::kBlockM, BN>(p, t, num_m_blocks_max, longest_first, params.section_pairs);
    if (!w.valid) continue;

    const int diag = w.seqlen_k - w.seqlen_q;
    ScoreMask mask;
    mask.pre = pre;
    mask.post = p.softcap * kLog2e;
    mask.use_softcap = use_softcap;
    mask.scale_scores = !use_softcap && !fold_scale;
    mask.key_end_rel = w.seqlen_k - 1 - q2;
    const int pos = w.m0 + row_g + diag - q2;  // key of row g's diagonal, relative to column 2q
    mask.first_rel = wl >= 0 ? pos - wl : -(1 << 30);
    mask.last_rel = wr >= 0 ? pos + wr : (1 << 30);
    // Keys this warpgroup's rows can see at most. Tiles none of them see are still multiplied
    // (and fully masked): a product issued under a branch makes ptxas serialize every wgmma.
    const int wg_first_row = w.m0 + wg_row0, wg_last_row = wg_first_row + 63;
    const int wg_lo = wl >= 0 ? wg_first_row + diag - wl : INT_MIN;
    const int wg_hi = wg_first_row >= w.seqlen_q ? -1 : wr >= 0 ? wg_last_row + diag + wr : INT_MAX;
    auto tile_needs_mask = [&](int n0) {
      return n0 + BN > w.seqlen_k || n0 + BN - 1 > wg_hi - 63 || n0 < wg_lo + 63;
    };

#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
    Softmax<BN> softmax;

    if (w.num_tiles > 0) {
      mbarrier_wait(&bars.q_full, q_loads & 1);
      {  // Key tile 0: S only.
        const int stage = ring % kStages;
        mbarrier_wait(&bars.k_full[stage], (ring / kStages) & 1);
        wait_turn();
        wgmma_fence();
        issue_qk(stage);
        wgmma_commit();
        pass_turn();
        wgmma_wait<0>();
        fence_registers(s);
        release(&bars.k_empty[stage]);
        mask.apply<BN>(s, w.n_first, tile_needs_mask(w.n_first));
        float alpha[2];
        softmax.step(s, exp_scale, alpha);
        pack_p();
      }
      // Key tile j: S(j) and P(j-1) V(j-1) in flight together; the softmax of S(j) runs under P V.
      for (int j = 1; j < w.num_tiles; ++j) {
        const int it = ring + j, stage = it % kStages, prev_stage = (it - 1) % kStages;
        const int n0 = w.n_first + j * BN;
        mbarrier_wait(&bars.k_full[stage], (it / kStages) & 1);
        mbarrier_wait(&bars.v_full[prev_stage], ((it - 1) / kStages) & 1);
        wait_turn();
        wgmma_fence();
        issue_qk(stage);
        wgmma_commit();
        issue_pv(prev_stage);
        wgmma_commit();
        pass_turn();
        wgmma_wait<1>();
        fence_registers(s);
        release(&bars.k_empty[stage]);
        mask.apply<BN>(s, n0, tile_needs_mask(n0));
        float alpha[2];
        softmax.step(s, exp_scale, alpha);
        wgmma_wait<0>();
        fence_registers(o);
        release(&bars.v_empty[prev_stage]);
        // Once the row maxima settle (most tiles of long rows) alpha is exactly 1 and the
        // rescale is skipped; the vote keeps the branch warp-uniform.
        if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) rescale_o(alpha);
        pack_p();
      }
      release(&bars.q_empty);  // every S of this work tile is done: the producer may load the next Q
      ++q_loads;
      {  // The last key tile's P V.
        const int it = ring + w.num_tiles - 1, stage = it % kStages;
        mbarrier_wait(&bars.v_full[stage], (it / kStages) & 1);
        wait_turn();
        wgmma_fence();
        issue_pv(stage);
        wgmma_commit();
        pass_turn();
        wgmma_wait<0>();
        fence_registers(o);
        release(&bars.v_empty[stage]);
      }
      ring += w.num_tiles;
    }

    // -- Epilogue: O / l and lse; rows that saw no key get 0 and -inf -------------------------------
    float inv[2], lse[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float sum = softmax.row_sum[h];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      inv[h] = sum > 0.f ? 1.f / sum : 0.f;
      lse[h] = sum > 0.f ? (softmax.row_max[h] * exp_scale + __log2f(sum)) * kLn2 : -INFINITY;
    }
    // Straight from the accumulators: a quad writes 16 contiguous bytes of a row per column
    // tile, and shared memory stays free for the next work tile's loads.
    T* out = static_cast<T*>(p.out) + w.batch * p.o_stride_b + static_cast<int64_t>(w.q_start) * p.o_stride_s +
             w.head * p.o_stride_h;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = w.m0 + row_g + 8 * h;
      if (r >= w.seqlen_q) continue;
      if (lane % 4 == 0)
        p.lse[w.batch * p.lse_stride_b + w.head * p.lse_stride_h +
              static_cast<int64_t>(w.q_start + r) * p.lse_stride_s] = lse[h];
      T* out_row = out + static_cast<int64_t>(r) * p.o_stride_s + q2;
#pragma unroll
      for (int c = 0; c < D / 8; ++c)
        *reinterpret_cast<uint32_t*>(out_row + 8 * c) = pack2<T>(o[4 * c + 2 * h] * inv[h], o[4 * c + 2 * h + 1] * inv[h]);
    }
  }
  if (consumer == 0) wait_turn();  // takes the last consumer's final hand-over: no barrier left half-arrived
#endif
}

template <typename T, int D>
Status launch_flash_fwd_sm90(const Sm90Params& params, cudaStream_t stream) {
  constexpr Sm90Tile kTile = flash_fwd_sm90_tile(D);
  using C = Config<D, kTile.block_m, kTile.block_n>;
  auto kernel = flash_fwd_sm90_kernel<T, D, kTile.block_m, kTile.block_n>;
  int device = 0;
  LEPTON_RETURN_IF_CUDA_ERROR(cudaGetDevice(&device));
  static bool opted_in[64] = {};
  if (device >= 64 || !opted_in[device]) {
    LEPTON_RETURN_IF_CUDA_ERROR(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmemBytes));
    if (device < 64) opted_in[device] = true;
  }
  const FlashFwdParams& p = params.p;
  const int64_t num_work = static_cast<int64_t>((p.seqlen_q + C::kBlockM - 1) / C::kBlockM) * p.batch * p.num_heads_q;
  if (num_work > INT_MAX) return Status::Error("flash_attention: too many query blocks for one launch");
  const DeviceInfo* info = cached_device_info(device);
  if (info == nullptr) return Status::Error("flash_attention: cannot query the current CUDA device");
  const int sms = info->multiprocessors;
  // Persistent (one CTA per SM). With causal or window masks work tiles differ in length and a
  // static round robin balances badly: there the CTAs take tiles from a counter when the caller
  // provides one, else there is one CTA per work tile and the hardware hands the next one to
  // whichever SM frees first.
  const bool uneven = (p.window_left >= 0 || p.window_right >= 0) && p.tile_counter == nullptr;
  const int grid = static_cast<int>(uneven || num_work < sms ? num_work : sms);
  kernel<<<grid, C::kThreads, C::kSmemBytes, stream>>>(params);
  LEPTON_RETURN_IF_CUDA_ERROR(cudaGetLastError());
  return Status::Ok();
}

}  // namespace flash90
}  // namespace lepton

// The attention forward kernel template; flash_fwd_hdim<D>.cu instantiate it per head dim.
//
// One CTA owns BLOCK_M query rows of one (sequence, query head); each warp owns 16 or 32 of
// those rows (one or two m16 row tiles) for the whole kernel, so the softmax statistics of a
// row never leave its warp. The CTA walks the key tiles its rows can see; the V tile loads
// (cp.async) while S = Q K^T and the softmax run, the next K tile while O += P V runs.
// Scores stay in registers: S accumulates in fp32 mma fragments, the online softmax (base 2)
// turns them into P, and P is re-read as the A operand of O += P V without touching shared
// memory.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cmath>
#include <cstdint>

#include "attention/flash_fwd.h"
#include "common/fast_math.cuh"

namespace lepton {
namespace flash {

// -- Tiles per head dim ---------------------------------------------------------------------------
// Each warp owns kMTiles m16 row tiles of the CTA's BLOCK_M query rows for the whole kernel, so
// the softmax statistics of a row never leave its warp. With two row tiles per warp (D <= 128)
// every K or V fragment a warp reads from shared memory feeds two mma instructions: half the
// shared-memory reads per FLOP of one row tile per warp. D = 192 and 256 keep one row tile per
// warp: their O accumulators (96 and 128 fp32 registers per row tile) leave no room for a
// second.
//
// K and V each get one shared buffer; the loads of V(n) and K(n+1) are waited for separately
// (see the main loop), so one is in flight while the other is multiplied. Shared memory stays
// under 99 KiB, the per-block limit of sm_86/sm_89, so one configuration serves every target.
// At D <= 128 (64 KiB or less) two CTAs of 4 warps share an SM on sm_80 and sm_90, which the
// register budget (at most 255 per thread at 128 threads) also allows; sm_86/sm_89 (100 KiB
// per SM) fit two only at D = 64 and 80.
template <int D> struct Config;
#define LEPTON_FLASH_CONFIG(D, BM, BN, WARPS)                                                      \
  template <> struct Config<D> {                                                                  \
    static constexpr int kBlockM = BM, kBlockN = BN, kWarps = WARPS;                              \
    static constexpr int kMTiles = BM / (16 * WARPS);                                             \
  };
// Q fragments are re-read from shared memory at every key tile: kept in registers they would
// take D / 4 per row tile (64 at D = 128 with two row tiles) of the registers O and S need.
// D = 64 takes BLOCK_N 128 (fewer barriers and row reductions per FLOP): its O is small.
//                   D    BM   BN  warps
LEPTON_FLASH_CONFIG(64,  128, 128, 4)
LEPTON_FLASH_CONFIG(80,  128, 64,  4)
LEPTON_FLASH_CONFIG(96,  128, 64,  4)
LEPTON_FLASH_CONFIG(128, 128, 64,  4)
LEPTON_FLASH_CONFIG(192, 128, 64,  8)
LEPTON_FLASH_CONFIG(256, 64,  64,  4)
#undef LEPTON_FLASH_CONFIG
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// -- Shared-memory layout of a [rows, D] tile -------------------------------------------------------
// A row is D/8 chunks of 16 bytes. ldmatrix reads one chunk from each of 8 consecutive rows
// (row bases are multiples of 8), so those 8 chunks must fall in distinct bank groups:
// * D a multiple of 64: chunk c of row r is stored at chunk c ^ (r & 7) (XOR swizzle within
//   aligned groups of 8 chunks; the row itself spans whole 128-byte lines).
// * D = 80, 96 (10, 12 chunks: no whole groups of 8): rows are padded by one chunk, which
//   shifts consecutive rows by 4 banks mod 32 (D=80: 44 words, D=96: 52 words per row), so the
//   8 rows land on 8 distinct 4-bank groups.
template <int D>
struct Smem {
  static constexpr bool kSwizzle = D % 64 == 0;
  static constexpr int kStride = kSwizzle ? D : D + 8;  // elements per row
  static constexpr int kChunks = D / 8;
  // Element offset of 16-byte chunk `chunk` of row `row`.
  __device__ __forceinline__ static int offset(int row, int chunk) {
    return row * kStride + (kSwizzle ? (chunk ^ (row & 7)) : chunk) * 8;
  }
  // Byte offset of (row + rows, chunk + chunks), given lane_off = 2 * offset(row, chunk) with
  // chunk 0 or 1, rows a multiple of 8 and chunks even (compile-time in every use), so the
  // ldmatrix addresses of all k-steps derive from one register per operand:
  // rows keeps row & 7; chunk + chunks = chunk | chunks (disjoint bits), so
  // (chunk + chunks) ^ (row & 7) = (chunks & ~7) + ((chunks & 7) ^ chunk ^ (row & 7)), and as
  // row * kStride * 2 is a multiple of 128 bytes, the inner XOR applies to lane_off's bits 4..6.
  __device__ __forceinline__ static uint32_t step(uint32_t lane_off, int rows, int chunks) {
    if constexpr (kSwizzle) return (lane_off ^ ((chunks & 7) * 16)) + rows * kStride * 2 + (chunks & ~7) * 16;
    return lane_off + rows * kStride * 2 + chunks * 16;
  }
};

template <int D>
constexpr int smem_bytes() {
  using C = Config<D>;
  return (C::kBlockM + 2 * C::kBlockN) * Smem<D>::kStride * 2;  // Q, K, V
}

// -- PTX wrappers -----------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global->shared copy; when !valid, nothing is read and the 16 bytes become zeros
// (rows past a sequence's end must be zeros, not stale data: 0 * NaN would poison P V).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

// ldmatrix .x4: lanes 8i..8i+7 give the row addresses of 8x8 matrix i (16 bytes each);
// register i of lane L then holds matrix i's row L/4, columns 2(L%4) and 2(L%4)+1.
// With .trans, register i holds matrix i's rows 2(L%4), 2(L%4)+1 of column L/4.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// mma.m16n8k16, fp32 accumulate. With g = lane / 4 and t = lane % 4 (PTX ISA fragment layout):
//   A (16x16, row major), 4 regs of 2 elements: a0 = A[g][2t..2t+1], a1 = A[g+8][2t..2t+1],
//       a2 = A[g][2t+8..2t+9], a3 = A[g+8][2t+8..2t+9]
//   B (16x8, K x N), 2 regs: b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]
//   C (16x8 fp32), 4 regs: c0, c1 = C[g][2t], C[g][2t+1]; c2, c3 = C[g+8][2t], C[g+8][2t+1]
// The lower half of each 32-bit register holds the element with the smaller index.
template <typename T> struct Mma;
template <> struct Mma<__half> {
  __device__ __forceinline__ static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};
template <> struct Mma<__nv_bfloat16> {
  __device__ __forceinline__ static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

// Copy rows [row0, row0 + ROWS) of a [*, D] global matrix (rows `row_stride` apart) into a
// shared tile; rows at or past `num_rows` become zeros. Each thread copies one chunk column of
// rows kRowStep apart: one 64-bit address computation per tile, and few registers live across
// the main loop. Where D / 8 does not divide THREADS (D = 80, 96, 192), the last
// THREADS % (D / 8) threads idle.
template <typename T, int D, int ROWS, int THREADS>
__device__ __forceinline__ void load_tile(uint32_t tile, const T* base, int64_t row_stride, int row0,
                                          int num_rows) {
  constexpr int kChunks = Smem<D>::kChunks, kRowStep = THREADS / kChunks;
  constexpr int kIters = (ROWS + kRowStep - 1) / kRowStep;
  const int r0 = threadIdx.x / kChunks, chunk = threadIdx.x % kChunks;
  if (THREADS % kChunks != 0 && r0 >= kRowStep) return;
  const T* src = base + static_cast<int64_t>(row0 + r0) * row_stride + chunk * 8;
  const int64_t step = kRowStep * row_stride;
#pragma unroll
  for (int i = 0; i < kIters; ++i) {
    const int r = r0 + i * kRowStep;
    if (ROWS % kRowStep == 0 || r < ROWS) {
      const bool valid = row0 + r < num_rows;
      cp_async_16(tile + Smem<D>::offset(r, chunk) * 2, valid ? src + i * step : base, valid);
    }
  }
}

// Fragment ownership, with g = lane / 4 and t = lane % 4 (the mma layouts above):
// * Warp w owns rows w * 16 * kMTiles + 16 mi + {g, g + 8} of the block for row tile mi, so a
//   lane holds two rows per row tile; in S and O (C fragments) it holds columns 2t, 2t + 1 of
//   every 8-wide column tile.
// * S = Q K^T is an [rows, BN] product over the head dim: A = Q rows (row major in shared
//   memory), B[k = d][n = key] = K[key][d], i.e. K's rows are B's columns, so plain ldmatrix
//   of K rows gives B fragments (no transpose).
// * O += P V is an [rows, D] product over keys: A = P straight from S's registers (see the PV
//   loop), B[k = key][n = d] = V[key][d] is row major, so ldmatrix.trans of V rows gives B.
// Each B fragment is loaded once per warp and multiplied into all kMTiles row tiles.
template <typename T, int D>
__global__ void __launch_bounds__(Config<D>::kWarps * 32, Config<D>::kWarps == 4 ? 2 : 1)
    flash_fwd_kernel(const FlashFwdParams p) {
  using C = Config<D>;
  using L = Smem<D>;
  constexpr int BM = C::kBlockM, BN = C::kBlockN, MT = C::kMTiles, kThreads = C::kWarps * 32;
  static_assert(BM == 16 * MT * C::kWarps, "the warps split BLOCK_M into m16 row tiles");
  static_assert(D % 16 == 0 && BN % 16 == 0, "mma k-steps of 16");

  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);  // [BM, D], then [BN, D] of K, then [BN, D] of V
  const uint32_t q_tile = smem_addr(sQ);
  const uint32_t k_tile = q_tile + BM * L::kStride * 2;
  const uint32_t v_tile = k_tile + BN * L::kStride * 2;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int head = blockIdx.y, batch = blockIdx.z;

  int q_start = 0, k_start = 0, seqlen_q = p.seqlen_q, seqlen_k = p.seqlen_k;
  if (p.cu_seqlens_q != nullptr) {
    q_start = p.cu_seqlens_q[batch];
    seqlen_q = p.cu_seqlens_q[batch + 1] - q_start;
    k_start = p.cu_seqlens_k[batch];
    seqlen_k = p.cu_seqlens_k[batch + 1] - k_start;
  }
  if (p.kv_lens != nullptr) seqlen_k = max(0, min(seqlen_k, p.kv_lens[batch]));

  // Last row blocks first: under causal masks they carry the most keys, so the tail of the
  // grid is made of short CTAs. The grid is sized for the longest sequence.
  const int num_m_blocks = (seqlen_q + BM - 1) / BM;
  if (static_cast<int>(blockIdx.x) >= num_m_blocks) return;
  const int m0 = (num_m_blocks - 1 - static_cast<int>(blockIdx.x)) * BM;
  const int kv_head = head / (p.num_heads_q / p.num_heads_k);

  const T* q = static_cast<const T*>(p.q) + batch * p.q_stride_b + static_cast<int64_t>(q_start) * p.q_stride_s +
               head * p.q_stride_h;
  const T* k = static_cast<const T*>(p.k) + batch * p.k_stride_b + static_cast<int64_t>(k_start) * p.k_stride_s +
               kv_head * p.k_stride_h;
  const T* v = static_cast<const T*>(p.v) + batch * p.v_stride_b + static_cast<int64_t>(k_start) * p.v_stride_s +
               kv_head * p.v_stride_h;

  // Keys any row of this block can see: [key_lo, key_hi). Query i sees key j iff
  // i + diag - left <= j <= i + diag + right (bottom-right aligned; -1 = unbounded).
  const int diag = seqlen_k - seqlen_q;
  const int wl = p.window_left, wr = p.window_right;
  const int m_last = min(m0 + BM, seqlen_q) - 1;
  const int key_lo = wl >= 0 ? max(0, m0 + diag - wl) : 0;
  const int key_hi = wr >= 0 ? min(seqlen_k, m_last + diag + wr + 1) : seqlen_k;
  const int n_first = key_lo / BN * BN;                           // first key tile
  const int n_end = key_hi > key_lo ? (key_hi + BN - 1) / BN * BN : n_first;  // past the last

  // Q and the first K tile travel in one cp.async group.
  load_tile<T, D, BM, kThreads>(q_tile, q, p.q_stride_s, m0, seqlen_q);
  if (n_first < n_end) load_tile<T, D, BN, kThreads>(k_tile, k, p.k_stride_s, n_first, seqlen_k);
  cp_async_commit();

  const bool use_softcap = p.softcap > 0.f;
  // Scores in log2 units: x = s * scale * log2(e), or softcap * log2(e) * tanh(s * scale / softcap).
  const float pre = use_softcap ? p.softmax_scale / p.softcap : p.softmax_scale * kLog2e;
  const float post = p.softcap * kLog2e;
  // Without softcap and with a positive scale (the usual case) the scale folds into the
  // exponent, p = 2^(s * pre - max * pre), one FFMA per score: the max is then taken over raw
  // scores, which a positive scale does not reorder. Otherwise the scores are transformed
  // first and exp_scale is 1.
  const bool fold_scale = !use_softcap && pre > 0.f;
  const float exp_scale = fold_scale ? pre : 1.f;

  // This warp's rows, relative to m0: [warp_row0, warp_row0 + 16 * MT). This lane's rows in
  // row tile mi: warp_row0 + 16 mi + g and + 8.
  const int warp_row0 = warp * 16 * MT;
  const int row_g = warp_row0 + lane / 4;
  const int col_t = 2 * (lane % 4);  // first of the two columns a lane holds in every C fragment

  // ldmatrix .x4 row/chunk of this lane (lanes 8i..8i+7 address matrix i; layouts above):
  //   A from Q: matrices (rows +0, d +0), (+8, +0), (+0, +8), (+8, +8) -> a0..a3
  //   B from K: matrices (keys +0, d +0), (+0, +8), (+8, +0), (+8, +8) -> b0, b1 of key
  //     tile n (keys 0..7 of the 16), then b0, b1 of key tile n + 1 (keys 8..15)
  //   B from V (.trans): matrices (keys +0, d +0), (+8, +0), (+0, +8), (+8, +8) -> b0, b1 of
  //     dim tile n (d 0..7 of the 16), then b0, b1 of dim tile n + 1 (d 8..15)
  const int mat = lane / 8, mat_row = lane % 8;
  const uint32_t q_ld = L::offset(warp_row0 + mat_row + (mat & 1) * 8, mat >> 1) * 2;
  const uint32_t k_ld = L::offset(mat_row + (mat >> 1) * 8, mat & 1) * 2;
  const uint32_t v_ld = L::offset(mat_row + (mat & 1) * 8, mat >> 1) * 2;

  cp_async_wait<0>();
  __syncthreads();

  float o[MT][D / 8][4];
#pragma unroll
  for (int mi = 0; mi < MT; ++mi)
#pragma unroll
    for (int j = 0; j < D / 8; ++j) o[mi][j][0] = o[mi][j][1] = o[mi][j][2] = o[mi][j][3] = 0.f;
  // row_max: of the scores as the softmax sees them (raw when fold_scale, log2 units times
  // 1 / exp_scale); row_sum: this lane's columns only.
  float row_max[MT][2], row_sum[MT][2];
#pragma unroll
  for (int mi = 0; mi < MT; ++mi) row_max[mi][0] = row_max[mi][1] = -INFINITY, row_sum[mi][0] = row_sum[mi][1] = 0.f;

  // The rows of this warp see keys [warp_lo, warp_hi] at most (before the end of the sequence).
  const int warp_first_row = m0 + warp_row0, warp_last_row = m0 + warp_row0 + 16 * MT - 1;
  const int warp_lo = wl >= 0 ? warp_first_row + diag - wl : INT_MIN;
  // (A warp whose rows all lie past the sequence's end gets warp_hi = -1: it skips every tile.)
  const int warp_hi = warp_first_row >= seqlen_q ? -1 : wr >= 0 ? warp_last_row + diag + wr : INT_MAX;

  // Visible keys of this lane's row g of row tile 0, relative to the lane's first column
  // (col_t) of a tile at key 0: [lane_first, min(lane_last, lane_key_last)]. Unbounded sides
  // get +-2^30: far past any key, and no overflow when n0 (< 2^30) is subtracted.
  const int lane_pos = m0 + row_g + diag - col_t;
  const int lane_first = wl >= 0 ? lane_pos - wl : -(1 << 30);
  const int lane_last = wr >= 0 ? lane_pos + wr : (1 << 30);
  const int lane_key_last = seqlen_k - 1 - col_t;

  for (int n0 = n_first; n0 < n_end; n0 += BN) {
    // This tile's K has landed (see the loop's end) and V's buffer is free: fetch V behind
    // S = Q K^T and the softmax.
    load_tile<T, D, BN, kThreads>(v_tile, v, p.v_stride_s, n0, seqlen_k);
    cp_async_commit();

    // A warp whose rows see none of this tile's keys (causal or window edges cutting through
    // the block) skips its math; it still takes part in the loads and barriers.
    const bool warp_busy = n0 <= warp_hi && n0 + BN - 1 >= warp_lo;

    // S = Q K^T: s[mi][j] is row tile mi, key columns n0 + 8j .. n0 + 8j + 7.
    float s[MT][BN / 8][4];
    uint32_t pa[MT][BN / 16][4];  // P packed as mma A fragments
    if (warp_busy) {
#pragma unroll
      for (int mi = 0; mi < MT; ++mi)
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) s[mi][j][0] = s[mi][j][1] = s[mi][j][2] = s[mi][j][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t a[MT][4];
#pragma unroll
        for (int mi = 0; mi < MT; ++mi) ldmatrix_x4(a[mi], q_tile + L::step(q_ld, 16 * mi, 2 * kk));
#pragma unroll
        for (int nj = 0; nj < BN / 16; ++nj) {
          uint32_t b[4];
          ldmatrix_x4(b, k_tile + L::step(k_ld, 16 * nj, 2 * kk));
#pragma unroll
          for (int mi = 0; mi < MT; ++mi) {
            Mma<T>::run(s[mi][2 * nj], a[mi], b[0], b[1]);
            Mma<T>::run(s[mi][2 * nj + 1], a[mi], b[2], b[3]);
          }
        }
      }

      if (use_softcap) {
#pragma unroll
        for (int mi = 0; mi < MT; ++mi)
#pragma unroll
          for (int j = 0; j < BN / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[mi][j][e] = post * tanh_fast(s[mi][j][e] * pre);
      } else if (!fold_scale) {
#pragma unroll
        for (int mi = 0; mi < MT; ++mi)
#pragma unroll
          for (int j = 0; j < BN / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[mi][j][e] *= pre;
      }

      // Mask only tiles where some (row, key) pair of this warp is invisible: the sequence's
      // last key tile and the tiles the causal diagonal or window edges cross.
      const bool need_mask = n0 + BN > seqlen_k || n0 + BN - 1 > warp_hi - 16 * MT + 1 || n0 < warp_lo + 16 * MT - 1;
      if (need_mask) {
#pragma unroll
        for (int mi = 0; mi < MT; ++mi) {
          // Visible keys of this lane's two rows: [first[h], last[h]], relative to this
          // lane's first column of the tile.
          int first[2], last[2];
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            first[h] = lane_first + 16 * mi + 8 * h - n0;
            last[h] = min(lane_key_last - n0, lane_last + 16 * mi + 8 * h - n0);
          }
#pragma unroll
          for (int j = 0; j < BN / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int key = 8 * j + (e & 1);
              if (key < first[e >> 1] || key > last[e >> 1]) s[mi][j][e] = -INFINITY;
            }
        }
      }

      // Online softmax. A row's 8 columns of an 8-wide tile live in the 4 lanes of a quad, so
      // row reductions go over lanes xor 1 and xor 2.
      float alpha[MT][2];
      bool max_moved = false;
#pragma unroll
      for (int mi = 0; mi < MT; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float mx = row_max[mi][h];
#pragma unroll
          for (int j = 0; j < BN / 8; ++j) mx = fmaxf(mx, fmaxf(s[mi][j][2 * h], s[mi][j][2 * h + 1]));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
          // A row with nothing visible yet keeps max -inf; subtracting 0 instead keeps p and
          // alpha at 0 rather than NaN (-inf - -inf).
          const float base = mx == -INFINITY ? 0.f : mx * exp_scale;
          const bool moved = mx != row_max[mi][h];
          max_moved |= moved;
          alpha[mi][h] = moved ? exp2_approx(row_max[mi][h] * exp_scale - base) : 1.f;
          row_max[mi][h] = mx;
          float sum = 0.f;
#pragma unroll
          for (int j = 0; j < BN / 8; ++j) {
            s[mi][j][2 * h] = exp2_approx(fmaf(s[mi][j][2 * h], exp_scale, -base));
            s[mi][j][2 * h + 1] = exp2_approx(fmaf(s[mi][j][2 * h + 1], exp_scale, -base));
            sum += s[mi][j][2 * h] + s[mi][j][2 * h + 1];
          }
          row_sum[mi][h] = row_sum[mi][h] * alpha[mi][h] + sum;
        }
      // Once the running maxima settle (most tiles of long rows), the D / 2 multiplies per row
      // of the rescale are skipped; the vote keeps the branch warp-uniform.
      if (__any_sync(0xffffffffu, max_moved)) {
#pragma unroll
        for (int mi = 0; mi < MT; ++mi)
#pragma unroll
          for (int j = 0; j < D / 8; ++j) {
            o[mi][j][0] *= alpha[mi][0];
            o[mi][j][1] *= alpha[mi][0];
            o[mi][j][2] *= alpha[mi][1];
            o[mi][j][3] *= alpha[mi][1];
          }
      }

      // O += P V. The C fragments of key tiles 2kk and 2kk+1 are exactly the A fragment of
      // k-step kk: a0 = (row g, keys 2t, 2t+1) of tile 2kk, a1 = (row g+8) of tile 2kk, a2, a3
      // the same of tile 2kk + 1 (keys 8 + 2t, 9 + 2t of the k-step). Packing all of P first
      // frees S's fp32 registers before the next K tile is fetched.
#pragma unroll
      for (int mi = 0; mi < MT; ++mi)
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
          pa[mi][kk][0] = Mma<T>::pack(s[mi][2 * kk][0], s[mi][2 * kk][1]);
          pa[mi][kk][1] = Mma<T>::pack(s[mi][2 * kk][2], s[mi][2 * kk][3]);
          pa[mi][kk][2] = Mma<T>::pack(s[mi][2 * kk + 1][0], s[mi][2 * kk + 1][1]);
          pa[mi][kk][3] = Mma<T>::pack(s[mi][2 * kk + 1][2], s[mi][2 * kk + 1][3]);
        }
    }  // warp_busy

    // V has landed and every warp is done with K: fetch the next K tile behind O += P V.
    // (Issued after the softmax, when P is packed: fewer registers are live around the copy.)
    cp_async_wait<0>();
    __syncthreads();
    if (n0 + BN < n_end) {
      load_tile<T, D, BN, kThreads>(k_tile, k, p.k_stride_s, n0 + BN, seqlen_k);
      cp_async_commit();
    }

    if (warp_busy) {
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk)
#pragma unroll
        for (int dj = 0; dj < D / 16; ++dj) {
          uint32_t b[4];
          ldmatrix_x4_trans(b, v_tile + L::step(v_ld, 16 * kk, 2 * dj));
#pragma unroll
          for (int mi = 0; mi < MT; ++mi) {
            Mma<T>::run(o[mi][2 * dj], pa[mi][kk], b[0], b[1]);
            Mma<T>::run(o[mi][2 * dj + 1], pa[mi][kk], b[2], b[3]);
          }
        }
    }

    // Wait for the next K tile and for every warp to finish with V before it is refilled.
    cp_async_wait<0>();
    __syncthreads();
  }

  // Epilogue: full row sums, O / l, lse; rows that saw no key get 0 and -inf.
  __syncthreads();  // every warp is done with sQ (also with no key tiles): it stages the output
#pragma unroll
  for (int mi = 0; mi < MT; ++mi) {
    float inv[2], lse[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float sum = row_sum[mi][h];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      inv[h] = sum > 0.f ? 1.f / sum : 0.f;
      lse[h] = sum > 0.f ? (row_max[mi][h] * exp_scale + __log2f(sum)) * kLn2 : -INFINITY;
    }
    const int row = row_g + 16 * mi;
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      const uint32_t lo = Mma<T>::pack(o[mi][j][0] * inv[0], o[mi][j][1] * inv[0]);
      const uint32_t hi = Mma<T>::pack(o[mi][j][2] * inv[1], o[mi][j][3] * inv[1]);
      *reinterpret_cast<uint32_t*>(sQ + L::offset(row, j) + col_t) = lo;
      *reinterpret_cast<uint32_t*>(sQ + L::offset(row + 8, j) + col_t) = hi;
    }
    if (lane % 4 == 0) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = m0 + row + 8 * h;
        if (r < seqlen_q)
          p.lse[batch * p.lse_stride_b + head * p.lse_stride_h + static_cast<int64_t>(q_start + r) * p.lse_stride_s] =
              lse[h];
      }
    }
  }
  __syncthreads();
  T* out = static_cast<T*>(p.out) + batch * p.o_stride_b + static_cast<int64_t>(q_start) * p.o_stride_s +
           head * p.o_stride_h;
  constexpr int kChunks = L::kChunks;
#pragma unroll
  for (int c = threadIdx.x; c < BM * kChunks; c += kThreads) {
    const int r = c / kChunks, chunk = c % kChunks;
    if (m0 + r < seqlen_q)
      *reinterpret_cast<uint4*>(out + static_cast<int64_t>(m0 + r) * p.o_stride_s + chunk * 8) =
          *reinterpret_cast<const uint4*>(sQ + L::offset(r, chunk));
  }
}

template <typename T, int D>
Status launch_flash_fwd(const FlashFwdParams& p, cudaStream_t stream) {
  using C = Config<D>;
  constexpr int kSmem = smem_bytes<D>();
  static_assert(kSmem <= 99 * 1024, "fits the 99 KiB per-block limit of sm_86/sm_89");
  auto kernel = flash_fwd_kernel<T, D>;
  // Above 48 KiB of dynamic shared memory needs an opt-in, per device (not a stream
  // operation, so it is allowed during graph capture).
  int device = 0;
  LEPTON_RETURN_IF_CUDA_ERROR(cudaGetDevice(&device));
  static bool opted_in[64] = {};
  if (device >= 64 || !opted_in[device]) {
    LEPTON_RETURN_IF_CUDA_ERROR(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
    if (device < 64) opted_in[device] = true;
  }
  const dim3 grid((p.seqlen_q + C::kBlockM - 1) / C::kBlockM, p.num_heads_q, p.batch);
  kernel<<<grid, C::kWarps * 32, kSmem, stream>>>(p);
  LEPTON_RETURN_IF_CUDA_ERROR(cudaGetLastError());
  return Status::Ok();
}

}  // namespace flash
}  // namespace lepton

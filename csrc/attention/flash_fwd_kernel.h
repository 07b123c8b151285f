// The attention forward kernel template; flash_fwd_hdim<D>.cu instantiate it per head dim.
//
// One CTA owns BLOCK_M query rows of one (sequence, query head); each warp owns 16 of those
// rows for the whole kernel, so the softmax statistics of a row never leave its warp. The CTA
// walks the key tiles its rows can see; K/V tiles arrive through a ring of STAGES cp.async
// buffers so the next tile loads while the current one is multiplied. Scores stay in
// registers: S = Q K^T accumulates in fp32 mma fragments, the online softmax (base 2) turns
// them into P in place, and P is re-read as the A operand of O += P V without touching
// shared memory.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cmath>
#include <cstdint>

#include "attention/flash_fwd.h"

namespace lepton {
namespace flash {

// -- Tiles per head dim ---------------------------------------------------------------------------
// Shared memory stays under 99 KiB, the per-block limit of sm_86/sm_89, so one configuration
// serves every target. Q lives in registers (loaded once) up to D=128; from D=192 the O
// accumulator takes 96-128 registers per thread, so Q fragments are re-read from shared
// memory at every key tile instead.
template <int D> struct Config;
#define LEPTON_FLASH_CONFIG(D, BM, BN, WARPS, STAGES, Q_IN_REGS)                                   \
  template <> struct Config<D> {                                                                  \
    static constexpr int kBlockM = BM, kBlockN = BN, kWarps = WARPS, kStages = STAGES;            \
    static constexpr bool kQInRegs = Q_IN_REGS;                                                   \
  };
// Three K/V stages where they fit (short tiles: less compute to hide each load behind).
//                   D    BM   BN  warps stages Q in regs
LEPTON_FLASH_CONFIG(64,  128, 64,  8,    3,     true)
LEPTON_FLASH_CONFIG(80,  128, 64,  8,    3,     true)
LEPTON_FLASH_CONFIG(96,  128, 64,  8,    2,     true)
LEPTON_FLASH_CONFIG(128, 128, 64,  8,    2,     true)
LEPTON_FLASH_CONFIG(192, 128, 32,  8,    2,     false)
LEPTON_FLASH_CONFIG(256, 64,  32,  4,    2,     false)
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
};

template <int D>
constexpr int smem_bytes() {
  using C = Config<D>;
  return (C::kBlockM + 2 * C::kStages * C::kBlockN) * Smem<D>::kStride * 2;
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
    asm volatile(
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
    asm volatile(
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

__device__ __forceinline__ float exp2_approx(float x) {  // exp2(-inf) = +0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Copy rows [row0, row0 + ROWS) of a [*, D] global matrix (rows `row_stride` apart) into a
// shared tile; rows at or past `num_rows` become zeros.
template <typename T, int D, int ROWS, int THREADS>
__device__ __forceinline__ void load_tile(uint32_t tile, const T* base, int64_t row_stride, int row0,
                                          int num_rows) {
  constexpr int kChunks = Smem<D>::kChunks, kTotal = ROWS * kChunks;
  constexpr int kIters = (kTotal + THREADS - 1) / THREADS;
  if constexpr (THREADS % kChunks == 0) {
    // Each thread copies the same chunk column of rows THREADS / kChunks apart: one 64-bit
    // address computation per tile instead of one per copy.
    constexpr int kRowStep = THREADS / kChunks;
    const int r0 = threadIdx.x / kChunks, chunk = threadIdx.x % kChunks;
    const T* src = base + static_cast<int64_t>(row0 + r0) * row_stride + chunk * 8;
    const int64_t step = kRowStep * row_stride;
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const int r = r0 + i * kRowStep;
      if (kTotal % THREADS == 0 || r < ROWS) {
        const bool valid = row0 + r < num_rows;
        cp_async_16(tile + Smem<D>::offset(r, chunk) * 2, valid ? src + i * step : base, valid);
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const int c = threadIdx.x + i * THREADS;
      if (kTotal % THREADS == 0 || c < kTotal) {
        const int r = c / kChunks, chunk = c % kChunks;
        const bool valid = row0 + r < num_rows;
        const T* src = valid ? base + static_cast<int64_t>(row0 + r) * row_stride + chunk * 8 : base;
        cp_async_16(tile + Smem<D>::offset(r, chunk) * 2, src, valid);
      }
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(Config<D>::kWarps * 32, 1) flash_fwd_kernel(const FlashFwdParams p) {
  using C = Config<D>;
  using L = Smem<D>;
  constexpr int BM = C::kBlockM, BN = C::kBlockN, kThreads = C::kWarps * 32, kStages = C::kStages;
  static_assert(BM == 16 * C::kWarps, "each warp owns 16 query rows");
  static_assert(D % 16 == 0 && BN % 16 == 0, "mma k-steps of 16");

  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + BM * L::kStride;                 // kStages tiles of [BN, D]
  T* sV = sK + kStages * BN * L::kStride;       // kStages tiles of [BN, D]
  const uint32_t q_tile = smem_addr(sQ), k_tiles = smem_addr(sK), v_tiles = smem_addr(sV);
  constexpr uint32_t kKVTileBytes = BN * L::kStride * 2;

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
  const int n_begin = key_lo / BN;
  const int num_tiles = key_hi > key_lo ? (key_hi + BN - 1) / BN - n_begin : 0;

  load_tile<T, D, BM, kThreads>(q_tile, q, p.q_stride_s, m0, seqlen_q);
  cp_async_commit();
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < num_tiles) {
      load_tile<T, D, BN, kThreads>(k_tiles + s * kKVTileBytes, k, p.k_stride_s, (n_begin + s) * BN, seqlen_k);
      load_tile<T, D, BN, kThreads>(v_tiles + s * kKVTileBytes, v, p.v_stride_s, (n_begin + s) * BN, seqlen_k);
    }
    cp_async_commit();  // empty groups too: the wait counts below assume one group per stage
  }

  const bool use_softcap = p.softcap > 0.f;
  // Scores in log2 units: x = s * scale * log2(e), or softcap * log2(e) * tanh(s * scale / softcap).
  const float pre = use_softcap ? p.softmax_scale / p.softcap : p.softmax_scale * kLog2e;
  const float post = p.softcap * kLog2e;

  // This lane's rows (relative to m0): rows g and g + 8 of the warp's 16, g = lane / 4.
  const int row_a = warp * 16 + lane / 4;
  const int col_t = 2 * (lane % 4);  // first of the two columns a lane holds in every C fragment

  // ldmatrix row/chunk of this lane for each operand (see the layouts above):
  //   A from Q (row major): matrices (rows +0, cols +0), (+8, +0), (+0, +8), (+8, +8) -> a0..a3
  //   B from K (K^T: k = head dim, n = key; K rows are keys): matrices (keys +0, d +0),
  //     (keys +0, d +8), (keys +8, d +0), (keys +8, d +8) -> b0, b1 of key tile n, then of n + 8
  //   B from V (.trans; k = key, n = head dim): matrices (keys +0, d +0), (keys +8, d +0),
  //     (keys +0, d +8), (keys +8, d +8) -> b0, b1 of dim tile n, then of n + 8
  const int mat = lane / 8, mat_row = lane % 8;
  const int q_ld_row = warp * 16 + mat_row + (mat & 1) * 8, q_ld_chunk = mat >> 1;
  const int k_ld_row = mat_row + (mat >> 1) * 8, k_ld_chunk = mat & 1;
  const int v_ld_row = mat_row + (mat & 1) * 8, v_ld_chunk = mat >> 1;

  constexpr int kQFrags = C::kQInRegs ? D / 16 : 1;
  uint32_t q_frag[kQFrags][4];
  if constexpr (C::kQInRegs) {
    cp_async_wait<kStages - 1>();  // the Q group is the oldest
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) ldmatrix_x4(q_frag[kk], q_tile + L::offset(q_ld_row, 2 * kk + q_ld_chunk) * 2);
  }

  float o[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};  // log2 units, of rows g and g + 8
  float row_sum[2] = {0.f, 0.f};              // this lane's partial sums (its columns only)

  for (int it = 0; it < num_tiles; ++it) {
    // Refill the stage the previous iteration finished with (all threads passed the barrier
    // at its end), then wait for this iteration's tile.
    const int prefetch = it + kStages - 1;
    if (prefetch < num_tiles) {
      const uint32_t off = (prefetch % kStages) * kKVTileBytes;
      load_tile<T, D, BN, kThreads>(k_tiles + off, k, p.k_stride_s, (n_begin + prefetch) * BN, seqlen_k);
      load_tile<T, D, BN, kThreads>(v_tiles + off, v, p.v_stride_s, (n_begin + prefetch) * BN, seqlen_k);
    }
    cp_async_commit();
    cp_async_wait<kStages - 1>();
    __syncthreads();

    const uint32_t k_tile = k_tiles + (it % kStages) * kKVTileBytes;
    const uint32_t v_tile = v_tiles + (it % kStages) * kKVTileBytes;
    const int n0 = (n_begin + it) * BN;

    // S = Q K^T: s[j] is key columns n0 + 8j .. n0 + 8j + 7.
    float s[BN / 8][4];
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[4];
      if constexpr (C::kQInRegs) {
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = q_frag[kk][i];
      } else {
        ldmatrix_x4(a, q_tile + L::offset(q_ld_row, 2 * kk + q_ld_chunk) * 2);
      }
#pragma unroll
      for (int nj = 0; nj < BN / 16; ++nj) {
        uint32_t b[4];
        ldmatrix_x4(b, k_tile + L::offset(nj * 16 + k_ld_row, 2 * kk + k_ld_chunk) * 2);
        Mma<T>::run(s[2 * nj], a, b[0], b[1]);
        Mma<T>::run(s[2 * nj + 1], a, b[2], b[3]);
      }
    }

    if (use_softcap) {
#pragma unroll
      for (int j = 0; j < BN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][e] = post * tanhf(s[j][e] * pre);
    } else {
#pragma unroll
      for (int j = 0; j < BN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][e] *= pre;
    }

    // Mask only tiles where some (row, key) pair of the block is invisible: the sequence's
    // last key tile and the tiles the causal diagonal or window edges cross.
    const bool need_mask = n0 + BN > seqlen_k || (wr >= 0 && n0 + BN - 1 > m0 + diag + wr) ||
                           (wl >= 0 && n0 < m0 + BM - 1 + diag - wl);
    if (need_mask) {
      // Visible keys of this lane's two rows: [first[h], last[h]], relative to this lane's
      // first column of the tile.
      int first[2], last[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int pos = m0 + row_a + 8 * h + diag - n0 - col_t;
        first[h] = wl >= 0 ? pos - wl : INT_MIN;
        last[h] = min(seqlen_k - 1 - n0 - col_t, wr >= 0 ? pos + wr : INT_MAX);
      }
#pragma unroll
      for (int j = 0; j < BN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = 8 * j + (e & 1);
          if (key < first[e >> 1] || key > last[e >> 1]) s[j][e] = -INFINITY;
        }
    }

    // Online softmax. A row's 16 columns of an 8-wide tile live in the 4 lanes of a quad, so
    // the row max is reduced over lanes xor 1 and xor 2.
    float alpha[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float mx = row_max[h];
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * h], s[j][2 * h + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      // A row with nothing visible yet keeps max -inf; subtracting 0 instead keeps p and
      // alpha at 0 rather than NaN (-inf - -inf).
      const float base = mx == -INFINITY ? 0.f : mx;
      alpha[h] = exp2_approx(row_max[h] - base);
      row_max[h] = mx;
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) {
        s[j][2 * h] = exp2_approx(s[j][2 * h] - base);
        s[j][2 * h + 1] = exp2_approx(s[j][2 * h + 1] - base);
        sum += s[j][2 * h] + s[j][2 * h + 1];
      }
      row_sum[h] = row_sum[h] * alpha[h] + sum;
    }
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      o[j][0] *= alpha[0];
      o[j][1] *= alpha[0];
      o[j][2] *= alpha[1];
      o[j][3] *= alpha[1];
    }

    // O += P V. The C fragments of key tiles 2kk and 2kk+1 are exactly the A fragment of
    // k-step kk: a0 = (row g, keys 2t..) of tile 2kk, a1 = (row g+8) of tile 2kk, a2, a3 the
    // same of tile 2kk + 1.
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t a[4];
      a[0] = Mma<T>::pack(s[2 * kk][0], s[2 * kk][1]);
      a[1] = Mma<T>::pack(s[2 * kk][2], s[2 * kk][3]);
      a[2] = Mma<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = Mma<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int dj = 0; dj < D / 16; ++dj) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, v_tile + L::offset(kk * 16 + v_ld_row, 2 * dj + v_ld_chunk) * 2);
        Mma<T>::run(o[2 * dj], a, b[0], b[1]);
        Mma<T>::run(o[2 * dj + 1], a, b[2], b[3]);
      }
    }
    __syncthreads();  // every warp is done with this stage before it is refilled
  }

  // Epilogue: full row sums, O / l, lse; rows that saw no key get 0 and -inf.
  float inv[2], lse[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float sum = row_sum[h];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    inv[h] = sum > 0.f ? 1.f / sum : 0.f;
    lse[h] = sum > 0.f ? (row_max[h] + __log2f(sum)) * kLn2 : -INFINITY;
  }
  cp_async_wait<0>();  // with no key tiles the Q copy may still be in flight
  __syncthreads();     // sQ is reused to stage the output
#pragma unroll
  for (int j = 0; j < D / 8; ++j) {
    const uint32_t lo = Mma<T>::pack(o[j][0] * inv[0], o[j][1] * inv[0]);
    const uint32_t hi = Mma<T>::pack(o[j][2] * inv[1], o[j][3] * inv[1]);
    *reinterpret_cast<uint32_t*>(sQ + L::offset(row_a, j) + col_t) = lo;
    *reinterpret_cast<uint32_t*>(sQ + L::offset(row_a + 8, j) + col_t) = hi;
  }
  if (lane % 4 == 0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = m0 + row_a + 8 * h;
      if (row < seqlen_q)
        p.lse[batch * p.lse_stride_b + head * p.lse_stride_h + static_cast<int64_t>(q_start + row) * p.lse_stride_s] =
            lse[h];
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

// The split-KV decode kernel, instantiated per (head dim, cache dtype) in
// paged_attention_{bf16,fp16,fp8}.cu so the build spreads over several files.
//
// Layout of the work: a CTA of 4 warps owns one (sequence, kv head, group of <= 16 query
// heads, split). The group's heads are the 16 rows of an m16n8k16 tile (padding rows hold
// zeros), so each K/V byte is read once for all of them. The split's keys come in tiles of 16;
// warp w takes tiles w, w+4, w+8, ... and runs its own cp.async ring of kStages tiles and its
// own online softmax, so the main loop has no CTA-wide barrier: a warp waits only for its own
// copies. The four partial states are merged through shared memory at the end.
//
// Per 16-key tile: S = Q K^T (mma.sync, fp32 accumulators), masked and scaled in base 2,
// online softmax, then O += P V (P straight from the S accumulators). 16-bit tiles feed the
// mma through ldmatrix (.trans for V). fp8 tiles are converted to fp16 in registers (exact:
// fp16 holds every e4m3 value) straight into the mma fragments, reading each byte from shared
// memory once: the head dim is permuted so that each lane's fragment bytes are contiguous —
// for K the same permutation is applied to Q (a dot product does not care), for V the output
// columns come out permuted and are put back in the final merge. With bfloat16 queries and an
// fp8 cache each query row is rescaled by a power of two into fp16 range; the factor is
// folded into the score scale.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>
#include <type_traits>

#include "common/fast_math.cuh"
#include "paged/paged_attention.h"

namespace lepton {
namespace paged_decode {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRows = 16;      // query heads per CTA: the M of one mma tile
constexpr int kTileKeys = 16;  // keys per warp step
constexpr int kStages = 3;     // tiles in flight per warp
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <int D, typename Cache>
struct Config {
  static constexpr int kElem = static_cast<int>(sizeof(Cache));
  static constexpr bool kFp8 = kElem == 1;
  // Row strides in shared memory (bytes), padded against bank conflicts. 16-bit rows: +16, so
  // the 8 rows one ldmatrix reads start in 8 different 4-bank groups. fp8 K rows are read as
  // 8 bytes at row g (8 rows x 4 lanes): a stride of 32 or 96 mod 128 bytes; fp8 V rows are
  // read at rows 2t, 2t+1, 2t+8, 2t+9: a stride of 16 mod 32 bytes.
  static constexpr int kRow16 = D * 2 + 16;  // Q, and 16-bit K/V rows
  static constexpr int kRowK = kFp8 ? (D % 64 == 32 ? D : D + 32) : kRow16;
  static constexpr int kRowV = kFp8 ? D + 16 : kRow16;
  static constexpr int kChunks = D * kElem / 16;  // 16-byte chunks per cache row
  static constexpr int kChunksPerLane = kTileKeys * kChunks / 32;
  static constexpr int kTileBytesK = kTileKeys * kRowK;
  static constexpr int kStageBytes = kTileBytesK + kTileKeys * kRowV;  // K tile, then V tile
  static constexpr int kRingBytes = kStages * kStageBytes;
  static constexpr int kWarpBytes = kRingBytes;
  // Q fragments live in registers up to D = 128 (at D = 256 the accumulators need them).
  static constexpr bool kQInRegs = D <= 128;
  static constexpr int kQBytes = kRows * kRow16;
  static constexpr int kRowInfoBytes = kRows * 4;
  static constexpr int kSmemBytes = kQBytes + kRowInfoBytes + kWarps * kWarpBytes;
  // The end-of-kernel merge reuses the rings: per warp 16 rows x D fp32 (+ m, l).
  static constexpr int kMergeStride = D + 4;
  static constexpr int kMergeBytes = kWarps * kRows * (kMergeStride + 2) * 4;
  static_assert(kMergeBytes <= kWarps * kWarpBytes, "merge buffer must fit in the rings");
  static_assert(kTileKeys * kChunks % 32 == 0, "a tile must split evenly over the lanes");
  static_assert(D % 32 == 0, "head dim must be a multiple of 32");
};

// Compute (mma) type: bfloat16 for bfloat16 caches, fp16 otherwise (fp8 included).
template <typename Cache>
struct ComputeOf { using type = __half; };
template <>
struct ComputeOf<__nv_bfloat16> { using type = __nv_bfloat16; };

// -- PTX wrappers ---------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global->shared copy that bypasses L1; src_bytes 0 writes zeros (masked rows).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// The "memory" clobber keeps the compiler from moving shared-memory reads above the wait.
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Two e4m3 bytes (low byte first) -> one fp16x2 word (low half first). Exact; one cvt on sm_89+.
__device__ __forceinline__ uint32_t fp8x2_to_half2(uint32_t two_bytes) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two_bytes), __NV_E4M3);
  return static_cast<uint32_t>(h.x) | (static_cast<uint32_t>(h.y) << 16);
}

__device__ __forceinline__ float load_as_float(const void* base, int64_t index, bool is_bf16) {
  if (is_bf16) return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[index]);
  return __half2float(static_cast<const __half*>(base)[index]);
}

// -- the kernel -----------------------------------------------------------------------------------

template <int D, typename Cache>
__global__ void __launch_bounds__(kThreads) decode_kernel(const PagedDecodeParams p, int log2_block_size) {
  using Cfg = Config<D, Cache>;
  using T = typename ComputeOf<Cache>::type;
  extern __shared__ __align__(16) unsigned char smem[];

  const int tid = threadIdx.x;
  const int warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t4 = lane % 4;  // mma fragment coordinates: row group, column pair
  const int split = blockIdx.x;
  const int group = static_cast<int>(p.num_q_heads / p.num_kv_heads);
  const int row_blocks = (group + kRows - 1) / kRows;
  const int kv_head = blockIdx.y / row_blocks;
  const int head0 = kv_head * group + (blockIdx.y % row_blocks) * kRows;
  const int rows = min(kRows, kv_head * group + group - head0);  // valid query rows
  const int64_t b = blockIdx.z;

  unsigned char* q_smem = smem;
  float* row_inv = reinterpret_cast<float*>(smem + Cfg::kQBytes);  // undoes each row's fp16 rescale
  unsigned char* ring = smem + Cfg::kQBytes + Cfg::kRowInfoBytes + warp * Cfg::kWarpBytes;

  // -- Q: rows of this group into shared memory (zeros in padding rows) -----------------------------
  {
    const bool q_bf16 = p.q_dtype == DType::kBFloat16;
    // bfloat16 queries computed in fp16 (fp8 caches): scale each row by a power of two so its
    // largest element is below 1; the exact inverse goes into the score scale.
    const bool rescale = q_bf16 && !std::is_same<T, __nv_bfloat16>::value;
    for (int r = warp; r < kRows; r += kWarps) {
      float vals[D / 32];
      float amax = 0.f;
      const int64_t q_row = b * p.q_stride_b + (head0 + r) * p.q_stride_h;
#pragma unroll
      for (int k = 0; k < D / 32; ++k) {
        vals[k] = r < rows ? load_as_float(p.q, q_row + lane + 32 * k, q_bf16) : 0.f;
        amax = fmaxf(amax, fabsf(vals[k]));
      }
      float mul = 1.f, inv = 1.f;
      if (rescale) {
#pragma unroll
        for (int o = 16; o > 0; o /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
        if (amax > 0.f && amax <= 3.0e38f) {
          int e;
          frexpf(amax, &e);  // amax = f * 2^e, f in [0.5, 1)
          mul = ldexpf(1.f, -e);
          inv = ldexpf(1.f, e);
        }
      }
      T* dst = reinterpret_cast<T*>(q_smem + r * Cfg::kRow16);
#pragma unroll
      for (int k = 0; k < D / 32; ++k) dst[lane + 32 * k] = from_float<T>(vals[k] * mul);
      if (lane == 0) row_inv[r] = inv;
    }
  }
  __syncthreads();

  // -- this split's keys: [lo, hi) visible, tiles [t_begin, t_end) --------------------------------
  const int seq_len = p.seq_lens[b];
  const int hi = seq_len;
  const int lo = p.window_left >= 0 ? static_cast<int>(max(int64_t{0}, int64_t{seq_len} - 1 - p.window_left)) : 0;
  const int tile_lo = lo / kTileKeys;
  const int n_tiles = max((hi + kTileKeys - 1) / kTileKeys - tile_lo, 0);
  const int num_splits = static_cast<int>(p.num_splits);
  // Whole CTA steps (kWarps tiles) per split, so the warps stay evenly loaded.
  const int per_split = ((n_tiles + num_splits - 1) / num_splits + kWarps - 1) / kWarps * kWarps;
  const int t_begin = tile_lo + split * per_split;
  const int t_end = min(t_begin + per_split, tile_lo + n_tiles);
  const int n_mine = t_end > t_begin + warp ? (t_end - t_begin - warp + kWarps - 1) / kWarps : 0;

  // fp8: dequantization scales folded into the score scale and the output.
  float k_scale = 1.f, v_scale = 1.f;
  if constexpr (Cfg::kFp8) {
    k_scale = p.k_scale[kv_head * p.scale_head_stride];
    v_scale = p.v_scale[kv_head * p.scale_head_stride];
  }
  const bool softcap = p.softcap > 0.f;
  // Scores in base 2: s2 = raw * score_mul (no softcap) or tanh(raw * score_mul) * cap_mul.
  float score_mul[2];
  const float base_mul = p.softmax_scale * k_scale;
  const float cap_mul = softcap ? p.softcap * kLog2e : 1.f;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float inv = row_inv[g + 8 * h];
    score_mul[h] = softcap ? base_mul * inv / p.softcap : base_mul * inv * kLog2e;
  }

  // -- address helpers ----------------------------------------------------------------------------
  const int32_t* bt_row = p.block_table + b * p.bt_stride_b;
  const char* k_base = static_cast<const char*>(p.k_cache) + kv_head * p.k_stride_head * Cfg::kElem;
  const char* v_base = static_cast<const char*>(p.v_cache) + kv_head * p.v_stride_head * Cfg::kElem;
  const int slot_mask = (1 << log2_block_size) - 1;

  // Pages of a tile's first and second 8 keys (equal unless blocks hold 8 tokens). Entries
  // past the sequence may hold anything: only pages with a visible key are looked up.
  auto load_pages = [&](int tile, int& page0, int& page1) {
    const int key0 = tile * kTileKeys;
    page0 = (key0 + 8 > lo) ? bt_row[static_cast<int64_t>(key0 >> log2_block_size) * p.bt_stride_j] : 0;
    page1 = (key0 + 8 < hi) ? bt_row[static_cast<int64_t>((key0 + 8) >> log2_block_size) * p.bt_stride_j] : 0;
  };
  const int k_st = static_cast<int>(p.k_stride_token * Cfg::kElem);  // bytes (checked < 2^31 on the host)
  const int v_st = static_cast<int>(p.v_stride_token * Cfg::kElem);
  auto issue = [&](int i, int tile, int page0, int page1) {
    const int key0 = tile * kTileKeys;
    const uint32_t dst = smem_addr(ring + (i % kStages) * Cfg::kStageBytes);
    // Rows 0-7 are consecutive slots of page0, rows 8-15 of page1.
    const int64_t slot0 = key0 & slot_mask, slot1 = (key0 + 8) & slot_mask;
    const char* k_page0 = k_base + (page0 * p.k_stride_block * Cfg::kElem + slot0 * k_st);
    const char* k_page1 = k_base + (page1 * p.k_stride_block * Cfg::kElem + slot1 * k_st);
    const char* v_page0 = v_base + (page0 * p.v_stride_block * Cfg::kElem + slot0 * v_st);
    const char* v_page1 = v_base + (page1 * p.v_stride_block * Cfg::kElem + slot1 * v_st);
#pragma unroll
    for (int c = 0; c < Cfg::kChunksPerLane; ++c) {
      int row, col;
      if constexpr (32 % Cfg::kChunks == 0) {
        // R = 32 / kChunks rows per instruction; R divides 8, so whether a row is in the second
        // page is known at compile time.
        row = lane / Cfg::kChunks + (32 / Cfg::kChunks) * c;
        col = lane % Cfg::kChunks;
      } else {
        row = (lane + 32 * c) / Cfg::kChunks;
        col = (lane + 32 * c) % Cfg::kChunks;
      }
      const int half = row >= 8 ? 1 : 0;
      const int key = key0 + row;
      const bool ok = key >= lo && key < hi;  // other rows are zero-filled
      const char* k_src = (half ? k_page1 : k_page0) + ((row - 8 * half) * k_st + col * 16);
      const char* v_src = (half ? v_page1 : v_page0) + ((row - 8 * half) * v_st + col * 16);
      cp_async16(dst + row * Cfg::kRowK + col * 16, ok ? k_src : k_base, ok ? 16 : 0);
      cp_async16(dst + Cfg::kTileBytesK + row * Cfg::kRowV + col * 16, ok ? v_src : v_base, ok ? 16 : 0);
    }
  };

  // -- per-warp state -----------------------------------------------------------------------------
  float acc[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY};  // running max (base 2) of rows g, g+8
  float l_run[2] = {0.f, 0.f};              // this lane's part of the running sums

  // ldmatrix lane addresses (see the fragment layouts of mma.m16n8k16).
  const int mat = lane / 8, mrow = lane % 8;
  const uint32_t q_addr = smem_addr(q_smem) + ((mat % 2) * 8 + mrow) * Cfg::kRow16 + (mat / 2) * 16;
  const uint32_t k_lane = ((mat / 2) * 8 + mrow) * Cfg::kRow16 + (mat % 2) * 16;
  const uint32_t v_lane = ((mat % 2) * 8 + mrow) * Cfg::kRow16 + (mat / 2) * 16;

  // Q's A fragment of k-step kk. fp8 caches: k-step kk = 2 kb + s reads, for mma columns
  // (2t, 2t+1) and (2t+8, 2t+9), the head-dim elements kb*32 + 8t + 4s + (0, 1) and (2, 3).
  auto q_fragment = [&](int kk, uint32_t (&a)[4]) {
    if constexpr (Cfg::kFp8) {
      const int col = (kk / 2) * 32 + 8 * t4 + 4 * (kk % 2);
      const uint2 lo = *reinterpret_cast<const uint2*>(q_smem + g * Cfg::kRow16 + col * 2);
      const uint2 hi = *reinterpret_cast<const uint2*>(q_smem + (g + 8) * Cfg::kRow16 + col * 2);
      a[0] = lo.x;
      a[1] = hi.x;
      a[2] = lo.y;
      a[3] = hi.y;
    } else {
      ldmatrix_x4(a, q_addr + kk * 32);
    }
  };
  uint32_t q_regs[Cfg::kQInRegs ? D / 16 : 1][4];
  if constexpr (Cfg::kQInRegs) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) q_fragment(kk, q_regs[kk]);
  }

  auto tile_of = [&](int i) { return t_begin + warp + i * kWarps; };

  // -- the pipeline: kStages tiles in flight per warp -----------------------------------------------
#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) {
    if (i < n_mine) {
      int p0, p1;
      load_pages(tile_of(i), p0, p1);
      issue(i, tile_of(i), p0, p1);
    }
    cp_async_commit();
  }
  int next0 = 0, next1 = 0;  // pages of the next tile to issue, looked up one step early
  if (kStages - 1 < n_mine) load_pages(tile_of(kStages - 1), next0, next1);

  for (int i = 0; i < n_mine; ++i) {
    const int ahead = i + kStages - 1;
    if (ahead < n_mine) issue(ahead, tile_of(ahead), next0, next1);
    cp_async_commit();
    if (ahead + 1 < n_mine) load_pages(tile_of(ahead + 1), next0, next1);
    cp_async_wait<kStages - 1>();
    __syncwarp();

    const unsigned char* stage = ring + (i % kStages) * Cfg::kStageBytes;
    const uint32_t k_tile = smem_addr(stage);
    const uint32_t v_tile = k_tile + Cfg::kTileBytesK;

    // S = Q K^T: 16 rows x 16 keys, two n=8 halves.
    float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
    if constexpr (Cfg::kFp8) {
#pragma unroll
      for (int kb = 0; kb < D / 32; ++kb) {
        // 8 bytes of keys g and g + 8: two k-steps' B fragments each.
        const uint2 k0 = *reinterpret_cast<const uint2*>(stage + g * Cfg::kRowK + kb * 32 + 8 * t4);
        const uint2 k1 = *reinterpret_cast<const uint2*>(stage + (g + 8) * Cfg::kRowK + kb * 32 + 8 * t4);
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int kk = 2 * kb + half;
          uint32_t a[4];
          if constexpr (Cfg::kQInRegs) {
#pragma unroll
            for (int e = 0; e < 4; ++e) a[e] = q_regs[kk][e];
          } else {
            q_fragment(kk, a);
          }
          const uint32_t w0 = half ? k0.y : k0.x, w1 = half ? k1.y : k1.x;
          mma16816<T>(s[0], a, fp8x2_to_half2(w0 & 0xFFFFu), fp8x2_to_half2(w0 >> 16));
          mma16816<T>(s[1], a, fp8x2_to_half2(w1 & 0xFFFFu), fp8x2_to_half2(w1 >> 16));
        }
      }
    } else {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t a[4], kb[4];
        if constexpr (Cfg::kQInRegs) {
#pragma unroll
          for (int e = 0; e < 4; ++e) a[e] = q_regs[kk][e];
        } else {
          q_fragment(kk, a);
        }
        ldmatrix_x4(kb, k_tile + k_lane + kk * 32);
        mma16816<T>(s[0], a, kb[0], kb[1]);
        mma16816<T>(s[1], a, kb[2], kb[3]);
      }
    }

    // Scale, softcap, mask; s[n][0..1] are row g, s[n][2..3] row g + 8; key n*8 + 2*t4 + (e&1).
    const int key_base = tile_of(i) * kTileKeys + 2 * t4;
    const bool inside = tile_of(i) * kTileKeys >= lo && tile_of(i) * kTileKeys + kTileKeys <= hi;  // warp-uniform
    float row_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < 2; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h = e / 2;
        float x = s[n][e] * score_mul[h];
        if (softcap) x = tanhf(x) * cap_mul;
        if (!inside) {
          const int key = key_base + n * 8 + (e & 1);
          x = (key >= lo && key < hi) ? x : -INFINITY;
        }
        s[n][e] = x;
        row_max[h] = fmaxf(row_max[h], x);
      }
    }
    float alpha[2], base[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      row_max[h] = fmaxf(row_max[h], __shfl_xor_sync(0xffffffffu, row_max[h], 1));
      row_max[h] = fmaxf(row_max[h], __shfl_xor_sync(0xffffffffu, row_max[h], 2));
      const float m_new = fmaxf(m_run[h], row_max[h]);
      base[h] = m_new == -INFINITY ? 0.f : m_new;  // a row with no key yet: keep everything 0
      alpha[h] = exp2f(m_run[h] - base[h]);
      m_run[h] = m_new;
    }
    float row_sum[2] = {0.f, 0.f};
#pragma unroll
    for (int n = 0; n < 2; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[n][e] = exp2f(s[n][e] - base[e / 2]);
        row_sum[e / 2] += s[n][e];
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) l_run[h] = l_run[h] * alpha[h] + row_sum[h];
    // Once the running maxima settle, most tiles leave them unchanged: skip the rescale.
    if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        acc[j][0] *= alpha[0];
        acc[j][1] *= alpha[0];
        acc[j][2] *= alpha[1];
        acc[j][3] *= alpha[1];
      }
    }

    // O += P V: P's A fragment is the S accumulators, packed to 16 bits.
    uint32_t pa[4];
    pa[0] = pack2<T>(s[0][0], s[0][1]);
    pa[1] = pack2<T>(s[0][2], s[0][3]);
    pa[2] = pack2<T>(s[1][0], s[1][1]);
    pa[3] = pack2<T>(s[1][2], s[1][3]);
    if constexpr (Cfg::kFp8) {
      // n-tile j, column g holds head-dim element g * D/8 + j: lane (g, t) reads D/8
      // contiguous bytes of keys 2t, 2t+1 (b0, b1) and 2t+8, 2t+9 (b2, b3), and pairs the two
      // keys' bytes of each element with a byte permute before converting.
      const unsigned char* v_raw = stage + Cfg::kTileBytesK + g * (D / 8);
#pragma unroll
      for (int u = 0; u < D / 32; ++u) {
        const uint32_t x0 = *reinterpret_cast<const uint32_t*>(v_raw + (2 * t4) * Cfg::kRowV + 4 * u);
        const uint32_t y0 = *reinterpret_cast<const uint32_t*>(v_raw + (2 * t4 + 1) * Cfg::kRowV + 4 * u);
        const uint32_t x1 = *reinterpret_cast<const uint32_t*>(v_raw + (2 * t4 + 8) * Cfg::kRowV + 4 * u);
        const uint32_t y1 = *reinterpret_cast<const uint32_t*>(v_raw + (2 * t4 + 9) * Cfg::kRowV + 4 * u);
        const uint32_t lo0 = __byte_perm(x0, y0, 0x5140), hi0 = __byte_perm(x0, y0, 0x7362);
        const uint32_t lo1 = __byte_perm(x1, y1, 0x5140), hi1 = __byte_perm(x1, y1, 0x7362);
        mma16816<T>(acc[4 * u + 0], pa, fp8x2_to_half2(lo0 & 0xFFFFu), fp8x2_to_half2(lo1 & 0xFFFFu));
        mma16816<T>(acc[4 * u + 1], pa, fp8x2_to_half2(lo0 >> 16), fp8x2_to_half2(lo1 >> 16));
        mma16816<T>(acc[4 * u + 2], pa, fp8x2_to_half2(hi0 & 0xFFFFu), fp8x2_to_half2(hi1 & 0xFFFFu));
        mma16816<T>(acc[4 * u + 3], pa, fp8x2_to_half2(hi0 >> 16), fp8x2_to_half2(hi1 >> 16));
      }
    } else {
#pragma unroll
      for (int dn = 0; dn < D / 16; ++dn) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, v_tile + v_lane + dn * 32);
        mma16816<T>(acc[2 * dn], pa, vb[0], vb[1]);
        mma16816<T>(acc[2 * dn + 1], pa, vb[2], vb[3]);
      }
    }
    __syncwarp();  // every lane is done with this stage before it is refilled
  }
  cp_async_wait<0>();

  // -- merge the warps' states through shared memory (the rings are free now) ----------------------
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 1);
    l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 2);
  }
  __syncthreads();
  float* red_o = reinterpret_cast<float*>(smem + Cfg::kQBytes + Cfg::kRowInfoBytes);
  float* red_m = red_o + kWarps * kRows * Cfg::kMergeStride;  // [warp][row]: max, then weight
  float* red_l = red_m + kWarps * kRows;                      // [warp][row]: sum; [0][row]: lse
#pragma unroll
  for (int j = 0; j < D / 8; ++j) {
    float* row0 = red_o + (warp * kRows + g) * Cfg::kMergeStride;
    float* row1 = row0 + 8 * Cfg::kMergeStride;
    if constexpr (Cfg::kFp8) {  // column c of n-tile j is head-dim element c * D/8 + j
      row0[(2 * t4) * (D / 8) + j] = acc[j][0];
      row0[(2 * t4 + 1) * (D / 8) + j] = acc[j][1];
      row1[(2 * t4) * (D / 8) + j] = acc[j][2];
      row1[(2 * t4 + 1) * (D / 8) + j] = acc[j][3];
    } else {
      *reinterpret_cast<float2*>(row0 + 8 * j + 2 * t4) = make_float2(acc[j][0], acc[j][1]);
      *reinterpret_cast<float2*>(row1 + 8 * j + 2 * t4) = make_float2(acc[j][2], acc[j][3]);
    }
  }
  if (t4 == 0) {
    red_m[warp * kRows + g] = m_run[0];
    red_m[warp * kRows + g + 8] = m_run[1];
    red_l[warp * kRows + g] = l_run[0];
    red_l[warp * kRows + g + 8] = l_run[1];
  }
  __syncthreads();
  if (tid < kRows) {
    const int r = tid;
    float m = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m = fmaxf(m, red_m[w * kRows + r]);
    float weight[kWarps];
    float l = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      weight[w] = m == -INFINITY ? 0.f : exp2f(red_m[w * kRows + r] - m);
      l += weight[w] * red_l[w * kRows + r];
    }
    // A row that saw no key: out 0, lse -inf.
    const float inv = l > 0.f ? v_scale / l : 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) red_m[w * kRows + r] = weight[w] * inv;
    red_l[r] = l > 0.f ? (m + log2f(l)) * kLn2 : -INFINITY;
  }
  __syncthreads();

  const bool partial = num_splits > 1;
  const bool out_bf16 = p.q_dtype == DType::kBFloat16;
  for (int idx = tid; idx < rows * D; idx += kThreads) {
    const int r = idx / D, d = idx % D;
    float o = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) o += red_o[(w * kRows + r) * Cfg::kMergeStride + d] * red_m[w * kRows + r];
    const int64_t head = head0 + r;
    if (partial) {
      p.ws_out[((b * p.num_q_heads + head) * num_splits + split) * D + d] = o;
    } else if (out_bf16) {
      static_cast<__nv_bfloat16*>(p.out)[b * p.out_stride_b + head * p.out_stride_h + d] = __float2bfloat16_rn(o);
    } else {
      static_cast<__half*>(p.out)[b * p.out_stride_b + head * p.out_stride_h + d] = __float2half_rn(o);
    }
  }
  if (tid < rows) {
    const int64_t head = head0 + tid;
    if (partial) {
      p.ws_lse[(b * p.num_q_heads + head) * num_splits + split] = red_l[tid];
    } else {
      p.lse[b * p.lse_stride_b + head * p.lse_stride_h] = red_l[tid];
    }
  }
}

// -- host side ------------------------------------------------------------------------------------

inline int log2_exact(int64_t x) {
  int k = 0;
  while ((int64_t{1} << k) < x) ++k;
  return k;
}

// Opt in to > 48 KB of dynamic shared memory, once per device and instantiation.
template <int D, typename Cache>
cudaError_t prepare_kernel() {
  static bool done[64] = {};
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (device < 64 && done[device]) return cudaSuccess;
  err = cudaFuncSetAttribute(decode_kernel<D, Cache>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             Config<D, Cache>::kSmemBytes);
  if (err == cudaSuccess && device < 64) done[device] = true;
  return err;
}

template <int D, typename Cache>
Status launch_decode(const PagedDecodeParams& p, cudaStream_t stream) {
  LEPTON_RETURN_IF_CUDA_ERROR((prepare_kernel<D, Cache>()));
  const int64_t group = p.num_q_heads / p.num_kv_heads;
  const int64_t row_blocks = (group + kRows - 1) / kRows;
  const int64_t grid_y = p.num_kv_heads * row_blocks;
  if (p.num_splits > 0x7fffffff || grid_y > 65535 || p.batch > 65535)
    return Status::Error("paged_attention: too many sequences, heads or splits for one launch");
  const dim3 grid(static_cast<unsigned>(p.num_splits), static_cast<unsigned>(grid_y), static_cast<unsigned>(p.batch));
  decode_kernel<D, Cache><<<grid, kThreads, Config<D, Cache>::kSmemBytes, stream>>>(p, log2_exact(p.block_size));
  LEPTON_RETURN_IF_CUDA_ERROR(cudaGetLastError());
  return Status::Ok();
}

template <int D, typename Cache>
Status ctas_per_sm(int* ctas) {
  LEPTON_RETURN_IF_CUDA_ERROR((prepare_kernel<D, Cache>()));
  LEPTON_RETURN_IF_CUDA_ERROR(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      ctas, decode_kernel<D, Cache>, kThreads, Config<D, Cache>::kSmemBytes));
  return Status::Ok();
}

// One entry point per cache dtype (each in its own .cu file).
template <typename Cache>
Status launch_for_dtype(const PagedDecodeParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return launch_decode<64, Cache>(p, stream);
    case 96: return launch_decode<96, Cache>(p, stream);
    case 128: return launch_decode<128, Cache>(p, stream);
    case 256: return launch_decode<256, Cache>(p, stream);
    default: return Status::Error("paged_attention: head dim must be 64, 96, 128 or 256");
  }
}
template <typename Cache>
Status ctas_for_dtype(int64_t head_dim, int* ctas) {
  switch (head_dim) {
    case 64: return ctas_per_sm<64, Cache>(ctas);
    case 96: return ctas_per_sm<96, Cache>(ctas);
    case 128: return ctas_per_sm<128, Cache>(ctas);
    case 256: return ctas_per_sm<256, Cache>(ctas);
    default: return Status::Error("paged_attention: head dim must be 64, 96, 128 or 256");
  }
}

Status launch_bf16(const PagedDecodeParams& p, cudaStream_t stream);
Status launch_fp16(const PagedDecodeParams& p, cudaStream_t stream);
Status launch_fp8(const PagedDecodeParams& p, cudaStream_t stream);
Status ctas_bf16(int64_t head_dim, int* ctas);
Status ctas_fp16(int64_t head_dim, int* ctas);
Status ctas_fp8(int64_t head_dim, int* ctas);

}  // namespace paged_decode
}  // namespace lepton

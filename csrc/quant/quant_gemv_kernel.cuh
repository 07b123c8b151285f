// The quant_gemv kernel (see quant_gemv.h), included by one .cu file per activation dtype so a
// build compiles the two halves in parallel.
//
// Work split. A warp owns 16 * R weight rows (R tiles of 16) and walks its K range in steps of
// 128 input channels. In a step, lane (g = lane / 4, t = lane % 4) reads, for rows g and g + 8
// of each tile, the 32 channels [step * 128 + 32 t, + 32): one 16-byte load for int4 (two for
// int8), contiguous within a row and never across a scale group of 32 or more. The 4 lanes of a
// row cover 128 contiguous channels, and a warp's steps are contiguous, so each row is streamed.
//
// Tensor cores with no repack. mma.m16n8k16 sums over its 16 k indices; which input channel
// each index stands for is ours to choose, as long as the weight operand (A) and the token
// operand (B) agree. Lane t holds A's k indices {2t, 2t+1, 2t+8, 2t+9} for its two rows and B's
// same indices for token g, so letting lane t's indices range over its own 32 channels keeps
// both operands in registers straight from the loads: the weights in the order the dequantizer
// produces them, and x's channels gathered to match with one byte-permute per register.
//
// Dequantization without int->float conversions (FasterTransformer's trick): (w >> 4i) &
// 0x000F000F | magic gives two 16-bit floats magic + u exactly (fp16 1024, bf16 128: their
// ulp is 1 there), and one fma with -(magic + zero) leaves u - zero, a small exact integer.
// int8: each byte + 128 under fp16's 1024 (exact), or under fp32's 2^23 then packed to bf16.
//
// Scales. Per output channel (and w8a16): in the fp32 epilogue. Groups of 128: a step is one
// group for every lane, so each tile's step is summed exactly in fp32 by the tensor cores and
// then scaled in fp32. Groups of 32 or 64: lanes of one mma hold different groups, so the
// weight u - zero is scaled in x's dtype before the mma (one rounding per weight, as Marlin).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "quant/quant_gemv.h"

namespace lepton {
namespace qgemv {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kStepK = kQuantGemvStepK;  // 4 lanes x 32 channels
static_assert(kStepK == 128, "a step is 4 lanes x 32 channels; groups of 128 rely on it");

enum class ScaleMode { kPerChannel, kGroupOfStep, kGroupInWeight };

using u32 = uint32_t;

template <typename T>
struct Traits;

template <>
struct Traits<__half> {
  static constexpr u32 kMagic = 0x64006400u;  // 1024.0 in both halves
  static constexpr float kMagicValue = 1024.f;
  static constexpr u32 kOne = 0x3C003C00u;
  // fp16 has room for 1024 + 16 u too: the high nibble of a byte needs no shift, only a
  // multiply by 1/16 in the fma that subtracts 64 + zero (Marlin's variant).
  static constexpr bool kHighNibbleInPlace = true;
  static constexpr u32 kSixteenth = 0x2C002C00u;
  static constexpr u32 kMagicMinus64 = 0x63806380u;  // 960
  __device__ __forceinline__ static u32 fma2(u32 a, u32 b, u32 c) {
    u32 d;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
  }
  __device__ __forceinline__ static u32 splat(float v) {
    __half2 h = __float2half2_rn(v);
    return *reinterpret_cast<u32*>(&h);
  }
  __device__ __forceinline__ static void mma(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
  // Bytes sel of a word of int8 (sel = 0: bytes 0, 1; 1: bytes 2, 3) as a pair of halves.
  __device__ __forceinline__ static u32 int8_pair(u32 biased, int sel) {
    // biased = q ^ 0x80808080 holds q + 128 in each byte; under 0x64 it is 1024 + 128 + q.
    const u32 magic = __byte_perm(biased, 0x64646464u, sel == 0 ? 0x4140 : 0x4342);
    return fma2(magic, kOne, 0xE480E480u);  // - 1152
  }
  __device__ __forceinline__ static __half from_float(float v) { return __float2half_rn(v); }
  __device__ __forceinline__ static float to_float(__half v) { return __half2float(v); }
};

template <>
struct Traits<__nv_bfloat16> {
  static constexpr u32 kMagic = 0x43004300u;  // 128.0 in both halves
  static constexpr float kMagicValue = 128.f;
  static constexpr u32 kOne = 0x3F803F80u;
  static constexpr bool kHighNibbleInPlace = false;  // 128 + 16 u needs 8 mantissa bits
  static constexpr u32 kSixteenth = 0;
  static constexpr u32 kMagicMinus64 = 0;
  __device__ __forceinline__ static u32 fma2(u32 a, u32 b, u32 c) {
    u32 d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
  }
  __device__ __forceinline__ static u32 splat(float v) {
    __nv_bfloat162 h = __float2bfloat162_rn(v);
    return *reinterpret_cast<u32*>(&h);
  }
  __device__ __forceinline__ static void mma(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
  __device__ __forceinline__ static u32 int8_pair(u32 biased, int sel) {
    // bf16 cannot hold 128 + 128 + q exactly under one exponent: build 2^23 + 128 + q in fp32,
    // subtract, and pack the two exact integers.
    const float lo = __int_as_float(__byte_perm(biased, 0x4B000000u, sel == 0 ? 0x7650 : 0x7652)) - 8388736.f;
    const float hi = __int_as_float(__byte_perm(biased, 0x4B000000u, sel == 0 ? 0x7651 : 0x7653)) - 8388736.f;
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<u32*>(&h);
  }
  __device__ __forceinline__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  __device__ __forceinline__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
};

// Weights are read once: keep them out of L1 and ask L2 for the whole 256-byte run at once.
__device__ __forceinline__ uint4 load_weights(const void* ptr) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(ptr));
  return v;
}

__device__ __forceinline__ u32 word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// (w & mask) | magic in one instruction.
template <u32 kMask>
__device__ __forceinline__ u32 nibbles_under(u32 w, u32 magic) {
  u32 d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(w), "n"(kMask), "r"(magic));
  return d;
}

// A hint with no destination register: brings a line to L1 ahead of its loads.
__device__ __forceinline__ void prefetch_l1(const void* ptr) { asm volatile("prefetch.global.L1 [%0];" ::"l"(ptr)); }

__device__ __forceinline__ float load_scale(const QuantGemvParams& p, int64_t row, int64_t group) {
  const int64_t off = row * p.scale_stride_n + group * p.scale_stride_g;
  switch (p.scale_dtype) {
    case DType::kFloat16: return __half2float(__ldg(static_cast<const __half*>(p.scales) + off));
    case DType::kBFloat16: return __bfloat162float(__ldg(static_cast<const __nv_bfloat16*>(p.scales) + off));
    default: return __ldg(static_cast<const float*>(p.scales) + off);
  }
}

// fp32 epilogue: per-channel scale, bias, one rounding to x's dtype.
template <typename T, ScaleMode kMode>
__device__ __forceinline__ void store_out(const QuantGemvParams& p, int64_t tok, int64_t row, float v) {
  if (kMode == ScaleMode::kPerChannel) v *= load_scale(p, row, 0);
  if (p.bias != nullptr) v += Traits<T>::to_float(static_cast<const T*>(p.bias)[row * p.bias_stride]);
  static_cast<T*>(p.out)[tok * p.out_stride + row] = Traits<T>::from_float(v);
}

// R: 16-row tiles per warp; NT: 8-token tiles (M <= 8 * NT).
template <typename T, bool kInt4, int R, int NT, ScaleMode kMode>
__global__ void __launch_bounds__(kThreads, 2)
quant_gemv_kernel(const QuantGemvParams p, const int warps_n, const int64_t row_tiles,
                  const int64_t steps_per_split, const int group_shift, const bool prefetch) {
  using Tr = Traits<T>;
  constexpr int kRowsPerWarp = 16 * R;
  constexpr int kTokens = 8 * NT;
  constexpr int kRedStride = kRowsPerWarp + 4;  // padding: the fragment stores hit 32 banks
  constexpr int kPieces = kInt4 ? 1 : 2;        // 16-byte loads per row and step
  __shared__ float red[kWarps * kTokens * kRedStride];
  __shared__ int is_last;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int warps_k = kWarps / warps_n;
  const int wn = warp / warps_k, wk = warp - wn * warps_k;
  const int64_t tile = blockIdx.x % row_tiles;
  const int64_t split = blockIdx.x / row_tiles;
  const int64_t splits = gridDim.x / row_tiles;
  const int rows_per_block = kRowsPerWarp * warps_n;

  // This warp's contiguous range of steps.
  // (32-bit: K < 2^31.)
  const int steps = static_cast<int>((p.k + kStepK - 1) / kStepK);
  const int split_begin = static_cast<int>(split * steps_per_split);
  const int split_end = min(split_begin + static_cast<int>(steps_per_split), steps);
  const int per_warp = (split_end - split_begin + warps_k - 1) / warps_k;
  const int begin = split_begin + wk * per_warp;
  const int end = min(begin + per_warp, split_end);

  // Rows g and g + 8 of each tile; rows past N re-read the last row (results dropped).
  const int64_t warp_row0 = tile * rows_per_block + wn * kRowsPerWarp;
  // Registers are the limit here: rows are recomputed where needed (an add and a min), and
  // weight rows are addressed by 32-bit offsets in 16-byte units (weights < 64 GiB).
  const int lane_row0 = static_cast<int>(warp_row0) + g, last_row = static_cast<int>(p.n - 1);
  auto row_of = [&](int r, int h) { return min(lane_row0 + r * 16 + 8 * h, last_row); };
  const uint4* w16 = static_cast<const uint4*>(p.w);
  const uint32_t row_units = static_cast<uint32_t>(p.w_stride / (kInt4 ? 4 : 16));

  float acc[R][NT][4];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[r][j][c] = 0.f;

  // Tile r's weights of a step. A 16-byte piece past K (K is a multiple of 32 for int4, 16 for
  // int8) re-reads the row's first piece; x is zero there.
  uint4 wq[R][2][kPieces];
  auto load_tile = [&](int r, int step) {
    const uint32_t base = static_cast<uint32_t>(step) * kStepK + 32 * t;
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int c = 0; c < kPieces; ++c) {
        const uint32_t ch = base + 16 * c;  // int8 only: the second piece
        const uint32_t off = ch + (kInt4 ? 32 : 16) <= p.k ? ch : 0;
        wq[r][h][c] = load_weights(w16 + (static_cast<uint32_t>(row_of(r, h)) * row_units + off / (kInt4 ? 32 : 16)));
      }
  };
  // The zero points and scales a tile needs are loaded just before its math, one tile after
  // another. After the first step they hit L1 (a row's groups are contiguous), but the first
  // step's all miss, one after another. Asked for here, before the first weights, their misses
  // overlap (the lines of the warp's first group; most warps need no other).
  if (kInt4 && begin < end) {
    const int64_t base = static_cast<int64_t>(begin) * kStepK + 32 * t;  // in K, as in the loop
    const int64_t first = (base + 32 <= p.k ? base : 0) >> group_shift;
    const int scale_bytes = p.scale_dtype == DType::kFloat32 ? 4 : 2;
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t row = row_of(r, h);
        prefetch_l1(static_cast<const char*>(p.scales) +
                    (row * p.scale_stride_n + first * p.scale_stride_g) * scale_bytes);
        if (p.zeros != nullptr) prefetch_l1(p.zeros + row * p.zero_stride_n + first * p.zero_stride_g);
      }
  }
  // prefetch: a software pipeline without extra registers: as soon as a tile's weights are
  // consumed, its registers receive the next step's, so a step starts with all its loads long
  // in flight. Otherwise each step issues its loads and waits (a runtime switch, for tuning).
  if (prefetch && begin < end) {
#pragma unroll
    for (int r = 0; r < R; ++r) load_tile(r, begin);
  }

  const T* x = static_cast<const T*>(p.x);
  for (int step = begin; step < end; ++step) {
    const int64_t base = static_cast<int64_t>(step) * kStepK + 32 * t;  // this lane's first channel
    if (!prefetch) {
#pragma unroll
      for (int r = 0; r < R; ++r) load_tile(r, step);
    }

    // x[token][base .. base + 32) for tokens g and g + 8 (L1-cached: other warps read it too).
    u32 xw[NT][16];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const int64_t tok = g + 8 * j;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        uint4 v = make_uint4(0, 0, 0, 0);
        if (tok < p.m && base + 8 * q + 8 <= p.k)
          v = __ldg(reinterpret_cast<const uint4*>(x + tok * p.x_stride + base + 8 * q));
        xw[j][4 * q] = v.x, xw[j][4 * q + 1] = v.y, xw[j][4 * q + 2] = v.z, xw[j][4 * q + 3] = v.w;
      }
    }

    // Zero points and group scales of this lane's 32 channels (one group: see the top), loaded
    // per tile below: holding all tiles' at once would spill.
    // Per channel, group_shift = 31 makes it 0 at run time: a compile-time 0 would let the
    // compiler hoist every tile's zero points out of the loop, into registers it lacks.
    const int64_t group = (base + 32 <= p.k ? base : 0) >> group_shift;

    // B fragments: token operand of step s in mma order (see the top).
    u32 bf[NT][8][2];
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int s = 0; s < 8; ++s) {
        if (kInt4) {
          // A register k pair (2t, 2t+1) of step s = 2w + e holds channels (8w+2e, 8w+2e+4),
          // pair (2t+8, 2t+9) holds (8w+2e+1, 8w+2e+5).
          const int w = s / 2, e = s % 2;
          bf[j][s][0] = __byte_perm(xw[j][4 * w + e], xw[j][4 * w + e + 2], 0x5410);
          bf[j][s][1] = __byte_perm(xw[j][4 * w + e], xw[j][4 * w + e + 2], 0x7632);
        } else {
          // int8 word s: pairs (4s, 4s+1) and (4s+2, 4s+3), x in its natural order.
          bf[j][s][0] = xw[j][2 * s];
          bf[j][s][1] = xw[j][2 * s + 1];
        }
      }

#pragma unroll
    for (int r = 0; r < R; ++r) {
      u32 negz[2], scale2[2];
      float scale[2];
      if (kInt4) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int64_t zero_at = static_cast<int64_t>(row_of(r, h)) * p.zero_stride_n + group * p.zero_stride_g;
          const float zero = p.zeros != nullptr ? static_cast<float>(__ldg(p.zeros + zero_at)) : 8.f;
          negz[h] = Tr::splat(-(Tr::kMagicValue + zero));  // exact: an integer <= 1040
          if (kMode != ScaleMode::kPerChannel) {
            scale[h] = load_scale(p, row_of(r, h), group);
            scale2[h] = Tr::splat(scale[h]);
          }
        }
      }
      // Groups of 128 sum the tile's step apart, to scale it; otherwise straight into acc.
      float part[NT][4];
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) part[j][c] = 0.f;
      float(&sum)[NT][4] = kMode == ScaleMode::kGroupOfStep ? part : acc[r];
#pragma unroll
      for (int s = 0; s < 8; ++s) {
        u32 a[4];  // rows g, g + 8 at k (2t, 2t+1); rows g, g + 8 at k (2t+8, 2t+9)
        if (kInt4) {
          const int w = s / 2, sh = 8 * (s % 2);
          const u32 q0 = word(wq[r][0][0], w), q1 = word(wq[r][1][0], w);
          const u32 s0 = q0 >> sh, s1 = q1 >> sh;
          a[0] = Tr::fma2(nibbles_under<0x000F000Fu>(s0, Tr::kMagic), Tr::kOne, negz[0]);
          a[1] = Tr::fma2(nibbles_under<0x000F000Fu>(s1, Tr::kMagic), Tr::kOne, negz[1]);
          // (1024 + 16 u) / 16 - (64 + zero), with -(64 + zero) = negz + 960. (Not with 16 tokens:
          // there the B fragments leave no register for it.)
          if (Tr::kHighNibbleInPlace && NT == 1) {
            a[2] = Tr::fma2(nibbles_under<0x00F000F0u>(s0, Tr::kMagic), Tr::kSixteenth,
                            Tr::fma2(negz[0], Tr::kOne, Tr::kMagicMinus64));
            a[3] = Tr::fma2(nibbles_under<0x00F000F0u>(s1, Tr::kMagic), Tr::kSixteenth,
                            Tr::fma2(negz[1], Tr::kOne, Tr::kMagicMinus64));
          } else {
            a[2] = Tr::fma2(nibbles_under<0x000F000Fu>(s0 >> 4, Tr::kMagic), Tr::kOne, negz[0]);
            a[3] = Tr::fma2(nibbles_under<0x000F000Fu>(s1 >> 4, Tr::kMagic), Tr::kOne, negz[1]);
          }
          if (kMode == ScaleMode::kGroupInWeight) {
            a[0] = Tr::fma2(a[0], scale2[0], 0x80008000u);
            a[1] = Tr::fma2(a[1], scale2[1], 0x80008000u);
            a[2] = Tr::fma2(a[2], scale2[0], 0x80008000u);
            a[3] = Tr::fma2(a[3], scale2[1], 0x80008000u);
          }
        } else {
          const u32 q0 = word(wq[r][0][s / 4], s % 4) ^ 0x80808080u;
          const u32 q1 = word(wq[r][1][s / 4], s % 4) ^ 0x80808080u;
          a[0] = Tr::int8_pair(q0, 0);
          a[1] = Tr::int8_pair(q1, 0);
          a[2] = Tr::int8_pair(q0, 1);
          a[3] = Tr::int8_pair(q1, 1);
        }
#pragma unroll
        for (int j = 0; j < NT; ++j) Tr::mma(sum[j], a[0], a[1], a[2], a[3], bf[j][s][0], bf[j][s][1]);
      }
      if (prefetch && step + 1 < end) load_tile(r, step + 1);
      // part[j]: (row g, tokens 2t, 2t+1), (row g + 8, tokens 2t, 2t+1) of token tile j.
      if (kMode == ScaleMode::kGroupOfStep) {
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          acc[r][j][0] += part[j][0] * scale[0];
          acc[r][j][1] += part[j][1] * scale[0];
          acc[r][j][2] += part[j][2] * scale[1];
          acc[r][j][3] += part[j][3] * scale[1];
        }
      }
    }
  }

  // Sum the warps that split K: red[warp][token][row of the warp].
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int row = r * 16 + g + 8 * (c >> 1);
        const int tok = j * 8 + 2 * t + (c & 1);
        red[(warp * kTokens + tok) * kRedStride + row] = acc[r][j][c];
      }
  __syncthreads();

  const int tokens = static_cast<int>(p.m < kTokens ? p.m : kTokens);
  const int count = rows_per_block * tokens;
  // Consecutive threads take consecutive rows: coalesced stores along N.
  for (int idx = threadIdx.x; idx < count; idx += kThreads) {
    const int tok = idx / rows_per_block, rb = idx - tok * rows_per_block;
    const int wn_ = rb / kRowsPerWarp, rl = rb - wn_ * kRowsPerWarp;
    float v = 0.f;
    for (int w = 0; w < warps_k; ++w) v += red[((wn_ * warps_k + w) * kTokens + tok) * kRedStride + rl];
    const int64_t row = tile * rows_per_block + rb;
    if (row >= p.n) continue;
    if (splits == 1)
      store_out<T, kMode>(p, tok, row, v);
    else
      p.workspace[(split * p.m + tok) * p.n + row] = v;
  }
  if (splits == 1) return;

  // Split K: the last block of this row tile to arrive sums the partials in split order.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(p.counters + tile, 1) == splits - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  for (int idx = threadIdx.x; idx < count; idx += kThreads) {
    const int tok = idx / rows_per_block, rb = idx - tok * rows_per_block;
    const int64_t row = tile * rows_per_block + rb;
    if (row >= p.n) continue;
    float v = 0.f;
    for (int64_t s = 0; s < splits; ++s) v += __ldcg(p.workspace + (s * p.m + tok) * p.n + row);
    store_out<T, kMode>(p, tok, row, v);
  }
  if (threadIdx.x == 0) p.counters[tile] = 0;  // every block of the tile has arrived: reusable
}

template <typename T, bool kInt4, int R, int NT, ScaleMode kMode>
Status launch(const QuantGemvParams& p, const QuantGemvPlan& plan, int group_shift, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(plan.row_tiles * plan.splits));
  quant_gemv_kernel<T, kInt4, R, NT, kMode><<<grid, kThreads, 0, stream>>>(
      p, plan.warps_n, plan.row_tiles, plan.steps_per_split, group_shift, plan.prefetch);
  LEPTON_RETURN_IF_CUDA_ERROR(cudaGetLastError());
  return Status::Ok();
}

template <typename T, bool kInt4, ScaleMode kMode>
Status dispatch_tokens(const QuantGemvParams& p, const QuantGemvPlan& plan, int group_shift, cudaStream_t stream) {
  // Rows x tokens per warp: int4 64 x 8 or 32 x 16, int8 (twice the bytes per row) 32 x 8 or
  // 16 x 16; about the same registers each (see quant_gemv_rows_per_warp).
  constexpr int kTiles = kInt4 ? 4 : 2;
  if (p.m <= 8) return launch<T, kInt4, kTiles, 1, kMode>(p, plan, group_shift, stream);
  return launch<T, kInt4, kTiles / 2, 2, kMode>(p, plan, group_shift, stream);
}

// Instantiated in quant_gemv_f16.cu and quant_gemv_bf16.cu.
template <typename T>
Status launch_typed(const QuantGemvParams& p, const QuantGemvPlan& plan, cudaStream_t stream) {
  if (!p.int4) return dispatch_tokens<T, false, ScaleMode::kPerChannel>(p, plan, 31, stream);
  if (p.group_size == -1) return dispatch_tokens<T, true, ScaleMode::kPerChannel>(p, plan, 31, stream);
  int shift = 0;
  while ((1 << shift) < p.group_size) ++shift;
  if (p.group_size == kStepK) return dispatch_tokens<T, true, ScaleMode::kGroupOfStep>(p, plan, shift, stream);
  return dispatch_tokens<T, true, ScaleMode::kGroupInWeight>(p, plan, shift, stream);
}

}  // namespace qgemv
}  // namespace lepton

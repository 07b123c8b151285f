// The quant_gemv kernel (see quant_gemv.h), included by one .cu file per activation dtype and
// one per per-token scheme (w8a8, fp8), so a build compiles the four in parallel.
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
// ulp is 1 there; fp16 also takes a high nibble in place as 64 + u, its ulp 1/16 there).
// Folded zero points (scales per channel or per 128-group): magic + u goes into the mma as it
// is, and the step's -(magic + zero) * sum(x) is added to the fp32 sum instead (8 extra mma a
// step, against constant rows, shared by the warp's tiles): one lop3 per weight pair is all
// the dequantization left. The cost is cancellation: the fp32 sums carry ~1032 x (fp16) or
// ~136 x (bf16) where u - zero carries ~8 x, so their rounding error grows by 2^7 (2^4); with
// the tensor cores' truncating fp32 sums that is ~5e-5 relative at most (fp16, emulated), far
// below the output's own rounding (~2e-4). Groups of 32 or 64 scale the weights before the
// mma, so there one fma with -(magic + zero) leaves u - zero, a small exact integer, first.
// int8: each byte + 128 under fp16's 1024 (exact), or under fp32's 2^23 then packed to bf16.
//
// Scales. Per output channel (and w8a16): in the fp32 epilogue. Groups of 128: a step is one
// group for every lane, so each tile's step is summed in fp32 by the tensor cores (its
// correction included) and then scaled in fp32. Groups of 32 or 64: lanes of one mma hold
// different groups, so the weight u - zero is scaled in x's dtype before the mma (one rounding
// per weight, as Marlin).
//
// Cost. Near HBM speed an H200 SM must take in ~14 weight bytes per clock, while a warp step
// spends ~1 instruction per 8 int4 weight bytes on dequantizing and the mma alone: the loop is
// issue-bound before it is memory-bound, so all else is kept out of it (see the kernel).
//
// w8a8 and fp8 (Prequant): quantize_rows has already turned x into float16 values (ints of at
// most 127, or e4m3 values: both exact in fp16), so the loop is the int8 one on fp16 tensor
// cores whatever x's dtype was (T = __half; O, the output's dtype, only shows in the epilogue).
// int8 weights take the fp16 byte trick above; e4m3 weights one cvt per pair, the pair's lower
// byte into the lower half, so a word's bytes (0, 1) and (2, 3) land on the k indices the int8
// path gives them (x stays in natural order). Products are exact; the epilogue scales the fp32
// sum by the token's and the channel's scales.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>
#include <type_traits>

#include "quant/quant_gemv.h"

namespace lepton {
namespace qgemv {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kStepK = kQuantGemvStepK;  // 4 lanes x 32 channels
static_assert(kStepK == 128, "a step is 4 lanes x 32 channels; groups of 128 rely on it");

enum class ScaleMode { kPerChannel, kGroupOfStep, kGroupInWeight };
// Activations quantized per token ahead of the kernel (w8a8: int8 weights, fp8: e4m3), or not.
enum class Prequant { kNone, kInt8, kE4M3 };

// e4m3 -> f16 conversions exist from sm_89 on; the host runs no e4m3 kernel below that, and
// there the kernel compiles to nothing.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 890
constexpr bool kArchHasE4M3 = false;
#else
constexpr bool kArchHasE4M3 = true;
#endif

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
  // Folded (see the top): (w & 0x00F000F0) | 64.0 is 64 + u exactly (ulp 1/16 there), the
  // high nibble with no shift and no fma.
  static constexpr u32 kMagicHi = 0x54005400u;
  static constexpr u32 kNegMagicHiBits = 0xD400u, kHiZeroStep = 16;  // -(64 + z): 0xD400 + 16 z
  static constexpr u32 kNegOne = 0xBC00u;
  // -(1024 + z) and -(64 + z) for a zero point z in [0, 16] are the bit patterns below plus z
  // (plus 16 z): 1024..2047 step by 1 in fp16, 64..127 by 1/16. No conversion per group.
  static constexpr u32 kNegMagicBits = 0xE400u;
  static constexpr u32 kNegMagic64Bits = 0xD400u;
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
  static constexpr u32 kMagicHi = kMagic;  // the high nibble shifted down first
  static constexpr u32 kNegMagicHiBits = 0xC300u, kHiZeroStep = 1;
  static constexpr u32 kNegOne = 0xBF80u;
  static constexpr u32 kNegMagicBits = 0xC300u;  // -(128 + z): 128..255 step by 1 in bf16
  static constexpr u32 kNegMagic64Bits = 0;
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

// Weights are read once: keep them out of L1. No L2 prefetch hint: with .L2::256B, loads of
// this kernel's pattern (8 rows x 64 bytes per warp instruction) ran at 64% of the H100's copy
// bandwidth in isolation, 74% without it, and the whole kernel went from 21.5 to 15.1 us at
// 14336 x 4096 (one token). (A shared-memory cp.async ring two steps deep was no faster.)
__device__ __forceinline__ uint4 load_weights(const void* ptr) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
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

// Bytes (0, 1) (sel = 0) or (2, 3) of a word of e4m3 as a pair of halves, lower byte lower.
__device__ __forceinline__ u32 e4m3_pair(u32 w, int sel) {
  const __half2_raw h =
      __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(sel == 0 ? w : w >> 16), __NV_E4M3);
  return static_cast<u32>(h.x) | (static_cast<u32>(h.y) << 16);
}

// Wait for the grid this one depends on programmatically (quantize_rows): a no-op when it was
// launched the ordinary way.
__device__ __forceinline__ void wait_for_dependencies() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void prefetch_l2(const void* ptr) { asm volatile("prefetch.global.L2 [%0];" ::"l"(ptr)); }

// What quantize_rows wrote is read with ordinary loads: under a programmatic dependent launch
// it is written while this grid runs, which the non-coherent (__ldg) path does not allow for.
// The asm volatile keeps them after the wait.
__device__ __forceinline__ uint4 load_coherent(const void* ptr) {
  uint4 v;
  asm volatile("ld.global.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(ptr));
  return v;
}
__device__ __forceinline__ float load_coherent(const float* ptr) {
  float v;
  asm volatile("ld.global.f32 %0, [%1];" : "=f"(v) : "l"(ptr));
  return v;
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ float load_scale(const QuantGemvParams& p, int64_t row, int64_t group) {
  const int64_t off = row * p.scale_stride_n + group * p.scale_stride_g;
  switch (p.scale_dtype) {
    case DType::kFloat16: return __half2float(__ldg(static_cast<const __half*>(p.scales) + off));
    case DType::kBFloat16: return __bfloat162float(__ldg(static_cast<const __nv_bfloat16*>(p.scales) + off));
    default: return __ldg(static_cast<const float*>(p.scales) + off);
  }
}

// fp32 epilogue: the token's scale (w8a8, fp8; in the reference's order), per-channel scale,
// bias, one rounding to the output's dtype O.
template <typename O, ScaleMode kMode, Prequant kPre>
__device__ __forceinline__ void store_out(const QuantGemvParams& p, int64_t tok, int64_t row, float v) {
  if (kPre != Prequant::kNone) v *= load_coherent(p.x_scales + tok);
  if (kMode == ScaleMode::kPerChannel) v *= load_scale(p, row, 0);
  if (p.bias != nullptr) v += Traits<O>::to_float(static_cast<const O*>(p.bias)[row * p.bias_stride]);
  static_cast<O*>(p.out)[tok * p.out_stride + row] = Traits<O>::from_float(v);
}

// R: 16-row tiles per warp; NT: 8-token tiles (M <= 8 * NT); S: the scales' dtype (read in the
// loop by the group modes only); kZeros: int4 with zero points; O: the output's dtype (T's but
// for w8a8 and fp8); kPre: see Prequant. Templates, so that the loop has no branch on them and
// a symmetric weight spends no registers on zero points.
//
// The loop is issue-bound before it is memory-bound (a warp step is ~8 instructions per 16
// weight bytes), so the per-step work outside the dequantizer is kept small: weight rows are
// 32-bit offsets computed once, a K tail is a predicate per step (not per load), and a tile's
// scales and zero points travel with its weights (issued a step ahead, not fetched one
// dependent load at a time just before the math).
template <typename T, bool kInt4, int R, int NT, ScaleMode kMode, typename S, bool kZeros, typename O = T,
          Prequant kPre = Prequant::kNone>
__global__ void __launch_bounds__(kThreads, 2)
quant_gemv_kernel(const QuantGemvParams p, const int warps_n, const int64_t row_tiles,
                  const int64_t steps_per_split, const int group_shift, const bool prefetch) {
  static_assert(kPre == Prequant::kNone || (!kInt4 && kMode == ScaleMode::kPerChannel &&
                                             std::is_same<T, __half>::value),
                "prequantized activations: 8-bit weights with per-channel scales, float16 x");
  if constexpr (kPre == Prequant::kE4M3 && !kArchHasE4M3) return;
  using Tr = Traits<T>;
  constexpr int kRowsPerWarp = 16 * R;
  constexpr int kTokens = 8 * NT;
  constexpr int kRedStride = kRowsPerWarp + 4;  // padding: the fragment stores hit 32 banks
  constexpr int kPieces = kInt4 ? 1 : 2;        // 16-byte loads per row and step
  constexpr int kPieceK = kInt4 ? 32 : 16;      // input channels per 16-byte load
  constexpr bool kGroups = kInt4 && kMode != ScaleMode::kPerChannel;
  // Zero points folded out of the weights (see the top): not where scales multiply the weights.
  constexpr bool kFold = kInt4 && kMode != ScaleMode::kGroupInWeight;
  // One token tile and at most two row tiles leave registers spare: see load_x and the
  // correction below. (With more, using them spilled.)
  constexpr bool kLean = NT == 1 && R <= 2;
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
  const int k = static_cast<int>(p.k);
  const int steps = (k + kStepK - 1) / kStepK;
  const int split_begin = static_cast<int>(split * steps_per_split);
  const int split_end = min(split_begin + static_cast<int>(steps_per_split), steps);
  const int per_warp = (split_end - split_begin + warps_k - 1) / warps_k;
  const int begin = split_begin + wk * per_warp;
  const int end = min(begin + per_warp, split_end);

  // A lane's piece c covers channels [step * 128 + 32 t + kPieceK c, + kPieceK): it exists for
  // step < piece_steps[c]. Only a K that is not a multiple of 128 leaves a lane pieces short in
  // the last step; such a piece is not loaded (its registers keep earlier, finite weights, which
  // multiply x's zeros there).
  int piece_steps[kPieces];
#pragma unroll
  for (int c = 0; c < kPieces; ++c) {
    const int first = 32 * t + kPieceK * c;  // channel of the piece in step 0
    piece_steps[c] = first + kPieceK <= k ? (k - first - kPieceK) / kStepK + 1 : 0;
  }

  // Rows g and g + 8 of each tile; rows past N re-read the last row (results dropped).
  const int64_t warp_row0 = tile * rows_per_block + wn * kRowsPerWarp;
  // Each row's offsets are computed once: weights in 16-byte units (weights < 64 GiB), scales
  // and zero points in elements, all 32-bit (the host checks the spans).
  const int lane_row0 = static_cast<int>(warp_row0) + g, last_row = static_cast<int>(p.n - 1);
  auto row_of = [&](int r, int h) { return min(lane_row0 + r * 16 + 8 * h, last_row); };
  const uint4* w16 = static_cast<const uint4*>(p.w);
  const uint32_t row_units = static_cast<uint32_t>(p.w_stride / (kInt4 ? 4 : 16));
  const S* scales = static_cast<const S*>(p.scales);
  const int s_stride_g = static_cast<int>(p.scale_stride_g), z_stride_g = static_cast<int>(p.zero_stride_g);
  uint32_t wrow[R][2];  // this lane's first 16-byte unit of each of its rows
  int srow[R][2];       // group modes: the row's first scale
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      wrow[r][h] = static_cast<uint32_t>(row_of(r, h)) * row_units + kPieces * t;
      srow[r][h] = row_of(r, h) * static_cast<int>(p.scale_stride_n);
    }
  // Zero points are rarer (asymmetric weights): their rows are recomputed, to save registers.
  auto zrow = [&](int r, int h) { return row_of(r, h) * static_cast<int>(p.zero_stride_n); };

  float acc[R][NT][4];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[r][j][c] = 0.f;

  // A tile's operands of one step: weights, and (group modes) each row's scale and zero point.
  // Zeroed once so that a piece never loaded (a K tail) holds finite bits.
  uint4 wq[R][2][kPieces];
  S gscale[R][2];
  u32 gzero[R][2];  // int4: the zero point, 0..16
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int c = 0; c < kPieces; ++c) wq[r][h][c] = make_uint4(0, 0, 0, 0);
      gscale[r][h] = S(0.f);
      gzero[r][h] = 8;
    }
  // Where a step's operands are, for every tile (computed once per step, not per tile). The
  // group is that of this lane's 32 channels (one group: see the top); a step past the lane's K
  // reads group 0 (its weights multiply zeros).
  struct At {
    int step, group;
    uint32_t unit;
  };
  auto at = [&](int step) {
    const int group = step < piece_steps[0] ? (step * kStepK + 32 * t) >> group_shift : 0;
    return At{step, group, static_cast<uint32_t>(step) * (kStepK / kPieceK)};
  };
  auto load_tile = [&](int r, const At& a) {
#pragma unroll
    for (int c = 0; c < kPieces; ++c)
      if (a.step < piece_steps[c]) {
#pragma unroll
        for (int h = 0; h < 2; ++h) wq[r][h][c] = load_weights(w16 + (wrow[r][h] + a.unit + c));
      }
    if (kGroups) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        gscale[r][h] = __ldg(scales + (srow[r][h] + a.group * s_stride_g));
        if (kZeros) gzero[r][h] = __ldg(p.zeros + (zrow(r, h) + a.group * z_stride_g));
      }
    }
  };
  // Per channel: the zero points are the same at every step, read once.
  if (kInt4 && !kGroups && kZeros) {
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int h = 0; h < 2; ++h) gzero[r][h] = __ldg(p.zeros + zrow(r, h));
  }
  // prefetch: a software pipeline without extra registers: as soon as a tile's operands are
  // consumed, its registers receive the next step's, so a step starts with all its loads long
  // in flight. Otherwise each step issues its loads and waits (a runtime switch, for tuning).
  if (prefetch && begin < end) {
#pragma unroll
    for (int r = 0; r < R; ++r) load_tile(r, at(begin));
  }
  // Only x and its scales come from quantize_rows: the weights above were free to go first, and
  // (under a programmatic launch) the next l2_steps steps go to L2 meanwhile: lane t takes steps
  // first + t, + 4, ..., one 128-byte row segment per row (the int8 step of a row).
  if constexpr (kPre != Prequant::kNone) {
    const int first = prefetch ? begin + 1 : begin, last = min(end, first + p.l2_steps);
    for (int step = first + t; step < last; step += 4) {
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int h = 0; h < 2; ++h) prefetch_l2(w16 + (wrow[r][h] - kPieces * t + step * (kStepK / kPieceK)));
    }
    wait_for_dependencies();
  }

  // x[token][step * 128 + 32 t, + 32) for tokens g and g + 8 (L1-cached: other warps read it
  // too); zeros past K. Where registers allow (kLean) it is loaded a step ahead, so that the
  // wait for it (often from L2) does not head every step's chain; elsewhere that spills (H100,
  // 14336 x 4096, 16 tokens: 22.7 -> 25.7 us).
  const T* x = static_cast<const T*>(p.x);
  auto load_x = [&](int step, u32(&xw)[NT][16]) {
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const int64_t tok = g + 8 * j;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        uint4 v = make_uint4(0, 0, 0, 0);
        if (tok < p.m && step < piece_steps[(8 * q) / kPieceK]) {
          const T* at_x = x + tok * p.x_stride + step * kStepK + 32 * t + 8 * q;
          v = kPre == Prequant::kNone ? __ldg(reinterpret_cast<const uint4*>(at_x)) : load_coherent(at_x);
        }
        xw[j][4 * q] = v.x, xw[j][4 * q + 1] = v.y, xw[j][4 * q + 2] = v.z, xw[j][4 * q + 3] = v.w;
      }
    }
  };
  u32 xw[NT][16];
  if (kLean && begin < end) load_x(begin, xw);
  for (int step = begin; step < end; ++step) {
    if (!prefetch) {
      const At now = at(step);
#pragma unroll
      for (int r = 0; r < R; ++r) load_tile(r, now);
    }
    const At next = at(step + 1);

    if (!kLean) load_x(step, xw);

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
    if (kLean && step + 1 < end) load_x(step + 1, xw);

    // Folded zero points: this step's -(magic + zero) * sum(x), per token, from the tensor cores
    // (the same B fragments against constant A rows). Rows g hold the lo/hi magics (symmetric:
    // plus the implicit zero 8, rows g + 8 alike); with zero points rows g + 8 hold -1 for
    // -sum(x), which each tile scales by its own zero point.
    float corr[NT][4];
    if (kFold) {
      constexpr u32 lo_g = (Tr::kNegMagicBits + (kZeros ? 0 : 8)) * 0x00010001u;
      constexpr u32 hi_g = (Tr::kNegMagicHiBits + (kZeros ? 0 : 8 * Tr::kHiZeroStep)) * 0x00010001u;
      constexpr u32 lo_g8 = kZeros ? Tr::kNegOne * 0x00010001u : lo_g, hi_g8 = kZeros ? lo_g8 : hi_g;
#pragma unroll
      for (int j = 0; j < NT; ++j) {
#pragma unroll
        for (int c = 0; c < 4; ++c) corr[j][c] = 0.f;
#pragma unroll
        for (int s = 0; s < 8; ++s) Tr::mma(corr[j], lo_g, lo_g8, hi_g, hi_g8, bf[j][s][0], bf[j][s][1]);
      }
    }

#pragma unroll
    for (int r = 0; r < R; ++r) {
      // The tile's group operands, taken out of the prefetch registers before they are refilled.
      u32 negz[2], negz64[2], scale2[2];
      float scale[2], fix[NT][4];
      if (kFold) {
        // The tile's correction: rows g, g + 8 x tokens 2t, 2t + 1 of each token tile.
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            fix[j][c] = corr[j][c & 1];
            if (kZeros) fix[j][c] = fmaf(static_cast<float>(gzero[r][c >> 1]), corr[j][2 + (c & 1)], fix[j][c]);
          }
      }
      if (kInt4) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          negz[h] = (Tr::kNegMagicBits + gzero[r][h]) * 0x00010001u;  // -(magic + zero), exact
          negz64[h] = (Tr::kNegMagic64Bits + 16 * gzero[r][h]) * 0x00010001u;  // fp16: -(64 + zero)
          if (kGroups) {
            scale[h] = to_float(gscale[r][h]);
            if (kMode == ScaleMode::kGroupInWeight) scale2[h] = Tr::splat(scale[h]);
          }
        }
      }
      // Groups of 128 sum the tile's step apart, to scale it; otherwise straight into acc.
      float part[NT][4];
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          if (kMode == ScaleMode::kGroupOfStep)
            part[j][c] = kFold && !kLean ? fix[j][c] : 0.f;
          else if (kFold)
            acc[r][j][c] += fix[j][c];
        }
      float(&sum)[NT][4] = kMode == ScaleMode::kGroupOfStep ? part : acc[r];
#pragma unroll
      for (int s = 0; s < 8; ++s) {
        u32 a[4];  // rows g, g + 8 at k (2t, 2t+1); rows g, g + 8 at k (2t+8, 2t+9)
        if (kFold) {
          // magic + u and magic_hi + u, as they are: the correction above removes the offsets.
          const int w = s / 2, sh = 8 * (s % 2);
          const u32 s0 = word(wq[r][0][0], w) >> sh, s1 = word(wq[r][1][0], w) >> sh;
          a[0] = nibbles_under<0x000F000Fu>(s0, Tr::kMagic);
          a[1] = nibbles_under<0x000F000Fu>(s1, Tr::kMagic);
          if (Tr::kHighNibbleInPlace) {
            a[2] = nibbles_under<0x00F000F0u>(s0, Tr::kMagicHi);
            a[3] = nibbles_under<0x00F000F0u>(s1, Tr::kMagicHi);
          } else {
            a[2] = nibbles_under<0x000F000Fu>(s0 >> 4, Tr::kMagicHi);
            a[3] = nibbles_under<0x000F000Fu>(s1 >> 4, Tr::kMagicHi);
          }
        } else if (kInt4) {
          const int w = s / 2, sh = 8 * (s % 2);
          const u32 q0 = word(wq[r][0][0], w), q1 = word(wq[r][1][0], w);
          const u32 s0 = q0 >> sh, s1 = q1 >> sh;
          a[0] = Tr::fma2(nibbles_under<0x000F000Fu>(s0, Tr::kMagic), Tr::kOne, negz[0]);
          a[1] = Tr::fma2(nibbles_under<0x000F000Fu>(s1, Tr::kMagic), Tr::kOne, negz[1]);
          // (1024 + 16 u) / 16 - (64 + zero). (Not with 16 tokens: there the B fragments leave
          // no register for it.)
          if (Tr::kHighNibbleInPlace && NT == 1) {
            a[2] = Tr::fma2(nibbles_under<0x00F000F0u>(s0, Tr::kMagic), Tr::kSixteenth, negz64[0]);
            a[3] = Tr::fma2(nibbles_under<0x00F000F0u>(s1, Tr::kMagic), Tr::kSixteenth, negz64[1]);
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
        } else if (kPre == Prequant::kE4M3) {
          const u32 q0 = word(wq[r][0][s / 4], s % 4), q1 = word(wq[r][1][s / 4], s % 4);
          a[0] = e4m3_pair(q0, 0);
          a[1] = e4m3_pair(q1, 0);
          a[2] = e4m3_pair(q0, 1);
          a[3] = e4m3_pair(q1, 1);
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
      if (prefetch && step + 1 < end) load_tile(r, next);
      // part[j]: (row g, tokens 2t, 2t+1), (row g + 8, tokens 2t, 2t+1) of token tile j.
      if (kMode == ScaleMode::kGroupOfStep) {
#pragma unroll
        for (int j = 0; j < NT; ++j) {
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            // kLean: the correction joins after the mma chain, not at its head.
            const float v = kFold && kLean ? part[j][c] + fix[j][c] : part[j][c];
            acc[r][j][c] = fmaf(v, scale[c >> 1], acc[r][j][c]);
          }
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
      store_out<O, kMode, kPre>(p, tok, row, v);
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
    store_out<O, kMode, kPre>(p, tok, row, v);
  }
  if (threadIdx.x == 0) p.counters[tile] = 0;  // every block of the tile has arrived: reusable
}

template <typename T, bool kInt4, int R, int NT, ScaleMode kMode, typename S, bool kZeros>
Status launch(const QuantGemvParams& p, const QuantGemvPlan& plan, int group_shift, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(plan.row_tiles * plan.splits));
  quant_gemv_kernel<T, kInt4, R, NT, kMode, S, kZeros><<<grid, kThreads, 0, stream>>>(
      p, plan.warps_n, plan.row_tiles, plan.steps_per_split, group_shift, plan.prefetch);
  LEPTON_RETURN_IF_CUDA_ERROR(cudaGetLastError());
  return Status::Ok();
}

// w8a8 / fp8: plan.pdl (the host has checked sm_90) launches the kernel as a programmatic
// dependent of quantize_rows (see QuantGemvPlan::pdl); CUDA graphs capture the dependency.
template <typename O, Prequant kPre, int R, int NT>
Status launch_prequant(const QuantGemvParams& p, const QuantGemvPlan& plan, cudaStream_t stream) {
  auto kernel = quant_gemv_kernel<__half, false, R, NT, ScaleMode::kPerChannel, float, false, O, kPre>;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(plan.row_tiles * plan.splits));
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = plan.pdl ? 1 : 0;
  LEPTON_RETURN_IF_CUDA_ERROR(cudaLaunchKernelEx(&config, kernel, p, plan.warps_n, plan.row_tiles,
                                                 plan.steps_per_split, 0, plan.prefetch));
  return Status::Ok();
}

// For quant_gemv_w8a8.cu and quant_gemv_fp8.cu (O: the output's dtype).
template <typename O, Prequant kPre>
Status launch_prequant_typed(const QuantGemvParams& p, const QuantGemvPlan& plan, cudaStream_t stream) {
  // The int8 tiles (see dispatch_tokens): 32 or 16 rows x 8 or 16 tokens.
  if (p.m <= 8) {
    if (plan.rows_per_warp == 32) return launch_prequant<O, kPre, 2, 1>(p, plan, stream);
    return launch_prequant<O, kPre, 1, 1>(p, plan, stream);
  }
  if (plan.rows_per_warp == 32) return launch_prequant<O, kPre, 2, 2>(p, plan, stream);
  return launch_prequant<O, kPre, 1, 2>(p, plan, stream);
}

template <typename T, bool kInt4, ScaleMode kMode, typename S, bool kZeros>
Status dispatch_tokens(const QuantGemvParams& p, const QuantGemvPlan& plan, int group_shift, cudaStream_t stream) {
  // Rows x tokens per warp (quant_gemv_rows_per_warp_choices): int4 64 or 32 x 8, 32 x 16; int8
  // (twice the bytes per row) 32 or 16 x 8 or 16.
  const int tiles = plan.rows_per_warp / 16;
  if (kInt4) {
    if (p.m > 8) return launch<T, kInt4, 2, 2, kMode, S, kZeros>(p, plan, group_shift, stream);
    if (tiles == 4) return launch<T, kInt4, 4, 1, kMode, S, kZeros>(p, plan, group_shift, stream);
    return launch<T, kInt4, 2, 1, kMode, S, kZeros>(p, plan, group_shift, stream);
  }
  if (p.m <= 8) {
    if (tiles == 2) return launch<T, kInt4, 2, 1, kMode, S, kZeros>(p, plan, group_shift, stream);
    return launch<T, kInt4, 1, 1, kMode, S, kZeros>(p, plan, group_shift, stream);
  }
  if (tiles == 2) return launch<T, kInt4, 2, 2, kMode, S, kZeros>(p, plan, group_shift, stream);
  return launch<T, kInt4, 1, 2, kMode, S, kZeros>(p, plan, group_shift, stream);
}

template <typename T, ScaleMode kMode, typename S>
Status dispatch_zeros(const QuantGemvParams& p, const QuantGemvPlan& plan, int group_shift, cudaStream_t stream) {
  if (p.zeros != nullptr) return dispatch_tokens<T, true, kMode, S, true>(p, plan, group_shift, stream);
  return dispatch_tokens<T, true, kMode, S, false>(p, plan, group_shift, stream);
}

// The group modes read scales in the loop: one kernel per scale dtype.
template <typename T, ScaleMode kMode>
Status dispatch_scales(const QuantGemvParams& p, const QuantGemvPlan& plan, int group_shift, cudaStream_t stream) {
  switch (p.scale_dtype) {
    case DType::kFloat16: return dispatch_zeros<T, kMode, __half>(p, plan, group_shift, stream);
    case DType::kBFloat16: return dispatch_zeros<T, kMode, __nv_bfloat16>(p, plan, group_shift, stream);
    default: return dispatch_zeros<T, kMode, float>(p, plan, group_shift, stream);
  }
}

// Instantiated in quant_gemv_f16.cu and quant_gemv_bf16.cu.
template <typename T>
Status launch_typed(const QuantGemvParams& p, const QuantGemvPlan& plan, cudaStream_t stream) {
  // Per channel, the scale is applied in the epilogue (any dtype); S is unused in the loop.
  if (!p.int4) return dispatch_tokens<T, false, ScaleMode::kPerChannel, float, false>(p, plan, 0, stream);
  if (p.group_size == -1) return dispatch_zeros<T, ScaleMode::kPerChannel, float>(p, plan, 0, stream);
  int shift = 0;
  while ((1 << shift) < p.group_size) ++shift;
  if (p.group_size == kStepK) return dispatch_scales<T, ScaleMode::kGroupOfStep>(p, plan, shift, stream);
  return dispatch_scales<T, ScaleMode::kGroupInWeight>(p, plan, shift, stream);
}

}  // namespace qgemv
}  // namespace lepton

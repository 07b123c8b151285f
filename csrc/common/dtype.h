// Element types the kernels understand. The numeric values are part of the Python binding
// (lepton_kernels/cuda/_dtypes.py mirrors them), so only append.
#pragma once
#include <cstdint>

namespace lepton {

enum class DType : int32_t {
  kFloat16 = 0,
  kBFloat16 = 1,
  kFloat32 = 2,
  kFloat8E4M3 = 3,
};

inline int dtype_size(DType t) {
  switch (t) {
    case DType::kFloat16: return 2;
    case DType::kBFloat16: return 2;
    case DType::kFloat32: return 4;
    case DType::kFloat8E4M3: return 1;
  }
  return 0;
}

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat32: return "float32";
    case DType::kFloat8E4M3: return "float8_e4m3fn";
  }
  return "unknown";
}

}  // namespace lepton

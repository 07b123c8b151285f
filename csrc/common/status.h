// Host-side error reporting shared by every launcher. Launchers never throw across the
// library boundary: they return a Status that the binding turns into a Python exception.
#pragma once
#include <string>
#include <utility>

namespace lepton {

struct Status {
  bool ok = true;
  std::string message;

  static Status Ok() { return {}; }
  static Status Error(std::string msg) { return {false, std::move(msg)}; }
};

}  // namespace lepton

#ifdef __CUDACC__
#include <cuda_runtime.h>
#define LEPTON_RETURN_IF_CUDA_ERROR(expr)                                                   \
  do {                                                                                      \
    cudaError_t err_ = (expr);                                                              \
    if (err_ != cudaSuccess)                                                                \
      return ::lepton::Status::Error(std::string(#expr " failed: ") + cudaGetErrorString(err_)); \
  } while (0)
#endif

// The only pybind11 file. Python passes raw pointers (as integers), sizes, strides and the
// stream handle; nothing here knows about torch, so the module works with any torch version.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#if LEPTON_WITH_CUDA
#include <cuda_runtime.h>

#include "common/device.h"
#include "paged/paged_kv_write.h"
#endif

namespace py = pybind11;

namespace {

#if LEPTON_WITH_CUDA
void throw_if_error(const lepton::Status& status) {
  if (!status.ok) throw std::runtime_error(status.message);
}

template <typename T>
T* as_ptr(uintptr_t address) { return reinterpret_cast<T*>(address); }

void paged_kv_write(uintptr_t k, uintptr_t v, uintptr_t k_cache, uintptr_t v_cache,
                    uintptr_t slot_mapping, uintptr_t k_scale, uintptr_t v_scale,
                    int64_t scale_head_stride, int64_t num_tokens, int64_t num_heads,
                    int64_t head_dim, int64_t block_size, std::vector<int64_t> k_strides,
                    std::vector<int64_t> v_strides, std::vector<int64_t> k_cache_strides,
                    std::vector<int64_t> v_cache_strides, int src_dtype, int cache_dtype,
                    uintptr_t stream) {
  if (k_strides.size() != 2 || v_strides.size() != 2 || k_cache_strides.size() != 3 ||
      v_cache_strides.size() != 3)
    throw std::invalid_argument("paged_kv_write: expected 2 strides for k/v and 3 for the caches");
  lepton::PagedKVWriteParams p;
  p.k = as_ptr<const void>(k);
  p.v = as_ptr<const void>(v);
  p.k_cache = as_ptr<void>(k_cache);
  p.v_cache = as_ptr<void>(v_cache);
  p.slot_mapping = as_ptr<const int64_t>(slot_mapping);
  p.k_scale = as_ptr<const float>(k_scale);
  p.v_scale = as_ptr<const float>(v_scale);
  p.scale_head_stride = scale_head_stride;
  p.num_tokens = num_tokens;
  p.num_heads = num_heads;
  p.head_dim = head_dim;
  p.block_size = block_size;
  p.k_stride_token = k_strides[0];
  p.k_stride_head = k_strides[1];
  p.v_stride_token = v_strides[0];
  p.v_stride_head = v_strides[1];
  p.kc_stride_block = k_cache_strides[0];
  p.kc_stride_offset = k_cache_strides[1];
  p.kc_stride_head = k_cache_strides[2];
  p.vc_stride_block = v_cache_strides[0];
  p.vc_stride_offset = v_cache_strides[1];
  p.vc_stride_head = v_cache_strides[2];
  p.src_dtype = static_cast<lepton::DType>(src_dtype);
  p.cache_dtype = static_cast<lepton::DType>(cache_dtype);
  throw_if_error(lepton::paged_kv_write(p, reinterpret_cast<cudaStream_t>(stream)));
}

py::dict device_info(int device) {
  lepton::DeviceInfo info;
  throw_if_error(lepton::query_device(device, &info));
  py::dict d;
  d["index"] = info.index;
  d["name"] = info.name;
  d["capability"] = py::make_tuple(info.major, info.minor);
  d["multiprocessors"] = info.multiprocessors;
  d["l2_bytes"] = info.l2_bytes;
  d["max_shared_per_block_optin"] = info.max_shared_per_block_optin;
  return d;
}
#endif

py::dict build_info() {
  py::dict d;
#if LEPTON_WITH_CUDA
  d["cuda"] = true;
  d["cuda_archs"] = std::string(LEPTON_CUDA_ARCHS_STR);
  d["cuda_version"] = std::string(LEPTON_CUDA_VERSION_STR);
  d["cuda_runtime_version"] = CUDART_VERSION;
  d["driver_version"] = lepton::driver_version();
#else
  d["cuda"] = false;
  d["reason"] = "the package was built without nvcc, so no CUDA kernels were compiled";
#endif
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lepton-kernels compiled kernels (raw pointers, sizes, strides and streams)";
  m.def("build_info", &build_info, "How this extension was built");
#if LEPTON_WITH_CUDA
  m.def("device_info", &device_info, py::arg("device"));
  m.def("paged_kv_write", &paged_kv_write, py::arg("k"), py::arg("v"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("slot_mapping"), py::arg("k_scale"), py::arg("v_scale"),
        py::arg("scale_head_stride"), py::arg("num_tokens"), py::arg("num_heads"),
        py::arg("head_dim"), py::arg("block_size"), py::arg("k_strides"), py::arg("v_strides"),
        py::arg("k_cache_strides"), py::arg("v_cache_strides"), py::arg("src_dtype"),
        py::arg("cache_dtype"), py::arg("stream"));
#endif
}

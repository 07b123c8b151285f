#include <cuda_runtime.h>

#include <vector>

#include "common/binding_util.h"
#include "paged/paged_kv_write.h"

namespace py = pybind11;

namespace lepton {
namespace {

void paged_kv_write_py(uintptr_t k, uintptr_t v, uintptr_t k_cache, uintptr_t v_cache,
                       uintptr_t slot_mapping, uintptr_t k_scale, uintptr_t v_scale,
                       int64_t scale_head_stride, int64_t num_tokens, int64_t num_heads,
                       int64_t head_dim, int64_t block_size, std::vector<int64_t> k_strides,
                       std::vector<int64_t> v_strides, std::vector<int64_t> k_cache_strides,
                       std::vector<int64_t> v_cache_strides, int src_dtype, int cache_dtype,
                       uintptr_t stream) {
  if (k_strides.size() != 2 || v_strides.size() != 2 || k_cache_strides.size() != 3 ||
      v_cache_strides.size() != 3)
    throw std::invalid_argument("paged_kv_write: expected 2 strides for k/v and 3 for the caches");
  PagedKVWriteParams p;
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
  p.src_dtype = static_cast<DType>(src_dtype);
  p.cache_dtype = static_cast<DType>(cache_dtype);
  throw_if_error(paged_kv_write(p, reinterpret_cast<cudaStream_t>(stream)));
}

}  // namespace

void bind_paged_kv_write(py::module_& m) {
  m.def("paged_kv_write", &paged_kv_write_py, py::arg("k"), py::arg("v"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("slot_mapping"), py::arg("k_scale"), py::arg("v_scale"),
        py::arg("scale_head_stride"), py::arg("num_tokens"), py::arg("num_heads"),
        py::arg("head_dim"), py::arg("block_size"), py::arg("k_strides"), py::arg("v_strides"),
        py::arg("k_cache_strides"), py::arg("v_cache_strides"), py::arg("src_dtype"),
        py::arg("cache_dtype"), py::arg("stream"));
}

}  // namespace lepton

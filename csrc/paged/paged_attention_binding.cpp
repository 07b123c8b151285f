#include <cuda_runtime.h>

#include <vector>

#include "common/binding_util.h"
#include "paged/paged_attention.h"

namespace py = pybind11;

namespace lepton {
namespace {

void paged_attention_decode_py(uintptr_t q, uintptr_t k_cache, uintptr_t v_cache, uintptr_t block_table,
                               uintptr_t seq_lens, uintptr_t k_scale, uintptr_t v_scale, int64_t scale_head_stride,
                               uintptr_t out, uintptr_t lse, uintptr_t ws_out, uintptr_t ws_lse,
                               std::vector<int64_t> sizes, int64_t num_splits, std::vector<int64_t> q_strides,
                               std::vector<int64_t> out_strides, std::vector<int64_t> lse_strides,
                               std::vector<int64_t> k_cache_strides, std::vector<int64_t> v_cache_strides,
                               std::vector<int64_t> block_table_strides, double softmax_scale, double softcap,
                               int64_t window_left, int q_dtype, int cache_dtype, uintptr_t stream) {
  if (sizes.size() != 5 || q_strides.size() != 2 || out_strides.size() != 2 || lse_strides.size() != 2 ||
      k_cache_strides.size() != 3 || v_cache_strides.size() != 3 || block_table_strides.size() != 2)
    throw std::invalid_argument(
        "paged_attention_decode: expected sizes (B, Hq, Hkv, D, block_size), 2 strides for q, out, lse and "
        "block_table, 3 for the caches");
  PagedDecodeParams p;
  p.q = as_ptr<const void>(q);
  p.k_cache = as_ptr<const void>(k_cache);
  p.v_cache = as_ptr<const void>(v_cache);
  p.block_table = as_ptr<const int32_t>(block_table);
  p.seq_lens = as_ptr<const int32_t>(seq_lens);
  p.k_scale = as_ptr<const float>(k_scale);
  p.v_scale = as_ptr<const float>(v_scale);
  p.scale_head_stride = scale_head_stride;
  p.out = as_ptr<void>(out);
  p.lse = as_ptr<float>(lse);
  p.ws_out = as_ptr<float>(ws_out);
  p.ws_lse = as_ptr<float>(ws_lse);
  p.batch = sizes[0];
  p.num_q_heads = sizes[1];
  p.num_kv_heads = sizes[2];
  p.head_dim = sizes[3];
  p.block_size = sizes[4];
  p.num_splits = num_splits;
  p.q_stride_b = q_strides[0];
  p.q_stride_h = q_strides[1];
  p.out_stride_b = out_strides[0];
  p.out_stride_h = out_strides[1];
  p.lse_stride_b = lse_strides[0];
  p.lse_stride_h = lse_strides[1];
  p.k_stride_block = k_cache_strides[0];
  p.k_stride_token = k_cache_strides[1];
  p.k_stride_head = k_cache_strides[2];
  p.v_stride_block = v_cache_strides[0];
  p.v_stride_token = v_cache_strides[1];
  p.v_stride_head = v_cache_strides[2];
  p.bt_stride_b = block_table_strides[0];
  p.bt_stride_j = block_table_strides[1];
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.softcap = static_cast<float>(softcap);
  p.window_left = window_left;
  p.q_dtype = static_cast<DType>(q_dtype);
  p.cache_dtype = static_cast<DType>(cache_dtype);
  throw_if_error(paged_attention_decode(p, reinterpret_cast<cudaStream_t>(stream)));
}

int paged_attention_decode_ctas_per_sm_py(int64_t head_dim, int cache_dtype) {
  int ctas = 0;
  throw_if_error(paged_attention_decode_ctas_per_sm(head_dim, static_cast<DType>(cache_dtype), &ctas));
  return ctas;
}

int paged_attention_decode_smem_bytes_py(int64_t head_dim, int cache_dtype) {
  int bytes = 0;
  throw_if_error(paged_attention_decode_smem_bytes(head_dim, static_cast<DType>(cache_dtype), &bytes));
  return bytes;
}

}  // namespace

void bind_paged_attention(py::module_& m) {
  m.def("paged_attention_decode", &paged_attention_decode_py, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("block_table"), py::arg("seq_lens"), py::arg("k_scale"), py::arg("v_scale"),
        py::arg("scale_head_stride"), py::arg("out"), py::arg("lse"), py::arg("ws_out"), py::arg("ws_lse"),
        py::arg("sizes"), py::arg("num_splits"), py::arg("q_strides"), py::arg("out_strides"),
        py::arg("lse_strides"), py::arg("k_cache_strides"), py::arg("v_cache_strides"),
        py::arg("block_table_strides"), py::arg("softmax_scale"), py::arg("softcap"), py::arg("window_left"),
        py::arg("q_dtype"), py::arg("cache_dtype"), py::arg("stream"));
  m.def("paged_attention_decode_ctas_per_sm", &paged_attention_decode_ctas_per_sm_py, py::arg("head_dim"),
        py::arg("cache_dtype"),
        "Resident decode CTAs per SM on the current device for this head dim and cache dtype");
  m.def("paged_attention_decode_smem_bytes", &paged_attention_decode_smem_bytes_py, py::arg("head_dim"),
        py::arg("cache_dtype"), "Dynamic shared memory of one decode CTA (bytes)");
}

}  // namespace lepton

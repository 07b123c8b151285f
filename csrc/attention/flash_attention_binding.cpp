#include <cuda_runtime.h>

#include <stdexcept>
#include <vector>

#include "attention/flash_fwd.h"
#include "attention/flash_fwd_sm90.h"
#include "common/binding_util.h"

namespace py = pybind11;

namespace lepton {
namespace {

// Strides come as [batch, seq, head] for q, k, v, out (batch 0 in a varlen call) and
// [batch, head, seq] for lse.
void flash_fwd_py(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse, uintptr_t cu_seqlens_q,
                  uintptr_t cu_seqlens_k, uintptr_t kv_lens, uintptr_t tile_counter, std::vector<int64_t> q_strides,
                  std::vector<int64_t> k_strides, std::vector<int64_t> v_strides, std::vector<int64_t> o_strides,
                  std::vector<int64_t> lse_strides, int batch, int num_heads_q, int num_heads_k, int head_dim,
                  int seqlen_q, int seqlen_k, int64_t total_q, int64_t total_k, double softmax_scale, double softcap, int window_left,
                  int window_right, int dtype, int kernel, uintptr_t stream) {
  for (const auto* s : {&q_strides, &k_strides, &v_strides, &o_strides, &lse_strides})
    if (s->size() != 3) throw std::invalid_argument("flash_fwd: expected 3 strides per tensor");
  FlashFwdParams p;
  p.q = as_ptr<const void>(q);
  p.k = as_ptr<const void>(k);
  p.v = as_ptr<const void>(v);
  p.out = as_ptr<void>(out);
  p.lse = as_ptr<float>(lse);
  p.cu_seqlens_q = as_ptr<const int32_t>(cu_seqlens_q);
  p.cu_seqlens_k = as_ptr<const int32_t>(cu_seqlens_k);
  p.kv_lens = as_ptr<const int32_t>(kv_lens);
  p.tile_counter = as_ptr<int32_t>(tile_counter);
  p.q_stride_b = q_strides[0], p.q_stride_s = q_strides[1], p.q_stride_h = q_strides[2];
  p.k_stride_b = k_strides[0], p.k_stride_s = k_strides[1], p.k_stride_h = k_strides[2];
  p.v_stride_b = v_strides[0], p.v_stride_s = v_strides[1], p.v_stride_h = v_strides[2];
  p.o_stride_b = o_strides[0], p.o_stride_s = o_strides[1], p.o_stride_h = o_strides[2];
  p.lse_stride_b = lse_strides[0], p.lse_stride_h = lse_strides[1], p.lse_stride_s = lse_strides[2];
  p.batch = batch;
  p.num_heads_q = num_heads_q;
  p.num_heads_k = num_heads_k;
  p.head_dim = head_dim;
  p.seqlen_q = seqlen_q;
  p.seqlen_k = seqlen_k;
  p.total_q = total_q;
  p.total_k = total_k;
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.softcap = static_cast<float>(softcap);
  p.window_left = window_left;
  p.window_right = window_right;
  p.dtype = static_cast<DType>(dtype);
  if (kernel < 0 || kernel > 2) throw std::invalid_argument("flash_fwd: kernel must be 0 (auto), 1 (mma.sync) or 2 (sm_90a)");
  p.kernel = static_cast<FlashKernel>(kernel);
  throw_if_error(flash_fwd(p, reinterpret_cast<cudaStream_t>(stream)));
}

}  // namespace

void bind_flash_attention(py::module_& m) {
  m.def("flash_fwd", &flash_fwd_py, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"),
        py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("kv_lens"), py::arg("tile_counter"), py::arg("q_strides"),
        py::arg("k_strides"), py::arg("v_strides"), py::arg("o_strides"), py::arg("lse_strides"), py::arg("batch"),
        py::arg("num_heads_q"), py::arg("num_heads_k"), py::arg("head_dim"), py::arg("seqlen_q"),
        py::arg("seqlen_k"), py::arg("total_q"), py::arg("total_k"), py::arg("softmax_scale"), py::arg("softcap"), py::arg("window_left"),
        py::arg("window_right"), py::arg("dtype"), py::arg("kernel"), py::arg("stream"));
  // Why the sm_90a kernel cannot run a call of this head dim and dtype on the current device
  // ("" if it can).
  m.def("flash_fwd_sm90_unsupported", [](int head_dim, int dtype) {
    FlashFwdParams p;
    p.head_dim = head_dim;
    p.dtype = static_cast<DType>(dtype);
    return flash_fwd_sm90_unsupported(p);
  }, py::arg("head_dim"), py::arg("dtype"));
  m.def("flash_fwd_head_dims", [] {
    std::vector<int> dims;
    for (int d : {64, 80, 96, 128, 192, 256})
      if (flash_fwd_supports_head_dim(d)) dims.push_back(d);
    return dims;
  });
}

}  // namespace lepton

#include <cuda_runtime.h>

#include "common/binding_util.h"
#include "quant/quant_gemv.h"

namespace py = pybind11;

namespace lepton {
namespace {

// Pointers arrive as integers (0 for an absent tensor); strides in elements of each tensor.
void quant_gemv_py(uintptr_t x, int64_t x_stride, uintptr_t w, int64_t w_stride, uintptr_t scales,
                   int64_t scale_stride_n, int64_t scale_stride_g, int scale_dtype, uintptr_t zeros,
                   int64_t zero_stride_n, int64_t zero_stride_g, uintptr_t bias, int64_t bias_stride,
                   uintptr_t out, int64_t out_stride, uintptr_t workspace, uintptr_t counters, int64_t m,
                   int64_t n, int64_t k, int group_size, bool int4, int dtype, int warps_n,
                   int64_t row_tiles, int splits, int64_t steps_per_split, bool prefetch, uintptr_t stream,
                   uintptr_t x_scales, bool fp8, bool pdl, int l2_steps, int rows_per_warp) {
  QuantGemvParams p;
  p.x = as_ptr<const void>(x);
  p.x_stride = x_stride;
  p.w = as_ptr<const void>(w);
  p.w_stride = w_stride;
  p.scales = as_ptr<const void>(scales);
  p.scale_stride_n = scale_stride_n;
  p.scale_stride_g = scale_stride_g;
  p.scale_dtype = static_cast<DType>(scale_dtype);
  p.zeros = as_ptr<const uint8_t>(zeros);
  p.zero_stride_n = zero_stride_n;
  p.zero_stride_g = zero_stride_g;
  p.bias = as_ptr<const void>(bias);
  p.bias_stride = bias_stride;
  p.out = as_ptr<void>(out);
  p.out_stride = out_stride;
  p.workspace = as_ptr<float>(workspace);
  p.counters = as_ptr<int>(counters);
  p.m = m;
  p.n = n;
  p.k = k;
  p.group_size = group_size;
  p.int4 = int4;
  p.dtype = static_cast<DType>(dtype);
  p.x_scales = as_ptr<const float>(x_scales);
  p.fp8 = fp8;
  QuantGemvPlan plan;
  plan.warps_n = warps_n;
  plan.row_tiles = row_tiles;
  plan.splits = splits;
  plan.steps_per_split = steps_per_split;
  plan.prefetch = prefetch;
  plan.pdl = pdl;
  plan.l2_steps = l2_steps;
  plan.rows_per_warp = rows_per_warp;
  throw_if_error(quant_gemv(p, plan, reinterpret_cast<cudaStream_t>(stream)));
}

void quantize_rows_py(uintptr_t x, int64_t x_stride, int dtype, uintptr_t xq, uintptr_t scales, int64_t m,
                      int64_t k, bool fp8, uintptr_t stream) {
  QuantizeRowsParams p;
  p.x = as_ptr<const void>(x);
  p.x_stride = x_stride;
  p.dtype = static_cast<DType>(dtype);
  p.xq = as_ptr<void>(xq);
  p.scales = as_ptr<float>(scales);
  p.m = m;
  p.k = k;
  p.fp8 = fp8;
  throw_if_error(quantize_rows(p, reinterpret_cast<cudaStream_t>(stream)));
}

}  // namespace

void bind_quant_gemv(py::module_& m) {
  m.def("quant_gemv", &quant_gemv_py, py::arg("x"), py::arg("x_stride"), py::arg("w"), py::arg("w_stride"),
        py::arg("scales"), py::arg("scale_stride_n"), py::arg("scale_stride_g"), py::arg("scale_dtype"),
        py::arg("zeros"), py::arg("zero_stride_n"), py::arg("zero_stride_g"), py::arg("bias"),
        py::arg("bias_stride"), py::arg("out"), py::arg("out_stride"), py::arg("workspace"),
        py::arg("counters"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("group_size"), py::arg("int4"),
        py::arg("dtype"), py::arg("warps_n"), py::arg("row_tiles"), py::arg("splits"),
        py::arg("steps_per_split"), py::arg("prefetch"), py::arg("stream"), py::arg("x_scales") = 0,
        py::arg("fp8") = false, py::arg("pdl") = false, py::arg("l2_steps") = 0, py::arg("rows_per_warp") = 0);
  m.def("quantize_rows", &quantize_rows_py, py::arg("x"), py::arg("x_stride"), py::arg("dtype"), py::arg("xq"),
        py::arg("scales"), py::arg("m"), py::arg("k"), py::arg("fp8"), py::arg("stream"));
  m.attr("QUANT_GEMV_MAX_M") = kQuantGemvMaxM;
}

}  // namespace lepton

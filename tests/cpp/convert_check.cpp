// Exposes fused_rnn::cpu::narrow_to for tests/test_cpu_convert.py as the op
// fused_rnn_convert::to_bfloat16(float tensor) -> bfloat16 tensor.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "fused_rnn/cpu_convert.h"

namespace {

at::Tensor to_bfloat16(const at::Tensor& x) {
  const at::Tensor in = x.contiguous();
  at::Tensor out = at::empty(in.sizes(), in.options().dtype(at::kBFloat16));
  const float* src = in.data_ptr<float>();
  c10::BFloat16* dst = out.data_ptr<c10::BFloat16>();
  for (int64_t i = 0; i < in.numel(); ++i) {
    dst[i] = fused_rnn::cpu::narrow_to<c10::BFloat16>(src[i]);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(fused_rnn_convert, m) { m.def("to_bfloat16(Tensor x) -> Tensor", &to_bfloat16); }

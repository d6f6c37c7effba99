// The op schemas of fused_rnn and the (empty) Python module whose import runs
// the kernel registrations. Each backend registers its kernels next to them
// (csrc/sequence/*.cpp for CPU and CUDA).
//
// Every op runs one layer in one direction over a whole sequence (the _pair
// ops: both directions of a bidirectional layer). `input` is
// (T, B, I) time-major, or packed (N, I) with `batch_sizes` (T,) an int64 CPU
// tensor as in torch.nn.utils.rnn.PackedSequence. `reverse` walks the
// sequence from its end (the reverse direction of a bidirectional layer).
// `train` makes the forward return the workspaces its backward needs; they
// are empty tensors of shape [0] otherwise. A backward returns an empty
// tensor for a gradient it was told not to compute (input_grad, has_bias,
// no projection).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Built with Py_LIMITED_API: one binary serves every CPython 3.10+.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "fused_rnn kernels (importing registers them)",
      -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fused_rnn, m) {
  m.def(
      "lstm_forward(Tensor input, Tensor hx, Tensor cx, Tensor w_ih, "
      "Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, "
      "Tensor? batch_sizes, bool reverse, bool train) -> "
      "(Tensor output, Tensor hy, Tensor cy, Tensor gates, Tensor cells)");
  m.def(
      "lstm_backward(Tensor grad_output, Tensor grad_hy, Tensor grad_cy, "
      "Tensor input, Tensor hx, Tensor cx, Tensor w_ih, Tensor w_hh, "
      "Tensor? w_hr, Tensor output, Tensor gates, Tensor cells, "
      "Tensor? batch_sizes, bool reverse, bool has_bias, bool input_grad) -> "
      "(Tensor grad_input, Tensor grad_hx, Tensor grad_cx, Tensor grad_w_ih, "
      "Tensor grad_w_hh, Tensor grad_bias, Tensor grad_w_hr)");
  m.def(
      "gru_forward(Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, "
      "Tensor? b_ih, Tensor? b_hh, Tensor? batch_sizes, bool reverse, "
      "bool train) -> (Tensor output, Tensor hy, Tensor gates, "
      "Tensor hidden_n)");
  m.def(
      "gru_backward(Tensor grad_output, Tensor grad_hy, Tensor input, "
      "Tensor hx, Tensor w_ih, Tensor w_hh, Tensor output, Tensor gates, "
      "Tensor hidden_n, Tensor? batch_sizes, bool reverse, bool has_bias, "
      "bool input_grad) -> (Tensor grad_input, Tensor grad_hx, "
      "Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b_ih, "
      "Tensor grad_b_hh)");
  m.def(
      "rnn_forward(Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, "
      "Tensor? b_ih, Tensor? b_hh, Tensor? batch_sizes, bool reverse, "
      "bool relu) -> (Tensor output, Tensor hy)");
  m.def(
      "rnn_backward(Tensor grad_output, Tensor grad_hy, Tensor input, "
      "Tensor hx, Tensor w_ih, Tensor w_hh, Tensor output, "
      "Tensor? batch_sizes, bool reverse, bool relu, bool has_bias, "
      "bool input_grad) -> (Tensor grad_input, Tensor grad_hx, "
      "Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_bias)");
  // Both directions of a bidirectional layer in one op: the forward
  // direction's arguments, then the reverse direction's (suffix _r), over
  // the same input; the outputs of each direction's op, forward's first.
  // On CUDA both recurrences share one launch where the persistent kernels
  // take the pair. The backward ops return one grad_input (the sum of both
  // directions').
  m.def(
      "lstm_forward_pair(Tensor input, Tensor hx, Tensor cx, Tensor w_ih, Tensor w_hh, "
      "Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, Tensor hx_r, Tensor cx_r, Tensor w_ih_r, "
      "Tensor w_hh_r, Tensor? b_ih_r, Tensor? b_hh_r, Tensor? w_hr_r, Tensor? batch_sizes, "
      "bool train) -> (Tensor output, Tensor hy, Tensor cy, Tensor gates, Tensor cells, "
      "Tensor output_r, Tensor hy_r, Tensor cy_r, Tensor gates_r, Tensor cells_r)");
  m.def(
      "lstm_backward_pair(Tensor grad_output, Tensor grad_hy, Tensor grad_cy, "
      "Tensor grad_output_r, Tensor grad_hy_r, Tensor grad_cy_r, Tensor input, Tensor hx, "
      "Tensor cx, Tensor w_ih, Tensor w_hh, Tensor? w_hr, Tensor output, Tensor gates, "
      "Tensor cells, Tensor hx_r, Tensor cx_r, Tensor w_ih_r, Tensor w_hh_r, Tensor? w_hr_r, "
      "Tensor output_r, Tensor gates_r, Tensor cells_r, Tensor? batch_sizes, bool has_bias, "
      "bool input_grad) -> (Tensor grad_input, Tensor grad_hx, Tensor grad_cx, "
      "Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_bias, Tensor grad_w_hr, "
      "Tensor grad_hx_r, Tensor grad_cx_r, Tensor grad_w_ih_r, Tensor grad_w_hh_r, "
      "Tensor grad_bias_r, Tensor grad_w_hr_r)");
  m.def(
      "gru_forward_pair(Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh, Tensor hx_r, Tensor w_ih_r, Tensor w_hh_r, Tensor? b_ih_r, "
      "Tensor? b_hh_r, Tensor? batch_sizes, bool train) -> (Tensor output, Tensor hy, "
      "Tensor gates, Tensor hidden_n, Tensor output_r, Tensor hy_r, Tensor gates_r, "
      "Tensor hidden_n_r)");
  m.def(
      "gru_backward_pair(Tensor grad_output, Tensor grad_hy, Tensor grad_output_r, "
      "Tensor grad_hy_r, Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor output, "
      "Tensor gates, Tensor hidden_n, Tensor hx_r, Tensor w_ih_r, Tensor w_hh_r, "
      "Tensor output_r, Tensor gates_r, Tensor hidden_n_r, Tensor? batch_sizes, "
      "bool has_bias, bool input_grad) -> (Tensor grad_input, Tensor grad_hx, "
      "Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b_ih, Tensor grad_b_hh, "
      "Tensor grad_hx_r, Tensor grad_w_ih_r, Tensor grad_w_hh_r, Tensor grad_b_ih_r, "
      "Tensor grad_b_hh_r)");
  m.def(
      "rnn_forward_pair(Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh, Tensor hx_r, Tensor w_ih_r, Tensor w_hh_r, Tensor? b_ih_r, "
      "Tensor? b_hh_r, Tensor? batch_sizes, bool relu) -> (Tensor output, Tensor hy, "
      "Tensor output_r, Tensor hy_r)");
  m.def(
      "rnn_backward_pair(Tensor grad_output, Tensor grad_hy, Tensor grad_output_r, "
      "Tensor grad_hy_r, Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor output, "
      "Tensor hx_r, Tensor w_ih_r, Tensor w_hh_r, Tensor output_r, Tensor? batch_sizes, "
      "bool relu, bool has_bias, bool input_grad) -> (Tensor grad_input, Tensor grad_hx, "
      "Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_bias, Tensor grad_hx_r, "
      "Tensor grad_w_ih_r, Tensor grad_w_hh_r, Tensor grad_bias_r)");
}

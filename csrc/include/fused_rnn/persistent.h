// The persistent whole-sequence CUDA kernels, as the sequence drivers
// (csrc/sequence/) call them, and the choice between them and the general
// per-step path.
//
// One cooperative launch runs every step of one layer in one direction:
// block k owns hidden units [k*J, (k+1)*J) and keeps the W_hh rows of those
// units (forward) or the W_hh columns (backward, W_hh^T) in shared memory
// for the whole sequence; per step it reads the full previous state (or the
// full gradient of the next step's pre-activations), multiplies, applies the
// cell math of cells.h to its units, writes them, and the grid meets at one
// barrier. The stepwise mode runs the same code one step per launch, the
// blocks' weight slices packed once into global memory. Packed sequences
// run in both: the rows of each step come from a table copied to the device
// with the cooperative launch, or with each stepwise launch. Both directions
// of a bidirectional layer may share one launch (the _pair entry points),
// each on half of the SMs. No projection: an LSTM with proj_size gives them
// its recurrence folded (lstm.cpp's fold_projection), a plain LSTM.
//
// Shape legend (every tensor contiguous, time-major, rows of step t at
// t*B .. t*B+B-1):
//   T  steps;  B  batch;  H  hidden size;  G  gates (LSTM 4, GRU 3, RNN 1)
// An argument documented as "may be undefined" is skipped when undefined.
#pragma once

#include <ATen/core/Tensor.h>

#include <initializer_list>
#include <string>
#include <vector>

#include "fused_rnn/graphs.h"

namespace fused_rnn {

// Which CUDA kernels the ops run. kPersistent: one cooperative launch for
// the whole sequence, the weights on chip. kStepwise: the same kernels, one
// ordinary launch per step, the weights read from global memory (L2): no
// limit on the hidden size and no co-residency needed. kGeneral: per step a
// cuBLAS GEMM and a fused pointwise kernel. The default kAuto takes the
// persistent kernels where they fit on chip and are expected to win, the
// stepwise ones where the persistent grid cannot be co-resident, the
// general path otherwise; a forced kPersistent takes them wherever they fit
// (stepwise when the grid cannot be co-resident at the call), kStepwise
// wherever it applies. Set with the op set_kernel_path or the environment
// variable FUSED_RNN_KERNEL_PATH (auto | persistent | stepwise | general),
// read at the first call.
enum class KernelPath { kAuto = 0, kPersistent = 1, kGeneral = 2, kStepwise = 3 };
KernelPath requested_kernel_path();
void set_requested_kernel_path(KernelPath path);
KernelPath parse_kernel_path(const std::string& name);
const char* kernel_path_name(KernelPath path);

enum class PersistentCell { kLstm = 0, kGru = 1, kRnnTanh = 2, kRnnRelu = 3 };

struct PersistentForward {
  PersistentCell cell = PersistentCell::kLstm;
  int64_t steps = 0, batch = 0;  // T, B
  bool reverse = false;          // walk t = T-1 .. 0
  // Packed input: the rows of each time step,
  // non-increasing, with batch = batch_sizes[0]; then every (T*B, *) below
  // is (N, *), N = sum(batch_sizes). Empty for dense input.
  std::vector<int64_t> batch_sizes;
  at::Tensor xw;       // (T*B, G*H) in: x_t @ W_ih^T (no bias); out, when
                       //            keep_gates: the activated gates (LSTM
                       //            i,f,g,o; GRU r,z,n)
  bool keep_gates = false;
  at::Tensor bias;     // (G*H) b_ih + b_hh (LSTM, RNN) or b_ih (GRU); may be undefined
  at::Tensor bias_hh;  // (G*H) GRU's b_hh; undefined exactly when bias is
  at::Tensor w_hh;     // (G*H, H)
  at::Tensor hx;       // (B, H)
  at::Tensor cx;       // (B, H) LSTM
  at::Tensor out;      // (T*B, H) out: h_t
  at::Tensor hy;       // (B, H)  out: h of the last processed step
  at::Tensor cy;       // (B, H)  out: LSTM's c of the last processed step
  at::Tensor cells;    // (T*B, H) out: LSTM's c_t, kept for backward; may be undefined
  at::Tensor hn;       // (T*B, H) out: GRU's W_hn h_{t-1} + b_hn; may be undefined
};

struct PersistentBackward {
  PersistentCell cell = PersistentCell::kLstm;
  int64_t steps = 0, batch = 0;
  bool reverse = false;
  std::vector<int64_t> batch_sizes;  // packed input, as PersistentForward's
  at::Tensor w_hh;      // (G*H, H)
  at::Tensor grad_out;  // (T*B, H) gradient of the output
  at::Tensor grad_hy;   // (B, H)
  at::Tensor grad_cy;   // (B, H) LSTM
  at::Tensor out;       // (T*B, H) the forward's output (GRU, RNN)
  at::Tensor hx;        // (B, H) GRU
  at::Tensor cx;        // (B, H) LSTM
  at::Tensor gates;     // (T*B, G*H) activated gates (LSTM, GRU)
  at::Tensor cells;     // (T*B, H) LSTM's c_t
  at::Tensor hn;        // (T*B, H) GRU's W_hn h_{t-1} + b_hn
  at::Tensor dgates;    // (T*B, G*H) out: gradients of the pre-activations
                        //            (GRU: of W_ih x + b_ih)
  at::Tensor dgates_h;  // (T*B, 3H) out: GRU's gradients of W_hh h_{t-1} + b_hh
  at::Tensor grad_hx;   // (B, H) out
  at::Tensor grad_cx;   // (B, H) out: LSTM
};

// f(tensor, role) for every tensor of a request, in a fixed order, with
// what the kernels do with it (graphs.h): the stepwise launches hand them to
// run_loop, and rebind a copy of the request to the tensors the loop is
// given by the same visit. The tensors are passed by reference.
template <typename F>
void for_each_tensor(PersistentForward& r, F&& f) {
  // keep_gates: the kernels write the activated gates over x_t W_ih^T
  f(r.xw, r.keep_gates ? LoopRole::kInOut : LoopRole::kIn);
  for (at::Tensor* in : {&r.bias, &r.bias_hh, &r.w_hh, &r.hx, &r.cx}) f(*in, LoopRole::kIn);
  for (at::Tensor* out : {&r.out, &r.hy, &r.cy, &r.cells, &r.hn}) f(*out, LoopRole::kOut);
}
template <typename F>
void for_each_tensor(PersistentBackward& r, F&& f) {
  for (at::Tensor* in : {&r.w_hh, &r.grad_out, &r.grad_hy, &r.grad_cy, &r.out, &r.hx, &r.cx,
                         &r.gates, &r.cells, &r.hn}) {
    f(*in, LoopRole::kIn);
  }
  for (at::Tensor* out : {&r.dgates, &r.dgates_h, &r.grad_hx, &r.grad_cx}) {
    f(*out, LoopRole::kOut);
  }
}

namespace cuda {
// Which kernels take a shape on a device (kPersistent, kStepwise or
// kGeneral), and why.
struct PathChoice {
  KernelPath path = KernelPath::kGeneral;
  std::string reason;
  int directions = 1;  // in one launch (2: both directions of a layer)
};
}  // namespace cuda

#if defined(FUSED_RNN_WITH_CUDA)
namespace cuda {

// The choice on the current device; its reason only when `explain` (an
// op's own call needs just the path).
PathChoice choose_path(PersistentCell cell, int64_t hidden, int64_t batch,
                       at::ScalarType dtype, bool packed, bool proj, bool backward,
                       bool bidirectional = false, bool explain = true);

// Run the persistent kernel when choose_path takes the shape and the grid
// can be co-resident now, else the stepwise launches where they apply;
// return false (nothing launched, nothing written) when the choice is the
// general path, which the caller then runs.
bool persistent_forward(const PersistentForward& args);
bool persistent_backward(const PersistentBackward& args);
// Both directions of a bidirectional layer (the same cell, shapes, dtype
// and batch_sizes; a.reverse false, b.reverse true) in one launch, each on
// half of the SMs, where the plan for the pair takes the persistent or the
// stepwise kernels; false, nothing launched, otherwise: the caller then
// runs each direction on its own (persistent_forward, or the general path).
// FUSED_RNN_BIDIRECTIONAL=separate (read once; default auto) declines every
// pair, for comparison.
bool persistent_forward_pair(const PersistentForward& a, const PersistentForward& b);
bool persistent_backward_pair(const PersistentBackward& a, const PersistentBackward& b);

}  // namespace cuda
#endif

}  // namespace fused_rnn

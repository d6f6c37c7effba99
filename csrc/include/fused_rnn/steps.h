// One time step's fused pointwise pass of each cell: the part of a step that
// is not a matrix product. The sequence drivers (csrc/sequence/) call these
// between the per-step GEMMs; csrc/cpu/ and csrc/cuda/ implement them with
// the cell math of cells.h.
//
// Shape legend (every tensor is a contiguous row-major view):
//   B  rows (sequences) active at this step
//   H  hidden size (the cell state's size for LSTM)
// An argument documented as "may be undefined" is skipped when undefined.
#pragma once

#include <ATen/core/Tensor.h>

namespace fused_rnn {

struct LstmForwardStep {
  at::Tensor gates;   // (B, 4H) in: pre-activations; out: activated i, f, g, o
  at::Tensor c;       // (B, H)  in: c_{t-1}; out: c_t (the running cell state)
  at::Tensor cells;   // (B, H)  out: c_t kept for backward; may be undefined
  at::Tensor h;       // (B, H)  out: h_t = o * tanh(c_t), before any projection
  at::Tensor h_copy;  // (B, H)  out: a second copy of h_t; may be undefined
};

struct LstmBackwardStep {
  at::Tensor gates;     // (B, 4H) activated i, f, g, o of this step
  at::Tensor cells;     // (B, H)  c_t
  at::Tensor c_prev;    // (B, H)  c_{t-1}
  at::Tensor dh;        // (B, H)  gradient of h_t (before projection)
  at::Tensor dh_extra;  // (B, H)  a second gradient of h_t, added; may be undefined
  at::Tensor dc;        // (B, H)  in: gradient of c_t from step t+1; out: of c_{t-1}
  at::Tensor dgates;    // (B, 4H) out: gradients of the pre-activations
};

struct GruForwardStep {
  at::Tensor gates;   // (B, 3H) in: W_ih x + b_ih; out: activated r, z, n
  at::Tensor hgates;  // (B, 3H) W_hh h_{t-1} + b_hh
  at::Tensor h;       // (B, H)  in: h_{t-1}; out: h_t (the running state)
  at::Tensor out;     // (B, H)  out: h_t
  at::Tensor hn;      // (B, H)  out: the n part of hgates, for backward; may be undefined
};

struct GruBackwardStep {
  at::Tensor gates;     // (B, 3H) activated r, z, n
  at::Tensor hn;        // (B, H)  the n part of W_hh h_{t-1} + b_hh
  at::Tensor h_prev;    // (B, H)  h_{t-1}
  at::Tensor dh;        // (B, H)  in: gradient of h_t; out: z * that (the direct part of dh_{t-1})
  at::Tensor dh_extra;  // (B, H)  a second gradient of h_t, added; may be undefined
  at::Tensor dgates_x;  // (B, 3H) out: gradients of W_ih x + b_ih
  at::Tensor dgates_h;  // (B, 3H) out: gradients of W_hh h_{t-1} + b_hh
};

struct RnnForwardStep {
  at::Tensor pre;   // (B, H) W_ih x + b_ih + W_hh h_{t-1} + b_hh
  at::Tensor out;   // (B, H) out: h_t
  at::Tensor h;     // (B, H) out: h_t again (the running state)
  bool relu;
};

struct RnnBackwardStep {
  at::Tensor out;       // (B, H) h_t
  at::Tensor dh;        // (B, H) gradient of h_t
  at::Tensor dh_extra;  // (B, H) a second gradient of h_t, added; may be undefined
  at::Tensor dpre;      // (B, H) out: gradient of the pre-activation
  bool relu;
};

namespace cpu {
void lstm_forward_step(const LstmForwardStep& s);
void lstm_backward_step(const LstmBackwardStep& s);
void gru_forward_step(const GruForwardStep& s);
void gru_backward_step(const GruBackwardStep& s);
void rnn_forward_step(const RnnForwardStep& s);
void rnn_backward_step(const RnnBackwardStep& s);
}  // namespace cpu

#if defined(FUSED_RNN_WITH_CUDA)
namespace cuda {
void lstm_forward_step(const LstmForwardStep& s);
void lstm_backward_step(const LstmBackwardStep& s);
void gru_forward_step(const GruForwardStep& s);
void gru_backward_step(const GruBackwardStep& s);
void rnn_forward_step(const RnnForwardStep& s);
void rnn_backward_step(const RnnBackwardStep& s);
}  // namespace cuda
#endif

}  // namespace fused_rnn

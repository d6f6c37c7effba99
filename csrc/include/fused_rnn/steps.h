// One time step of each cell, as the sequence drivers (csrc/sequence/) call
// it; csrc/cpu/ and csrc/cuda/ implement them with the cell math of cells.h.
// A forward step is the recurrent GEMM (h_{t-1} @ W_hh^T) and the fused
// pointwise pass; a backward step is the pointwise pass only (the driver
// then multiplies by W_hh). The GEMMs are GemmWeight products (gemm.h:
// fused_rnn's packed kernel for float32 on CPUs with AVX-512, else ATen's
// mm: the BLAS on the CPU, cuBLAS on CUDA), then one fused pointwise pass
// (CPU: parallel over rows, vectorised; CUDA: one kernel).
//
// Shape legend (every tensor is a contiguous row-major view):
//   B  rows (sequences) active at this step
//   H  hidden size (the cell state's size for LSTM)
// An argument documented as "may be undefined" is skipped when undefined.
#pragma once

#include <ATen/core/Tensor.h>

#include "fused_rnn/gemm.h"

namespace fused_rnn {

struct LstmForwardStep {
  at::Tensor gates;   // (B, 4H) in: W_ih x (no bias); out, when cells is given
                      //         (training): activated i, f, g, o
  at::Tensor bias;    // (4H)    b_ih + b_hh; may be undefined
  at::Tensor h_prev;  // (B, P)  h_{t-1}
  const GemmWeight& w_hh;  // W_hh (4H, P), for h_{t-1} @ W_hh^T
  at::Tensor c;       // (B, H)  in: c_{t-1}; out: c_t (the running cell state)
  at::Tensor cells;   // (B, H)  out: c_t kept for backward; may be undefined
  at::Tensor h;       // (B, H)  out: h_t = o * tanh(c_t), before any projection;
                      //         never h_prev's memory
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
  at::Tensor gates;   // (B, 3H) in: W_ih x (no bias); out, when hn is given
                      //         (training): activated r, z, n
  at::Tensor b_ih;    // (3H)    may be undefined (then b_hh is too)
  at::Tensor b_hh;    // (3H)
  at::Tensor h_prev;  // (B, H)  h_{t-1}
  const GemmWeight& w_hh;  // W_hh (3H, H), for h_{t-1} @ W_hh^T
  at::Tensor out;     // (B, H)  out: h_t; never h_prev's memory
  at::Tensor hn;      // (B, H)  out: W_hn h_{t-1} + b_hn, for backward; may be undefined
  at::Tensor scratch; // (>= B * 3H) workspace for W_hh h_{t-1}, kept apart from the
                      //         input projection (r multiplies only its n part)
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
  at::Tensor pre;     // (B, H) in: W_ih x (no bias); overwritten
  at::Tensor bias;    // (H)    b_ih + b_hh; may be undefined
  at::Tensor h_prev;  // (B, H) h_{t-1}
  const GemmWeight& w_hh;  // W_hh (H, H), for h_{t-1} @ W_hh^T
  at::Tensor out;     // (B, H) out: h_t; never h_prev's memory
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
// Raises a clear error (c10::Error) when this build has no kernels for CUDA
// device `device` (its compute capability is not among the architectures
// the extension was compiled for); checked once per device.
void check_device_supported(c10::DeviceIndex device);
void lstm_forward_step(const LstmForwardStep& s);
void lstm_backward_step(const LstmBackwardStep& s);
void gru_forward_step(const GruForwardStep& s);
void gru_backward_step(const GruBackwardStep& s);
void rnn_forward_step(const RnnForwardStep& s);
void rnn_backward_step(const RnnBackwardStep& s);
}  // namespace cuda
#endif

}  // namespace fused_rnn

// The math of each cell, for one hidden unit of one batch row, written once
// for the CPU kernels and the CUDA kernels. `T` is the math type (float for
// float, half and bfloat16 storage; double for double).
//
// Gate order and formulas are torch.nn's:
//   LSTM  gates i, f, g, o:  c' = f*c + i*g,  h' = o*tanh(c')
//   GRU   gates r, z, n:     n = tanh(x_n + r*(W_hn h + b_hn)),  h' = (1-z)*n + z*h
//   RNN   h' = tanh(pre) or relu(pre)
// Forward functions take pre-activations and return what backward needs;
// backward functions return gradients of the pre-activations.
#pragma once

#include "fused_rnn/activations.h"

namespace fused_rnn {

// ---------------------------------------------------------------- LSTM
// In:  pre-activations gi, gf, gg, go; previous cell state c_prev.
// Out: activated gates i, f, g, o (overwriting the inputs), c' and h' (before
//      any projection).
template <typename T>
FR_HD FR_INLINE void lstm_forward_point(T& i, T& f, T& g, T& o, T c_prev, T& c,
                                        T& h) {
  i = sigmoid(i);
  f = sigmoid(f);
  g = tanh_act(g);
  o = sigmoid(o);
  c = f * c_prev + i * g;
  h = o * tanh_act(c);
}

// In:  activated gates i, f, g, o; c (this step's cell state), c_prev; dh, the
//      gradient of h' (before projection); dc, the gradient reaching c' from
//      the next step.
// Out: gradients of the four pre-activations; dc_prev for the previous step.
template <typename T>
FR_HD FR_INLINE void lstm_backward_point(T i, T f, T g, T o, T c, T c_prev,
                                         T dh, T dc, T& di, T& df, T& dg,
                                         T& d_o, T& dc_prev) {
  const T tc = tanh_act(c);
  d_o = dh * tc * o * (T(1) - o);
  dc = dc + dh * o * (T(1) - tc * tc);
  di = dc * g * i * (T(1) - i);
  df = dc * c_prev * f * (T(1) - f);
  dg = dc * i * (T(1) - g * g);
  dc_prev = dc * f;
}

// ---------------------------------------------------------------- GRU
// In:  xr, xz, xn: input projection (with b_ih); hr, hz, hn: recurrent
//      projection (with b_hh); h_prev.
// Out: activated r, z, n (overwriting xr, xz, xn) and h'.
template <typename T>
FR_HD FR_INLINE void gru_forward_point(T& r, T& z, T& n, T hr, T hz, T hn,
                                       T h_prev, T& h) {
  r = sigmoid(r + hr);
  z = sigmoid(z + hz);
  n = tanh_act(n + r * hn);
  h = (T(1) - z) * n + z * h_prev;
}

// In:  activated r, z, n; hn (the recurrent n projection with b_hn); h_prev;
//      dh, the gradient of h'.
// Out: dxr, dxz, dxn: gradients of the input-side pre-activations (those of
//      the recurrent side are the same for r and z); dhn: gradient of the
//      recurrent n projection; dh_prev: the direct part of the gradient of
//      h_prev (the matrix part is added by the caller).
template <typename T>
FR_HD FR_INLINE void gru_backward_point(T r, T z, T n, T hn, T h_prev, T dh,
                                        T& dxr, T& dxz, T& dxn, T& dhn,
                                        T& dh_prev) {
  const T dn = dh * (T(1) - z) * (T(1) - n * n);
  dxz = dh * (h_prev - n) * z * (T(1) - z);
  dxr = dn * hn * r * (T(1) - r);
  dxn = dn;
  dhn = dn * r;
  dh_prev = dh * z;
}

// ---------------------------------------------------------------- RNN
template <bool kRelu, typename T>
FR_HD FR_INLINE T rnn_forward_point(T pre) {
  return kRelu ? relu(pre) : tanh_act(pre);
}

// h is this step's output; returns the gradient of the pre-activation.
template <bool kRelu, typename T>
FR_HD FR_INLINE T rnn_backward_point(T h, T dh) {
  // relu: torch's threshold_backward passes the gradient unless h <= 0, a
  // NaN h included.
  return kRelu ? (h <= T(0) ? T(0) : dh) : dh * (T(1) - h * h);
}

}  // namespace fused_rnn

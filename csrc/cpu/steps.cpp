// CPU implementation of the per-step pointwise passes (steps.h): parallel
// over batch rows with at::parallel_for, vectorised over hidden units. The
// math is cells.h; for float the host activations are branch-free so the
// loops vectorise, and on x86-64 each float loop is also compiled for AVX2 +
// FMA and picked at load time (target_clones), so the extension still runs
// on any x86-64 machine.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>


#include "fused_rnn/cells.h"
#include "fused_rnn/cpu_convert.h"
#include "fused_rnn/steps.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && \
    (__GNUC__ >= 11)
#define FR_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FR_CPU_CLONES
#endif

#if defined(__GNUC__) || defined(__clang__)
#define FR_RESTRICT __restrict__
#else
#define FR_RESTRICT
#endif

// Tells the compiler the rows of one loop do not overlap: without it GCC
// gives up on the gate loops nested in the row loop.
#if defined(__clang__)
#define FR_IVDEP _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define FR_IVDEP _Pragma("GCC ivdep")
#else
#define FR_IVDEP
#endif

namespace fused_rnn {
namespace cpu {
namespace {

template <typename scalar_t>
scalar_t* ptr(const at::Tensor& t) {
  if (!t.defined()) return nullptr;
  TORCH_INTERNAL_ASSERT(t.is_contiguous(), "fused_rnn: a step tensor is not contiguous");
  return t.data_ptr<scalar_t>();
}

// Runs fn(b0, b1) over batch rows in parallel chunks of at least 4096 gate
// elements (`width` per row; ~1.5 us of an LSTM's gate math), so small
// steps stay on one thread. (16K kept LSTM steps up to B=32, H=128 on one
// thread while the other waited: the forward of an LSTM at I=32, H=128,
// B=32, T=63 took 1.66-1.75 ms, 1.50-1.53 with 4096, on the 2-core EPYC;
// the same at B=32, H=256, T=100.)
template <typename Fn>
void for_rows(int64_t rows, int64_t width, const Fn& fn) {
  constexpr int64_t kMinElements = 4096;
  const int64_t grain = std::max<int64_t>(1, kMinElements / std::max<int64_t>(1, width));
  at::parallel_for(0, rows, grain, fn);
}

// A forward step: the recurrent product h_{t-1} @ W_hh^T as one GEMM
// (threaded by the BLAS), then the pointwise pass, parallel over rows, adding
// the biases. LSTM and RNN accumulate the product into the input projection
// (beta = 1, measured faster than a separate output); GRU keeps it apart, as
// its reset gate multiplies only the recurrent n part. Measured no faster on
// the 2-core AMD EPYC: each thread multiplying by its own slice of W_hh
// inside one parallel region per step, at B=32 and (row blocks of W_hh, to
// keep each in one core's cache) at B <= 8.
at::Tensor recurrent_product(const at::Tensor& scratch, const at::Tensor& h_prev,
                             const GemmWeight& w_hh, int64_t width) {
  const int64_t n = h_prev.size(0);
  at::Tensor hh = scratch.narrow(0, 0, n * width).view({n, width});
  w_hh.product_into(hh, h_prev);
  return hh;
}

// Non-template overloads of a row function for float and bfloat16, compiled
// per instruction set (FR_CPU_CLONES); overload resolution prefers them to
// the template, which serves double and float16.
#define FR_CPU_CLONED_ROWS(name, Ptrs)                                                  \
  FR_CPU_CLONES void name(const Ptrs<float>& p, int64_t b0, int64_t b1) {              \
    name<float>(p, b0, b1);                                                            \
  }                                                                                    \
  FR_CPU_CLONES void name(const Ptrs<c10::BFloat16>& p, int64_t b0, int64_t b1) {      \
    name<c10::BFloat16>(p, b0, b1);                                                    \
  }

// Runs a row function over all rows; overload resolution picks the
// target-cloned version for float and bfloat16.
#define FR_RUN_ROWS(kernel, P, rows_, width) \
  for_rows(rows_, width, [&](int64_t b0, int64_t b1) { kernel(P, b0, b1); })

// ------------------------------------------------------------------ LSTM
template <typename scalar_t>
struct LstmForwardPtrs {
  scalar_t* gates;        // (n, 4H) pre-activations in, activated gates out
  const scalar_t* bias;   // (4H) or null
  scalar_t *c, *cells, *h;
  int64_t H;
};

// Optional operands are template flags: a condition in the loop would stop
// it from vectorising.
template <typename scalar_t, bool kBias, bool kCells>
FR_INLINE void lstm_forward_rows_impl(const LstmForwardPtrs<scalar_t>& p, int64_t b0,
                                      int64_t b1) {
  using T = at::opmath_type<scalar_t>;
  const int64_t H = p.H;
  const scalar_t* FR_RESTRICT bi = kBias ? p.bias : nullptr;
  const scalar_t* FR_RESTRICT bf = kBias ? bi + H : nullptr;
  const scalar_t* FR_RESTRICT bg = kBias ? bi + 2 * H : nullptr;
  const scalar_t* FR_RESTRICT bo = kBias ? bi + 3 * H : nullptr;
  for (int64_t b = b0; b < b1; ++b) {
    scalar_t* FR_RESTRICT gi = p.gates + b * 4 * H;
    scalar_t* FR_RESTRICT gf = gi + H;
    scalar_t* FR_RESTRICT gg = gi + 2 * H;
    scalar_t* FR_RESTRICT go = gi + 3 * H;
    scalar_t* FR_RESTRICT c = p.c + b * H;
    scalar_t* FR_RESTRICT h = p.h + b * H;
    scalar_t* FR_RESTRICT cells = kCells ? p.cells + b * H : nullptr;
    FR_IVDEP
    for (int64_t j = 0; j < H; ++j) {
      T i = gi[j], f = gf[j], g = gg[j], o = go[j];
      if constexpr (kBias) {
        i += T(bi[j]);
        f += T(bf[j]);
        g += T(bg[j]);
        o += T(bo[j]);
      }
      T c_new, h_new;
      lstm_forward_point<T>(i, f, g, o, T(c[j]), c_new, h_new);
      // The activated gates and c_t are kept for backward (training, where
      // cells is given); inference needs only the state.
      if constexpr (kCells) {
        gi[j] = narrow_to<scalar_t>(i);
        gf[j] = narrow_to<scalar_t>(f);
        gg[j] = narrow_to<scalar_t>(g);
        go[j] = narrow_to<scalar_t>(o);
        cells[j] = narrow_to<scalar_t>(c_new);
      }
      c[j] = narrow_to<scalar_t>(c_new);
      h[j] = narrow_to<scalar_t>(h_new);
    }
  }
}

template <typename scalar_t>
FR_INLINE void lstm_forward_rows(const LstmForwardPtrs<scalar_t>& p, int64_t b0,
                                      int64_t b1) {
  if (p.bias) {
    if (p.cells) {
      lstm_forward_rows_impl<scalar_t, true, true>(p, b0, b1);
    } else {
      lstm_forward_rows_impl<scalar_t, true, false>(p, b0, b1);
    }
  } else {
    if (p.cells) {
      lstm_forward_rows_impl<scalar_t, false, true>(p, b0, b1);
    } else {
      lstm_forward_rows_impl<scalar_t, false, false>(p, b0, b1);
    }
  }
}

FR_CPU_CLONED_ROWS(lstm_forward_rows, LstmForwardPtrs)

template <typename scalar_t>
struct LstmBackwardPtrs {
  const scalar_t *gates, *cells, *c_prev, *dh, *dh_extra;
  scalar_t *dc, *dgates;
  int64_t H;
};

template <typename scalar_t, bool kExtra>
FR_INLINE void lstm_backward_rows_impl(const LstmBackwardPtrs<scalar_t>& p,
                                       int64_t b0, int64_t b1) {
  using T = at::opmath_type<scalar_t>;
  const int64_t H = p.H;
  for (int64_t b = b0; b < b1; ++b) {
    const scalar_t* FR_RESTRICT gi = p.gates + b * 4 * H;
    const scalar_t* FR_RESTRICT gf = gi + H;
    const scalar_t* FR_RESTRICT gg = gi + 2 * H;
    const scalar_t* FR_RESTRICT go = gi + 3 * H;
    const scalar_t* FR_RESTRICT c = p.cells + b * H;
    const scalar_t* FR_RESTRICT c_prev = p.c_prev + b * H;
    const scalar_t* FR_RESTRICT dh = p.dh + b * H;
    const scalar_t* FR_RESTRICT dh_extra = p.dh_extra ? p.dh_extra + b * H : nullptr;
    scalar_t* FR_RESTRICT dc = p.dc + b * H;
    scalar_t* FR_RESTRICT di = p.dgates + b * 4 * H;
    scalar_t* FR_RESTRICT df = di + H;
    scalar_t* FR_RESTRICT dg = di + 2 * H;
    scalar_t* FR_RESTRICT d_o = di + 3 * H;
    FR_IVDEP
    for (int64_t j = 0; j < H; ++j) {
      T grad_h = T(dh[j]);
      if constexpr (kExtra) grad_h += T(dh_extra[j]);
      T vi, vf, vg, vo, vc;
      lstm_backward_point<T>(T(gi[j]), T(gf[j]), T(gg[j]), T(go[j]), T(c[j]),
                             T(c_prev[j]), grad_h, T(dc[j]), vi, vf, vg, vo,
                             vc);
      di[j] = narrow_to<scalar_t>(vi);
      df[j] = narrow_to<scalar_t>(vf);
      dg[j] = narrow_to<scalar_t>(vg);
      d_o[j] = narrow_to<scalar_t>(vo);
      dc[j] = narrow_to<scalar_t>(vc);
    }
  }
}

template <typename scalar_t>
FR_INLINE void lstm_backward_rows(const LstmBackwardPtrs<scalar_t>& p,
                                  int64_t b0, int64_t b1) {
  if (p.dh_extra) {
    lstm_backward_rows_impl<scalar_t, true>(p, b0, b1);
  } else {
    lstm_backward_rows_impl<scalar_t, false>(p, b0, b1);
  }
}

FR_CPU_CLONED_ROWS(lstm_backward_rows, LstmBackwardPtrs)

// ------------------------------------------------------------------- GRU
template <typename scalar_t>
struct GruForwardPtrs {
  scalar_t* gates;             // (n, 3H) x projections in, activated gates out
  const scalar_t *b_ih, *b_hh; // (3H) or null
  const scalar_t* hh;          // (n, 3H) h_{t-1} @ W_hh^T
  const scalar_t* h_prev;      // (n, H)
  scalar_t *out, *hn;
  int64_t H;
};

template <typename scalar_t, bool kBias, bool kSave>
FR_INLINE void gru_forward_rows_impl(const GruForwardPtrs<scalar_t>& p, int64_t b0,
                                     int64_t b1) {
  using T = at::opmath_type<scalar_t>;
  const int64_t H = p.H;
  for (int64_t b = b0; b < b1; ++b) {
    scalar_t* FR_RESTRICT xr = p.gates + b * 3 * H;
    scalar_t* FR_RESTRICT xz = xr + H;
    scalar_t* FR_RESTRICT xn = xr + 2 * H;
    const scalar_t* FR_RESTRICT hr = p.hh + b * 3 * H;
    const scalar_t* FR_RESTRICT hz = hr + H;
    const scalar_t* FR_RESTRICT hn = hr + 2 * H;
    const scalar_t* FR_RESTRICT h_prev = p.h_prev + b * H;
    scalar_t* FR_RESTRICT out = p.out + b * H;
    scalar_t* FR_RESTRICT hn_saved = kSave ? p.hn + b * H : nullptr;
    FR_IVDEP
    for (int64_t j = 0; j < H; ++j) {
      T r = xr[j], z = xz[j], n = xn[j], ar = hr[j], az = hz[j], an = hn[j];
      if constexpr (kBias) {
        r += T(p.b_ih[j]);
        z += T(p.b_ih[H + j]);
        n += T(p.b_ih[2 * H + j]);
        ar += T(p.b_hh[j]);
        az += T(p.b_hh[H + j]);
        an += T(p.b_hh[2 * H + j]);
      }
      T h_new;
      gru_forward_point<T>(r, z, n, ar, az, an, T(h_prev[j]), h_new);
      // The activated gates and W_hn h + b_hn are kept for backward
      // (training, where hn is given); inference needs only h_t.
      if constexpr (kSave) {
        xr[j] = narrow_to<scalar_t>(r);
        xz[j] = narrow_to<scalar_t>(z);
        xn[j] = narrow_to<scalar_t>(n);
        hn_saved[j] = narrow_to<scalar_t>(an);
      }
      out[j] = narrow_to<scalar_t>(h_new);
    }
  }
}

template <typename scalar_t>
FR_INLINE void gru_forward_rows(const GruForwardPtrs<scalar_t>& p, int64_t b0,
                                     int64_t b1) {
  if (p.b_ih) {
    if (p.hn) {
      gru_forward_rows_impl<scalar_t, true, true>(p, b0, b1);
    } else {
      gru_forward_rows_impl<scalar_t, true, false>(p, b0, b1);
    }
  } else {
    if (p.hn) {
      gru_forward_rows_impl<scalar_t, false, true>(p, b0, b1);
    } else {
      gru_forward_rows_impl<scalar_t, false, false>(p, b0, b1);
    }
  }
}

FR_CPU_CLONED_ROWS(gru_forward_rows, GruForwardPtrs)

template <typename scalar_t>
struct GruBackwardPtrs {
  const scalar_t *gates, *hn, *h_prev, *dh_extra;
  scalar_t *dh, *dgates_x, *dgates_h;
  int64_t H;
};

template <typename scalar_t, bool kExtra>
FR_INLINE void gru_backward_rows_impl(const GruBackwardPtrs<scalar_t>& p,
                                      int64_t b0, int64_t b1) {
  using T = at::opmath_type<scalar_t>;
  const int64_t H = p.H;
  for (int64_t b = b0; b < b1; ++b) {
    const scalar_t* FR_RESTRICT r = p.gates + b * 3 * H;
    const scalar_t* FR_RESTRICT z = r + H;
    const scalar_t* FR_RESTRICT n = r + 2 * H;
    const scalar_t* FR_RESTRICT hn = p.hn + b * H;
    const scalar_t* FR_RESTRICT h_prev = p.h_prev + b * H;
    const scalar_t* FR_RESTRICT dh_extra = p.dh_extra ? p.dh_extra + b * H : nullptr;
    scalar_t* FR_RESTRICT dh = p.dh + b * H;
    scalar_t* FR_RESTRICT dxr = p.dgates_x + b * 3 * H;
    scalar_t* FR_RESTRICT dxz = dxr + H;
    scalar_t* FR_RESTRICT dxn = dxr + 2 * H;
    scalar_t* FR_RESTRICT dhr = p.dgates_h + b * 3 * H;
    scalar_t* FR_RESTRICT dhz = dhr + H;
    scalar_t* FR_RESTRICT dhn = dhr + 2 * H;
    FR_IVDEP
    for (int64_t j = 0; j < H; ++j) {
      T grad_h = T(dh[j]);
      if constexpr (kExtra) grad_h += T(dh_extra[j]);
      T vr, vz, vn, vhn, vh;
      gru_backward_point<T>(T(r[j]), T(z[j]), T(n[j]), T(hn[j]), T(h_prev[j]),
                            grad_h, vr, vz, vn, vhn, vh);
      dxr[j] = narrow_to<scalar_t>(vr);
      dxz[j] = narrow_to<scalar_t>(vz);
      dxn[j] = narrow_to<scalar_t>(vn);
      dhr[j] = narrow_to<scalar_t>(vr);
      dhz[j] = narrow_to<scalar_t>(vz);
      dhn[j] = narrow_to<scalar_t>(vhn);
      dh[j] = narrow_to<scalar_t>(vh);
    }
  }
}

template <typename scalar_t>
FR_INLINE void gru_backward_rows(const GruBackwardPtrs<scalar_t>& p,
                                 int64_t b0, int64_t b1) {
  if (p.dh_extra) {
    gru_backward_rows_impl<scalar_t, true>(p, b0, b1);
  } else {
    gru_backward_rows_impl<scalar_t, false>(p, b0, b1);
  }
}

FR_CPU_CLONED_ROWS(gru_backward_rows, GruBackwardPtrs)

// ------------------------------------------------------------------- RNN
template <typename scalar_t>
struct RnnForwardPtrs {
  const scalar_t* pre;   // (n, H) pre-activations
  const scalar_t* bias;  // (H) or null
  scalar_t* out;
  int64_t H;
  bool relu;
};

template <bool kRelu, bool kBias, typename scalar_t>
FR_INLINE void rnn_forward_rows_impl(const RnnForwardPtrs<scalar_t>& p, int64_t b0,
                                     int64_t b1) {
  using T = at::opmath_type<scalar_t>;
  const int64_t H = p.H;
  const scalar_t* FR_RESTRICT bias = kBias ? p.bias : nullptr;
  for (int64_t b = b0; b < b1; ++b) {
    const scalar_t* FR_RESTRICT pre = p.pre + b * H;
    scalar_t* FR_RESTRICT out = p.out + b * H;
    FR_IVDEP
    for (int64_t j = 0; j < H; ++j) {
      T v = pre[j];
      if constexpr (kBias) v += T(bias[j]);
      out[j] = narrow_to<scalar_t>(rnn_forward_point<kRelu, T>(v));
    }
  }
}

template <typename scalar_t>
FR_INLINE void rnn_forward_rows(const RnnForwardPtrs<scalar_t>& p, int64_t b0,
                                     int64_t b1) {
  if (p.relu) {
    if (p.bias) {
      rnn_forward_rows_impl<true, true>(p, b0, b1);
    } else {
      rnn_forward_rows_impl<true, false>(p, b0, b1);
    }
  } else {
    if (p.bias) {
      rnn_forward_rows_impl<false, true>(p, b0, b1);
    } else {
      rnn_forward_rows_impl<false, false>(p, b0, b1);
    }
  }
}

FR_CPU_CLONED_ROWS(rnn_forward_rows, RnnForwardPtrs)

template <typename scalar_t>
struct RnnBackwardPtrs {
  const scalar_t *out, *dh, *dh_extra;
  scalar_t* dpre;
  int64_t H;
  bool relu;
};

template <bool kRelu, typename scalar_t>
FR_INLINE void rnn_backward_rows_impl(const RnnBackwardPtrs<scalar_t>& p,
                                      int64_t b0, int64_t b1) {
  using T = at::opmath_type<scalar_t>;
  const int64_t H = p.H;
  const scalar_t* FR_RESTRICT out = p.out + b0 * H;
  const scalar_t* FR_RESTRICT dh = p.dh + b0 * H;
  const scalar_t* FR_RESTRICT dh_extra = p.dh_extra ? p.dh_extra + b0 * H : nullptr;
  scalar_t* FR_RESTRICT dpre = p.dpre + b0 * H;
  FR_IVDEP
  for (int64_t k = 0; k < (b1 - b0) * H; ++k) {
    T grad_h = T(dh[k]);
    if (dh_extra) grad_h += T(dh_extra[k]);
    dpre[k] = narrow_to<scalar_t>(rnn_backward_point<kRelu, T>(T(out[k]), grad_h));
  }
}

template <typename scalar_t>
FR_INLINE void rnn_backward_rows(const RnnBackwardPtrs<scalar_t>& p, int64_t b0,
                                 int64_t b1) {
  if (p.relu) {
    rnn_backward_rows_impl<true>(p, b0, b1);
  } else {
    rnn_backward_rows_impl<false>(p, b0, b1);
  }
}

FR_CPU_CLONED_ROWS(rnn_backward_rows, RnnBackwardPtrs)

}  // namespace

void lstm_forward_step(const LstmForwardStep& s) {
  const int64_t n = s.gates.size(0), H = s.c.size(1);
  s.w_hh.product_into(s.gates, s.h_prev, /*accumulate=*/true);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, s.gates.scalar_type(), "lstm_forward_step", [&] {
        const LstmForwardPtrs<scalar_t> p{ptr<scalar_t>(s.gates), ptr<scalar_t>(s.bias),
                                          ptr<scalar_t>(s.c), ptr<scalar_t>(s.cells),
                                          ptr<scalar_t>(s.h), H};
        FR_RUN_ROWS(lstm_forward_rows, p, n, 4 * H);
      });
}

void lstm_backward_step(const LstmBackwardStep& s) {
  const int64_t B = s.gates.size(0), H = s.dc.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, s.gates.scalar_type(), "lstm_backward_step", [&] {
        const LstmBackwardPtrs<scalar_t> p{
            ptr<scalar_t>(s.gates), ptr<scalar_t>(s.cells), ptr<scalar_t>(s.c_prev),
            ptr<scalar_t>(s.dh),    ptr<scalar_t>(s.dh_extra), ptr<scalar_t>(s.dc),
            ptr<scalar_t>(s.dgates), H};
        FR_RUN_ROWS(lstm_backward_rows, p, B, 4 * H);
      });
}

void gru_forward_step(const GruForwardStep& s) {
  const int64_t n = s.gates.size(0), H = s.out.size(1);
  const at::Tensor hh = recurrent_product(s.scratch, s.h_prev, s.w_hh, 3 * H);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, s.gates.scalar_type(), "gru_forward_step", [&] {
        const GruForwardPtrs<scalar_t> p{
            ptr<scalar_t>(s.gates),  ptr<scalar_t>(s.b_ih), ptr<scalar_t>(s.b_hh),
            ptr<scalar_t>(hh),       ptr<scalar_t>(s.h_prev), ptr<scalar_t>(s.out),
            ptr<scalar_t>(s.hn),     H};
        FR_RUN_ROWS(gru_forward_rows, p, n, 3 * H);
      });
}

void gru_backward_step(const GruBackwardStep& s) {
  const int64_t B = s.gates.size(0), H = s.dh.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, s.gates.scalar_type(), "gru_backward_step", [&] {
        const GruBackwardPtrs<scalar_t> p{
            ptr<scalar_t>(s.gates),    ptr<scalar_t>(s.hn),
            ptr<scalar_t>(s.h_prev),   ptr<scalar_t>(s.dh_extra),
            ptr<scalar_t>(s.dh),       ptr<scalar_t>(s.dgates_x),
            ptr<scalar_t>(s.dgates_h), H};
        FR_RUN_ROWS(gru_backward_rows, p, B, 3 * H);
      });
}

void rnn_forward_step(const RnnForwardStep& s) {
  const int64_t n = s.pre.size(0), H = s.pre.size(1);
  s.w_hh.product_into(s.pre, s.h_prev, /*accumulate=*/true);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, s.pre.scalar_type(), "rnn_forward_step", [&] {
        const RnnForwardPtrs<scalar_t> p{ptr<scalar_t>(s.pre), ptr<scalar_t>(s.bias),
                                         ptr<scalar_t>(s.out), H, s.relu};
        FR_RUN_ROWS(rnn_forward_rows, p, n, H);
      });
}

void rnn_backward_step(const RnnBackwardStep& s) {
  const int64_t B = s.dpre.size(0), H = s.dpre.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, s.dpre.scalar_type(), "rnn_backward_step", [&] {
        const RnnBackwardPtrs<scalar_t> p{ptr<scalar_t>(s.out), ptr<scalar_t>(s.dh),
                                          ptr<scalar_t>(s.dh_extra), ptr<scalar_t>(s.dpre),
                                          H, s.relu};
        FR_RUN_ROWS(rnn_backward_rows, p, B, H);
      });
}

}  // namespace cpu
}  // namespace fused_rnn

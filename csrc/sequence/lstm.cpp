// LSTM (with optional projection) over a whole sequence, one layer, one
// direction, on any device: one GEMM for the input projection of every step,
// per step one GEMM for W_hh h_{t-1} and one fused pointwise pass, and in
// backward the weight gradients as large GEMMs after the recurrence.
#include <torch/library.h>

#include <cstdlib>
#include <string>

#include "sequence.h"

namespace fused_rnn {
namespace {

using at::Tensor;
using c10::optional;

constexpr CellShape kLstm{"LSTM", 4};

// With proj_size the state is h_t = W_hr m_t, m_t = o_t * tanh(c_t) (H
// wide), and the gates of step t+1 take W_hh h_t = (W_hh W_hr) m_t. Folded,
// the recurrence runs as an LSTM without projection on m, with the (4H, H)
// weight W_hh W_hr, from m = 0, W_hh h_0 added to the input rows where each
// sequence starts; the projection of every step is then one GEMM after it.
// Backward likewise: the recurrence on m takes the output gradient through
// W_hr (grad_output W_hr), and W_hr's and h_0's gradients come from the gate
// gradients afterwards. So the persistent and stepwise kernels run LSTMs
// with projection, at the cost of a recurrent weight of 4H x H instead of
// 4H x P + P x H. Where the choice for the folded recurrence is the general
// path, it runs per step as before (W_hh, then W_hr). FUSED_RNN_PROJECTION
// (read at every call): auto (the default: folded where the folded
// recurrence takes the persistent or stepwise kernels, which the plan says
// for proj = true), fold (on every device; the CPU tests use it), steps
// (never).
bool fold_projection(const Tensor& input, const Schedule& sc, int64_t hidden, bool backward) {
  const char* env = std::getenv("FUSED_RNN_PROJECTION");
  const std::string mode = env == nullptr ? "" : env;
  if (mode == "fold") return true;
  if (mode == "steps") return false;
  TORCH_CHECK_VALUE(mode.empty() || mode == "auto", "FUSED_RNN_PROJECTION=", mode,
                    ": expected auto, fold or steps");
#if defined(FUSED_RNN_WITH_CUDA)
  if (input.is_cuda()) {
    return cuda::choose_path(PersistentCell::kLstm, hidden, sc.batch, input.scalar_type(),
                             !sc.dense, /*proj=*/true, backward, /*bidirectional=*/false,
                             /*explain=*/false)
               .path != KernelPath::kGeneral;
  }
#endif
  (void)input, (void)sc, (void)hidden, (void)backward;
  return false;
}

// See ops.cpp for the schema. Shapes: input (T, B, I) or packed (N, I);
// hx (B, P); cx (B, H); w_ih (4H, I); w_hh (4H, P); b_ih, b_hh (4H);
// w_hr (P, H). Returns output (T, B, P) or (N, P), hy (B, P), cy (B, H) and,
// when training, the activated gates (N, 4H) and cell states (N, H).
using Forward = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
using Backward = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

Forward lstm_forward_impl(const Tensor& input, const Tensor& hx, const Tensor& cx,
                          const Tensor& w_ih, const Tensor& w_hh, const optional<Tensor>& b_ih,
                          const optional<Tensor>& b_hh, const optional<Tensor>& w_hr,
                          const optional<Tensor>& batch_sizes, bool reverse, bool train,
                          RunWhole<PersistentForward> run_whole) {
  check_forward_args(kLstm, input, batch_sizes, {hx, cx}, w_ih, w_hh, b_ih,
                     b_hh, w_hr);
  const c10::OptionalDeviceGuard guard(at::device_of(input));
  const AutocastOff autocast_off;
  const Schedule sc = make_schedule(input, batch_sizes, hx.size(0), reverse);
  const bool proj = w_hr.has_value();
  const int64_t H = w_hh.size(0) / 4;
  const int64_t P = proj ? w_hr->size(0) : H;
  const auto opts = input.options();
  const bool fold = proj && fold_projection(input, sc, H, /*backward=*/false);
  const bool step_proj = proj && !fold;  // W_hr inside the per-step loop

  const Tensor x = input.reshape({sc.rows, input.size(-1)});
  // x_t @ W_ih^T, (rows, 4H) per step; the biases join in the pointwise pass.
  InputProjection xw = [&] {
    const PhaseRange phase("fused_rnn::input_projection");
    return InputProjection(x, w_ih, sc,
                           train || input.is_cuda() || fold || loop_needs_whole_projection());
  }();
  const Tensor bias = b_ih.has_value() ? *b_ih + *b_hh : Tensor();
  const Tensor out = at::empty({sc.rows, P}, opts);
  const Tensor h = at::empty({sc.batch, P}, opts);
  const Tensor c = at::empty({sc.batch, H}, opts);
  const Tensor cells = train ? at::empty({sc.rows, H}, opts) : Tensor();

  // The recurrence's weight, initial state, outputs and final state: folded,
  // those of m (fold_projection).
  Tensor w_rec_weight = w_hh, h_init = hx, out_rec = out, h_rec = h;
  if (fold) {
    const PhaseRange phase("fused_rnn::fold_projection");
    w_rec_weight = at::mm(w_hh, *w_hr);
    add_at_first_rows(xw.all(), at::mm(hx, w_hh.t()), sc);
    h_init = at::zeros({sc.batch, H}, opts);
    out_rec = at::empty({sc.rows, H}, opts);
    h_rec = at::empty({sc.batch, H}, opts);
  }
  {
    const PhaseRange recurrence("fused_rnn::recurrence");
    PersistentForward whole;
    if (input.is_cuda() && !step_proj) {
      whole = persistent_request<PersistentForward>(PersistentCell::kLstm, sc, w_rec_weight);
      whole.xw = xw.all();
      whole.keep_gates = train;
      whole.bias = bias;
      whole.hx = h_init.contiguous();
      whole.cx = cx.contiguous();
      whole.out = out_rec;
      whole.hy = h_rec;
      whole.cy = c;
      whole.cells = cells;
    }
    // The per-step loop (the general path), for run_whole to run itself
    // (both directions of a layer side by side) or after it.
    auto general = [&] {
      // The per-step loop, on the tensors run_loop hands it (graphs.h: a
      // replayed CUDA graph runs it on copies of its own); `xw` itself only
      // where the projection is not kept whole (CPU inference).
      enum { kXw, kBias, kH0, kC0, kW, kWhr, kOut, kHy, kCy, kCells };
      auto loop = [&sc, &xw, train, step_proj](const std::vector<Tensor>& t) {
        const GemmWeight w_rec(t[kW], sc.rows, /*per_step=*/true);
        const GemmWeight w_proj = step_proj ? GemmWeight(t[kWhr], sc.rows, true) : GemmWeight();
        const Tensor h_full = step_proj ? at::empty_like(t[kCy]) : Tensor();
        t[kHy].copy_(t[kH0]);
        t[kCy].copy_(t[kC0]);
        RunningState state(t[kHy], sc);
        for (int64_t s = 0; s < sc.steps; ++s) {
          const int64_t n = sc.size_at(s);
          const Tensor out_s = step_rows(t[kOut], sc, s);
          LstmForwardStep step{t[kXw].defined() ? step_rows(t[kXw], sc, s) : xw.step(s),
                               t[kBias],
                               state.before(s, n),
                               w_rec,
                               rows(t[kCy], n),
                               train ? step_rows(t[kCells], sc, s) : Tensor(),
                               step_proj ? rows(h_full, n) : out_s};
          FUSED_RNN_RUN_STEP(lstm_forward_step, step, out_s);
          if (step_proj) w_proj.product_into(out_s, rows(h_full, n));
          state.after(out_s);
        }
        state.finish();
      };
      const int64_t width = fold ? H : P;  // of the recurrent state
      run_loop({"lstm_forward", loop_params(sc, {train, step_proj}), sc.steps,
                sc.batch * (4 * H * width + (step_proj ? P * H : 0))},
               {{xw.all(), train ? LoopRole::kInOut : LoopRole::kIn},
                {bias, LoopRole::kIn},
                {h_init, LoopRole::kIn},
                {cx, LoopRole::kIn},
                {w_rec_weight, LoopRole::kIn},
                {step_proj ? *w_hr : Tensor(), LoopRole::kIn},
                {out_rec, LoopRole::kOut},
                {h_rec, LoopRole::kOut},
                {c, LoopRole::kOut},
                {cells, LoopRole::kOut}},
               loop);
    };
    if (!run_whole(whole, {general, input})) general();
  }
  if (fold) {
    const PhaseRange phase("fused_rnn::projection");
    Tensor out_p = out, h_p = h;  // (handles of the same tensors, for mm_out)
    at::mm_out(out_p, out_rec, w_hr->t());
    at::mm_out(h_p, h_rec, w_hr->t());
  }
  const Tensor output =
      sc.dense ? out.view({sc.steps, sc.batch, P}) : out;
  return {output, h, c, train ? xw.all() : absent(input),
          train ? cells : absent(input)};
}

// Gradients of lstm_forward's inputs, given those of its outputs and what a
// training forward returned. grad_input is absent unless input_grad,
// grad_bias (that of b_ih and of b_hh alike) unless has_bias, grad_w_hr
// without projection.
Backward lstm_backward_impl(const Tensor& grad_output, const Tensor& grad_hy,
                            const Tensor& grad_cy, const Tensor& input, const Tensor& hx,
                            const Tensor& cx, const Tensor& w_ih, const Tensor& w_hh,
                            const optional<Tensor>& w_hr, const Tensor& output,
                            const Tensor& gates, const Tensor& cells,
                            const optional<Tensor>& batch_sizes, bool reverse, bool has_bias,
                            bool input_grad, RunWhole<PersistentBackward> run_whole) {
  check_forward_args(kLstm, input, batch_sizes, {hx, cx}, w_ih, w_hh,
                     c10::nullopt, c10::nullopt, w_hr);
  const c10::OptionalDeviceGuard guard(at::device_of(input));
  const AutocastOff autocast_off;
  const Schedule sc = make_schedule(input, batch_sizes, hx.size(0), reverse);
  const bool proj = w_hr.has_value();
  const int64_t H = w_hh.size(0) / 4;
  const int64_t P = proj ? w_hr->size(0) : H;
  check_like("output", output, input, output.sizes());
  TORCH_CHECK(output.numel() == sc.rows * P, "LSTM backward: output has ",
              output.numel(), " elements, expected ", sc.rows * P);
  check_like("grad_output", grad_output, input, output.sizes());
  check_like("grad_hy", grad_hy, input, hx.sizes());
  check_like("grad_cy", grad_cy, input, cx.sizes());
  check_like("gates", gates, input, {sc.rows, 4 * H});
  check_like("cells", cells, input, {sc.rows, H});

  const Tensor x = input.reshape({sc.rows, input.size(-1)});
  const Tensor go = grad_output.reshape({sc.rows, P}).contiguous();
  const Tensor out = output.reshape({sc.rows, P});
  const Tensor gates_c = gates.contiguous();
  const Tensor cells_c = cells.contiguous();
  const Tensor dgates = at::empty({sc.rows, 4 * H}, input.options());
  const Tensor dh = at::empty({sc.batch, P}, input.options());
  const Tensor dc = at::empty({sc.batch, H}, input.options());
  const Tensor dr = proj ? at::empty({sc.rows, P}, input.options()) : Tensor();
  const bool fold = proj && fold_projection(input, sc, H, /*backward=*/true);
  const bool step_proj = proj && !fold;  // W_hr inside the per-step loop

  // The recurrence's weight, output and final-state gradients and initial-
  // state gradient: folded, those of m (fold_projection), whose initial
  // state (zero) has a gradient nobody needs.
  Tensor w_rec_weight = w_hh, go_rec = go, grad_hy_rec = grad_hy, dh_rec = dh;
  if (fold) {
    const PhaseRange phase("fused_rnn::fold_projection");
    w_rec_weight = at::mm(w_hh, *w_hr);
    go_rec = at::mm(go, *w_hr);
    grad_hy_rec = at::mm(grad_hy, *w_hr);
    dh_rec = at::empty({sc.batch, H}, input.options());
  }
  {
    const PhaseRange recurrence("fused_rnn::recurrence_backward");
    PersistentBackward whole;
    if (input.is_cuda() && !step_proj) {
      whole = persistent_request<PersistentBackward>(PersistentCell::kLstm, sc, w_rec_weight);
      whole.grad_out = go_rec;
      whole.grad_hy = grad_hy_rec.contiguous();
      whole.grad_cy = grad_cy.contiguous();
      whole.cx = cx.contiguous();
      whole.gates = gates_c;
      whole.cells = cells_c;
      whole.dgates = dgates;
      whole.grad_hx = dh_rec;
      whole.grad_cx = dc;
    }
    // The per-step loop (the general path), for run_whole to run itself
    // (both directions of a layer side by side) or after it.
    auto general = [&] {
      // The per-step loop, on the tensors run_loop hands it (graphs.h).
      enum { kGates, kCells, kC0, kGo, kGradHy, kGradCy, kW, kWhr, kDgates, kDh, kDc, kDr };
      auto loop = [&sc, step_proj](const std::vector<Tensor>& t) {
        const PreviousStates c_prev(t[kCells], t[kC0], sc);
        const Tensor dh_full = step_proj ? at::empty_like(t[kDc]) : Tensor();
        // dh_{t-1} = dgates @ W_hh, dh (before the projection) = dr @ W_hr.
        const GemmWeight w_rec_t(t[kW].t(), sc.rows, /*per_step=*/true);
        const GemmWeight w_proj_t =
            step_proj ? GemmWeight(t[kWhr].t(), sc.rows, true) : GemmWeight();
        t[kDh].copy_(t[kGradHy]);
        t[kDc].copy_(t[kGradCy]);
        for (int64_t s = sc.steps - 1; s >= 0; --s) {
          const int64_t n = sc.size_at(s);
          if (step_proj) {
            const Tensor dr_s = step_rows(t[kDr], sc, s);
            add_into(dr_s, rows(t[kDh], n), step_rows(t[kGo], sc, s));
            w_proj_t.product_into(rows(dh_full, n), dr_s);
          }
          const Tensor dgates_s = step_rows(t[kDgates], sc, s);
          LstmBackwardStep step{step_rows(t[kGates], sc, s),
                                step_rows(t[kCells], sc, s),
                                c_prev.step(s),
                                step_proj ? rows(dh_full, n) : rows(t[kDh], n),
                                step_proj ? Tensor() : step_rows(t[kGo], sc, s),
                                rows(t[kDc], n),
                                dgates_s};
          FUSED_RNN_RUN_STEP(lstm_backward_step, step, dgates_s);
          w_rec_t.product_into(rows(t[kDh], n), dgates_s);
        }
      };
      const int64_t width = fold ? H : P;  // of the recurrent state
      run_loop({"lstm_backward", loop_params(sc, {step_proj}), sc.steps,
                sc.batch * (4 * H * width + (step_proj ? P * H : 0))},
               {{gates_c, LoopRole::kIn},
                {cells_c, LoopRole::kIn},
                {cx.contiguous(), LoopRole::kIn},
                {go_rec, LoopRole::kIn},
                {grad_hy_rec, LoopRole::kIn},
                {grad_cy, LoopRole::kIn},
                {w_rec_weight, LoopRole::kIn},
                {step_proj ? *w_hr : Tensor(), LoopRole::kIn},
                {dgates, LoopRole::kOut},
                {dh_rec, LoopRole::kOut},
                {dc, LoopRole::kOut},
                {step_proj ? dr : Tensor(), LoopRole::kOut}},
               loop);
    };
    if (!run_whole(whole, {general, input})) general();
  }
  if (fold) {
    // dr: each output row's gradient (its own, the next step's through
    // W_hh, the final state's where a sequence ends); dh: h_0's.
    const PhaseRange phase("fused_rnn::projection_backward");
    dr.copy_(go);
    route_state_gradients(at::mm(dgates, w_hh), grad_hy.contiguous(), sc, dr, dh);
  }

  const PhaseRange weights("fused_rnn::weight_gradients");
  const PreviousStates h_prev(out.contiguous(), hx.contiguous(), sc);
  Tensor grad_w_hr = absent(input);
  if (proj) {
    const Tensor h_all = gates_c.narrow(1, 3 * H, H) * at::tanh(cells_c);
    grad_w_hr = sequence_sum_product(dr, h_all);
  }
  return {input_grad ? input_gradient(dgates, w_ih).view(input.sizes()) : absent(input),
          dh,
          dc,
          sequence_sum_product(dgates, x),
          h_prev.sum_product(dgates),
          has_bias ? dgates.sum(0) : absent(input),
          grad_w_hr};
}

Forward lstm_forward(const Tensor& input, const Tensor& hx, const Tensor& cx,
                     const Tensor& w_ih, const Tensor& w_hh, const optional<Tensor>& b_ih,
                     const optional<Tensor>& b_hh, const optional<Tensor>& w_hr,
                     const optional<Tensor>& batch_sizes, bool reverse, bool train) {
  return lstm_forward_impl(input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse,
                           train, [](const PersistentForward& w, const GeneralLoop&) { return run_alone(w); });
}

Backward lstm_backward(const Tensor& grad_output, const Tensor& grad_hy,
                       const Tensor& grad_cy, const Tensor& input, const Tensor& hx,
                       const Tensor& cx, const Tensor& w_ih, const Tensor& w_hh,
                       const optional<Tensor>& w_hr, const Tensor& output,
                       const Tensor& gates, const Tensor& cells,
                       const optional<Tensor>& batch_sizes, bool reverse, bool has_bias,
                       bool input_grad) {
  return lstm_backward_impl(grad_output, grad_hy, grad_cy, input, hx, cx, w_ih, w_hh, w_hr,
                            output, gates, cells, batch_sizes, reverse, has_bias, input_grad,
                            [](const PersistentBackward& w, const GeneralLoop&) { return run_alone(w); });
}

// Both directions of a bidirectional layer (the second walks the sequence
// from its end): lstm_forward's outputs for each, the recurrences in one
// launch where the persistent kernels take the pair.
decltype(std::tuple_cat(Forward(), Forward())) lstm_forward_pair(
    const Tensor& input, const Tensor& hx, const Tensor& cx, const Tensor& w_ih,
    const Tensor& w_hh, const optional<Tensor>& b_ih, const optional<Tensor>& b_hh,
    const optional<Tensor>& w_hr, const Tensor& hx_r, const Tensor& cx_r, const Tensor& w_ih_r,
    const Tensor& w_hh_r, const optional<Tensor>& b_ih_r, const optional<Tensor>& b_hh_r,
    const optional<Tensor>& w_hr_r, const optional<Tensor>& batch_sizes, bool train) {
  Forward f, r;
  run_both_directions<PersistentForward>(
      [&](RunWhole<PersistentForward> run) {
        f = lstm_forward_impl(input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, false,
                              train, run);
      },
      [&](RunWhole<PersistentForward> run) {
        r = lstm_forward_impl(input, hx_r, cx_r, w_ih_r, w_hh_r, b_ih_r, b_hh_r, w_hr_r,
                              batch_sizes, true, train, run);
      });
  return std::tuple_cat(f, r);
}

// lstm_backward of both directions, the recurrences in one launch where the
// persistent kernels take the pair; one grad_input, the sum of both.
decltype(std::tuple_cat(Backward(), std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>()))
lstm_backward_pair(const Tensor& grad_output, const Tensor& grad_hy, const Tensor& grad_cy,
                   const Tensor& grad_output_r, const Tensor& grad_hy_r,
                   const Tensor& grad_cy_r, const Tensor& input, const Tensor& hx,
                   const Tensor& cx, const Tensor& w_ih, const Tensor& w_hh,
                   const optional<Tensor>& w_hr, const Tensor& output, const Tensor& gates,
                   const Tensor& cells, const Tensor& hx_r, const Tensor& cx_r,
                   const Tensor& w_ih_r, const Tensor& w_hh_r, const optional<Tensor>& w_hr_r,
                   const Tensor& output_r, const Tensor& gates_r, const Tensor& cells_r,
                   const optional<Tensor>& batch_sizes, bool has_bias, bool input_grad) {
  Backward f, r;
  run_both_directions<PersistentBackward>(
      [&](RunWhole<PersistentBackward> run) {
        f = lstm_backward_impl(grad_output, grad_hy, grad_cy, input, hx, cx, w_ih, w_hh, w_hr,
                               output, gates, cells, batch_sizes, false, has_bias, input_grad,
                               run);
      },
      [&](RunWhole<PersistentBackward> run) {
        r = lstm_backward_impl(grad_output_r, grad_hy_r, grad_cy_r, input, hx_r, cx_r, w_ih_r,
                               w_hh_r, w_hr_r, output_r, gates_r, cells_r, batch_sizes, true,
                               has_bias, input_grad, run);
      });
  auto [g_in, g_hx, g_cx, g_wih, g_whh, g_b, g_whr] = f;
  auto [g_in_r, g_hx_r, g_cx_r, g_wih_r, g_whh_r, g_b_r, g_whr_r] = r;
  if (input_grad) g_in.add_(g_in_r);
  return {g_in,   g_hx,   g_cx,    g_wih,   g_whh, g_b,   g_whr,
          g_hx_r, g_cx_r, g_wih_r, g_whh_r, g_b_r, g_whr_r};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_rnn, CPU, m) {
  m.impl("lstm_forward", &lstm_forward);
  m.impl("lstm_backward", &lstm_backward);
  m.impl("lstm_forward_pair", &lstm_forward_pair);
  m.impl("lstm_backward_pair", &lstm_backward_pair);
}

#if defined(FUSED_RNN_WITH_CUDA)
TORCH_LIBRARY_IMPL(fused_rnn, CUDA, m) {
  m.impl("lstm_forward", &lstm_forward);
  m.impl("lstm_backward", &lstm_backward);
  m.impl("lstm_forward_pair", &lstm_forward_pair);
  m.impl("lstm_backward_pair", &lstm_backward_pair);
}
#endif

}  // namespace fused_rnn

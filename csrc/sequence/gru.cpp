// GRU over a whole sequence, one layer, one direction, on any device. The
// reset gate multiplies the recurrent n projection (with b_hn), as in
// torch.nn and cuDNN, so per step the recurrent projection W_hh h_{t-1} + b_hh
// is its own GEMM and the pointwise pass joins it with the input projection.
#include <torch/library.h>

#include "sequence.h"

namespace fused_rnn {
namespace {

using at::Tensor;
using c10::optional;

constexpr CellShape kGru{"GRU", 3};

// Shapes: input (T, B, I) or packed (N, I); hx (B, H); w_ih (3H, I);
// w_hh (3H, H); b_ih, b_hh (3H). Returns output (T, B, H) or (N, H), hy
// (B, H) and, when training, the activated gates r, z, n (N, 3H) and the
// recurrent n projections (N, H).
using Forward = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using Backward = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

Forward gru_forward_impl(const Tensor& input, const Tensor& hx, const Tensor& w_ih,
                         const Tensor& w_hh, const optional<Tensor>& b_ih,
                         const optional<Tensor>& b_hh, const optional<Tensor>& batch_sizes,
                         bool reverse, bool train, RunWhole<PersistentForward> run_whole) {
  check_forward_args(kGru, input, batch_sizes, {hx}, w_ih, w_hh, b_ih, b_hh,
                     c10::nullopt);
  const c10::OptionalDeviceGuard guard(at::device_of(input));
  const AutocastOff autocast_off;
  const Schedule sc = make_schedule(input, batch_sizes, hx.size(0), reverse);
  const int64_t H = w_hh.size(0) / 3;
  const auto opts = input.options();

  const Tensor x = input.reshape({sc.rows, input.size(-1)});
  // x_t @ W_ih^T, (rows, 3H) per step; the biases join in the pointwise pass.
  InputProjection xw = [&] {
    const PhaseRange phase("fused_rnn::input_projection");
    return InputProjection(x, w_ih, sc,
                           train || input.is_cuda() || loop_needs_whole_projection());
  }();
  const Tensor out = at::empty({sc.rows, H}, opts);
  const Tensor h = at::empty({sc.batch, H}, opts);
  const Tensor hn = train ? at::empty({sc.rows, H}, opts) : Tensor();
  const Tensor bias_ih = b_ih.has_value() ? b_ih->contiguous() : Tensor();
  const Tensor bias_hh = b_hh.has_value() ? b_hh->contiguous() : Tensor();

  const PhaseRange recurrence("fused_rnn::recurrence");
  PersistentForward whole;
  if (input.is_cuda()) {
    whole = persistent_request<PersistentForward>(PersistentCell::kGru, sc, w_hh);
    whole.xw = xw.all();
    whole.keep_gates = train;
    whole.bias = bias_ih;
    whole.bias_hh = bias_hh;
    whole.hx = hx.contiguous();
    whole.out = out;
    whole.hy = h;
    whole.hn = hn;
  }
  // The per-step loop (the general path), for run_whole to run itself
  // (both directions of a layer side by side) or after it.
  auto general = [&] {
    // The per-step loop, on the tensors run_loop hands it (graphs.h); `xw`
    // itself only where the projection is not kept whole (CPU inference).
    enum { kXw, kBiasIh, kBiasHh, kH0, kW, kOut, kHy, kHn };
    auto loop = [&sc, &xw, train](const std::vector<Tensor>& t) {
      const int64_t H = t[kHy].size(1);
      const GemmWeight w_rec(t[kW], sc.rows, /*per_step=*/true);
      const Tensor scratch = at::empty({sc.batch * 3 * H}, t[kOut].options());
      t[kHy].copy_(t[kH0]);
      RunningState state(t[kHy], sc);
      for (int64_t s = 0; s < sc.steps; ++s) {
        const int64_t n = sc.size_at(s);
        const Tensor out_s = step_rows(t[kOut], sc, s);
        GruForwardStep step{t[kXw].defined() ? step_rows(t[kXw], sc, s) : xw.step(s),
                            t[kBiasIh],
                            t[kBiasHh],
                            state.before(s, n),
                            w_rec,
                            out_s,
                            train ? step_rows(t[kHn], sc, s) : Tensor(),
                            scratch};
        FUSED_RNN_RUN_STEP(gru_forward_step, step, out_s);
        state.after(out_s);
      }
      state.finish();
    };
    run_loop({"gru_forward", loop_params(sc, {train}), sc.steps, sc.batch * 3 * H * H},
             {{xw.all(), train ? LoopRole::kInOut : LoopRole::kIn},
              {bias_ih, LoopRole::kIn},
              {bias_hh, LoopRole::kIn},
              {hx, LoopRole::kIn},
              {w_hh, LoopRole::kIn},
              {out, LoopRole::kOut},
              {h, LoopRole::kOut},
              {hn, LoopRole::kOut}},
             loop);
  };
  if (!run_whole(whole, {general, input})) general();
  const Tensor output = sc.dense ? out.view({sc.steps, sc.batch, H}) : out;
  return {output, h, train ? xw.all() : absent(input),
          train ? hn : absent(input)};
}

Backward gru_backward_impl(const Tensor& grad_output, const Tensor& grad_hy,
                           const Tensor& input, const Tensor& hx, const Tensor& w_ih,
                           const Tensor& w_hh, const Tensor& output, const Tensor& gates,
                           const Tensor& hidden_n, const optional<Tensor>& batch_sizes,
                           bool reverse, bool has_bias, bool input_grad,
                           RunWhole<PersistentBackward> run_whole) {
  check_forward_args(kGru, input, batch_sizes, {hx}, w_ih, w_hh, c10::nullopt,
                     c10::nullopt, c10::nullopt);
  const c10::OptionalDeviceGuard guard(at::device_of(input));
  const AutocastOff autocast_off;
  const Schedule sc = make_schedule(input, batch_sizes, hx.size(0), reverse);
  const int64_t H = w_hh.size(0) / 3;
  TORCH_CHECK(output.numel() == sc.rows * H, "GRU backward: output has ",
              output.numel(), " elements, expected ", sc.rows * H);
  check_like("output", output, input, output.sizes());
  check_like("grad_output", grad_output, input, output.sizes());
  check_like("grad_hy", grad_hy, input, hx.sizes());
  check_like("gates", gates, input, {sc.rows, 3 * H});
  check_like("hidden_n", hidden_n, input, {sc.rows, H});

  const Tensor x = input.reshape({sc.rows, input.size(-1)});
  const Tensor go = grad_output.reshape({sc.rows, H}).contiguous();
  const Tensor out = output.reshape({sc.rows, H}).contiguous();
  const Tensor hx_c = hx.contiguous();
  const PreviousStates h_prev(out, hx_c, sc);
  const Tensor gates_c = gates.contiguous();
  const Tensor hn_c = hidden_n.contiguous();
  const Tensor dgates_x = at::empty({sc.rows, 3 * H}, input.options());
  const Tensor dgates_h = at::empty({sc.rows, 3 * H}, input.options());
  const Tensor dh = at::empty({sc.batch, H}, input.options());

  {
    const PhaseRange recurrence("fused_rnn::recurrence_backward");
    PersistentBackward whole;
    if (input.is_cuda()) {
      whole = persistent_request<PersistentBackward>(PersistentCell::kGru, sc, w_hh);
      whole.grad_out = go;
      whole.grad_hy = grad_hy.contiguous();
      whole.out = out;
      whole.hx = hx_c;
      whole.gates = gates_c;
      whole.hn = hn_c;
      whole.dgates = dgates_x;
      whole.dgates_h = dgates_h;
      whole.grad_hx = dh;
    }
    // The per-step loop (the general path), for run_whole to run itself
    // (both directions of a layer side by side) or after it.
    auto general = [&] {
      // The per-step loop, on the tensors run_loop hands it (graphs.h).
      enum { kGates, kHn, kOut, kH0, kPrev, kGo, kGradHy, kW, kDgatesX, kDgatesH, kDh };
      auto loop = [&sc](const std::vector<Tensor>& t) {
        const PreviousStates h_prev(t[kOut], t[kH0], sc, t[kPrev]);
        const Tensor product = at::empty_like(t[kDh]);
        const GemmWeight w_rec_t(t[kW].t(), sc.rows, /*per_step=*/true);
        t[kDh].copy_(t[kGradHy]);
        for (int64_t s = sc.steps - 1; s >= 0; --s) {
          const int64_t n = sc.size_at(s);
          const Tensor dgh = step_rows(t[kDgatesH], sc, s);
          GruBackwardStep step{step_rows(t[kGates], sc, s), step_rows(t[kHn], sc, s),
                               h_prev.step(s),              rows(t[kDh], n),
                               step_rows(t[kGo], sc, s),    step_rows(t[kDgatesX], sc, s),
                               dgh};
          FUSED_RNN_RUN_STEP(gru_backward_step, step, dgh);
          // dh_{t-1} = z * dh_t (the step wrote it) + dgates_h @ W_hh. A
          // separate product then an add: accumulating the product into dh in
          // place (beta = 1) was measured several times less accurate in
          // float32.
          w_rec_t.product_into(rows(product, n), dgh);
          rows(t[kDh], n).add_(rows(product, n));
        }
      };
      run_loop({"gru_backward", loop_params(sc, {}), sc.steps, sc.batch * 3 * H * H},
               {{gates_c, LoopRole::kIn},
                {hn_c, LoopRole::kIn},
                {out, LoopRole::kIn},
                {hx_c, LoopRole::kIn},
                {h_prev.materialized(), LoopRole::kIn},
                {go, LoopRole::kIn},
                {grad_hy, LoopRole::kIn},
                {w_hh, LoopRole::kIn},
                {dgates_x, LoopRole::kOut},
                {dgates_h, LoopRole::kOut},
                {dh, LoopRole::kOut}},
               loop);
    };
    if (!run_whole(whole, {general, input})) general();
  }

  const PhaseRange weights("fused_rnn::weight_gradients");

  return {input_grad ? input_gradient(dgates_x, w_ih).view(input.sizes())
                     : absent(input),
          dh,
          sequence_sum_product(dgates_x, x),
          h_prev.sum_product(dgates_h),
          has_bias ? dgates_x.sum(0) : absent(input),
          has_bias ? dgates_h.sum(0) : absent(input)};
}

Forward gru_forward(const Tensor& input, const Tensor& hx, const Tensor& w_ih,
                    const Tensor& w_hh, const optional<Tensor>& b_ih,
                    const optional<Tensor>& b_hh, const optional<Tensor>& batch_sizes,
                    bool reverse, bool train) {
  return gru_forward_impl(input, hx, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse, train,
                          [](const PersistentForward& w, const GeneralLoop&) { return run_alone(w); });
}

Backward gru_backward(const Tensor& grad_output, const Tensor& grad_hy, const Tensor& input,
                      const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh,
                      const Tensor& output, const Tensor& gates, const Tensor& hidden_n,
                      const optional<Tensor>& batch_sizes, bool reverse, bool has_bias,
                      bool input_grad) {
  return gru_backward_impl(grad_output, grad_hy, input, hx, w_ih, w_hh, output, gates,
                           hidden_n, batch_sizes, reverse, has_bias, input_grad,
                           [](const PersistentBackward& w, const GeneralLoop&) { return run_alone(w); });
}

// Both directions of a bidirectional layer (the second walks the sequence
// from its end): gru_forward's outputs for each, the recurrences in one
// launch where the persistent kernels take the pair.
decltype(std::tuple_cat(Forward(), Forward())) gru_forward_pair(
    const Tensor& input, const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh,
    const optional<Tensor>& b_ih, const optional<Tensor>& b_hh, const Tensor& hx_r,
    const Tensor& w_ih_r, const Tensor& w_hh_r, const optional<Tensor>& b_ih_r,
    const optional<Tensor>& b_hh_r, const optional<Tensor>& batch_sizes, bool train) {
  Forward f, r;
  run_both_directions<PersistentForward>(
      [&](RunWhole<PersistentForward> run) {
        f = gru_forward_impl(input, hx, w_ih, w_hh, b_ih, b_hh, batch_sizes, false, train, run);
      },
      [&](RunWhole<PersistentForward> run) {
        r = gru_forward_impl(input, hx_r, w_ih_r, w_hh_r, b_ih_r, b_hh_r, batch_sizes, true,
                             train, run);
      });
  return std::tuple_cat(f, r);
}

// gru_backward of both directions, the recurrences in one launch where the
// persistent kernels take the pair; one grad_input, the sum of both.
decltype(std::tuple_cat(Backward(), std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>()))
gru_backward_pair(const Tensor& grad_output, const Tensor& grad_hy, const Tensor& grad_output_r,
                  const Tensor& grad_hy_r, const Tensor& input, const Tensor& hx,
                  const Tensor& w_ih, const Tensor& w_hh, const Tensor& output,
                  const Tensor& gates, const Tensor& hidden_n, const Tensor& hx_r,
                  const Tensor& w_ih_r, const Tensor& w_hh_r, const Tensor& output_r,
                  const Tensor& gates_r, const Tensor& hidden_n_r,
                  const optional<Tensor>& batch_sizes, bool has_bias, bool input_grad) {
  Backward f, r;
  run_both_directions<PersistentBackward>(
      [&](RunWhole<PersistentBackward> run) {
        f = gru_backward_impl(grad_output, grad_hy, input, hx, w_ih, w_hh, output, gates,
                              hidden_n, batch_sizes, false, has_bias, input_grad, run);
      },
      [&](RunWhole<PersistentBackward> run) {
        r = gru_backward_impl(grad_output_r, grad_hy_r, input, hx_r, w_ih_r, w_hh_r, output_r,
                              gates_r, hidden_n_r, batch_sizes, true, has_bias, input_grad, run);
      });
  auto [g_in, g_hx, g_wih, g_whh, g_bih, g_bhh] = f;
  auto [g_in_r, g_hx_r, g_wih_r, g_whh_r, g_bih_r, g_bhh_r] = r;
  if (input_grad) g_in.add_(g_in_r);
  return {g_in, g_hx, g_wih, g_whh, g_bih, g_bhh, g_hx_r, g_wih_r, g_whh_r, g_bih_r, g_bhh_r};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_rnn, CPU, m) {
  m.impl("gru_forward", &gru_forward);
  m.impl("gru_backward", &gru_backward);
  m.impl("gru_forward_pair", &gru_forward_pair);
  m.impl("gru_backward_pair", &gru_backward_pair);
}

#if defined(FUSED_RNN_WITH_CUDA)
TORCH_LIBRARY_IMPL(fused_rnn, CUDA, m) {
  m.impl("gru_forward", &gru_forward);
  m.impl("gru_backward", &gru_backward);
  m.impl("gru_forward_pair", &gru_forward_pair);
  m.impl("gru_backward_pair", &gru_backward_pair);
}
#endif

}  // namespace fused_rnn

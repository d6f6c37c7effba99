// Elman RNN (tanh or relu) over a whole sequence, one layer, one direction,
// on any device. Backward needs nothing beyond the output itself.
#include <torch/library.h>

#include "sequence.h"

namespace fused_rnn {
namespace {

using at::Tensor;
using c10::optional;

constexpr CellShape kRnn{"RNN", 1};

// Shapes: input (T, B, I) or packed (N, I); hx (B, H); w_ih (H, I);
// w_hh (H, H); b_ih, b_hh (H). Returns output (T, B, H) or (N, H), hy (B, H).
using Forward = std::tuple<Tensor, Tensor>;
using Backward = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

Forward rnn_forward_impl(const Tensor& input, const Tensor& hx, const Tensor& w_ih,
                         const Tensor& w_hh, const optional<Tensor>& b_ih,
                         const optional<Tensor>& b_hh, const optional<Tensor>& batch_sizes,
                         bool reverse, bool relu, RunWhole<PersistentForward> run_whole) {
  check_forward_args(kRnn, input, batch_sizes, {hx}, w_ih, w_hh, b_ih, b_hh,
                     c10::nullopt);
  const c10::OptionalDeviceGuard guard(at::device_of(input));
  const AutocastOff autocast_off;
  const Schedule sc = make_schedule(input, batch_sizes, hx.size(0), reverse);
  const int64_t H = w_hh.size(0);

  const Tensor x = input.reshape({sc.rows, input.size(-1)});
  // x_t @ W_ih^T, (rows, H) per step; the biases join in the pointwise pass.
  InputProjection xw = [&] {
    const PhaseRange phase("fused_rnn::input_projection");
    return InputProjection(x, w_ih, sc, input.is_cuda() || loop_needs_whole_projection());
  }();
  const Tensor bias = b_ih.has_value() ? *b_ih + *b_hh : Tensor();
  const Tensor out = at::empty({sc.rows, H}, input.options());
  const Tensor h = at::empty({sc.batch, H}, input.options());

  const PhaseRange recurrence("fused_rnn::recurrence");
  PersistentForward whole;
  if (input.is_cuda()) {
    whole = persistent_request<PersistentForward>(
        relu ? PersistentCell::kRnnRelu : PersistentCell::kRnnTanh, sc, w_hh);
    whole.xw = xw.all();
    whole.bias = bias;
    whole.hx = hx.contiguous();
    whole.out = out;
    whole.hy = h;
  }
  // The per-step loop (the general path), for run_whole to run itself
  // (both directions of a layer side by side) or after it.
  auto general = [&] {
    // The per-step loop, on the tensors run_loop hands it (graphs.h); `xw`
    // itself only where the projection is not kept whole (CPU inference).
    enum { kXw, kBias, kH0, kW, kOut, kHy };
    auto loop = [&sc, &xw, relu](const std::vector<Tensor>& t) {
      const GemmWeight w_rec(t[kW], sc.rows, /*per_step=*/true);
      t[kHy].copy_(t[kH0]);
      RunningState state(t[kHy], sc);
      for (int64_t s = 0; s < sc.steps; ++s) {
        const int64_t n = sc.size_at(s);
        const Tensor out_s = step_rows(t[kOut], sc, s);
        RnnForwardStep step{t[kXw].defined() ? step_rows(t[kXw], sc, s) : xw.step(s),
                            t[kBias], state.before(s, n), w_rec, out_s, relu};
        FUSED_RNN_RUN_STEP(rnn_forward_step, step, out_s);
        state.after(out_s);
      }
      state.finish();
    };
    run_loop({"rnn_forward", loop_params(sc, {relu}), sc.steps, sc.batch * H * H},
             {{xw.all(), LoopRole::kIn},
              {bias, LoopRole::kIn},
              {hx, LoopRole::kIn},
              {w_hh, LoopRole::kIn},
              {out, LoopRole::kOut},
              {h, LoopRole::kOut}},
             loop);
  };
  if (!run_whole(whole, {general, input})) general();
  return {sc.dense ? out.view({sc.steps, sc.batch, H}) : out, h};
}

Backward rnn_backward_impl(const Tensor& grad_output, const Tensor& grad_hy,
                           const Tensor& input, const Tensor& hx, const Tensor& w_ih,
                           const Tensor& w_hh, const Tensor& output,
                           const optional<Tensor>& batch_sizes, bool reverse, bool relu,
                           bool has_bias, bool input_grad,
                           RunWhole<PersistentBackward> run_whole) {
  check_forward_args(kRnn, input, batch_sizes, {hx}, w_ih, w_hh, c10::nullopt,
                     c10::nullopt, c10::nullopt);
  const c10::OptionalDeviceGuard guard(at::device_of(input));
  const AutocastOff autocast_off;
  const Schedule sc = make_schedule(input, batch_sizes, hx.size(0), reverse);
  const int64_t H = w_hh.size(0);
  TORCH_CHECK(output.numel() == sc.rows * H, "RNN backward: output has ",
              output.numel(), " elements, expected ", sc.rows * H);
  check_like("output", output, input, output.sizes());
  check_like("grad_output", grad_output, input, output.sizes());
  check_like("grad_hy", grad_hy, input, hx.sizes());

  const Tensor x = input.reshape({sc.rows, input.size(-1)});
  const Tensor go = grad_output.reshape({sc.rows, H}).contiguous();
  const Tensor out = output.reshape({sc.rows, H}).contiguous();
  const Tensor dpre = at::empty({sc.rows, H}, input.options());
  const Tensor dh = at::empty({sc.batch, H}, input.options());

  {
    const PhaseRange recurrence("fused_rnn::recurrence_backward");
    PersistentBackward whole;
    if (input.is_cuda()) {
      whole = persistent_request<PersistentBackward>(
          relu ? PersistentCell::kRnnRelu : PersistentCell::kRnnTanh, sc, w_hh);
      whole.grad_out = go;
      whole.grad_hy = grad_hy.contiguous();
      whole.out = out;
      whole.dgates = dpre;
      whole.grad_hx = dh;
    }
    // The per-step loop (the general path), for run_whole to run itself
    // (both directions of a layer side by side) or after it.
    auto general = [&] {
      // The per-step loop, on the tensors run_loop hands it (graphs.h).
      enum { kOut, kGo, kGradHy, kW, kDpre, kDh };
      auto loop = [&sc, relu](const std::vector<Tensor>& t) {
        t[kDh].copy_(t[kGradHy]);
        const GemmWeight w_rec_t(t[kW].t(), sc.rows, /*per_step=*/true);
        for (int64_t s = sc.steps - 1; s >= 0; --s) {
          const int64_t n = sc.size_at(s);
          const Tensor dp = step_rows(t[kDpre], sc, s);
          RnnBackwardStep step{step_rows(t[kOut], sc, s), rows(t[kDh], n),
                               step_rows(t[kGo], sc, s), dp, relu};
          FUSED_RNN_RUN_STEP(rnn_backward_step, step, dp);
          w_rec_t.product_into(rows(t[kDh], n), dp);
        }
      };
      run_loop({"rnn_backward", loop_params(sc, {relu}), sc.steps, sc.batch * H * H},
               {{out, LoopRole::kIn},
                {go, LoopRole::kIn},
                {grad_hy, LoopRole::kIn},
                {w_hh, LoopRole::kIn},
                {dpre, LoopRole::kOut},
                {dh, LoopRole::kOut}},
               loop);
    };
    if (!run_whole(whole, {general, input})) general();
  }

  const PhaseRange weights("fused_rnn::weight_gradients");

  return {input_grad ? input_gradient(dpre, w_ih).view(input.sizes()) : absent(input),
          dh, sequence_sum_product(dpre, x),
          PreviousStates(out, hx.contiguous(), sc).sum_product(dpre),
          has_bias ? dpre.sum(0) : absent(input)};
}

Forward rnn_forward(const Tensor& input, const Tensor& hx, const Tensor& w_ih,
                    const Tensor& w_hh, const optional<Tensor>& b_ih,
                    const optional<Tensor>& b_hh, const optional<Tensor>& batch_sizes,
                    bool reverse, bool relu) {
  return rnn_forward_impl(input, hx, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse, relu,
                          [](const PersistentForward& w, const GeneralLoop&) { return run_alone(w); });
}

Backward rnn_backward(const Tensor& grad_output, const Tensor& grad_hy, const Tensor& input,
                      const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh,
                      const Tensor& output, const optional<Tensor>& batch_sizes, bool reverse,
                      bool relu, bool has_bias, bool input_grad) {
  return rnn_backward_impl(grad_output, grad_hy, input, hx, w_ih, w_hh, output, batch_sizes,
                           reverse, relu, has_bias, input_grad,
                           [](const PersistentBackward& w, const GeneralLoop&) { return run_alone(w); });
}

// Both directions of a bidirectional layer (the second walks the sequence
// from its end): rnn_forward's outputs for each, the recurrences in one
// launch where the persistent kernels take the pair.
decltype(std::tuple_cat(Forward(), Forward())) rnn_forward_pair(
    const Tensor& input, const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh,
    const optional<Tensor>& b_ih, const optional<Tensor>& b_hh, const Tensor& hx_r,
    const Tensor& w_ih_r, const Tensor& w_hh_r, const optional<Tensor>& b_ih_r,
    const optional<Tensor>& b_hh_r, const optional<Tensor>& batch_sizes, bool relu) {
  Forward f, r;
  run_both_directions<PersistentForward>(
      [&](RunWhole<PersistentForward> run) {
        f = rnn_forward_impl(input, hx, w_ih, w_hh, b_ih, b_hh, batch_sizes, false, relu, run);
      },
      [&](RunWhole<PersistentForward> run) {
        r = rnn_forward_impl(input, hx_r, w_ih_r, w_hh_r, b_ih_r, b_hh_r, batch_sizes, true,
                             relu, run);
      });
  return std::tuple_cat(f, r);
}

// rnn_backward of both directions, the recurrences in one launch where the
// persistent kernels take the pair; one grad_input, the sum of both.
decltype(std::tuple_cat(Backward(), std::tuple<Tensor, Tensor, Tensor, Tensor>()))
rnn_backward_pair(const Tensor& grad_output, const Tensor& grad_hy, const Tensor& grad_output_r,
                  const Tensor& grad_hy_r, const Tensor& input, const Tensor& hx,
                  const Tensor& w_ih, const Tensor& w_hh, const Tensor& output,
                  const Tensor& hx_r, const Tensor& w_ih_r, const Tensor& w_hh_r,
                  const Tensor& output_r, const optional<Tensor>& batch_sizes, bool relu,
                  bool has_bias, bool input_grad) {
  Backward f, r;
  run_both_directions<PersistentBackward>(
      [&](RunWhole<PersistentBackward> run) {
        f = rnn_backward_impl(grad_output, grad_hy, input, hx, w_ih, w_hh, output, batch_sizes,
                              false, relu, has_bias, input_grad, run);
      },
      [&](RunWhole<PersistentBackward> run) {
        r = rnn_backward_impl(grad_output_r, grad_hy_r, input, hx_r, w_ih_r, w_hh_r, output_r,
                              batch_sizes, true, relu, has_bias, input_grad, run);
      });
  auto [g_in, g_hx, g_wih, g_whh, g_b] = f;
  auto [g_in_r, g_hx_r, g_wih_r, g_whh_r, g_b_r] = r;
  if (input_grad) g_in.add_(g_in_r);
  return {g_in, g_hx, g_wih, g_whh, g_b, g_hx_r, g_wih_r, g_whh_r, g_b_r};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_rnn, CPU, m) {
  m.impl("rnn_forward", &rnn_forward);
  m.impl("rnn_backward", &rnn_backward);
  m.impl("rnn_forward_pair", &rnn_forward_pair);
  m.impl("rnn_backward_pair", &rnn_backward_pair);
}

#if defined(FUSED_RNN_WITH_CUDA)
TORCH_LIBRARY_IMPL(fused_rnn, CUDA, m) {
  m.impl("rnn_forward", &rnn_forward);
  m.impl("rnn_backward", &rnn_backward);
  m.impl("rnn_forward_pair", &rnn_forward_pair);
  m.impl("rnn_backward_pair", &rnn_backward_pair);
}
#endif

}  // namespace fused_rnn

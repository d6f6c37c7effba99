#include "sequence.h"

#include <c10/util/irange.h>

namespace fused_rnn {

Schedule make_schedule(const at::Tensor& input,
                       const c10::optional<at::Tensor>& batch_sizes,
                       int64_t batch, bool reverse) {
  Schedule sc;
  sc.batch = batch;
  sc.reverse = reverse;
  if (!batch_sizes.has_value()) {
    TORCH_CHECK(input.dim() == 3, "input must have 3 dimensions, got ",
                input.dim());
    TORCH_CHECK(input.size(0) > 0,
                "Expected sequence length to be larger than 0 in RNN");
    TORCH_CHECK(input.size(1) == batch, "Expected hidden size (", batch,
                ", ...) to match the input's batch ", input.size(1));
    sc.dense = true;
    sc.steps = input.size(0);
    sc.rows = sc.steps * batch;
    sc.size.assign(sc.steps, batch);
    sc.offset.resize(sc.steps);
    for (const auto t : c10::irange(sc.steps)) sc.offset[t] = t * batch;
    return sc;
  }
  const at::Tensor& bs = *batch_sizes;
  TORCH_CHECK(input.dim() == 2, "packed input must have 2 dimensions, got ",
              input.dim());
  TORCH_CHECK(bs.dim() == 1 && bs.device().is_cpu() &&
                  bs.scalar_type() == at::kLong,
              "batch_sizes must be a 1-D int64 CPU tensor, got ",
              bs.dim(), "-D ", bs.scalar_type(), " on ", bs.device());
  TORCH_CHECK(bs.numel() > 0,
              "Expected sequence length to be larger than 0 in RNN");
  const at::Tensor sizes = bs.contiguous();
  const int64_t* p = sizes.data_ptr<int64_t>();
  sc.dense = false;
  sc.steps = sizes.numel();
  sc.size.assign(p, p + sc.steps);
  sc.offset.resize(sc.steps);
  int64_t total = 0;
  for (const auto t : c10::irange(sc.steps)) {
    TORCH_CHECK(sc.size[t] > 0, "batch_sizes must be positive, got ",
                sc.size[t], " at step ", t);
    TORCH_CHECK(t == 0 || sc.size[t] <= sc.size[t - 1],
                "batch_sizes must be non-increasing, got ", sc.size[t - 1],
                " then ", sc.size[t]);
    sc.offset[t] = total;
    total += sc.size[t];
  }
  TORCH_CHECK(sc.size[0] == batch, "Expected hidden size (", batch,
              ", ...) to match batch_sizes[0] = ", sc.size[0]);
  TORCH_CHECK(total == input.size(0), "batch_sizes sum to ", total,
              " but the packed input has ", input.size(0), " rows");
  sc.rows = total;
  return sc;
}

namespace {

void check_same(const char* what, const at::Tensor& input, const at::Tensor& t) {
  TORCH_CHECK(t.device() == input.device(), "Input and ", what,
              " tensors are not at the same device, found input tensor at ",
              input.device(), " and ", what, " tensor at ", t.device());
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), "Input and ", what,
              " tensors are not the same dtype, found input tensor with ",
              input.scalar_type(), " and ", what, " tensor with ",
              t.scalar_type());
}

void check_shape(const char* what, const at::Tensor& t, at::IntArrayRef sizes) {
  TORCH_CHECK(t.sizes() == sizes, "Expected ", what, " of size ", sizes,
              ", got ", t.sizes());
}

}  // namespace

void check_forward_args(const CellShape& cell, const at::Tensor& input,
                        const c10::optional<at::Tensor>& batch_sizes,
                        std::initializer_list<at::Tensor> states,
                        const at::Tensor& w_ih, const at::Tensor& w_hh,
                        const c10::optional<at::Tensor>& b_ih,
                        const c10::optional<at::Tensor>& b_hh,
                        const c10::optional<at::Tensor>& w_hr) {
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), cell.name,
              ": expected a floating point input, got ", input.scalar_type());
  TORCH_CHECK(input.dim() == (batch_sizes.has_value() ? 2 : 3), cell.name,
              ": input must have ", batch_sizes.has_value() ? 2 : 3,
              " dimensions, got ", input.dim());
  for (const auto& w : {w_ih, w_hh}) check_same("parameter", input, w);
  TORCH_CHECK(b_ih.has_value() == b_hh.has_value(), cell.name,
              ": give both biases or neither");
  if (b_ih.has_value()) {
    check_same("parameter", input, *b_ih);
    check_same("parameter", input, *b_hh);
  }
  if (w_hr.has_value()) check_same("parameter", input, *w_hr);
  for (const auto& s : states) check_same("hidden", input, s);

  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) % cell.gates == 0, cell.name,
              ": weight_hh must be 2-D with a multiple of ", cell.gates,
              " rows, got ", w_hh.sizes());
  const int64_t hidden = w_hh.size(0) / cell.gates;
  const int64_t proj = w_hr.has_value() ? w_hr->size(0) : hidden;
  const int64_t gate_rows = cell.gates * hidden;
  check_shape("weight_ih", w_ih, {gate_rows, input.size(-1)});
  check_shape("weight_hh", w_hh, {gate_rows, proj});
  if (b_ih.has_value()) {
    check_shape("bias_ih", *b_ih, {gate_rows});
    check_shape("bias_hh", *b_hh, {gate_rows});
  }
  if (w_hr.has_value()) check_shape("weight_hr", *w_hr, {proj, hidden});
  const at::Tensor& hx = *states.begin();
  TORCH_CHECK(hx.dim() == 2, cell.name, ": hx must be 2-D, got ", hx.dim(),
              "-D");
  check_shape("hx", hx, {hx.size(0), proj});
  for (auto it = states.begin() + 1; it != states.end(); ++it) {
    check_shape("cx", *it, {hx.size(0), hidden});
  }
#if defined(FUSED_RNN_WITH_CUDA)
  if (input.is_cuda()) cuda::check_device_supported(input.device().index());
#endif
}

void check_like(const char* what, const at::Tensor& t, const at::Tensor& like,
                at::IntArrayRef sizes) {
  check_same(what, like, t);
  check_shape(what, t, sizes);
}

at::Tensor previous_states(const at::Tensor& seq, const at::Tensor& init,
                           const Schedule& sc) {
  const int64_t B = sc.batch;
  if (sc.dense) {
    if (sc.steps == 1) return init.clone();
    return sc.reverse ? at::cat({seq.narrow(0, B, sc.rows - B), init})
                      : at::cat({init, seq.narrow(0, 0, sc.rows - B)});
  }
  at::Tensor prev = at::empty_like(seq);
  for (const auto s : c10::irange(sc.steps)) {
    const int64_t k = sc.carried(s);
    const int64_t off = sc.offset_at(s);
    if (k > 0) {
      prev.narrow(0, off, k).copy_(seq.narrow(0, sc.offset_at(s - 1), k));
    }
    const int64_t n = sc.size_at(s);
    if (n > k) prev.narrow(0, off + k, n - k).copy_(init.narrow(0, k, n - k));
  }
  return prev;
}

void add_at_first_rows(const at::Tensor& seq, const at::Tensor& per_sequence,
                       const Schedule& sc) {
  const int64_t B = sc.batch;
  if (sc.dense) {
    seq.narrow(0, sc.offset_at(0), B).add_(per_sequence);
    return;
  }
  for (const auto s : c10::irange(sc.steps)) {
    const int64_t k = sc.carried(s), n = sc.size_at(s);
    if (n > k) seq.narrow(0, sc.offset_at(s) + k, n - k).add_(per_sequence.narrow(0, k, n - k));
  }
}

void route_state_gradients(const at::Tensor& grad_prev, const at::Tensor& grad_final,
                           const Schedule& sc, const at::Tensor& seq_grad,
                           const at::Tensor& grad_init) {
  const int64_t B = sc.batch, N = sc.rows;
  if (sc.dense) {
    // Processed step 0 starts from the initial state; step s > 0 from step
    // s-1, the B rows before it in time order (after it in reverse).
    grad_init.copy_(grad_prev.narrow(0, sc.offset_at(0), B));
    if (N > B) {
      seq_grad.narrow(0, sc.reverse ? B : 0, N - B)
          .add_(grad_prev.narrow(0, sc.reverse ? 0 : B, N - B));
    }
    seq_grad.narrow(0, sc.offset_at(sc.steps - 1), B).add_(grad_final);
    return;
  }
  for (const auto s : c10::irange(sc.steps)) {
    const int64_t k = sc.carried(s), n = sc.size_at(s), off = sc.offset_at(s);
    if (k > 0) seq_grad.narrow(0, sc.offset_at(s - 1), k).add_(grad_prev.narrow(0, off, k));
    if (n > k) grad_init.narrow(0, k, n - k).copy_(grad_prev.narrow(0, off + k, n - k));
    // rows past those the next step carries end here
    const int64_t next = s + 1 < sc.steps ? sc.carried(s + 1) : 0;
    if (n > next) {
      seq_grad.narrow(0, off + next, n - next).add_(grad_final.narrow(0, next, n - next));
    }
  }
}

PreviousStates::PreviousStates(const at::Tensor& seq, const at::Tensor& init,
                               const Schedule& sc, const at::Tensor& materialized)
    : seq_(seq), init_(init), sc_(sc) {
  if (!sc.dense) all_ = materialized.defined() ? materialized : previous_states(seq, init, sc);
}

at::Tensor PreviousStates::step(int64_t s) const {
  if (all_.defined()) return step_rows(all_, sc_, s);
  return s == 0 ? init_ : step_rows(seq_, sc_, s - 1);
}

at::Tensor PreviousStates::sum_product(const at::Tensor& a) const {
  const auto dtype = a.scalar_type();
  if (all_.defined() || (dtype != at::kFloat && dtype != at::kDouble) || packed_sums(a)) {
    // (the packed kernel, where it serves, is worth the copy of the states:
    // ~3 ms of a 34 ms LSTM training step at B=32, H=256, T=100 on the
    // 2-core EPYC)
    return sequence_sum_product(a, all_.defined() ? all_ : previous_states(seq_, init_, sc_));
  }
  // Dense: processed step 0 (time 0, or T-1 in reverse) starts from init,
  // every other row from the row B before it in processing order.
  const int64_t B = sc_.batch, N = sc_.rows;
  at::Tensor sum = sequence_sum_product(a.narrow(0, sc_.reverse ? N - B : 0, B), init_);
  if (N > B) {
    const at::Tensor a_rest = a.narrow(0, sc_.reverse ? 0 : B, N - B);
    const at::Tensor seq_rest = seq_.narrow(0, sc_.reverse ? B : 0, N - B);
    if (a.device().is_cpu()) {
      // (the small-N packed product or a narrow state's form: see there)
      sum.add_(sequence_sum_product(a_rest, seq_rest));
    } else {
      sum.addmm_(a_rest.t(), seq_rest);
    }
  }
  return sum;
}

InputProjection::InputProjection(const at::Tensor& x, const at::Tensor& w_ih,
                                 const Schedule& sc, bool keep_all)
    : x_(x), w_(w_ih, sc.rows), sc_(sc) {
  const int64_t width = w_ih.size(0);
  if (keep_all) {
    all_ = w_.product(x_);
    return;
  }
  constexpr int64_t kBufferElements = int64_t{1} << 19;
  block_steps_ = std::max<int64_t>(1, kBufferElements / std::max<int64_t>(1, sc.batch * width));
  buffer_ = at::empty({std::min(block_steps_, sc.steps) * sc.batch, width}, x.options());
}

at::Tensor InputProjection::step(int64_t s) {
  if (all_.defined()) return step_rows(all_, sc_, s);
  if (s < first_ || s > last_) {
    // Steps s .. s + block_steps - 1 in processing order cover a contiguous
    // range of times, hence of rows.
    first_ = s;
    last_ = std::min(sc_.steps, s + block_steps_) - 1;
    const int64_t t0 = std::min(sc_.time(first_), sc_.time(last_));
    const int64_t t1 = std::max(sc_.time(first_), sc_.time(last_));
    row0_ = sc_.offset[t0];
    const int64_t rows = sc_.offset[t1] + sc_.size[t1] - row0_;
    at::Tensor block = buffer_.narrow(0, 0, rows);
    w_.product_into(block, x_.narrow(0, row0_, rows));
  }
  return buffer_.narrow(0, sc_.offset_at(s) - row0_, sc_.size_at(s));
}

}  // namespace fused_rnn

// What the whole-sequence drivers of every cell share: the schedule of rows
// per step (dense or packed, forward or reverse), argument checks with
// torch.nn's messages, and the gathering of each step's initial state.
//
// Shape legend:
//   T  steps;  B  batch (rows of the state);  N  rows of the flattened
//   sequence (T*B dense, sum(batch_sizes) packed);  I  input size;
//   H  hidden size;  P  size of the hidden state h (proj_size or H);
//   G  gates per cell (LSTM 4, GRU 3, RNN 1).
#pragma once

#include <ATen/ATen.h>
#include <ATen/DeviceGuard.h>
#include <ATen/record_function.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/FunctionRef.h>

#include <algorithm>
#include <initializer_list>
#include <vector>

#include "fused_rnn/gemm.h"
#include "fused_rnn/graphs.h"
#include "fused_rnn/persistent.h"
#include "fused_rnn/steps.h"

namespace fused_rnn {

// Runs a step's pointwise pass on the device of `device_tensor`.
#if defined(FUSED_RNN_WITH_CUDA)
#define FUSED_RNN_RUN_STEP(fn, step, device_tensor) \
  ((device_tensor).is_cuda() ? cuda::fn(step) : cpu::fn(step))
#else
#define FUSED_RNN_RUN_STEP(fn, step, device_tensor) cpu::fn(step)
#endif

// The persistent whole-sequence CUDA kernels (persistent.h) for `args`, on
// CUDA tensors where the chosen path takes them; false, with nothing
// launched, where the general path must run instead.
inline bool run_persistent(const PersistentForward& args) {
#if defined(FUSED_RNN_WITH_CUDA)
  return args.out.is_cuda() && cuda::persistent_forward(args);
#else
  (void)args;
  return false;
#endif
}
inline bool run_persistent(const PersistentBackward& args) {
#if defined(FUSED_RNN_WITH_CUDA)
  return args.grad_out.is_cuda() && cuda::persistent_backward(args);
#else
  (void)args;
  return false;
#endif
}

// Whether two requests can share a launch: the same cell, steps, rows,
// shapes, dtype and device (each keeps its own tensors and time order).
template <typename Request>
bool same_launch_shape(const Request& a, const Request& b, const at::Tensor& a_rows,
                       const at::Tensor& b_rows) {
  return a.cell == b.cell && a.steps == b.steps && a.batch == b.batch &&
         a.batch_sizes == b.batch_sizes && a.w_hh.sizes() == b.w_hh.sizes() &&
         a_rows.sizes() == b_rows.sizes() && a_rows.scalar_type() == b_rows.scalar_type() &&
         a_rows.device() == b_rows.device();
}
// Both directions of a bidirectional layer in one launch of the persistent
// kernels (persistent.h), where the two requests can share it and the
// chosen path takes the pair; false, with nothing launched, otherwise.
inline bool run_persistent_pair(const PersistentForward& a, const PersistentForward& b) {
#if defined(FUSED_RNN_WITH_CUDA)
  return a.out.defined() && b.out.defined() && a.out.is_cuda() &&
         same_launch_shape(a, b, a.xw, b.xw) && cuda::persistent_forward_pair(a, b);
#else
  (void)a;
  (void)b;
  return false;
#endif
}
inline bool run_persistent_pair(const PersistentBackward& a, const PersistentBackward& b) {
#if defined(FUSED_RNN_WITH_CUDA)
  return a.grad_out.defined() && b.grad_out.defined() && a.grad_out.is_cuda() &&
         same_launch_shape(a, b, a.grad_out, b.grad_out) &&
         cuda::persistent_backward_pair(a, b);
#else
  (void)a;
  (void)b;
  return false;
#endif
}

// How a driver runs its recurrence's persistent request (its tensors
// undefined where the driver runs no persistent kernel: CPU tensors, a
// projection run per step): true when that ran the recurrence, false when the driver must
// run its per-step loop. Every driver calls it exactly once, before that
// loop. An op of one direction runs the request alone (run_alone). The
// driver also hands over its per-step loop (GeneralLoop), which a RunWhole
// may run itself (and then answer true): the pair runs both directions'
// loops side by side.
struct GeneralLoop {
  c10::function_ref<void()> run;
  at::Tensor like;  // the op's input: where the loop runs
};
template <typename Request>
using RunWhole = c10::function_ref<bool(const Request&, const GeneralLoop&)>;
inline bool run_alone(const PersistentForward& w) {
  return w.out.defined() && run_persistent(w);
}
inline bool run_alone(const PersistentBackward& w) {
  return w.grad_out.defined() && run_persistent(w);
}

// Runs the drivers of both directions of a bidirectional layer, first(run)
// and second(run) (each a driver given its RunWhole), so that their
// recurrences run together: the second driver runs inside the first's
// RunWhole, where both requests and both per-step loops exist; the pair
// launches when run_persistent_pair takes it, else each request alone where
// the persistent kernels take it, and where neither does, both per-step
// loops side by side (run_side_by_side, graphs.h). Work reaches the stream
// in the order: first's and second's input projections, the recurrences,
// second's and first's rest.
template <typename Request, typename First, typename Second>
void run_both_directions(First first, Second second) {
  first([&](const Request& a, const GeneralLoop& loop_a) {
    bool a_ran = false;
    second([&](const Request& b, const GeneralLoop& loop_b) {
      if (run_persistent_pair(a, b)) return a_ran = true;
      const bool b_ran = run_alone(b);
      a_ran = run_alone(a);
      if (b_ran || a_ran) return b_ran;  // a driver whose request did not run runs its loop
      run_side_by_side(loop_b.like, loop_b.run, loop_a.run);
      return a_ran = true;
    });
    return a_ran;
  });
}

// Inside a kernel the ATen calls run in the caller's dtype: autocast (which
// would recast them; the op itself is not autocast-aware) is excluded. They
// also run below autograd and ADInplaceOrView: nothing inside is
// differentiated (the op's own backward is), and each of the per-step views
// and products then costs one dispatch instead of three.
struct AutocastOff {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
  at::AutoDispatchBelowADInplaceOrView below_autograd;
};

// A named range for the profiler (and NVTX under emit_nvtx) around a phase
// of an op: input projection, recurrence, weight gradients.
struct PhaseRange {
  explicit PhaseRange(const char* name) : guard(at::RecordScope::USER_SCOPE) {
    if (guard.isActive()) guard.before(name);
  }
  at::RecordFunction guard;
};

// Which rows of the flattened (N, *) sequence each step covers.
// Dense input (T, B, *): every step has B rows and step t starts at row t*B.
// Packed input (N, *) with batch_sizes (T,): step t covers batch_sizes[t]
// rows (non-increasing in t) starting at the sum of the earlier sizes; row b
// of a step is row b of the state. Steps run in time order, or in reverse.
struct Schedule {
  int64_t steps = 0;  // T
  int64_t batch = 0;  // B
  int64_t rows = 0;   // N
  bool dense = true;
  bool reverse = false;
  std::vector<int64_t> size;    // (T,) rows of step t
  std::vector<int64_t> offset;  // (T,) first row of step t

  // Time index of the s-th step in processing order.
  int64_t time(int64_t s) const { return reverse ? steps - 1 - s : s; }
  int64_t size_at(int64_t s) const { return size[time(s)]; }
  int64_t offset_at(int64_t s) const { return offset[time(s)]; }
  // Rows of the s-th processed step that continue the (s-1)-th; the others
  // (only in reverse over packed input) start from the initial state.
  int64_t carried(int64_t s) const {
    return s == 0 ? 0 : std::min(size_at(s), size_at(s - 1));
  }
};

// Rows [0, n) of a contiguous 2-D tensor (the tensor itself when that is
// all of it: a view costs a dispatch, which adds up over the steps).
inline at::Tensor rows(const at::Tensor& t, int64_t n) {
  return n == t.size(0) ? t : t.narrow(0, 0, n);
}
// Rows of the s-th processed step of a flattened (N, W) sequence tensor.
inline at::Tensor step_rows(const at::Tensor& t, const Schedule& sc, int64_t s) {
  return t.narrow(0, sc.offset_at(s), sc.size_at(s));
}

// The hidden state h_{t-1} each forward step of the per-step loop starts
// from. Where every row of a step continues the previous step (dense input,
// and packed input in time order) that is the previous step's output rows,
// with no copy; the state tensor (hx at first) is then brought up to date
// once at the end (dense) or follows every step (packed, where sequences
// end at different steps, and in reverse start at different steps).
class RunningState {
 public:
  // state (B, P): holds hx; holds each sequence's last h after finish().
  RunningState(const at::Tensor& state, const Schedule& sc) : state_(state), sc_(sc) {}
  // h_{t-1} of the s-th processed step, (n, P).
  at::Tensor before(int64_t s, int64_t n) const {
    return s > 0 && sc_.carried(s) == n ? rows(last_, n) : rows(state_, n);
  }
  // Records the s-th step's output h_t, (n, P).
  void after(const at::Tensor& out_s) {
    last_ = out_s;
    if (!sc_.dense) rows(state_, out_s.size(0)).copy_(out_s);
  }
  void finish() {
    if (sc_.dense && last_.defined()) state_.copy_(last_);
  }

 private:
  const at::Tensor state_;
  const Schedule& sc_;
  at::Tensor last_;
};

// What a per-step loop's launches depend on besides its tensors' shapes,
// for run_loop's key (graphs.h): the schedule (packed input: every step's
// batch size) and the driver's flags.
inline std::vector<int64_t> loop_params(const Schedule& sc, std::initializer_list<int64_t> flags) {
  std::vector<int64_t> params(flags);
  params.push_back(sc.dense);
  params.push_back(sc.reverse);
  params.push_back(sc.batch);
  if (!sc.dense) params.insert(params.end(), sc.size.begin(), sc.size.end());
  return params;
}

// Whether the input projection must be kept whole for the per-step loop:
// run_loop hands the loop its tensors, so under FUSED_RNN_CUDA_GRAPHS=emulate
// the CPU keeps it whole as CUDA always does.
inline bool loop_needs_whole_projection() {
  return requested_graph_mode() == GraphMode::kEmulate;
}

// What every persistent request of a driver shares: the cell, the schedule
// (packed input: the rows of each step) and W_hh.
template <typename Args>
Args persistent_request(PersistentCell cell, const Schedule& sc, const at::Tensor& w_hh) {
  Args args;
  args.cell = cell;
  args.steps = sc.steps;
  args.batch = sc.batch;
  args.reverse = sc.reverse;
  if (!sc.dense) args.batch_sizes = sc.size;
  args.w_hh = w_hh.contiguous();
  return args;
}

// The input projections x_t @ W_ih^T of every step, as GEMMs over many steps
// at once. When they must be kept (training: the forward's workspace) all
// of them are computed up front, (N, G*H). Otherwise (CPU inference) they are
// computed a block of steps at a time into one reused buffer of ~2 MB that
// stays in cache, instead of a fresh N x G*H array whose pages are faulted
// in on every call.
class InputProjection {
 public:
  InputProjection(const at::Tensor& x, const at::Tensor& w_ih, const Schedule& sc,
                  bool keep_all);
  // (rows of step s, G*H) for the s-th processed step; valid until the next
  // call. Steps must be asked for in processing order.
  at::Tensor step(int64_t s);
  // (N, G*H), when keep_all.
  const at::Tensor& all() const { return all_; }

 private:
  const at::Tensor x_;
  const GemmWeight w_;
  const Schedule& sc_;
  at::Tensor all_, buffer_;
  int64_t block_steps_ = 0, first_ = 0, last_ = -1, row0_ = 0;
};

// Checks `input` against `batch_sizes` and builds the schedule. `batch` is
// the number of rows of the initial state.
Schedule make_schedule(const at::Tensor& input,
                       const c10::optional<at::Tensor>& batch_sizes,
                       int64_t batch, bool reverse);

// Checks shared by every forward op: input rank, dtypes, devices and the
// shapes of the weights, biases and initial states.
struct CellShape {
  const char* name;  // "LSTM", "GRU", "RNN"
  int64_t gates;     // G
};
void check_forward_args(const CellShape& cell, const at::Tensor& input,
                        const c10::optional<at::Tensor>& batch_sizes,
                        std::initializer_list<at::Tensor> states,
                        const at::Tensor& w_ih, const at::Tensor& w_hh,
                        const c10::optional<at::Tensor>& b_ih,
                        const c10::optional<at::Tensor>& b_hh,
                        const c10::optional<at::Tensor>& w_hr);

// Checks a gradient or saved tensor handed to a backward op.
void check_like(const char* what, const at::Tensor& t, const at::Tensor& like,
                at::IntArrayRef sizes);

// (N, W): the rows of step s hold the state step s started from, that is the
// rows of `seq` (N, W) at the previous step for carried rows and the rows of
// `init` (B, W) for the others.
at::Tensor previous_states(const at::Tensor& seq, const at::Tensor& init,
                           const Schedule& schedule);

// The states every step started from (h_{t-1}, c_{t-1}), as previous_states
// gives them, without copying for dense input: there step s's are the
// previous step's rows of `seq` (N, W), or `init` (B, W) for the first
// step. Packed input (where some rows of a step may start from init)
// materialises previous_states once. seq and init: contiguous.
class PreviousStates {
 public:
  // materialized: previous_states(seq, init) where the caller has it
  // (another PreviousStates' materialized()), else computed here if needed.
  PreviousStates(const at::Tensor& seq, const at::Tensor& init, const Schedule& sc,
                 const at::Tensor& materialized = at::Tensor());
  // previous_states(seq, init) for packed input; undefined for dense input.
  const at::Tensor& materialized() const { return all_; }
  // (rows of the s-th processed step, W).
  at::Tensor step(int64_t s) const;
  // a^T @ previous_states(seq, init) for a (N, X): (X, W), the gradient of
  // a recurrent weight. Dense float32 and float64 input: two products (the
  // first step's rows by init, the others by seq shifted one step), no
  // (N, W) copy; half types keep one product (a second would round twice).
  at::Tensor sum_product(const at::Tensor& a) const;

 private:
  const at::Tensor seq_, init_;
  const Schedule& sc_;
  at::Tensor all_;  // packed input: previous_states(seq, init)
};

// Adds row b of `per_sequence` (B, W) to the row of `seq` (N, W) at
// sequence b's first processed step (dense: every row of the first step;
// packed in reverse: where each sequence's last time step is).
void add_at_first_rows(const at::Tensor& seq, const at::Tensor& per_sequence,
                       const Schedule& sc);

// The transpose of previous_states and of the gather of the final states.
// grad_prev (N, W): the gradient of the state each row started from. Adds
// each row's part to the row of the previous processed step of its sequence
// in seq_grad (N, W), and grad_final (B, W), the final states' gradient, to
// the row of each sequence's last processed step; writes into grad_init
// (B, W) the parts that reach the initial state. All contiguous.
void route_state_gradients(const at::Tensor& grad_prev, const at::Tensor& grad_final,
                           const Schedule& sc, const at::Tensor& seq_grad,
                           const at::Tensor& grad_init);

// An empty tensor standing for "not computed" in an op's outputs.
inline at::Tensor absent(const at::Tensor& like) {
  return at::empty({0}, like.options());
}

// out = a + b, into an existing view.
inline void add_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b) {
  at::add_out(out, a, b);
}

// The fewest rows (N: steps x batch) for which the weight gradients'
// sums take the chunked form below (sequence_sum_product).
constexpr int64_t kMinRowsForPackedSums = 256;

// Whether the sums over a sequence's rows of `a` (N, X) take the chunked
// packed form (sequence_sum_product), given as many rows: then the previous
// states are worth materialising as one operand (PreviousStates).
inline bool packed_sums(const at::Tensor& a) {
  return a.size(0) >= kMinRowsForPackedSums && a.device().is_cpu() &&
         a.scalar_type() == at::kFloat && cpu::packed_gemm_active();
}

// a^T @ b through ATen's mm, a (N, X) and b (N, Y). On the CPU where b is
// narrow (Y below a panel: an input of a few features, a small hidden size)
// and N not tiny, as (b^T @ a)^T: MKL runs the transposed-left form 2-30x
// slower there on the 2-core EPYC (N = 3200, X = 1024: 8.5 ms against 0.28
// at Y = 2, 8.0 against 0.87 at Y = 8; X = 256, Y = 2: 0.52 against 0.10),
// and no slower at N >= 64 for any Y below 32; from Y = 32 on the
// transposed-left form is as fast or faster.
inline at::Tensor aten_sum_product(const at::Tensor& a, const at::Tensor& b) {
  if (a.device().is_cpu() && b.size(1) < cpu::kPanel && a.size(0) >= 64) {
    return b.t().mm(a).t().contiguous();
  }
  return a.t().mm(b);
}

// a^T @ b, summed over the N rows of a sequence: a (N, X), b (N, Y) give
// (X, Y) (the weight gradients), on the packed kernel (gemm.h) where it
// serves:
// - N >= kMinRowsForPackedSums: as (b^T @ a)^T with a packed (panels of its
//   columns, read row by row) and b^T copied to row-major, N in chunks: on
//   the 2-core EPYC an LSTM's training step at B=32, H=256, T=100 took 40 ms
//   with ATen's mm (MKL) here and in input_gradient, 31 ms with both on the
//   packed kernel (torch.nn: 35).
// - fewer rows (a cell's step, short or narrow batches): a^T (X rows of N)
//   against b packed whole, no transposes of the result: MKL runs these
//   small-N products at 40-90 GFLOP/s there; an LSTMCell's backward (H=256,
//   1 thread) took 494 -> 355 us at B=16 and 1416 -> 939 at B=64, an LSTM's
//   at B=1, T=100 1.5-2.0 -> 1.4 ms (the chunked form lost there: its
//   transposes and a's packing cost more than they saved).
inline at::Tensor sequence_sum_product(const at::Tensor& a, const at::Tensor& b) {
  const int64_t N = a.size(0);
  const bool packable = a.device().is_cpu() && a.scalar_type() == at::kFloat &&
                        cpu::packed_gemm_active();
  if (packable && N < kMinRowsForPackedSums) {
    const GemmWeight packed_b(b.t(), a.size(1));
    if (!packed_b.packed()) return aten_sum_product(a, b);
    at::Tensor out = at::empty({a.size(1), b.size(1)}, a.options());
    packed_b.product_into(out, a.t());
    return out;
  }
  if (!packed_sums(a)) return aten_sum_product(a, b);
  // N taken kSumChunk rows at a time, accumulated: a panel of the packed
  // operand is then 32 KiB, which stays in cache while every row block of
  // b^T passes over it (a whole sequence's panel, N x 32 floats, did not:
  // at B=256, T=100 the weight gradients ran at ~210 GFLOP/s against the
  // forward's ~500)
  constexpr int64_t kSumChunk = 256;
  at::Tensor out_t = at::empty({b.size(1), a.size(1)}, a.options());
  for (int64_t k0 = 0; k0 < N; k0 += kSumChunk) {
    const int64_t rows = std::min(kSumChunk, N - k0);
    const GemmWeight packed_a(a.narrow(0, k0, rows).t(), b.size(1));
    if (!packed_a.packed()) return aten_sum_product(a, b);  // (decided alike for every chunk)
    packed_a.product_into(out_t, b.narrow(0, k0, rows).t(), /*accumulate=*/k0 > 0);
  }
  return out_t.t().contiguous();
}

// grad @ w: grad (N, G*H) and w (G*H, I) give the gradient of the input of
// x @ w^T, (N, I); w^T packed where the packed kernel serves (GemmWeight:
// from 8 rows; a cell's backward at B=32, H=256: 544 -> 454 us, an LSTM's
// at B=1, T=100: 1.4 -> 1.2 ms, against MKL at small N).
inline at::Tensor input_gradient(const at::Tensor& grad, const at::Tensor& w) {
  return GemmWeight(w.t(), grad.size(0)).product(grad);
}

}  // namespace fused_rnn

// The persistent kernels of csrc/cuda/persistent.cuh run on the CPU through
// cuda_emu.h (order: 0 runs the threads of each phase in ascending order, 1
// in descending), as two ops of the namespace fused_rnn_emu, for
// tests/test_persistent_emulation.py: one cooperative launch, or
// (stepwise) the packed weight slices and one launch per step. They fill
// the kernels' parameters as csrc/cuda/persistent_launch.cuh does, with the
// units per block given rather than derived from a GPU's SM count.
#include "cuda_emu.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../../csrc/cuda/persistent.cuh"

namespace {

using at::Tensor;
using c10::optional;
using fused_rnn::PersistentCell;
namespace p = fused_rnn::cuda::persistent;

template <typename scalar_t>
scalar_t* data(const optional<Tensor>& t) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->is_contiguous() && t->is_cpu(), "emulation tensors are contiguous CPU tensors");
  return t->data_ptr<scalar_t>();
}

template <typename F>
void with_cell(int64_t cell, F&& f) {
  switch (cell) {
    case 0: return f(std::integral_constant<PersistentCell, PersistentCell::kLstm>{});
    case 1: return f(std::integral_constant<PersistentCell, PersistentCell::kGru>{});
    case 2: return f(std::integral_constant<PersistentCell, PersistentCell::kRnnTanh>{});
    case 3: return f(std::integral_constant<PersistentCell, PersistentCell::kRnnRelu>{});
  }
  TORCH_CHECK(false, "cell must be 0..3");
}

// Batch tile 1, or the wide tile of the dtype (FMA kMaxBatchTile for float
// and double, tensor-core kMmaTile for half types), as the launcher picks.
template <typename scalar_t, typename F>
void with_tile(int64_t tile, F&& f) {
  constexpr bool half =
      std::is_same_v<scalar_t, c10::Half> || std::is_same_v<scalar_t, c10::BFloat16>;
  constexpr int wide = half ? p::kMmaTile : p::kMaxBatchTile;
  if (tile == 1) return f(std::integral_constant<int, 1>{});
  TORCH_CHECK(tile == wide, "batch tile must be 1 or ", wide, " for this dtype");
  f(std::integral_constant<int, wide>{});
}

int gates(int64_t cell) { return cell == 0 ? 4 : cell == 1 ? 3 : 1; }

// Stepwise: every block's weight slice packed by pack_slices_kernel (its own
// emulated launch), as persistent_launch.cuh's pack_slices does.
template <int G, bool kBackward, int BT, typename scalar_t>
Tensor pack_slices(const Tensor& w_hh, const p::Tiling& tl, int blocks, int units,
                   int64_t batch, int64_t order) {
  Tensor slices = at::empty({blocks * p::slice_elements(tl)}, w_hh.options());
  const scalar_t* w = w_hh.data_ptr<scalar_t>();
  scalar_t* out = slices.data_ptr<scalar_t>();
  const int H = static_cast<int>(w_hh.size(1));
  fused_rnn_emu::launch(blocks, p::kThreads, 0, static_cast<int>(order), [&] {
    p::pack_slices_kernel<G, kBackward, BT, scalar_t>(w, out, H, units, batch);
  });
  return slices;
}

// Runs `kernel` over the steps as persistent_launch.cuh's launch_steps does:
// one cooperative launch (packed input: its rows from the step table;
// tagged: the blocks exchange rows through the tagged ring, no grid
// barrier), or (stepwise) the weight slices packed and one
// launch per step with the rows of its step (batch_sizes: packed input;
// empty: dense), forward 0 .. T-1, backward T-1 down to -1. `tl`: the
// launch's tiling (its bytes of dynamic shared memory), `units` per block.
template <int G, bool kBackward, int BT, typename scalar_t, typename Params, typename Kernel>
void run_steps(Params& prm, const Tensor& w_hh, const p::Tiling& tl, int units, bool stepwise,
               bool tagged, int64_t order, const std::vector<int64_t>& batch_sizes,
               Kernel kernel) {
  const int blocks = (prm.hidden + units - 1) / units;
  if (!stepwise) {
    prm.run = {kBackward ? prm.steps - 1 : 0, kBackward ? -1 : prm.steps, true};
    prm.slices = nullptr;
    // packed input: the step table the launcher copies to the device
    const std::vector<int64_t> table = p::packed_step_table(batch_sizes);
    prm.step_table = batch_sizes.empty() ? nullptr : table.data();
    // tagged: the zeroed two-slot ring the blocks pass each step's rows through
    const int64_t width = kBackward ? G * prm.hidden : prm.hidden;
    std::vector<uint64_t> ring(tagged ? p::exchange_ring_words<scalar_t>(prm.batch, width) : 0);
    prm.exchange = tagged ? ring.data() : nullptr;
    fused_rnn_emu::launch(blocks, p::kThreads, tl.bytes, static_cast<int>(order),
                          [&] { kernel(prm); });
    return;
  }
  const Tensor slices =
      pack_slices<G, kBackward, BT, scalar_t>(w_hh, tl, blocks, units, prm.batch, order);
  prm.slices = slices.data_ptr<scalar_t>();
  p::for_each_step<kBackward>(prm.steps, prm.batch, prm.reverse, batch_sizes,
                              [&](int64_t s, const p::StepRows& rows) {
                                prm.run = {s, kBackward ? s : s + 1, false};
                                prm.step = rows;
                                fused_rnn_emu::launch(blocks, p::kThreads, tl.bytes,
                                                      static_cast<int>(order),
                                                      [&] { kernel(prm); });
                              });
}

// Rows of the (N, *) sequence tensors and the batch_sizes vector: dense
// (T*B rows) when batch_sizes is absent.
std::vector<int64_t> sizes_of(const optional<Tensor>& batch_sizes) {
  if (!batch_sizes.has_value()) return {};
  const Tensor b = batch_sizes->to(at::kLong).contiguous();
  return std::vector<int64_t>(b.data_ptr<int64_t>(), b.data_ptr<int64_t>() + b.numel());
}

// Returns out, hy, cy, xw (activated gates when keep_gates), cells, hn.
std::vector<Tensor> forward(int64_t cell, const Tensor& xw_in, const optional<Tensor>& bias,
                            const optional<Tensor>& bias_hh, const Tensor& w_hh,
                            const Tensor& hx, const optional<Tensor>& cx, int64_t steps,
                            int64_t batch, bool reverse, bool keep_gates, int64_t units,
                            int64_t batch_tile, int64_t order, bool stepwise, bool tagged,
                            const optional<Tensor>& batch_sizes, int64_t chunk) {
  const int64_t H = w_hh.size(1), G = gates(cell), N = xw_in.size(0);
  TORCH_CHECK(G * units <= p::kMaxRows, "too many rows per block");
  const std::vector<int64_t> sizes = sizes_of(batch_sizes);
  const auto o = xw_in.options();
  Tensor xw = xw_in.clone(), out = at::empty({N, H}, o), hy = at::empty({batch, H}, o);
  Tensor cy = at::empty({batch, H}, o);
  Tensor cells = cell == 0 && keep_gates ? at::empty({N, H}, o) : Tensor();
  Tensor hn = cell == 1 && keep_gates ? at::empty({N, H}, o) : Tensor();
  Tensor state = at::empty({batch, H}, o.dtype(at::toOpMathType(o.dtype().toScalarType())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xw.scalar_type(), "emu_forward", [&] {
    using T = at::opmath_type<scalar_t>;
    p::ForwardParams<scalar_t> prm{};
    prm.steps = steps;
    prm.batch = batch;
    prm.hidden = static_cast<int>(H);
    prm.units = static_cast<int>(units);
    prm.chunk = static_cast<int>(chunk);
    prm.reverse = reverse;
    prm.keep_gates = keep_gates;
    prm.xw = xw.data_ptr<scalar_t>();
    prm.bias = data<scalar_t>(bias);
    prm.bias_hh = data<scalar_t>(bias_hh);
    prm.w_hh = w_hh.data_ptr<scalar_t>();
    prm.hx = hx.data_ptr<scalar_t>();
    prm.cx = data<scalar_t>(cx);
    prm.out = out.data_ptr<scalar_t>();
    prm.hy = hy.data_ptr<scalar_t>();
    prm.cy = cy.data_ptr<scalar_t>();
    prm.cells = data<scalar_t>(cells);
    prm.hn = data<scalar_t>(hn);
    prm.state = state.data_ptr<T>();
    const int rows = static_cast<int>(G * units);
    with_cell(cell, [&](auto c) {
      with_tile<scalar_t>(batch_tile, [&](auto bt) {
        TORCH_CHECK(bt.value * units <= p::kThreads, "too many units for this tile");
        const auto layout =
            p::make_tiling(rows, static_cast<int>(H), bt.value, batch, static_cast<int>(units),
                           sizeof(scalar_t), sizeof(T), /*weights_shared=*/!stepwise,
                           static_cast<int>(chunk));
        run_steps<p::gate_count<c.value>(), false, bt.value, scalar_t>(
            prm, w_hh, layout, static_cast<int>(units), stepwise, tagged, order, sizes,
            p::forward_kernel<c.value, bt.value, scalar_t>);
      });
    });
  });
  return {out, hy, cy, xw, cells.defined() ? cells : at::empty({0}, o),
          hn.defined() ? hn : at::empty({0}, o)};
}

// Returns dgates, dgates_h, grad_hx, grad_cx.
std::vector<Tensor> backward(int64_t cell, const Tensor& w_hh, const Tensor& grad_out,
                             const Tensor& grad_hy, const optional<Tensor>& grad_cy,
                             const optional<Tensor>& out, const optional<Tensor>& hx,
                             const optional<Tensor>& cx, const optional<Tensor>& gates_in,
                             const optional<Tensor>& cells, const optional<Tensor>& hn,
                             int64_t steps, int64_t batch, bool reverse, int64_t units,
                             int64_t batch_tile, int64_t order, bool stepwise, bool tagged,
                             const optional<Tensor>& batch_sizes, int64_t chunk) {
  const int64_t H = w_hh.size(1), G = gates(cell), N = grad_out.size(0);
  TORCH_CHECK(units <= p::kMaxRows, "too many rows per block");
  const std::vector<int64_t> sizes = sizes_of(batch_sizes);
  const auto o = grad_out.options();
  Tensor dgates = at::empty({N, G * H}, o);
  Tensor dgates_h = cell == 1 ? at::empty({N, G * H}, o) : at::empty({0}, o);
  Tensor grad_hx = at::empty({batch, H}, o), grad_cx = at::empty({batch, H}, o);
  Tensor carry = at::empty({batch, H}, o.dtype(at::toOpMathType(o.dtype().toScalarType())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "emu_backward", [&] {
    using T = at::opmath_type<scalar_t>;
    p::BackwardParams<scalar_t> prm{};
    prm.steps = steps;
    prm.batch = batch;
    prm.hidden = static_cast<int>(H);
    prm.units = static_cast<int>(units);
    prm.chunk = static_cast<int>(chunk);
    prm.reverse = reverse;
    prm.w_hh = w_hh.data_ptr<scalar_t>();
    prm.grad_out = grad_out.data_ptr<scalar_t>();
    prm.grad_hy = grad_hy.data_ptr<scalar_t>();
    prm.grad_cy = data<scalar_t>(grad_cy);
    prm.out = data<scalar_t>(out);
    prm.hx = data<scalar_t>(hx);
    prm.cx = data<scalar_t>(cx);
    prm.gates = data<scalar_t>(gates_in);
    prm.cells = data<scalar_t>(cells);
    prm.hn = data<scalar_t>(hn);
    prm.dgates = dgates.data_ptr<scalar_t>();
    prm.dgates_h = cell == 1 ? dgates_h.data_ptr<scalar_t>() : nullptr;
    prm.grad_hx = grad_hx.data_ptr<scalar_t>();
    prm.grad_cx = grad_cx.data_ptr<scalar_t>();
    prm.carry = carry.data_ptr<T>();
    const int rows = static_cast<int>(units);
    with_cell(cell, [&](auto c) {
      with_tile<scalar_t>(batch_tile, [&](auto bt) {
        TORCH_CHECK(bt.value * units <= p::kThreads, "too many units for this tile");
        const auto layout = p::make_tiling(rows, static_cast<int>(G * H), bt.value, batch,
                                           static_cast<int>(units), sizeof(scalar_t), sizeof(T),
                                           /*weights_shared=*/!stepwise, static_cast<int>(chunk));
        run_steps<p::gate_count<c.value>(), true, bt.value, scalar_t>(
            prm, w_hh, layout, static_cast<int>(units), stepwise, tagged, order, sizes,
            p::backward_kernel<c.value, bt.value, scalar_t>);
      });
    });
  });
  return {dgates, dgates_h, grad_hx, grad_cx};
}

}  // namespace

TORCH_LIBRARY(fused_rnn_emu, m) {
  m.def(
      "forward(int cell, Tensor xw, Tensor? bias, Tensor? bias_hh, Tensor w_hh, Tensor hx, "
      "Tensor? cx, int steps, int batch, bool reverse, bool keep_gates, int units, "
      "int batch_tile, int order, bool stepwise=False, bool tagged=False, "
      "Tensor? batch_sizes=None, int chunk=0) -> Tensor[]",
      &forward);
  m.def(
      "backward(int cell, Tensor w_hh, Tensor grad_out, Tensor grad_hy, Tensor? grad_cy, "
      "Tensor? out, Tensor? hx, Tensor? cx, Tensor? gates, Tensor? cells, Tensor? hn, "
      "int steps, int batch, bool reverse, int units, int batch_tile, int order, "
      "bool stepwise=False, bool tagged=False, Tensor? batch_sizes=None, int chunk=0) "
      "-> Tensor[]",
      &backward);
}

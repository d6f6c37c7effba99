// The persistent kernels of csrc/cuda/persistent.cuh run on the CPU through
// cuda_emu.h (order: 0 runs the threads of each phase in ascending order, 1
// in descending), as two ops of the namespace fused_rnn_emu, for
// tests/test_persistent_emulation.py: one cooperative launch, or
// (stepwise) the packed weight slices and one launch per step; one
// direction of a layer, or both side by side (paired). They fill
// the kernels' parameters as csrc/cuda/persistent_launch.cuh does, with the
// units per block given rather than derived from a GPU's SM count.
#include "cuda_emu.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "../../csrc/cuda/persistent.cuh"
#include "../../csrc/cuda/persistent_plan.h"
#include "fused_rnn/graphs.h"

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

// Batch tile 1 or a wide tile of the dtype, as the launcher picks: FMA
// kMaxBatchTile for float and double, tensor-core kMmaTile for half types
// and (TF32) float.
template <typename scalar_t, typename F>
void with_tile(int64_t tile, F&& f) {
  constexpr bool half =
      std::is_same_v<scalar_t, c10::Half> || std::is_same_v<scalar_t, c10::BFloat16>;
  constexpr bool is_double = std::is_same_v<scalar_t, double>;
  if (tile == 1) return f(std::integral_constant<int, 1>{});
  if constexpr (!half) {
    if (tile == p::kMaxBatchTile) return f(std::integral_constant<int, p::kMaxBatchTile>{});
  }
  if constexpr (!is_double) {
    if (tile == p::kMmaTile) return f(std::integral_constant<int, p::kMmaTile>{});
  }
  TORCH_CHECK(false, "batch tile ", tile, " is not compiled for this dtype");
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

// Runs `kernel` over the steps as persistent_launch.cuh's launch_steps does,
// for launch.count directions (w_hh[d] each; both directions of a layer side by
// side, blocks of direction 1 after those of direction 0): one cooperative
// launch (packed input: its rows from the step table; tagged: each direction's
// blocks exchange rows through their own tagged ring, no grid barrier; cluster:
// each direction's blocks one thread-block cluster, exchanging rows through
// each other's shared memory), or (stepwise) the weight slices packed and one
// launch per step with the rows of its step in each direction (batch_sizes:
// packed input; empty: dense), forward 0 .. T-1, backward T-1 down to -1. `tl`:
// the launch's tiling (its bytes of dynamic shared memory), `units` per block.
template <int G, bool kBackward, int BT, typename scalar_t, typename Params, typename Kernel>
void run_steps(p::Directions<Params>& launch, const std::vector<Tensor>& w_hh,
               const p::Tiling& tl, int units, bool stepwise, bool tagged, bool cluster,
               int64_t order, const std::vector<int64_t>& batch_sizes, Kernel kernel) {
  const int count = launch.count;
  const Params& first = launch.dir[0];
  const int blocks = (first.hidden + units - 1) / units;
  launch.blocks = blocks;
  if (!stepwise) {
    // packed input: the step table the launcher copies to the device
    const std::vector<int64_t> table = p::packed_step_table(batch_sizes);
    // tagged: per direction, the zeroed two-slot ring the blocks pass each
    // step's rows through
    const int64_t width = kBackward ? G * first.hidden : first.hidden;
    const int64_t words = p::exchange_ring_words<scalar_t>(first.batch, width);
    std::vector<uint64_t> ring(tagged ? count * words : 0);
    for (int d = 0; d < count; ++d) {
      Params& prm = launch.dir[d];
      prm.run = {kBackward ? prm.steps - 1 : 0, kBackward ? -1 : prm.steps, true};
      prm.slices = nullptr;
      prm.step_table = batch_sizes.empty() ? nullptr : table.data();
      prm.exchange = tagged ? ring.data() + d * words : nullptr;
      prm.cluster = cluster ? blocks : 0;
    }
    fused_rnn_emu::launch(count * blocks, p::kThreads, tl.bytes, static_cast<int>(order),
                          [&] { kernel(launch); }, cluster ? blocks : 0);
    return;
  }
  std::vector<Tensor> slices;
  for (int d = 0; d < count; ++d) {
    slices.push_back(pack_slices<G, kBackward, BT, scalar_t>(w_hh[d], tl, blocks, units,
                                                             first.batch, order));
    launch.dir[d].slices = slices.back().data_ptr<scalar_t>();
  }
  p::for_each_step<kBackward>(first.steps, first.batch, batch_sizes,
                              [&](int64_t s, const auto& rows) {
                                for (int d = 0; d < count; ++d) {
                                  Params& prm = launch.dir[d];
                                  prm.run = {s, kBackward ? s : s + 1, false};
                                  prm.step = rows(prm.reverse);
                                }
                                fused_rnn_emu::launch(count * blocks, p::kThreads, tl.bytes,
                                                      static_cast<int>(order),
                                                      [&] { kernel(launch); });
                              });
}

// Rows of the (N, *) sequence tensors and the batch_sizes vector: dense
// (T*B rows) when batch_sizes is absent.
std::vector<int64_t> sizes_of(const optional<Tensor>& batch_sizes) {
  if (!batch_sizes.has_value()) return {};
  const Tensor b = batch_sizes->to(at::kLong).contiguous();
  return std::vector<int64_t>(b.data_ptr<int64_t>(), b.data_ptr<int64_t>() + b.numel());
}

// Direction d's part of an argument: the tensor itself for one direction,
// its d-th slice when `paired` (every tensor argument then stacks both
// directions along a leading dimension of 2).
optional<Tensor> part(const optional<Tensor>& t, int d, bool paired) {
  if (!t.has_value() || !paired) return t;
  return t->select(0, d).contiguous();
}
Tensor part(const Tensor& t, int d, bool paired) {
  return paired ? t.select(0, d).contiguous() : t;
}

// The outputs of every direction, stacked along a leading dimension when paired.
std::vector<Tensor> stack_directions(const std::vector<std::vector<Tensor>>& per_direction) {
  if (per_direction.size() == 1) return per_direction[0];
  std::vector<Tensor> out;
  for (size_t i = 0; i < per_direction[0].size(); ++i) {
    out.push_back(at::stack({per_direction[0][i], per_direction[1][i]}));
  }
  return out;
}

// Every tensor of the requests of the call in progress, listed field by
// field by forward() and backward() below (not by for_each_tensor, whose
// list is what emulated_run_loop checks).
std::vector<Tensor>& call_tensors() {
  static std::vector<Tensor> tensors;
  return tensors;
}

// graphs.h's run_loop as its emulate mode runs a static entry, the loop
// given tensors of its own: inputs copied, outputs NaN (an output the
// launches leave partly unwritten shows), the call's own tensors (those
// listed and call_tensors()) NaN while the loop runs (a launch that reached
// one other than through its argument, or a tensor missing from the list,
// computes NaN or writes where the copy back overwrites it), then the
// outputs copied back and the inputs restored.
void emulated_run_loop(const fused_rnn::LoopShape& /*shape*/,
                       const std::vector<fused_rnn::LoopTensor>& tensors,
                       fused_rnn::StepLoop loop) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  std::vector<Tensor> statics(tensors.size()), poisoned = call_tensors(), saved;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const Tensor& t = tensors[i].tensor;
    if (!t.defined()) continue;
    statics[i] = tensors[i].role == fused_rnn::LoopRole::kOut ? at::full_like(t, nan) : t.clone();
    poisoned.push_back(t);
  }
  for (const Tensor& t : poisoned) saved.push_back(t.defined() ? t.clone() : t);
  for (const Tensor& t : poisoned) {
    if (t.defined()) t.fill_(nan);
  }
  loop(statics);
  for (size_t i = 0; i < poisoned.size(); ++i) {
    if (poisoned[i].defined()) poisoned[i].copy_(saved[i]);
  }
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (tensors[i].tensor.defined() && tensors[i].role != fused_rnn::LoopRole::kIn) {
      tensors[i].tensor.copy_(statics[i]);
    }
  }
}

// Every tensor of a request, field by field (for call_tensors()).
std::vector<Tensor> fields(const fused_rnn::PersistentForward& r) {
  return {r.xw, r.bias, r.bias_hh, r.w_hh, r.hx, r.cx, r.out, r.hy, r.cy, r.cells, r.hn};
}
std::vector<Tensor> fields(const fused_rnn::PersistentBackward& r) {
  return {r.w_hh, r.grad_out, r.grad_hy, r.grad_cy, r.out, r.hx, r.cx, r.gates, r.cells, r.hn,
          r.dgates, r.dgates_h, r.grad_hx, r.grad_cx};
}

// launch_all(requests[0], second) (second: requests[1] for a pair, else
// null); graphed: as the CUDA launcher runs stepwise launches from a graph
// (run_as_loop), with emulated_run_loop and every tensor of the requests
// listed.
template <typename Request, typename LaunchAll>
void run_launches(const char* name, const Request (&requests)[2], int count, bool graphed,
                  LaunchAll launch_all) {
  const Request* second = count == 2 ? &requests[1] : nullptr;
  if (!graphed) {
    launch_all(requests[0], second);
    return;
  }
  for (int d = 0; d < count; ++d) {
    const std::vector<Tensor> f = fields(requests[d]);
    call_tensors().insert(call_tensors().end(), f.begin(), f.end());
  }
  p::run_as_loop(name, {}, 0, requests[0], second, launch_all, &emulated_run_loop);
  call_tensors().clear();
}

// A request's tensor from an optional argument (undefined where absent).
Tensor given(const optional<Tensor>& t) { return t.has_value() ? *t : Tensor(); }

// Returns out, hy, cy, xw (activated gates when keep_gates), cells, hn.
// paired: both directions of a layer in one launch, every tensor argument
// (d, ...) with direction 0 walking as `reverse` says and direction 1 the
// other way; every output then (2, ...). graphed (stepwise): the launches
// through persistent.cuh's run_as_loop, as the CUDA launcher runs them, with
// emulated_run_loop's copies. cluster: one launch, each direction's blocks
// one thread-block cluster passing rows through each other's windows (the
// whole rows staged: chunk is not used).
std::vector<Tensor> forward(int64_t cell, const Tensor& xw_in, const optional<Tensor>& bias,
                            const optional<Tensor>& bias_hh, const Tensor& w_hh,
                            const Tensor& hx, const optional<Tensor>& cx, int64_t steps,
                            int64_t batch, bool reverse, bool keep_gates, int64_t units,
                            int64_t batch_tile, int64_t order, bool stepwise, bool tagged,
                            const optional<Tensor>& batch_sizes, int64_t chunk, bool paired,
                            bool graphed, bool cluster) {
  const int count = paired ? 2 : 1;
  const int64_t H = w_hh.size(-1), G = gates(cell), N = xw_in.size(-2);
  TORCH_CHECK(G * units <= p::max_rows(static_cast<int>(batch_tile), cluster),
              "too many rows per block");
  TORCH_CHECK(!graphed || stepwise, "graphed: stepwise launches only");
  TORCH_CHECK(!cluster || (!stepwise && !tagged), "cluster: one launch, no tagged ring");
  const std::vector<int64_t> sizes = sizes_of(batch_sizes);
  const auto o = xw_in.options();
  std::vector<std::vector<Tensor>> outputs(count);
  fused_rnn::PersistentForward requests[2];
  for (int d = 0; d < count; ++d) {
    Tensor cells = cell == 0 && keep_gates ? at::empty({N, H}, o) : at::empty({0}, o);
    Tensor hn = cell == 1 && keep_gates ? at::empty({N, H}, o) : at::empty({0}, o);
    outputs[d] = {at::empty({N, H}, o), at::empty({batch, H}, o), at::empty({batch, H}, o),
                  part(xw_in, d, paired).clone(), cells, hn};
    fused_rnn::PersistentForward& r = requests[d];
    r.steps = steps;
    r.batch = batch;
    r.reverse = d == 0 ? reverse : !reverse;
    r.batch_sizes = sizes;
    r.keep_gates = keep_gates;
    r.xw = outputs[d][3];
    r.bias = given(part(bias, d, paired));
    r.bias_hh = given(part(bias_hh, d, paired));
    r.w_hh = part(w_hh, d, paired);
    r.hx = part(hx, d, paired);
    r.cx = given(part(cx, d, paired));
    r.out = outputs[d][0];
    r.hy = outputs[d][1];
    r.cy = outputs[d][2];
    r.cells = cells.numel() ? cells : Tensor();
    r.hn = hn.numel() ? hn : Tensor();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xw_in.scalar_type(), "emu_forward", [&] {
    using T = at::opmath_type<scalar_t>;
    const int rows = static_cast<int>(G * units);
    with_cell(cell, [&](auto c) {
      with_tile<scalar_t>(batch_tile, [&](auto bt) {
        TORCH_CHECK(bt.value * units <= p::kThreads, "too many units for this tile");
        const auto layout =
            p::make_tiling(rows, static_cast<int>(H), bt.value, batch, static_cast<int>(units),
                           sizeof(scalar_t), sizeof(T), /*weights_shared=*/!stepwise,
                           static_cast<int>(chunk), /*window=*/cluster);
        // the launches for requests first and (paired) *second
        auto launch_all = [&](const fused_rnn::PersistentForward& first,
                              const fused_rnn::PersistentForward* second) {
          const fused_rnn::PersistentForward* dirs[2] = {&first, second};
          p::Directions<p::ForwardParams<scalar_t>> launch{};
          launch.count = count;
          Tensor state[2];
          std::vector<Tensor> weights;
          for (int d = 0; d < count; ++d) {
            if (cell == 0) state[d] = at::empty({batch, H}, o.dtype(at::toOpMathType(o.dtype().toScalarType())));
            launch.dir[d] = p::forward_params<scalar_t>(*dirs[d], static_cast<int>(units), state[d]);
            launch.dir[d].chunk = static_cast<int>(chunk);
            weights.push_back(dirs[d]->w_hh);
          }
          auto run = [&](auto kernel) {
            run_steps<p::gate_count<c.value>(), false, bt.value, scalar_t>(
                launch, weights, layout, static_cast<int>(units), stepwise, tagged, cluster, order,
                sizes, kernel);
          };
          // (the emulation has the cluster kernels of every dtype)
          p::with_variant<true>(paired, cluster, [&](auto pr, auto cl) {
            run(p::forward_kernel<c.value, bt.value, scalar_t, pr.value, cl.value>);
          });
        };
        run_launches("stepwise_forward", requests, count, graphed, launch_all);
      });
    });
  });
  return stack_directions(outputs);
}

// Returns dgates, dgates_h, grad_hx, grad_cx; paired, graphed and cluster as forward's.
std::vector<Tensor> backward(int64_t cell, const Tensor& w_hh, const Tensor& grad_out,
                             const Tensor& grad_hy, const optional<Tensor>& grad_cy,
                             const optional<Tensor>& out, const optional<Tensor>& hx,
                             const optional<Tensor>& cx, const optional<Tensor>& gates_in,
                             const optional<Tensor>& cells, const optional<Tensor>& hn,
                             int64_t steps, int64_t batch, bool reverse, int64_t units,
                             int64_t batch_tile, int64_t order, bool stepwise, bool tagged,
                             const optional<Tensor>& batch_sizes, int64_t chunk, bool paired,
                             bool graphed, bool cluster) {
  const int count = paired ? 2 : 1;
  const int64_t H = w_hh.size(-1), G = gates(cell), N = grad_out.size(-2);
  TORCH_CHECK(units <= p::max_rows(static_cast<int>(batch_tile), cluster),
              "too many rows per block");
  TORCH_CHECK(!graphed || stepwise, "graphed: stepwise launches only");
  TORCH_CHECK(!cluster || (!stepwise && !tagged), "cluster: one launch, no tagged ring");
  const std::vector<int64_t> sizes = sizes_of(batch_sizes);
  const auto o = grad_out.options();
  std::vector<std::vector<Tensor>> outputs(count);
  fused_rnn::PersistentBackward requests[2];
  for (int d = 0; d < count; ++d) {
    outputs[d] = {at::empty({N, G * H}, o),
                  cell == 1 ? at::empty({N, G * H}, o) : at::empty({0}, o),
                  at::empty({batch, H}, o), at::empty({batch, H}, o)};
    fused_rnn::PersistentBackward& r = requests[d];
    r.steps = steps;
    r.batch = batch;
    r.reverse = d == 0 ? reverse : !reverse;
    r.batch_sizes = sizes;
    r.w_hh = part(w_hh, d, paired);
    r.grad_out = part(grad_out, d, paired);
    r.grad_hy = part(grad_hy, d, paired);
    r.grad_cy = given(part(grad_cy, d, paired));
    r.out = given(part(out, d, paired));
    r.hx = given(part(hx, d, paired));
    r.cx = given(part(cx, d, paired));
    r.gates = given(part(gates_in, d, paired));
    r.cells = given(part(cells, d, paired));
    r.hn = given(part(hn, d, paired));
    r.dgates = outputs[d][0];
    r.dgates_h = cell == 1 ? outputs[d][1] : Tensor();
    r.grad_hx = outputs[d][2];
    r.grad_cx = outputs[d][3];
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "emu_backward", [&] {
    using T = at::opmath_type<scalar_t>;
    const int rows = static_cast<int>(units);
    with_cell(cell, [&](auto c) {
      with_tile<scalar_t>(batch_tile, [&](auto bt) {
        TORCH_CHECK(bt.value * units <= p::kThreads, "too many units for this tile");
        const auto layout = p::make_tiling(rows, static_cast<int>(G * H), bt.value, batch,
                                           static_cast<int>(units), sizeof(scalar_t), sizeof(T),
                                           /*weights_shared=*/!stepwise, static_cast<int>(chunk),
                                           /*window=*/cluster);
        auto launch_all = [&](const fused_rnn::PersistentBackward& first,
                              const fused_rnn::PersistentBackward* second) {
          const fused_rnn::PersistentBackward* dirs[2] = {&first, second};
          p::Directions<p::BackwardParams<scalar_t>> launch{};
          launch.count = count;
          Tensor carry[2];
          std::vector<Tensor> weights;
          for (int d = 0; d < count; ++d) {
            if (cell <= 1) carry[d] = at::empty({batch, H}, o.dtype(at::toOpMathType(o.dtype().toScalarType())));
            launch.dir[d] = p::backward_params<scalar_t>(*dirs[d], static_cast<int>(units), carry[d]);
            launch.dir[d].chunk = static_cast<int>(chunk);
            weights.push_back(dirs[d]->w_hh);
          }
          auto run = [&](auto kernel) {
            run_steps<p::gate_count<c.value>(), true, bt.value, scalar_t>(
                launch, weights, layout, static_cast<int>(units), stepwise, tagged, cluster, order,
                sizes, kernel);
          };
          p::with_variant<true>(paired, cluster, [&](auto pr, auto cl) {
            run(p::backward_kernel<c.value, bt.value, scalar_t, pr.value, cl.value>);
          });
        };
        run_launches("stepwise_backward", requests, count, graphed, launch_all);
      });
    });
  });
  return stack_directions(outputs);
}

// The launcher's batch tile (persistent.cuh) on a device of compute
// capability `arch` (major * 10 + minor).
int64_t batch_tile(int64_t batch, c10::ScalarType dtype, bool tf32, int64_t arch) {
  return p::batch_tile(batch, dtype, tf32, static_cast<int>(arch));
}

fused_rnn::KernelPath path_named(const std::string& name) {
  using fused_rnn::KernelPath;
  if (name == "persistent") return KernelPath::kPersistent;
  if (name == "stepwise") return KernelPath::kStepwise;
  if (name == "general") return KernelPath::kGeneral;
  TORCH_CHECK(name == "auto", "unknown kernel path ", name);
  return KernelPath::kAuto;
}

// The launcher's choice (persistent_plan.h, decide_for) for a shape on a
// GPU described by its limits (sms, shared_optin bytes, cooperative,
// compute capability arch, the largest cluster: -1 as persistent.cu reads
// it, 16 from 9.0 on; code_arch: the PTX version of the code the device
// loads, 0 the device's own), the requested path `want`, the exchange `sync`
// (auto, cluster, tags, barrier) and torch's TF32 flag: (path, explain's
// reason, batch tile, units per block, blocks per direction, how a
// persistent launch's blocks pass the rows on: cluster, tags or barrier;
// empty off the persistent kernel).
std::tuple<std::string, std::string, int64_t, int64_t, int64_t, std::string> choose(
    int64_t cell, int64_t hidden, int64_t batch, c10::ScalarType dtype, bool packed, bool proj,
    bool backward, int64_t directions, bool tf32, int64_t sms, int64_t shared_optin,
    bool cooperative, int64_t arch, const std::string& want, const std::string& sync,
    int64_t cluster, int64_t code_arch) {
  p::PlanContext ctx;
  ctx.limits = {static_cast<int>(sms), static_cast<int>(shared_optin), cooperative ? 1 : 0,
                static_cast<int>(arch),
                static_cast<int>(cluster >= 0 ? cluster : arch >= 90 ? 16 : 0),
                static_cast<int>(code_arch)};
  ctx.want = path_named(want);
  TORCH_CHECK(sync == "auto" || sync == "tags" || sync == "barrier" || sync == "cluster",
              "unknown sync ", sync);
  ctx.sync = sync == "tags"      ? p::GridSync::kTags
             : sync == "barrier" ? p::GridSync::kBarrier
             : sync == "cluster" ? p::GridSync::kCluster
                                 : p::GridSync::kAuto;
  ctx.tf32 = tf32;
  static const PersistentCell cells[] = {PersistentCell::kLstm, PersistentCell::kGru,
                                         PersistentCell::kRnnTanh, PersistentCell::kRnnRelu};
  TORCH_CHECK(cell >= 0 && cell < 4, "cell must be 0..3");
  const p::Decision d = p::decide_for(cells[cell], hidden, batch, dtype, packed, proj, backward,
                                      static_cast<int>(directions), true, ctx);
  static const char* names[] = {"auto", "persistent", "general", "stepwise"};
  const bool persistent = d.choice.path == fused_rnn::KernelPath::kPersistent;
  return {names[static_cast<int>(d.choice.path)], d.choice.reason, d.plan.batch_tile,
          d.plan.units, d.plan.blocks,
          !persistent ? "" : d.plan.cluster ? "cluster" : d.plan.tagged ? "tags" : "barrier"};
}

// The graph cache's choices (graphs.h) for a sequence of calls, call i of
// shape shapes[i] with its tensors at addresses[i] and bytes[i] of them:
// per call the action (0 uncached, 1 capture direct, 2 capture static,
// 3 replay direct, 4 replay static), then the cache's counts (captures,
// replays, uncached, evictions, entries, bytes). A capture of a call listed
// in `skipped` does not happen (another thread was capturing).
std::vector<int64_t> graph_cache_trace(const std::vector<int64_t>& shapes,
                                       const std::vector<int64_t>& addresses,
                                       const std::vector<int64_t>& bytes, int64_t direct_after,
                                       int64_t static_after, int64_t entry_bytes,
                                       int64_t total_bytes, const std::vector<int64_t>& skipped) {
  using Cache = fused_rnn::GraphCache<int>;
  Cache cache;
  const fused_rnn::GraphPolicy policy{static_cast<int>(direct_after),
                                      static_cast<int>(static_after)};
  const fused_rnn::GraphLimits limits{entry_bytes, total_bytes};
  std::vector<int64_t> out;
  for (size_t i = 0; i < shapes.size(); ++i) {
    const fused_rnn::GraphKey shape{{shapes[i]}};
    const fused_rnn::GraphKey direct{{shapes[i], -2, addresses[i]}};
    const Cache::Action action = cache.decide(shape, direct, bytes[i], policy, limits);
    const bool skip =
        std::find(skipped.begin(), skipped.end(), static_cast<int64_t>(i)) != skipped.end();
    if (action == Cache::Action::kCaptureDirect) {
      if (skip) {
        cache.capture_skipped(direct);
      } else {
        cache.insert(direct, 0, 0, limits);
      }
    }
    if (action == Cache::Action::kCaptureStatic) {
      if (skip) {
        cache.capture_skipped(shape);
      } else {
        cache.insert(shape, bytes[i], 0, limits);
      }
    }
    out.push_back(static_cast<int64_t>(action));
  }
  const fused_rnn::GraphCacheInfo& info = cache.info();
  for (const int64_t v : {info.captures, info.replays, info.uncached, info.evictions,
                          info.entries, info.bytes}) {
    out.push_back(v);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(fused_rnn_emu, m) {
  m.def(
      "graph_cache_trace(int[] shapes, int[] addresses, int[] bytes, int direct_after, "
      "int static_after, int entry_bytes, int total_bytes, int[] skipped=[]) -> int[]",
      &graph_cache_trace);
  m.def("batch_tile(int batch, ScalarType dtype, bool tf32, int arch) -> int", &batch_tile);
  m.def(
      "choose(int cell, int hidden, int batch, ScalarType dtype, bool packed, bool proj, "
      "bool backward, int directions, bool tf32, int sms, int shared_optin, bool cooperative, "
      "int arch, str want='auto', str sync='auto', int cluster=-1, int code_arch=0) "
      "-> (str, str, int, int, int, str)",
      &choose);
  m.def(
      "forward(int cell, Tensor xw, Tensor? bias, Tensor? bias_hh, Tensor w_hh, Tensor hx, "
      "Tensor? cx, int steps, int batch, bool reverse, bool keep_gates, int units, "
      "int batch_tile, int order, bool stepwise=False, bool tagged=False, "
      "Tensor? batch_sizes=None, int chunk=0, bool paired=False, bool graphed=False, "
      "bool cluster=False) -> Tensor[]",
      &forward);
  m.def(
      "backward(int cell, Tensor w_hh, Tensor grad_out, Tensor grad_hy, Tensor? grad_cy, "
      "Tensor? out, Tensor? hx, Tensor? cx, Tensor? gates, Tensor? cells, Tensor? hn, "
      "int steps, int batch, bool reverse, int units, int batch_tile, int order, "
      "bool stepwise=False, bool tagged=False, Tensor? batch_sizes=None, int chunk=0, "
      "bool paired=False, bool graphed=False, bool cluster=False) -> Tensor[]",
      &backward);
}

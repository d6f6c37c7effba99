// Launching the persistent kernels: the plan of a launch (grid, units per
// block, batch tile, shared memory), the cooperative launch itself, and the
// per-cell, per-dtype entry points. persistent_<cell>_<forward|backward>.cu
// instantiate run_forward / run_backward, one cell and direction each, so
// that they compile in parallel; persistent.cu chooses between the paths.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <initializer_list>
#include <type_traits>
#include <vector>

#include "persistent.cuh"
#include "persistent_plan.h"

namespace fused_rnn {
namespace cuda {
namespace persistent {

// Cooperative launch of `kernel` (one argument, *params) on the current
// stream, `directions` x plan.blocks blocks. Returns false, having launched
// nothing, when the grid cannot be co-resident on the current device now
// (other work or MPS limits).
bool launch_cooperative(const void* kernel, const Plan& plan, int directions, void* params);
// The cluster exchange's launch (plan.cluster): one thread-block cluster of
// plan.cluster blocks per direction, on the current stream. Returns false,
// having launched nothing, when the device cannot schedule such a cluster.
bool launch_cluster(const void* kernel, const Plan& plan, int directions, void* params);
// Lets `kernel` have the current device's dynamic shared memory (once per
// kernel and device); before launch_blocks.
void allow_shared_memory(const void* kernel);
// Packed input's step table (packed_step_table) on the device, copied from
// pinned host memory on the current stream; undefined while the stream is
// being captured into a CUDA graph, whose replays could not count on that
// host buffer (the caller then runs the steps stepwise: each launch carries
// its rows in its parameters).
at::Tensor step_table_on_device(const std::vector<int64_t>& batch_sizes, at::Device device);
// An ordinary launch of `kernel` (arguments `args`) with `blocks` blocks of
// kThreads threads on the current stream, checked.
void launch_blocks(const void* kernel, int blocks, size_t shared_bytes, void** args);

// The batch tiles compiled: 1 (a single sequence) and the wide tiles:
// kMaxBatchTile (FMA) for float and double, kMmaTile (tensor cores) for
// half, bfloat16 and (TF32) float (batch_tile in persistent.cuh picks one).
template <typename scalar_t>
constexpr bool has_tile(int tile) {
  constexpr bool half =
      std::is_same_v<scalar_t, c10::Half> || std::is_same_v<scalar_t, c10::BFloat16>;
  return tile == 1 || (tile == kMaxBatchTile && !half) ||
         (tile == kMmaTile && !std::is_same_v<scalar_t, double>);
}

// The kernel `pick` gives for the plan's batch tile: pick(tile), tile an
// std::integral_constant<int, BT> of a tile compiled for scalar_t.
template <typename scalar_t, typename Pick>
const void* tiled(const Plan& plan, Pick pick) {
  switch (plan.batch_tile) {
    case 1:
      return reinterpret_cast<const void*>(pick(std::integral_constant<int, 1>{}));
    case kMaxBatchTile:
      if constexpr (has_tile<scalar_t>(kMaxBatchTile)) {
        return reinterpret_cast<const void*>(pick(std::integral_constant<int, kMaxBatchTile>{}));
      }
      break;
    case kMmaTile:
      if constexpr (has_tile<scalar_t>(kMmaTile)) {
        return reinterpret_cast<const void*>(pick(std::integral_constant<int, kMmaTile>{}));
      }
      break;
  }
  TORCH_CHECK(false, "fused_rnn: no persistent kernel with batch tile ", plan.batch_tile,
              " for ", c10::CppTypeToScalarType<scalar_t>::value);
}

// The kernel `pick` gives for the plan (batch tile, cluster exchange) and
// the number of directions in one launch: pick(tile, paired, cluster), each
// an std::integral_constant (with_variant, persistent.cuh).
template <typename scalar_t, typename Pick>
const void* kernel_for(const Plan& plan, bool paired, Pick pick) {
  const void* kernel = nullptr;
  with_variant<has_cluster_kernels<scalar_t>()>(paired, plan.cluster > 0, [&](auto p, auto c) {
    kernel = tiled<scalar_t>(plan, [&](auto tile) { return pick(tile, p, c); });
  });
  return kernel;
}

#define FR_PERSISTENT_DISPATCH(type, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, type, name, __VA_ARGS__)

// For the stepwise launches: every block's weight slice (forward: W_hh
// rows, backward: W_hh columns), packed once per call into global memory by
// pack_slices_kernel. The tensor must live until the launches that read it
// are enqueued (the caching allocator orders its reuse on the stream).
template <int G, bool kBackward, typename scalar_t>
at::Tensor pack_slices(const at::Tensor& w_hh, const Plan& plan, int64_t batch) {
  using T = at::opmath_type<scalar_t>;
  int H = static_cast<int>(w_hh.size(1)), J = plan.units;
  const Tiling tl = make_tiling(kBackward ? J : G * J, kBackward ? G * H : H, plan.batch_tile,
                                batch, J, sizeof(scalar_t), sizeof(T), false);
  at::Tensor slices = at::empty({plan.blocks * slice_elements(tl)}, w_hh.options());
  const scalar_t* w = data<scalar_t>(w_hh);
  scalar_t* out = data<scalar_t>(slices);
  void* args[] = {&w, &out, &H, &J, &batch};
  const void* kernel = tiled<scalar_t>(plan, [](auto tile) {
    return pack_slices_kernel<G, kBackward, decltype(tile)::value, scalar_t>;
  });
  launch_blocks(kernel, plan.blocks, 0, args);  // (no dynamic shared memory)
  return slices;
}

// Runs `kernel` over the steps of launch.count directions (each with its
// W_hh in w_hh[d]; batch_sizes: the rows of each time step of packed input,
// empty for dense input, the same for both directions): one cooperative
// launch for all of them (plan.tagged: each direction's blocks pass each
// step's rows through their own zeroed tagged ring, else the whole grid
// meets at a barrier per step; plan.cluster: one cluster launch, each
// direction's blocks a cluster passing rows through each other's shared
// memory; false when no such cluster can be scheduled), packed input's rows read from a step table
// on the device (false, nothing launched, when the grid cannot be
// co-resident now, or for packed input while the stream is being captured),
// or, when plan.stepwise, the weight slices of each w_hh packed and one
// launch per step with the rows of its step in each direction (through
// run_plan, which raises the kernel's shared memory limit first). Forward
// steps run 0 .. T-1, backward T-1 down to -1 (grad_hx). plan.blocks is per
// direction; the grid has launch.count times as many.
template <int G, bool kBackward, typename scalar_t, typename Params>
bool launch_steps(const void* kernel, const Plan& plan, Directions<Params>& launch,
                  const at::Tensor (&w_hh)[2], const std::vector<int64_t>& batch_sizes) {
  launch.blocks = plan.blocks;
  const int count = launch.count;
  for (int d = 0; d < count; ++d) {
    launch.dir[d].chunk = plan.stepwise ? plan.step_chunk : plan.chunk;
  }
  if (!plan.stepwise) {
    // These live until the launch is enqueued: the caching allocator orders
    // their reuse after the kernel on the stream.
    at::Tensor table, ring;
    if (!batch_sizes.empty()) {
      table = step_table_on_device(batch_sizes, w_hh[0].device());
      if (!table.defined()) return false;
    }
    const Params& first = launch.dir[0];
    // per direction, two slots of the rows the next product reads, zeroed (exchange_put)
    const int64_t width = kBackward ? G * w_hh[0].size(1) : w_hh[0].size(1);
    const int64_t words = exchange_ring_words<scalar_t>(first.batch, width);
    if (plan.tagged) ring = at::zeros({count * words}, w_hh[0].options().dtype(at::kLong));
    for (int d = 0; d < count; ++d) {
      Params& p = launch.dir[d];
      p.run = {kBackward ? p.steps - 1 : 0, kBackward ? -1 : p.steps, true};
      p.slices = nullptr;
      p.step_table = table.defined() ? data<int64_t>(table) : nullptr;
      p.exchange = plan.tagged ? reinterpret_cast<uint64_t*>(data<int64_t>(ring)) + d * words
                               : nullptr;
      p.cluster = plan.cluster;
    }
    return plan.cluster ? launch_cluster(kernel, plan, count, &launch)
                        : launch_cooperative(kernel, plan, count, &launch);
  }
  at::Tensor slices[2];
  for (int d = 0; d < count; ++d) {
    slices[d] = pack_slices<G, kBackward, scalar_t>(w_hh[d], plan, launch.dir[d].batch);
    launch.dir[d].slices = data<scalar_t>(slices[d]);
    launch.dir[d].cluster = 0;  // (a launch per step: the kernel boundary for the barrier)
  }
  // (the kernel's shared memory limit was raised before: run_plan)
  void* args[] = {&launch};  // read at each launch: the next step changes it
  for_each_step<kBackward>(launch.dir[0].steps, launch.dir[0].batch, batch_sizes,
                           [&](int64_t s, const auto& rows) {
                             for (int d = 0; d < count; ++d) {
                               Params& p = launch.dir[d];
                               p.run = {s, kBackward ? s : s + 1, false};
                               p.step = rows(p.reverse);
                             }
                             launch_blocks(kernel, count * plan.blocks, plan.step_shared_bytes,
                                           args);
                           });
  return true;
}

// Runs the plan's launches, run(first, second) (false as launch_steps):
// the cooperative one directly; the stepwise ones through run_as_loop
// (persistent.cuh), so that from the second call of a shape on
// (FUSED_RNN_CUDA_GRAPHS, graphs.h) the packing of the weight slices and the
// T launches are replayed from one CUDA graph instead of T launches from the
// host. The kernel's shared memory limit is raised before, never inside a
// capture. flags: what else the launches depend on.
template <PersistentCell kCell, bool kBackward, typename Request, typename Run>
bool run_plan(const void* kernel, const Plan& plan, const Request& a, const Request* second,
              std::initializer_list<int64_t> flags, Run run) {
  if (!plan.stepwise) return run(a, second);
  allow_shared_memory(kernel);
  std::vector<int64_t> params = {static_cast<int64_t>(kCell), kBackward, plan.blocks,
                                 plan.units, plan.batch_tile, plan.step_chunk,
                                 static_cast<int64_t>(plan.step_shared_bytes)};
  params.insert(params.end(), flags.begin(), flags.end());
  const int64_t H = a.w_hh.size(1);
  const int64_t macs = (second ? 2 : 1) * a.batch * gate_count<kCell>() * H * H;
  run_as_loop(kBackward ? "stepwise_backward" : "stepwise_forward", std::move(params), macs, a,
              second, run, &run_loop);
  return true;
}

// Runs one direction (second null) or both directions of a layer
// (`second`: the same shapes, dtype and batch_sizes as `a`) in one launch
// of the plan; false as launch_steps.
template <PersistentCell kCell>
bool run_forward(const PersistentForward& a, const PersistentForward* second, const Plan& plan) {
  bool launched = false;
  FR_PERSISTENT_DISPATCH(a.xw.scalar_type(), "fused_rnn_persistent_forward", [&] {
    auto pick = [](auto t, auto p, auto c) {
      return forward_kernel<kCell, decltype(t)::value, scalar_t, decltype(p)::value,
                            decltype(c)::value>;
    };
    const void* kernel = kernel_for<scalar_t>(plan, second != nullptr, pick);
    auto run = [&](const PersistentForward& first, const PersistentForward* other) {
      const PersistentForward* dirs[2] = {&first, other};
      Directions<ForwardParams<scalar_t>> launch{};
      launch.count = other ? 2 : 1;
      at::Tensor state[2], w_hh[2];
      for (int d = 0; d < launch.count; ++d) {
        const PersistentForward& x = *dirs[d];
        // LSTM's cell state runs in the math type between steps.
        if (kCell == PersistentCell::kLstm) {
          state[d] = at::empty({x.batch, x.w_hh.size(1)},
                               x.xw.options().dtype(at::toOpMathType(x.xw.scalar_type())));
        }
        w_hh[d] = x.w_hh;
        launch.dir[d] = forward_params<scalar_t>(x, plan.units, state[d]);
      }
      return launch_steps<gate_count<kCell>(), false, scalar_t>(kernel, plan, launch, w_hh,
                                                                first.batch_sizes);
    };
    launched = run_plan<kCell, false>(kernel, plan, a, second, {a.keep_gates}, run);
  });
  return launched;
}

template <PersistentCell kCell>
bool run_backward(const PersistentBackward& a, const PersistentBackward* second,
                  const Plan& plan) {
  bool launched = false;
  FR_PERSISTENT_DISPATCH(a.grad_out.scalar_type(), "fused_rnn_persistent_backward", [&] {
    auto pick = [](auto t, auto p, auto c) {
      return backward_kernel<kCell, decltype(t)::value, scalar_t, decltype(p)::value,
                             decltype(c)::value>;
    };
    const void* kernel = kernel_for<scalar_t>(plan, second != nullptr, pick);
    auto run = [&](const PersistentBackward& first, const PersistentBackward* other) {
      const PersistentBackward* dirs[2] = {&first, other};
      Directions<BackwardParams<scalar_t>> launch{};
      launch.count = other ? 2 : 1;
      at::Tensor carry[2], w_hh[2];
      for (int d = 0; d < launch.count; ++d) {
        const PersistentBackward& x = *dirs[d];
        // LSTM's dc and GRU's z * dh run in the math type between steps.
        if (kCell == PersistentCell::kLstm || kCell == PersistentCell::kGru) {
          carry[d] = at::empty({x.batch, x.w_hh.size(1)},
                               x.grad_out.options().dtype(
                                   at::toOpMathType(x.grad_out.scalar_type())));
        }
        w_hh[d] = x.w_hh;
        launch.dir[d] = backward_params<scalar_t>(x, plan.units, carry[d]);
      }
      return launch_steps<gate_count<kCell>(), true, scalar_t>(kernel, plan, launch, w_hh,
                                                               first.batch_sizes);
    };
    launched = run_plan<kCell, true>(kernel, plan, a, second, {}, run);
  });
  return launched;
}

}  // namespace persistent
}  // namespace cuda
}  // namespace fused_rnn

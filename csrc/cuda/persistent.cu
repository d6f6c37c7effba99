// The choice between the persistent kernels (one cooperative launch, or one
// launch per step: stepwise) and the general per-step path, the plan of a
// launch for the device at hand, and the launches.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "persistent_launch.cuh"

namespace fused_rnn {
namespace cuda {
namespace persistent {

extern template bool run_forward<PersistentCell::kLstm>(const PersistentForward&,
                                                            const PersistentForward*,
                                                            const Plan&);
extern template bool run_backward<PersistentCell::kLstm>(const PersistentBackward&,
                                                             const PersistentBackward*,
                                                             const Plan&);
extern template bool run_forward<PersistentCell::kGru>(const PersistentForward&,
                                                            const PersistentForward*,
                                                            const Plan&);
extern template bool run_backward<PersistentCell::kGru>(const PersistentBackward&,
                                                             const PersistentBackward*,
                                                             const Plan&);
extern template bool run_forward<PersistentCell::kRnnTanh>(const PersistentForward&,
                                                            const PersistentForward*,
                                                            const Plan&);
extern template bool run_backward<PersistentCell::kRnnTanh>(const PersistentBackward&,
                                                            const PersistentBackward*,
                                                            const Plan&);
extern template bool run_forward<PersistentCell::kRnnRelu>(const PersistentForward&,
                                                            const PersistentForward*,
                                                            const Plan&);
extern template bool run_backward<PersistentCell::kRnnRelu>(const PersistentBackward&,
                                                            const PersistentBackward*,
                                                            const Plan&);

namespace {

// The automatic choice, from the H200 grid of 2026-11-27 (both paths
// forced, LSTM and GRU, T=256, B 1-256, H 256-1024, every dtype;
// bench/results/nvidia-h200*.json). Up to kAutoLatencyBatch sequences the
// persistent kernels won every shape (the steps are latency-bound, and
// cuBLAS plus a pointwise kernel per step cost 15-60 us of launches). Past
// it they run while a block's work per step, weight rows x k x batch, is
// at most kAutoMaxWork (kAutoMaxWorkMma for the tensor-core forward), and
// the per-step GEMMs take over beyond: e.g. float32 LSTM forward at B=64
// H=256 (131k) 4.2 ms persistent vs 8.0 ms general, at B=64 H=512 (524k)
// 8.5 vs 6.3 ms. The measured crossover came before the batch tiles were
// staged with several loads in flight; FUSED_RNN_KERNEL_PATH=persistent
// forces the persistent kernels wherever they fit.
constexpr int64_t kAutoLatencyBatch = 16;
constexpr int64_t kAutoMaxWork = int64_t{1} << 18;
constexpr int64_t kAutoMaxWorkMma = int64_t{1} << 19;

// How the blocks of one cooperative launch pass a step's rows on: the
// tagged exchange (persistent.cuh, exchange_put: the rows' own words carry
// the step, one trip through L2 per step) or a grid barrier per step
// followed by plain loads of the rows. The tagged words are 8 bytes per
// value (16 for float64), so every block reads 2x (float32) to 4x (half
// types) the bytes of plain loads: worth it while those extra bytes, over
// the grid and per step, take L2 less time than a barrier (~1.1 us empty on
// the H100, DESIGN.md). kTaggedExtraBytes, a prediction for H100/H200
// (~4 MiB at ~6 TB/s of L2: ~0.7 us) until a GPU run compares the two
// (device_check.sh stepwise: <card>-barrier.json): at most 4 MiB per step
// takes the tags, e.g. float32 forward up to B=8 at H=1024, every shape at
// B=1. FUSED_RNN_GRID_SYNC (read once): auto (this rule, the default),
// tags or barrier everywhere.
enum class GridSync { kAuto, kTags, kBarrier };
constexpr int64_t kTaggedExtraBytes = int64_t{4} << 20;

GridSync grid_sync() {
  static const GridSync sync = [] {
    const char* value = std::getenv("FUSED_RNN_GRID_SYNC");
    const std::string mode = value ? value : "";
    if (mode.empty() || mode == "auto") return GridSync::kAuto;
    if (mode == "tags") return GridSync::kTags;
    TORCH_CHECK(mode == "barrier",
                "FUSED_RNN_GRID_SYNC must be 'auto', 'tags' or 'barrier', got '", mode, "'");
    return GridSync::kBarrier;
  }();
  return sync;
}

// Whether both directions of a bidirectional layer may share a launch:
// FUSED_RNN_BIDIRECTIONAL (read once) auto (the default: where the plan for
// the pair takes the persistent or stepwise kernels) or separate (each
// direction on its own, one after the other: for comparison).
bool pairs_allowed() {
  static const bool allowed = [] {
    const char* value = std::getenv("FUSED_RNN_BIDIRECTIONAL");
    const std::string mode = value ? value : "";
    TORCH_CHECK(mode.empty() || mode == "auto" || mode == "separate",
                "FUSED_RNN_BIDIRECTIONAL must be 'auto' or 'separate', got '", mode, "'");
    return mode != "separate";
  }();
  return allowed;
}

// The L2 bytes per step that the tagged words add over plain loads: every
// block reads every row of the step, `width` values each.
int64_t tagged_extra_bytes(int64_t blocks, int64_t batch, int64_t width, at::ScalarType dtype) {
  const int64_t element = static_cast<int64_t>(c10::elementSize(dtype));
  return blocks * batch * width * (8 * exchange_words_for(element) - element);
}

struct DeviceLimits {
  int sms = 0;
  int shared_optin = 0;  // bytes of dynamic shared memory a block may have
  int cooperative = 0;   // whether the device takes cooperative launches
  int arch = 0;          // compute capability, major * 10 + minor
};

DeviceLimits device_limits(int device) {
  static std::mutex mutex;
  static std::vector<DeviceLimits> cache;
  std::lock_guard<std::mutex> lock(mutex);
  if (device >= static_cast<int>(cache.size())) cache.resize(device + 1);
  DeviceLimits& limits = cache[device];
  if (limits.sms == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&limits.sms, cudaDevAttrMultiProcessorCount, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&limits.shared_optin,
                                          cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    C10_CUDA_CHECK(
        cudaDeviceGetAttribute(&limits.cooperative, cudaDevAttrCooperativeLaunch, device));
    int major = 0, minor = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    limits.arch = major * 10 + minor;
  }
  return limits;
}

int gates_of(PersistentCell cell) {
  switch (cell) {
    case PersistentCell::kLstm:
      return 4;
    case PersistentCell::kGru:
      return 3;
    default:
      return 1;
  }
}

size_t math_size(at::ScalarType dtype) { return dtype == at::kDouble ? 8 : 4; }

// How a batch tile multiplies, for explain.
std::string tile_words(int batch_tile, at::ScalarType dtype, int64_t batch, int arch) {
  if (batch_tile != kMmaTile) {
    if (batch > 1 && is_half(dtype) && arch < mma_arch(dtype)) {
      return " on FMA units (wmma multiplies " + std::string(c10::toString(dtype)) +
             " from compute capability " + std::to_string(mma_arch(dtype) / 10) + "." +
             std::to_string(mma_arch(dtype) % 10) + ", this GPU has " +
             std::to_string(arch / 10) + "." + std::to_string(arch % 10) + ")";
    }
    return " on FMA units";
  }
  return dtype == at::kFloat
             ? " on tensor cores in TF32 (wmma, fp32 accumulation; torch allows TF32 for "
               "its float32 RNNs: torch.backends.cudnn.allow_tf32, or with cuDNN disabled "
               "torch.backends.cuda.matmul.allow_tf32)"
             : " on tensor cores (wmma, fp32 accumulation)";
}

struct Decision {
  PathChoice choice;
  Plan plan;
};

// Whether float32 RNNs may multiply in TF32, as torch.nn's would, read at
// every call: with cuDNN (torch's RNNs on CUDA unless
// torch.backends.cudnn.enabled is off), its flag for RNNs
// (torch.backends.cudnn.allow_tf32, or the RNN entry of its fp32_precision
// settings); without it torch's RNNs multiply through cuBLAS, whose flag
// is torch.backends.cuda.matmul.allow_tf32.
bool tf32_allowed() {
  const at::Context& ctx = at::globalContext();
  return ctx.userEnabledCuDNN() && at::Context::hasCuDNN()
             ? ctx.allowTF32CuDNN(at::Float32Op::RNN)
             : ctx.allowTF32CuBLAS();
}

// The choice for a shape on the current device, for one direction of a
// layer or (directions = 2) both directions of a bidirectional layer in one
// launch, each on half of the SMs, with the batch tile for `tf32` (float32
// on tensor cores allowed or not). The reason (for explain) is written only
// when `explain`: an op call needs just the plan.
Decision decide_tiled(PersistentCell cell, int64_t hidden, int64_t batch, at::ScalarType dtype,
                      bool packed, bool proj, bool backward, int directions, bool explain,
                      bool tf32) {
  Decision d;
  const KernelPath want = requested_kernel_path();
  const char* general = "general path (a cuBLAS GEMM and a fused pointwise kernel per step): ";
  auto take_general = [&](const std::string& why) {
    d.choice.path = KernelPath::kGeneral;
    d.choice.reason = general + why;
    return d;
  };
  if (want == KernelPath::kGeneral) return take_general("the general path was requested");
  if (proj) return take_general("LSTM with proj_size runs per step");
  if (dtype != at::kFloat && dtype != at::kDouble && dtype != at::kHalf &&
      dtype != at::kBFloat16) {
    return take_general("no persistent kernel for this dtype");
  }
  if (hidden <= 0 || batch <= 0) return take_general("an empty hidden state");
  const int device = c10::cuda::current_device();
  const DeviceLimits limits = device_limits(device);
  // the SMs of one direction
  const int64_t sms = std::max(1, limits.sms / directions);
  const int64_t G = gates_of(cell);
  const int64_t k = backward ? G * hidden : hidden;
  const int64_t rows_per_unit = backward ? 1 : G;
  Plan& plan = d.plan;
  plan.batch_tile = batch_tile(batch, dtype, tf32, limits.arch);
  // One unit per SM or more, as few as cover H on every SM: the persistent
  // grid; a stepwise grid takes more blocks than SMs where a block cannot
  // hold that many units' rows.
  const int64_t units = (hidden + sms - 1) / sms;
  const int64_t max_units = std::min<int64_t>(kMaxRows / rows_per_unit,
                                              kThreads / plan.batch_tile);
  const bool too_many_rows = units > max_units;
  plan.units = static_cast<int>(std::min(units, max_units));
  plan.blocks = static_cast<int>((hidden + plan.units - 1) / plan.units);
  const int64_t rows = rows_per_unit * plan.units;
  auto tiling = [&](bool weights_shared, int chunk) {
    return make_tiling(static_cast<int>(rows), static_cast<int>(k), plan.batch_tile, batch,
                       plan.units, c10::elementSize(dtype), math_size(dtype), weights_shared,
                       chunk);
  };
  // The widest staging of a pass that the block's shared memory holds: all
  // k columns (one staging, two __syncthreads per pass), else the widest
  // halving of it still wider than the default chunk; 0: the default.
  auto widest_chunk = [&](bool weights_shared) {
    const Tiling base = tiling(weights_shared, 0);
    for (int c = base.kpad; c > base.chunk; c = round_up((c + 1) / 2, 16)) {
      if (tiling(weights_shared, c).bytes <= static_cast<size_t>(limits.shared_optin)) return c;
    }
    return 0;
  };
  plan.step_chunk = widest_chunk(false);
  plan.chunk = too_many_rows ? 0 : widest_chunk(true);
  const Tiling step_tiling = tiling(false, plan.step_chunk);
  const Tiling shared_tiling = too_many_rows ? Tiling{} : tiling(true, plan.chunk);
  plan.shared_bytes = shared_tiling.bytes;
  plan.step_shared_bytes = step_tiling.bytes;

  std::ostringstream why;
  auto take_stepwise = [&](const char* because) {
    plan.stepwise = true;
    d.choice.path = KernelPath::kStepwise;
    if (explain) {
      why << "stepwise kernels (the persistent kernels' code, one launch per step, "
          << (backward ? "W_hh^T" : "W_hh") << " slices read from global memory): "
          << plan.blocks << " blocks x " << kThreads << " threads, " << plan.units
          << " hidden unit" << (plan.units == 1 ? "" : "s") << " per block, slice of " << rows
          << " x " << k << ", batch tile " << plan.batch_tile
          << tile_words(plan.batch_tile, dtype, batch, limits.arch) << ", "
          << step_tiling.bsplits << " tile" << (step_tiling.bsplits == 1 ? "" : "s")
          << " side by side, the input staged " << step_tiling.chunk << " of " << k
          << " columns at a time"
          << (directions > 1 ? "; both directions side by side in each launch (twice the blocks)"
                             : "")
          << "; " << because;
      d.choice.reason = why.str();
    }
    return d;
  };
  if (plan.step_shared_bytes > static_cast<size_t>(limits.shared_optin)) {
    if (explain)
      why << "a stepwise block needs " << plan.step_shared_bytes / 1024
          << " KiB of shared memory; a block may have " << limits.shared_optin / 1024 << " KiB";
    return take_general(why.str());
  }
  if (want == KernelPath::kStepwise) return take_stepwise("the stepwise kernels were requested");

  if (too_many_rows) {
    if (explain)
      why << "H=" << hidden << " needs " << units << " hidden units (" << rows_per_unit * units
          << " weight rows) per block on " << sms << " SMs"
          << (directions > 1 ? " per direction" : "")
          << "; a persistent block holds at most " << kMaxRows << " rows and "
          << kThreads / plan.batch_tile << " units";
    return take_general(why.str());
  }
  if (plan.shared_bytes > static_cast<size_t>(limits.shared_optin)) {
    if (explain)
      why << "the weights need " << plan.shared_bytes / 1024
          << " KiB of shared memory per block on " << sms << " SMs"
          << (directions > 1 ? " per direction" : "") << "; a block may have "
          << limits.shared_optin / 1024 << " KiB";
    return take_general(why.str());
  }
  // The rule compares one direction's persistent kernel with the per-step
  // GEMMs; both directions side by side are the same work over half the
  // SMs each, no slower than one direction after the other, so a pair is
  // held to the rule at the work of one direction's plan.
  const int64_t work = rows * k * batch / directions;
  const int64_t max_work =
      plan.batch_tile == kMmaTile && !backward ? kAutoMaxWorkMma : kAutoMaxWork;
  if (want == KernelPath::kAuto && batch > kAutoLatencyBatch && work > max_work) {
    if (explain)
      why << rows / directions << " x " << k << " weights x " << batch
          << " sequences of work per block and step (more than " << max_work
          << "), where the per-step GEMMs are faster (the persistent kernel would fit: "
             "FUSED_RNN_KERNEL_PATH=persistent forces it)";
    return take_general(why.str());
  }
  if (!limits.cooperative) {
    return take_stepwise("this device takes no cooperative launches, so no persistent kernel");
  }
  d.choice.path = KernelPath::kPersistent;
  const int64_t extra = directions * tagged_extra_bytes(plan.blocks, batch, k, dtype);
  const GridSync sync = grid_sync();
  plan.tagged = sync == GridSync::kTags || (sync == GridSync::kAuto && extra <= kTaggedExtraBytes);
  if (!explain) return d;
  const Tiling& tl = shared_tiling;
  why << "persistent kernel (" << (backward ? "backward" : "forward")
      << (directions > 1 ? ", both directions of the layer side by side" : "")
      << ", one cooperative launch for the whole sequence): "
      << (directions > 1 ? "2 x " : "") << plan.blocks << " blocks x "
      << kThreads << " threads, " << plan.units << " hidden unit"
      << (plan.units == 1 ? "" : "s") << " per block, W_hh" << (backward ? "^T" : "")
      << " slice of " << rows << " x " << k << " in " << plan.shared_bytes / 1024
      << " KiB of shared memory (of " << limits.shared_optin / 1024 << " KiB), batch tile "
      << plan.batch_tile
      << tile_words(plan.batch_tile, dtype, batch, limits.arch)
      << ", " << tl.bsplits << " tile" << (tl.bsplits == 1 ? "" : "s")
      << " side by side (" << (batch + tl.pass - 1) / tl.pass << " pass"
      << ((batch + tl.pass - 1) / tl.pass == 1 ? "" : "es")
      << " per step" << (packed ? " at most" : "") << ", the input staged " << tl.chunk
      << " of " << k << " columns at a time), "
      << (plan.tagged ? "each step's rows passed on through a tagged ring in global memory "
                        "(no grid barrier; "
                      : "one grid barrier per step (")
      << "the tagged ring's words would add " << (extra + 1023) / 1024
      << " KiB of L2 reads per step"
      << (sync == GridSync::kAuto ? "" : ", as FUSED_RNN_GRID_SYNC says") << ")"
      << (packed ? "; packed sequences: each step's rows from a table copied to the device "
                   "with the launch"
                 : "")
      << "; one launch per step (stepwise) when the grid cannot be co-resident at the call"
      << (packed ? " or the stream is being captured into a CUDA graph" : "");
  d.choice.reason = why.str();
  return d;
}

// decide_tiled with float32's batch tile chosen: TF32 tensor cores where
// torch allows TF32 for RNNs and the batch takes the wide tile, unless their
// tiles (rows and columns padded to 16) leave the shape to the general path
// where the exact FMA tile does not.
Decision decide(PersistentCell cell, int64_t hidden, int64_t batch, at::ScalarType dtype,
                bool packed, bool proj, bool backward, int directions, bool explain) {
  const int arch = device_limits(c10::cuda::current_device()).arch;
  const bool tf32 = dtype == at::kFloat && batch_tile(batch, dtype, true, arch) == kMmaTile &&
                    tf32_allowed();
  if (tf32) {
    Decision d = decide_tiled(cell, hidden, batch, dtype, packed, proj, backward, directions,
                              explain, true);
    if (d.choice.path != KernelPath::kGeneral) return d;
    Decision fma = decide_tiled(cell, hidden, batch, dtype, packed, proj, backward, directions,
                                explain, false);
    if (fma.choice.path == KernelPath::kGeneral) return d;
    if (explain) {
      fma.choice.reason += "; exact float32 (TF32 is allowed, but with its tensor-core tiles "
                           "this shape would take the " + d.choice.reason + ")";
    }
    return fma;
  }
  return decide_tiled(cell, hidden, batch, dtype, packed, proj, backward, directions, explain,
                      false);
}

}  // namespace

namespace {

// Raises the kernel's dynamic shared memory limit to the device's, once per
// kernel and device.
void raise_shared_limit(const void* kernel, int device, const DeviceLimits& limits) {
  static std::mutex mutex;
  static std::set<std::pair<const void*, int>> raised;
  std::lock_guard<std::mutex> lock(mutex);
  if (raised.count({kernel, device}) == 0) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        limits.shared_optin));
    raised.insert({kernel, device});
  }
}

}  // namespace

void allow_shared_memory(const void* kernel) {
  const int device = c10::cuda::current_device();
  raise_shared_limit(kernel, device, device_limits(device));
}

at::Tensor step_table_on_device(const std::vector<int64_t>& batch_sizes, at::Device device) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) return at::Tensor();
  const std::vector<int64_t> table = packed_step_table(batch_sizes);
  at::Tensor host = at::empty({static_cast<int64_t>(table.size())},
                              at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::copy(table.begin(), table.end(), host.data_ptr<int64_t>());
  return host.to(device, /*non_blocking=*/true);
}

void launch_blocks(const void* kernel, int blocks, size_t shared_bytes, void** args) {
  C10_CUDA_CHECK(cudaLaunchKernel(kernel, dim3(blocks), dim3(kThreads), args, shared_bytes,
                                  c10::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool launch_cooperative(const void* kernel, const Plan& plan, int directions, void* params) {
  const int device = c10::cuda::current_device();
  const DeviceLimits limits = device_limits(device);
  raise_shared_limit(kernel, device, limits);
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads,
                                                               plan.shared_bytes));
  const int blocks = directions * plan.blocks;
  if (static_cast<int64_t>(per_sm) * limits.sms < blocks) return false;
  void* args[] = {params};
  const cudaError_t err =
      cudaLaunchCooperativeKernel(kernel, dim3(blocks), dim3(kThreads), args,
                                  plan.shared_bytes, c10::cuda::getCurrentCUDAStream());
  if (err == cudaErrorCooperativeLaunchTooLarge) {
    // Not co-resident now (MPS limits, say): nothing ran; the caller runs
    // the same plan stepwise.
    (void)cudaGetLastError();
    return false;
  }
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

}  // namespace persistent

PathChoice choose_path(PersistentCell cell, int64_t hidden, int64_t batch, at::ScalarType dtype,
                       bool packed, bool proj, bool backward, bool bidirectional) {
  if (!bidirectional) {
    return persistent::decide(cell, hidden, batch, dtype, packed, proj, backward, 1, true)
        .choice;
  }
  PathChoice single =
      persistent::decide(cell, hidden, batch, dtype, packed, proj, backward, 1, true).choice;
  if (!persistent::pairs_allowed()) {
    single.reason += "; each direction on its own, one after the other "
                     "(FUSED_RNN_BIDIRECTIONAL=separate)";
    return single;
  }
  PathChoice pair =
      persistent::decide(cell, hidden, batch, dtype, packed, proj, backward, 2, true).choice;
  if (pair.path != KernelPath::kGeneral) return pair;
  // each direction on its own, one after the other
  if (single.path == KernelPath::kGeneral) return single;
  single.reason += "; each direction on its own, one after the other (side by side, on half "
                   "the SMs each, they would take the " +
                   pair.reason + ")";
  return single;
}

namespace {

using persistent::Plan;

bool run_forward_cell(const PersistentForward& a, const PersistentForward* second,
                      const Plan& plan) {
  using persistent::run_forward;
  switch (a.cell) {
    case PersistentCell::kLstm:
      return run_forward<PersistentCell::kLstm>(a, second, plan);
    case PersistentCell::kGru:
      return run_forward<PersistentCell::kGru>(a, second, plan);
    case PersistentCell::kRnnTanh:
      return run_forward<PersistentCell::kRnnTanh>(a, second, plan);
    case PersistentCell::kRnnRelu:
      return run_forward<PersistentCell::kRnnRelu>(a, second, plan);
  }
  return false;
}

bool run_backward_cell(const PersistentBackward& a, const PersistentBackward* second,
                       const Plan& plan) {
  using persistent::run_backward;
  switch (a.cell) {
    case PersistentCell::kLstm:
      return run_backward<PersistentCell::kLstm>(a, second, plan);
    case PersistentCell::kGru:
      return run_backward<PersistentCell::kGru>(a, second, plan);
    case PersistentCell::kRnnTanh:
      return run_backward<PersistentCell::kRnnTanh>(a, second, plan);
    case PersistentCell::kRnnRelu:
      return run_backward<PersistentCell::kRnnRelu>(a, second, plan);
  }
  return false;
}

// The persistent plan run one step per launch (its units per block need no
// co-residency), for a grid that cannot be co-resident now.
Plan stepwise(Plan plan) {
  plan.stepwise = true;
  return plan;
}

}  // namespace

bool persistent_forward(const PersistentForward& a) {
  const auto d = persistent::decide(a.cell, a.w_hh.size(1), a.batch, a.xw.scalar_type(),
                                    /*packed=*/!a.batch_sizes.empty(), /*proj=*/false,
                                    /*backward=*/false, /*directions=*/1, /*explain=*/false);
  if (d.choice.path == KernelPath::kGeneral) return false;
  return run_forward_cell(a, nullptr, d.plan) || run_forward_cell(a, nullptr, stepwise(d.plan));
}

bool persistent_backward(const PersistentBackward& a) {
  const auto d = persistent::decide(a.cell, a.w_hh.size(1), a.batch, a.grad_out.scalar_type(),
                                    /*packed=*/!a.batch_sizes.empty(), /*proj=*/false,
                                    /*backward=*/true, /*directions=*/1, /*explain=*/false);
  if (d.choice.path == KernelPath::kGeneral) return false;
  return run_backward_cell(a, nullptr, d.plan) ||
         run_backward_cell(a, nullptr, stepwise(d.plan));
}

bool persistent_forward_pair(const PersistentForward& a, const PersistentForward& b) {
  if (!persistent::pairs_allowed()) return false;
  const auto d = persistent::decide(a.cell, a.w_hh.size(1), a.batch, a.xw.scalar_type(),
                                    /*packed=*/!a.batch_sizes.empty(), /*proj=*/false,
                                    /*backward=*/false, /*directions=*/2, /*explain=*/false);
  if (d.choice.path == KernelPath::kGeneral) return false;
  return run_forward_cell(a, &b, d.plan) || run_forward_cell(a, &b, stepwise(d.plan));
}

bool persistent_backward_pair(const PersistentBackward& a, const PersistentBackward& b) {
  if (!persistent::pairs_allowed()) return false;
  const auto d = persistent::decide(a.cell, a.w_hh.size(1), a.batch, a.grad_out.scalar_type(),
                                    /*packed=*/!a.batch_sizes.empty(), /*proj=*/false,
                                    /*backward=*/true, /*directions=*/2, /*explain=*/false);
  if (d.choice.path == KernelPath::kGeneral) return false;
  return run_backward_cell(a, &b, d.plan) || run_backward_cell(a, &b, stepwise(d.plan));
}

}  // namespace cuda
}  // namespace fused_rnn

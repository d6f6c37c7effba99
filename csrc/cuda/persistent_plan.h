// The plan of a persistent or stepwise launch (grid, units per block, batch
// tile, staging, shared memory, exchange) and the choice between the kernel
// paths for a shape, on a device described by its limits: host code with no
// CUDA runtime call, so that the CPU emulation's tests check the choice for
// a given GPU (tests/emulation). persistent.cu gives it the current
// device's limits, the requested path and torch's flags (its decide).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <sstream>
#include <string>

#include "fused_rnn/persistent.h"
#include "persistent.cuh"

namespace fused_rnn {
namespace cuda {
namespace persistent {

struct Plan {
  bool stepwise = false;  // one launch per step (else one cooperative launch)
  bool tagged = false;    // a cooperative launch exchanges rows tagged (no grid barrier)
  int cluster = 0;        // the cluster exchange: each direction's blocks one thread-block
                          // cluster of this many (= blocks); 0: none
  int blocks = 0;         // grid size per direction, ceil(H / units)
  int units = 0;          // J, hidden units per block
  int batch_tile = 0;     // BT: 1, kMaxBatchTile or kMmaTile (float: TF32)
  int chunk = 0;          // staged columns (make_tiling), the persistent kernel
  int step_chunk = 0;     // and a stepwise launch
  size_t shared_bytes = 0;       // per block, the persistent kernel (weights on chip)
  size_t step_shared_bytes = 0;  // per block, a stepwise launch (staged input, sums)
};

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
// B=1.
//
// Or, from compute capability 9.0, the cluster exchange (persistent.cuh):
// where all blocks of a direction fit in one thread-block cluster (at most
// DeviceLimits::cluster, 16 on Hopper), with their weight slices and a
// window of two steps' input rows in shared memory, each block puts its
// rows into every peer's window and a step ends at one cluster barrier: no
// L2 round trip, no grid barrier, and a hardware barrier among at most 16
// SMs. The price: the work of a step spread over 16 SMs instead of all of
// them. The automatic choice takes it while a block's work per step (weight
// rows x k x batch) is at most kClusterMaxWork (kClusterMaxWorkMma on
// tensor cores): e.g. float32 LSTM H=256 up to B=16 (64 x 256 x 16 FMA per
// block, ~1 us of one SM), the half types' tensor cores to B=64. A
// prediction (a step of ~1-1.5 us at B <= 8, H <= 256, against ~3-4.6 us
// with the tags or the barrier on 132 SMs), until a GPU run compares them
// (the session's <card>.json, which takes it, against the stepwise stage's
// <card>-tags.json: goals.py --tags).
// FUSED_RNN_GRID_SYNC (read once): auto (these rules, the default), cluster
// (wherever it fits; the rule above elsewhere), tags or barrier everywhere.
// float32 and the half types only (float64 is for gradcheck and accuracy:
// no cluster kernels are compiled for it).
enum class GridSync { kAuto, kTags, kBarrier, kCluster };
constexpr int64_t kTaggedExtraBytes = int64_t{4} << 20;
constexpr int64_t kClusterMaxWork = int64_t{1} << 18;
constexpr int64_t kClusterMaxWorkMma = int64_t{1} << 20;

// The L2 bytes per step that the tagged words add over plain loads: every
// block reads every row of the step, `width` values each.
inline int64_t tagged_extra_bytes(int64_t blocks, int64_t batch, int64_t width,
                                  at::ScalarType dtype) {
  const int64_t element = static_cast<int64_t>(c10::elementSize(dtype));
  return blocks * batch * width * (8 * exchange_words_for(element) - element);
}

// What the plan reads of a device.
struct DeviceLimits {
  int sms = 0;
  int shared_optin = 0;  // bytes of dynamic shared memory a block may have
  int cooperative = 0;   // whether the device takes cooperative launches
  int arch = 0;          // compute capability, major * 10 + minor
  int cluster = 0;       // the most blocks of a thread-block cluster the plan may take
                         // (16 where the device launches clusters, 9.0 on; else 0)
  int code_arch = 0;     // the virtual architecture of this build's code as the device
                         // loads it (a kernel's PTX version), 0: the device's own
};

// The compute capability whose features the loaded code has. A build
// without code for the device (e.g. TORCH_CUDA_ARCH_LIST="8.0+PTX" on an
// H100) runs the PTX of an older architecture there, JIT-compiled, in which
// the newer features compiled to a trap (thread-block clusters before 9.0,
// the bfloat16 and TF32 tensor-core tiles before 8.0): the plan takes the
// features of that architecture, not the device's.
inline int usable_arch(const DeviceLimits& limits) {
  return limits.code_arch > 0 && limits.code_arch < limits.arch ? limits.code_arch
                                                                : limits.arch;
}

// Thread-block clusters (the cluster exchange): compute capability 9.0 on.
constexpr int kClusterArch = 90;

// What a choice reads besides the shape: the device's limits, the path the
// user asked for (FUSED_RNN_KERNEL_PATH, fused_rnn.set_kernel_path), the
// exchange (FUSED_RNN_GRID_SYNC), and whether torch allows TF32 for its
// float32 RNNs (tf32_allowed in persistent.cu).
struct PlanContext {
  DeviceLimits limits;
  KernelPath want = KernelPath::kAuto;
  GridSync sync = GridSync::kAuto;
  bool tf32 = false;
};

inline int gates_of(PersistentCell cell) {
  switch (cell) {
    case PersistentCell::kLstm:
      return 4;
    case PersistentCell::kGru:
      return 3;
    default:
      return 1;
  }
}

inline size_t math_size(at::ScalarType dtype) { return dtype == at::kDouble ? 8 : 4; }

inline std::string arch_words(int arch) {
  return std::to_string(arch / 10) + "." + std::to_string(arch % 10);
}

// How a batch tile multiplies, for explain.
inline std::string tile_words(int batch_tile, at::ScalarType dtype, int64_t batch,
                              const DeviceLimits& limits) {
  const int arch = usable_arch(limits);
  if (batch_tile != kMmaTile) {
    if (batch > 1 && is_half(dtype) && arch < mma_arch(dtype)) {
      return " on FMA units (wmma multiplies " + std::string(c10::toString(dtype)) +
             " from compute capability " + arch_words(mma_arch(dtype)) +
             (arch == limits.arch
                  ? ", this GPU has " + arch_words(arch)
                  : ", and this build runs the PTX of " + arch_words(arch) +
                        " here, having no code for this GPU's " + arch_words(limits.arch)) +
             ")";
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

// The choice for a shape on the device of `ctx`, for one direction of a
// layer or (directions = 2) both directions of a bidirectional layer in one
// launch, each on half of the SMs, with the batch tile for `tf32` (float32
// on tensor cores allowed or not). The reason (for explain) is written only
// when `explain`: an op call needs just the plan.
inline Decision decide_tiled(PersistentCell cell, int64_t hidden, int64_t batch,
                             at::ScalarType dtype, bool packed, bool proj, bool backward,
                             int directions, bool explain, bool tf32, const PlanContext& ctx) {
  Decision d;
  const KernelPath want = ctx.want;
  const char* general = "general path (a cuBLAS GEMM and a fused pointwise kernel per step): ";
  auto take_general = [&](const std::string& why) {
    d.choice.path = KernelPath::kGeneral;
    d.choice.reason = general + why;
    return d;
  };
  if (want == KernelPath::kGeneral) return take_general("the general path was requested");
  if (proj) {
    // lstm.cpp folds the projection into the recurrent weight (W_hh W_hr,
    // 4H x H) where its recurrence, an LSTM without projection of the same
    // hidden size, takes these kernels; per step otherwise.
    Decision folded = decide_tiled(cell, hidden, batch, dtype, packed, /*proj=*/false,
                                   backward, directions, explain, tf32, ctx);
    if (explain) {
      std::string& reason = folded.choice.reason;
      if (folded.choice.path == KernelPath::kGeneral) {
        const std::string why = reason.rfind(general, 0) == 0 ? reason.substr(strlen(general))
                                                              : reason;
        return take_general("LSTM with proj_size per step (W_hh, then W_hr), as its folded "
                            "recurrence would take the general path: " + why);
      }
      reason = "proj_size folded (the recurrence on o * tanh(c), H wide, with weight_hh @ "
               "weight_hr; the projection one GEMM after it): " + reason;
    }
    return folded;
  }
  if (dtype != at::kFloat && dtype != at::kDouble && dtype != at::kHalf &&
      dtype != at::kBFloat16) {
    return take_general("no persistent kernel for this dtype");
  }
  if (hidden <= 0 || batch <= 0) return take_general("an empty hidden state");
  const DeviceLimits& limits = ctx.limits;
  // the SMs of one direction
  const int64_t sms = std::max(1, limits.sms / directions);
  const int64_t G = gates_of(cell);
  const int64_t k = backward ? G * hidden : hidden;
  const int64_t rows_per_unit = backward ? 1 : G;
  Plan& plan = d.plan;
  plan.batch_tile = batch_tile(batch, dtype, tf32, usable_arch(limits));
  // One unit per SM or more, as few as cover H on every SM: the persistent
  // grid; a stepwise grid takes more blocks than SMs where a block cannot
  // hold that many units' rows.
  const int64_t units = (hidden + sms - 1) / sms;
  const int64_t max_units = std::min<int64_t>(max_rows(plan.batch_tile) / rows_per_unit,
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
          << tile_words(plan.batch_tile, dtype, batch, limits) << ", "
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
          << "; a persistent block holds at most " << max_rows(plan.batch_tile)
          << " rows and "
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
  // The cluster exchange: each direction's blocks one cluster of as few
  // units per block as cover H on limits.cluster blocks.
  const GridSync sync = ctx.sync;
  if (limits.cluster > 0 && usable_arch(limits) >= kClusterArch &&
      has_cluster_kernels(dtype) && (sync == GridSync::kAuto || sync == GridSync::kCluster)) {
    const int64_t cunits = (hidden + limits.cluster - 1) / limits.cluster;
    const int64_t crows = rows_per_unit * cunits;
    const int64_t cwork = crows * k * batch;
    const int64_t cmax =
        plan.batch_tile == kMmaTile ? kClusterMaxWorkMma : kClusterMaxWork;
    const Tiling ct = make_tiling(static_cast<int>(crows), static_cast<int>(k), plan.batch_tile,
                                  batch, static_cast<int>(cunits), c10::elementSize(dtype),
                                  math_size(dtype), true, 0, /*window=*/true);
    // (a window lets the FMA product take more than kMaxRows rows: max_rows)
    const int64_t cmax_units = std::min<int64_t>(
        max_rows(plan.batch_tile, /*window=*/true) / rows_per_unit, kThreads / plan.batch_tile);
    const bool fits =
        cunits <= cmax_units && ct.bytes <= static_cast<size_t>(limits.shared_optin);
    if (fits && (sync == GridSync::kCluster || cwork <= cmax)) {
      d.choice.path = KernelPath::kPersistent;
      plan.units = static_cast<int>(cunits);
      plan.blocks = static_cast<int>((hidden + cunits - 1) / cunits);
      plan.cluster = plan.blocks;
      plan.chunk = ct.kpad;
      plan.shared_bytes = ct.bytes;
      plan.tagged = false;
      if (!explain) return d;
      why << "persistent kernel (" << (backward ? "backward" : "forward")
          << (directions > 1 ? ", both directions of the layer side by side" : "")
          << ", one launch for the whole sequence): "
          << (directions > 1 ? "two thread-block clusters (one per direction) of "
                             : "one thread-block cluster of ")
          << plan.blocks << " blocks x " << kThreads
          << " threads, " << plan.units << " hidden unit" << (plan.units == 1 ? "" : "s")
          << " per block, W_hh" << (backward ? "^T" : "") << " slice of " << crows << " x " << k
          << " and a window of two steps' " << ct.window_rows << " input rows in "
          << plan.shared_bytes / 1024 << " KiB of shared memory (of "
          << limits.shared_optin / 1024 << " KiB), batch tile " << plan.batch_tile
          << tile_words(plan.batch_tile, dtype, batch, limits) << ", " << ct.bsplits
          << " tile" << (ct.bsplits == 1 ? "" : "s") << " side by side ("
          << (batch + ct.pass - 1) / ct.pass << " pass"
          << ((batch + ct.pass - 1) / ct.pass == 1 ? "" : "es") << " per step"
          << (packed ? " at most" : "")
          << "), each step's rows put into every block's shared memory and one cluster "
             "barrier per step (the cluster exchange: no grid barrier, no trip through L2"
          << (sync == GridSync::kAuto ? "" : ", as FUSED_RNN_GRID_SYNC says") << ")"
          << (packed ? "; packed sequences: each step's rows from a table copied to the device "
                       "with the launch"
                     : "")
          << "; clusters of 8, then the grid of all SMs, when the device cannot schedule "
             "such a cluster at the call";
      d.choice.reason = why.str();
      return d;
    }
  }
  if (!limits.cooperative) {
    return take_stepwise("this device takes no cooperative launches, so no persistent kernel");
  }
  d.choice.path = KernelPath::kPersistent;
  const int64_t extra = directions * tagged_extra_bytes(plan.blocks, batch, k, dtype);
  plan.tagged = sync == GridSync::kTags ||
                ((sync == GridSync::kAuto || sync == GridSync::kCluster) &&
                 extra <= kTaggedExtraBytes);
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
      << tile_words(plan.batch_tile, dtype, batch, limits)
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
      << (sync == GridSync::kTags || sync == GridSync::kBarrier
              ? ", as FUSED_RNN_GRID_SYNC says"
              : "")
      << ")"
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
inline Decision decide_for(PersistentCell cell, int64_t hidden, int64_t batch,
                           at::ScalarType dtype, bool packed, bool proj, bool backward,
                           int directions, bool explain, const PlanContext& ctx) {
  const bool tf32 = dtype == at::kFloat &&
                    batch_tile(batch, dtype, true, usable_arch(ctx.limits)) == kMmaTile && ctx.tf32;
  if (tf32) {
    Decision d = decide_tiled(cell, hidden, batch, dtype, packed, proj, backward, directions,
                              explain, true, ctx);
    if (d.choice.path != KernelPath::kGeneral) return d;
    Decision fma = decide_tiled(cell, hidden, batch, dtype, packed, proj, backward, directions,
                                explain, false, ctx);
    if (fma.choice.path == KernelPath::kGeneral) return d;
    if (explain) {
      fma.choice.reason += "; exact float32 (TF32 is allowed, but with its tensor-core tiles "
                           "this shape would take the " + d.choice.reason + ")";
    }
    return fma;
  }
  return decide_tiled(cell, hidden, batch, dtype, packed, proj, backward, directions, explain,
                      false, ctx);
}

}  // namespace persistent
}  // namespace cuda
}  // namespace fused_rnn

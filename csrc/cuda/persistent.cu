// The choice between the persistent kernels and the general per-step path,
// the plan of a persistent launch for the device at hand, and the
// cooperative launch.
#include <cuda_runtime.h>

#include <mutex>
#include <set>
#include <sstream>
#include <utility>
#include <vector>

#include "persistent_launch.cuh"

namespace fused_rnn {
namespace cuda {
namespace persistent {

extern template bool run_forward<PersistentCell::kLstm>(const PersistentForward&, const Plan&);
extern template bool run_backward<PersistentCell::kLstm>(const PersistentBackward&, const Plan&);
extern template bool run_forward<PersistentCell::kGru>(const PersistentForward&, const Plan&);
extern template bool run_backward<PersistentCell::kGru>(const PersistentBackward&, const Plan&);
extern template bool run_forward<PersistentCell::kRnnTanh>(const PersistentForward&, const Plan&);
extern template bool run_backward<PersistentCell::kRnnTanh>(const PersistentBackward&,
                                                            const Plan&);
extern template bool run_forward<PersistentCell::kRnnRelu>(const PersistentForward&, const Plan&);
extern template bool run_backward<PersistentCell::kRnnRelu>(const PersistentBackward&,
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

struct DeviceLimits {
  int sms = 0;
  int shared_optin = 0;  // bytes of dynamic shared memory a block may have
  int cooperative = 0;   // whether the device takes cooperative launches
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

struct Decision {
  PathChoice choice;
  Plan plan;
};

// The choice for a shape on the current device. The reason (for explain)
// is written only when `explain`: an op call needs just the plan.
Decision decide(PersistentCell cell, int64_t hidden, int64_t batch, at::ScalarType dtype,
                bool packed, bool proj, bool backward, bool explain) {
  Decision d;
  const KernelPath want = requested_kernel_path();
  const char* general = "general path (a cuBLAS GEMM and a fused pointwise kernel per step): ";
  if (want == KernelPath::kGeneral) {
    d.choice.reason = std::string(general) + "the general path was requested";
    return d;
  }
  if (packed) {
    d.choice.reason = std::string(general) + "packed sequences run per step";
    return d;
  }
  if (proj) {
    d.choice.reason = std::string(general) + "LSTM with proj_size runs per step";
    return d;
  }
  if (dtype != at::kFloat && dtype != at::kDouble && dtype != at::kHalf &&
      dtype != at::kBFloat16) {
    d.choice.reason = std::string(general) + "no persistent kernel for this dtype";
    return d;
  }
  if (hidden <= 0 || batch <= 0) {
    d.choice.reason = std::string(general) + "an empty hidden state";
    return d;
  }
  const int device = c10::cuda::current_device();
  const DeviceLimits limits = device_limits(device);
  if (!limits.cooperative) {
    d.choice.reason = std::string(general) + "this device takes no cooperative launches";
    return d;
  }
  const int64_t G = gates_of(cell);
  const int64_t units = (hidden + limits.sms - 1) / limits.sms;
  const int64_t rows = backward ? units : G * units;
  const int64_t k = backward ? G * hidden : hidden;
  Plan& plan = d.plan;
  plan.units = static_cast<int>(units);
  plan.blocks = static_cast<int>((hidden + units - 1) / units);
  plan.batch_tile = batch_tile(batch, dtype);
  if (rows > kMaxRows || plan.batch_tile * units > kThreads) {
    std::ostringstream why;
    if (explain)
      why << general << "H=" << hidden << " needs " << units << " hidden units (" << rows
        << " weight rows) per block on " << limits.sms
        << " SMs; a persistent block holds at most " << kMaxRows << " rows and "
        << kThreads / plan.batch_tile << " units";
    d.choice.reason = why.str();
    return d;
  }
  const Tiling tiling = make_tiling(static_cast<int>(rows), static_cast<int>(k), plan.batch_tile,
                                    batch, plan.units, c10::elementSize(dtype), math_size(dtype));
  plan.shared_bytes = tiling.bytes;
  if (plan.shared_bytes > static_cast<size_t>(limits.shared_optin)) {
    std::ostringstream why;
    if (explain)
      why << general << "the weights need " << plan.shared_bytes / 1024
        << " KiB of shared memory per block on " << limits.sms << " SMs; a block may have "
        << limits.shared_optin / 1024 << " KiB";
    d.choice.reason = why.str();
    return d;
  }
  const int64_t work = rows * k * batch;
  const int64_t max_work =
      plan.batch_tile == kMmaTile && !backward ? kAutoMaxWorkMma : kAutoMaxWork;
  if (want == KernelPath::kAuto && batch > kAutoLatencyBatch && work > max_work) {
    std::ostringstream why;
    if (explain)
      why << general << rows << " x " << k << " weights x " << batch
        << " sequences of work per block and step (more than " << max_work
        << "), where the per-step GEMMs are faster (the persistent kernel would fit: "
           "FUSED_RNN_KERNEL_PATH=persistent forces it)";
    d.choice.reason = why.str();
    return d;
  }
  d.choice.persistent = true;
  if (!explain) return d;
  std::ostringstream why;
  why << "persistent kernel (" << (backward ? "backward" : "forward")
      << ", one cooperative launch for the whole sequence): " << plan.blocks << " blocks x "
      << kThreads << " threads, " << units << " hidden unit" << (units == 1 ? "" : "s")
      << " per block, W_hh" << (backward ? "^T" : "") << " slice of " << rows << " x " << k
      << " in " << plan.shared_bytes / 1024 << " KiB of shared memory (of "
      << limits.shared_optin / 1024 << " KiB), batch tile " << plan.batch_tile
      << (plan.batch_tile == kMmaTile ? " on tensor cores (wmma, fp32 accumulation)"
                                      : " on FMA units")
      << ", " << tiling.bsplits << " tile" << (tiling.bsplits == 1 ? "" : "s")
      << " side by side (" << (batch + tiling.pass - 1) / tiling.pass << " pass"
      << ((batch + tiling.pass - 1) / tiling.pass == 1 ? "" : "es")
      << " per step), one grid barrier per step";
  d.choice.reason = why.str();
  return d;
}

}  // namespace

bool launch_cooperative(const void* kernel, const Plan& plan, void* params) {
  const int device = c10::cuda::current_device();
  const DeviceLimits limits = device_limits(device);
  {
    // Raise the kernel's dynamic shared memory limit once per device.
    static std::mutex mutex;
    static std::set<std::pair<const void*, int>> raised;
    std::lock_guard<std::mutex> lock(mutex);
    if (raised.count({kernel, device}) == 0) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          limits.shared_optin));
      raised.insert({kernel, device});
    }
  }
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads,
                                                               plan.shared_bytes));
  if (static_cast<int64_t>(per_sm) * limits.sms < plan.blocks) return false;
  void* args[] = {params};
  const cudaError_t err =
      cudaLaunchCooperativeKernel(kernel, dim3(plan.blocks), dim3(kThreads), args,
                                  plan.shared_bytes, c10::cuda::getCurrentCUDAStream());
  if (err == cudaErrorCooperativeLaunchTooLarge) {
    // Not co-resident now (MPS limits, say): nothing ran; the caller runs
    // the general path.
    (void)cudaGetLastError();
    return false;
  }
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

}  // namespace persistent

PathChoice choose_path(PersistentCell cell, int64_t hidden, int64_t batch, at::ScalarType dtype,
                       bool packed, bool proj, bool backward) {
  return persistent::decide(cell, hidden, batch, dtype, packed, proj, backward, true).choice;
}

bool persistent_forward(const PersistentForward& a) {
  using persistent::run_forward;
  const auto d = persistent::decide(a.cell, a.w_hh.size(1), a.batch, a.xw.scalar_type(),
                                    /*packed=*/false, /*proj=*/false, /*backward=*/false,
                                    /*explain=*/false);
  if (!d.choice.persistent) return false;
  switch (a.cell) {
    case PersistentCell::kLstm:
      return run_forward<PersistentCell::kLstm>(a, d.plan);
    case PersistentCell::kGru:
      return run_forward<PersistentCell::kGru>(a, d.plan);
    case PersistentCell::kRnnTanh:
      return run_forward<PersistentCell::kRnnTanh>(a, d.plan);
    case PersistentCell::kRnnRelu:
      return run_forward<PersistentCell::kRnnRelu>(a, d.plan);
  }
  return false;
}

bool persistent_backward(const PersistentBackward& a) {
  using persistent::run_backward;
  const auto d = persistent::decide(a.cell, a.w_hh.size(1), a.batch, a.grad_out.scalar_type(),
                                    /*packed=*/false, /*proj=*/false, /*backward=*/true,
                                    /*explain=*/false);
  if (!d.choice.persistent) return false;
  switch (a.cell) {
    case PersistentCell::kLstm:
      return run_backward<PersistentCell::kLstm>(a, d.plan);
    case PersistentCell::kGru:
      return run_backward<PersistentCell::kGru>(a, d.plan);
    case PersistentCell::kRnnTanh:
      return run_backward<PersistentCell::kRnnTanh>(a, d.plan);
    case PersistentCell::kRnnRelu:
      return run_backward<PersistentCell::kRnnRelu>(a, d.plan);
  }
  return false;
}

}  // namespace cuda
}  // namespace fused_rnn

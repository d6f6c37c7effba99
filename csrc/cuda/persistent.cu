// The choice between the persistent kernels (one cooperative launch, or one
// launch per step: stepwise) and the general per-step path, the plan of a
// launch for the device at hand, and the launches.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <set>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <c10/cuda/CUDAGuard.h>

#include "fused_rnn/graphs.h"
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

// FUSED_RNN_GRID_SYNC, read once (GridSync, persistent_plan.h).
GridSync grid_sync() {
  static const GridSync sync = [] {
    const char* value = std::getenv("FUSED_RNN_GRID_SYNC");
    const std::string mode = value ? value : "";
    if (mode.empty() || mode == "auto") return GridSync::kAuto;
    if (mode == "tags") return GridSync::kTags;
    if (mode == "cluster") return GridSync::kCluster;
    TORCH_CHECK(mode == "barrier",
                "FUSED_RNN_GRID_SYNC must be 'auto', 'cluster', 'tags' or 'barrier', got '", mode,
                "'");
    return GridSync::kBarrier;
  }();
  return sync;
}

// Whether both directions of a bidirectional layer may share a launch:
// FUSED_RNN_BIDIRECTIONAL (graphs.h).
bool pairs_allowed() { return bidirectional_pairs_allowed(); }

// An empty kernel whose attributes tell which of this build's code a device
// loads: every kernel of the extension is compiled for the same
// architectures, so the device picks the same one for all of them.
__global__ void code_arch_probe_kernel() {}

// The PTX version (virtual architecture, major * 10 + minor) of the code
// `device` runs for this build's kernels; 0 where the query fails (a build
// with no code for the device at all: the op's argument check names both).
int loaded_code_arch(int device) {
  c10::cuda::CUDAGuard guard(device);
  cudaFuncAttributes attributes{};
  const cudaError_t err =
      cudaFuncGetAttributes(&attributes, reinterpret_cast<const void*>(code_arch_probe_kernel));
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // not sticky: no image for the device
    return 0;
  }
  return attributes.ptxVersion;
}

// The current limits of `device` (DeviceLimits, persistent_plan.h), read
// once per device.
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
    int clusters = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&clusters, cudaDevAttrClusterLaunch, device));
    // 16: Hopper's largest (non-portable) cluster; whether a kernel's
    // cluster can be scheduled is asked at its launch (launch_cluster)
    limits.cluster = clusters ? 16 : 0;
    limits.code_arch = loaded_code_arch(device);
  }
  return limits;
}

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

// The choice for a shape on the current device (persistent_plan.h), with
// the requested path, FUSED_RNN_GRID_SYNC and torch's TF32 flag as they are
// now; max_cluster: at most that many blocks in a thread-block cluster (the
// fallbacks of a cluster that cannot be scheduled: 8, the portable size,
// then 0, without the cluster exchange), -1 the device's.
Decision decide(PersistentCell cell, int64_t hidden, int64_t batch, at::ScalarType dtype,
                bool packed, bool proj, bool backward, int directions, bool explain,
                int max_cluster = -1) {
  // (torch's TF32 flag bears on float32 alone)
  PlanContext ctx{device_limits(c10::cuda::current_device()), requested_kernel_path(),
                  grid_sync(), dtype == at::kFloat && tf32_allowed()};
  if (max_cluster >= 0) ctx.limits.cluster = std::min(ctx.limits.cluster, max_cluster);
  return decide_for(cell, hidden, batch, dtype, packed, proj, backward, directions, explain,
                    ctx);
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

// Lets `kernel` take clusters of more than 8 blocks (Hopper's non-portable
// sizes), asked once per kernel and device: false where the device refuses
// (the error cleared; the caller then takes the grid of all SMs).
bool allow_large_clusters(const void* kernel, int device) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, bool> allowed;
  std::lock_guard<std::mutex> lock(mutex);
  const auto found = allowed.find({kernel, device});
  if (found != allowed.end()) return found->second;
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
  if (err != cudaSuccess) (void)cudaGetLastError();
  allowed.emplace(std::make_pair(kernel, device), err == cudaSuccess);
  return err == cudaSuccess;
}

// What is known of a (kernel, device, cluster size, shared memory) launch.
using ClusterKey = std::tuple<const void*, int, unsigned, size_t>;
std::mutex& cluster_mutex() {
  static std::mutex mutex;
  return mutex;
}
std::map<ClusterKey, bool>& known_clusters() {
  static std::map<ClusterKey, bool> known;
  return known;
}
ClusterKey cluster_key(const void* kernel, int device, const cudaLaunchConfig_t& config) {
  return std::make_tuple(kernel, device, config.gridDim.x, config.dynamicSmemBytes);
}

// Whether the device can schedule at least one cluster of `config` for
// `kernel` (cudaOccupancyMaxActiveClusters), asked once per kernel, device,
// cluster size and shared memory: false where it cannot (the SMs of one GPC,
// or fewer under MPS or a partitioned GPU), where the query itself fails
// (an error that is cleared: the caller then takes the grid of all SMs), and
// where cluster_refused said a launch of that configuration was refused
// (false from then on).
bool cluster_schedulable(const void* kernel, int device, const cudaLaunchConfig_t& config) {
  std::lock_guard<std::mutex> lock(cluster_mutex());
  const ClusterKey key = cluster_key(kernel, device, config);
  const auto found = known_clusters().find(key);
  if (found != known_clusters().end()) return found->second;
  int clusters = 0;
  const cudaError_t err = cudaOccupancyMaxActiveClusters(&clusters, kernel, &config);
  if (err != cudaSuccess) (void)cudaGetLastError();
  const bool fits = err == cudaSuccess && clusters > 0;
  known_clusters().emplace(key, fits);
  return fits;
}
void cluster_refused(const void* kernel, int device, const cudaLaunchConfig_t& config) {
  std::lock_guard<std::mutex> lock(cluster_mutex());
  known_clusters()[cluster_key(kernel, device, config)] = false;
}

}  // namespace

bool launch_cluster(const void* kernel, const Plan& plan, int directions, void* params) {
  const int device = c10::cuda::current_device();
  const DeviceLimits limits = device_limits(device);
  raise_shared_limit(kernel, device, limits);
  if (plan.cluster > 8 && !allow_large_clusters(kernel, device)) return false;
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim.x = static_cast<unsigned>(plan.cluster);
  attribute.val.clusterDim.y = 1;
  attribute.val.clusterDim.z = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(plan.cluster));  // one cluster, for the query
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = plan.shared_bytes;
  config.stream = c10::cuda::getCurrentCUDAStream();
  config.attrs = &attribute;
  config.numAttrs = 1;
  if (!cluster_schedulable(kernel, device, config)) return false;
  // one cluster per direction; the clusters need not be co-resident (each
  // meets only its own barrier)
  const cudaLaunchConfig_t query = config;
  config.gridDim = dim3(static_cast<unsigned>(directions * plan.cluster));
  void* args[] = {params};
  const cudaError_t err = cudaLaunchKernelExC(&config, kernel, args);
  if (err == cudaErrorInvalidClusterSize) {
    // A cluster the launch refuses although the occupancy query allowed it:
    // nothing ran; the caller takes the grid of all SMs, from now on.
    (void)cudaGetLastError();
    cluster_refused(kernel, device, query);
    return false;
  }
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

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
                       bool packed, bool proj, bool backward, bool bidirectional,
                       bool explain) {
  if (!bidirectional) {
    return persistent::decide(cell, hidden, batch, dtype, packed, proj, backward, 1, explain)
        .choice;
  }
  PathChoice single =
      persistent::decide(cell, hidden, batch, dtype, packed, proj, backward, 1, explain).choice;
  if (!persistent::pairs_allowed()) {
    single.reason += "; each direction on its own, one after the other "
                     "(FUSED_RNN_BIDIRECTIONAL=separate)";
    return single;
  }
  PathChoice pair =
      persistent::decide(cell, hidden, batch, dtype, packed, proj, backward, 2, explain).choice;
  pair.directions = 2;
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

// Runs run(plan) with the plan for a shape (false, nothing launched, where
// it takes the general path), else its fallbacks: a cluster that the device
// cannot schedule, the plan without the cluster exchange; a grid that cannot
// be co-resident now, the same plan one step per launch (its units per
// block need no co-residency).
template <typename Run>
bool run_decided(PersistentCell cell, int64_t hidden, int64_t batch, at::ScalarType dtype,
                 bool packed, bool backward, int directions, Run run) {
  auto decide = [&](int max_cluster) {
    return persistent::decide(cell, hidden, batch, dtype, packed, /*proj=*/false, backward,
                              directions, /*explain=*/false, max_cluster);
  };
  auto d = decide(-1);
  if (d.choice.path == KernelPath::kGeneral) return false;
  if (run(d.plan)) return true;
  // A cluster the device cannot schedule now (fewer SMs in a GPC than the
  // cluster, MPS, a partitioned GPU): clusters of 8, then none.
  for (const int max_cluster : {8, 0}) {
    if (!d.plan.cluster) break;
    if (d.plan.cluster <= max_cluster) continue;
    d = decide(max_cluster);
    if (d.choice.path == KernelPath::kGeneral) return false;
    if (run(d.plan)) return true;
  }
  if (d.plan.stepwise) return false;  // (stepwise launches always run)
  Plan plan = d.plan;
  plan.stepwise = true;
  return run(plan);
}

}  // namespace

bool persistent_forward(const PersistentForward& a) {
  return run_decided(a.cell, a.w_hh.size(1), a.batch, a.xw.scalar_type(),
                     !a.batch_sizes.empty(), /*backward=*/false, 1,
                     [&](const Plan& plan) { return run_forward_cell(a, nullptr, plan); });
}

bool persistent_backward(const PersistentBackward& a) {
  return run_decided(a.cell, a.w_hh.size(1), a.batch, a.grad_out.scalar_type(),
                     !a.batch_sizes.empty(), /*backward=*/true, 1,
                     [&](const Plan& plan) { return run_backward_cell(a, nullptr, plan); });
}

bool persistent_forward_pair(const PersistentForward& a, const PersistentForward& b) {
  if (!persistent::pairs_allowed()) return false;
  return run_decided(a.cell, a.w_hh.size(1), a.batch, a.xw.scalar_type(),
                     !a.batch_sizes.empty(), /*backward=*/false, 2,
                     [&](const Plan& plan) { return run_forward_cell(a, &b, plan); });
}

bool persistent_backward_pair(const PersistentBackward& a, const PersistentBackward& b) {
  if (!persistent::pairs_allowed()) return false;
  return run_decided(a.cell, a.w_hh.size(1), a.batch, a.grad_out.scalar_type(),
                     !a.batch_sizes.empty(), /*backward=*/true, 2,
                     [&](const Plan& plan) { return run_backward_cell(a, &b, plan); });
}

}  // namespace cuda
}  // namespace fused_rnn

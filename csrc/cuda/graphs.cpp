// The CUDA half of run_loop (graphs.h): capturing a per-step loop into a
// CUDA graph, what the loop allocates inside going to a memory pool of the
// caching allocator that lives with the graph (as torch.cuda.graph does),
// and replaying it on the current stream.
//
// Not through ATen's CUDAGraph, whose capture marks torch's default CUDA
// generator as capturing for the whole process (another thread's dropout
// during one of our captures would then fail: "Offset increment outside
// graph capture") and whose destruction, in newer releases, frees the cuBLAS
// workspace of the stream it was captured on, which our other graphs
// captured there use. Our loops draw no random numbers.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <memory>
#include <mutex>
#include <unordered_map>

#include "fused_rnn/graphs.h"

namespace fused_rnn {
namespace cuda {
namespace {

// A captured loop: the graph, its executable, and the pool of the caching
// allocator that holds what the loop allocated during the capture (released
// with the graph: its memory returns to CUDA once its blocks are free, at
// the allocator's next release of cached memory, which synchronizes first).
class GraphLoop final : public CapturedLoop {
 public:
  GraphLoop(c10::DeviceIndex device, at::cuda::MempoolId_t pool) : device_(device), pool_(pool) {}
  ~GraphLoop() override {
    if (exec_) C10_CUDA_CHECK_WARN(cudaGraphExecDestroy(exec_));
    if (graph_) C10_CUDA_CHECK_WARN(cudaGraphDestroy(graph_));
    if (pool_made) {
      try {
        c10::cuda::CUDACachingAllocator::releasePool(device_, pool_);
      } catch (const std::exception& e) {
        TORCH_WARN("fused_rnn: releasing a CUDA graph's memory pool failed: ", e.what());
      }
    }
  }
  void replay() override {
    C10_CUDA_CHECK(cudaGraphLaunch(exec_, c10::cuda::getCurrentCUDAStream().stream()));
  }
  cudaGraph_t graph_ = nullptr;
  cudaGraphExec_t exec_ = nullptr;
  bool pool_made = false;  // by RouteToPool (else there is none to release)

 private:
  const c10::DeviceIndex device_;
  const at::cuda::MempoolId_t pool_;
};

// While it lives, the caching allocator gives allocations made on a stream
// that the capture `id` records from `pool` (created here, with one use:
// GraphLoop's).
class RouteToPool {
 public:
  RouteToPool(c10::DeviceIndex device, at::cuda::MempoolId_t pool,
              std::shared_ptr<const unsigned long long> id)
      : device_(device), pool_(pool) {
    c10::cuda::CUDACachingAllocator::beginAllocateToPool(
        device, pool, [id = std::move(id)](cudaStream_t stream) {
          cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
          unsigned long long stream_id = 0;
          C10_CUDA_CHECK(cudaStreamGetCaptureInfo(stream, &status, &stream_id));
          return status == cudaStreamCaptureStatusActive && stream_id == *id;
        });
  }
  ~RouteToPool() {
    try {
      c10::cuda::CUDACachingAllocator::endAllocateToPool(device_, pool_);
    } catch (const std::exception& e) {
      TORCH_WARN("fused_rnn: ending a CUDA graph capture's memory pool failed: ", e.what());
    }
  }
  RouteToPool(const RouteToPool&) = delete;
  RouteToPool& operator=(const RouteToPool&) = delete;

 private:
  const c10::DeviceIndex device_;
  const at::cuda::MempoolId_t pool_;
};

// Streams of our own beside each user stream, one per purpose, created once
// and never destroyed (a handful per process: one per stream that runs the
// ops):
// - kCapture: where a loop replayed on `user` is captured (a capture may not
//   run on the default stream, and the cuBLAS workspace ATen keeps per
//   stream, baked into the graph, is then used by replays on `user` alone,
//   one after another);
// - kSide: where run_side_by_side runs its first loop.
enum class OwnStream { kCapture = 0, kSide = 1 };
c10::cuda::CUDAStream own_stream(const c10::cuda::CUDAStream& user, OwnStream purpose) {
  static std::mutex mutex;
  static std::unordered_map<int64_t, cudaStream_t> streams;
  const std::lock_guard<std::mutex> lock(mutex);
  // StreamId is unique per device only: the key is (id, device, purpose)
  const int64_t key = (user.id() * 64 + user.device_index()) * 2 + static_cast<int>(purpose);
  auto found = streams.find(key);
  if (found == streams.end()) {
    const c10::cuda::CUDAGuard guard(user.device_index());
    cudaStream_t stream = nullptr;
    C10_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    found = streams.emplace(key, stream).first;
  }
  return c10::cuda::getStreamFromExternal(found->second, user.device_index());
}

// `to` waits for the work enqueued on `from` so far.
void wait_for(const c10::cuda::CUDAStream& to, const c10::cuda::CUDAStream& from) {
  cudaEvent_t event = nullptr;
  C10_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
  C10_CUDA_CHECK(cudaEventRecord(event, from.stream()));
  C10_CUDA_CHECK(cudaStreamWaitEvent(to.stream(), event, 0));
  // released once it has completed
  C10_CUDA_CHECK(cudaEventDestroy(event));
}

}  // namespace

void run_side_by_side(c10::function_ref<void()> first, c10::function_ref<void()> second) {
  const c10::cuda::CUDAStream user = c10::cuda::getCurrentCUDAStream();
  const c10::cuda::CUDAStream side = own_stream(user, OwnStream::kSide);
  wait_for(side, user);
  // the current stream waits for the side stream however the loops end, so
  // that nothing the caller frees afterwards is still in use there
  struct Join {
    const c10::cuda::CUDAStream& user;
    const c10::cuda::CUDAStream& side;
    ~Join() {
      cudaEvent_t event = nullptr;
      if (cudaEventCreateWithFlags(&event, cudaEventDisableTiming) == cudaSuccess) {
        C10_CUDA_CHECK_WARN(cudaEventRecord(event, side.stream()));
        C10_CUDA_CHECK_WARN(cudaStreamWaitEvent(user.stream(), event, 0));
        C10_CUDA_CHECK_WARN(cudaEventDestroy(event));
      }
    }
  } join{user, side};
  {
    const c10::cuda::CUDAStreamGuard on_side(side);
    first();
  }
  second();
}

bool current_stream_capturing() {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(), &status));
  return status != cudaStreamCaptureStatusNone;
}

std::vector<int64_t> stream_and_blas_settings() {
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream();
  auto& context = at::globalContext();
  return {stream.id(),
          stream.device_index(),
          context.allowTF32CuBLAS(),
          context.allowTF32CuDNN(),
          static_cast<int64_t>(context.allowFP16ReductionCuBLAS()),
          static_cast<int64_t>(context.allowBF16ReductionCuBLAS()),
          context.allowFP16AccumulationCuBLAS(),
          static_cast<int64_t>(context.blasPreferredBackend())};
}

int64_t device_memory_bytes(c10::DeviceIndex device) {
  constexpr int kKnown = 64;
  static std::atomic<int64_t> known[kKnown] = {};
  const bool cached = device >= 0 && device < kKnown;
  if (cached) {
    const int64_t bytes = known[device].load(std::memory_order_relaxed);
    if (bytes > 0) return bytes;
  }
  cudaDeviceProp props;
  C10_CUDA_CHECK(cudaGetDeviceProperties(&props, device));
  const auto bytes = static_cast<int64_t>(props.totalGlobalMem);
  if (cached) known[device].store(bytes, std::memory_order_relaxed);
  return bytes;
}

// One capture at a time on a capture stream: a second cudaStreamBeginCapture
// on a stream that is capturing fails. Threads that replay on one user
// stream share its capture stream.
std::mutex& capture_mutex(cudaStream_t stream) {
  static std::mutex mutex;
  static std::unordered_map<cudaStream_t, std::unique_ptr<std::mutex>> mutexes;
  const std::lock_guard<std::mutex> lock(mutex);
  std::unique_ptr<std::mutex>& m = mutexes[stream];
  if (!m) m = std::make_unique<std::mutex>();
  return *m;
}

// The caching allocator's reserved bytes on `device` now.
int64_t reserved_bytes(c10::DeviceIndex device) {
  using c10::CachingAllocator::StatType;
  return c10::cuda::CUDACachingAllocator::getDeviceStats(device)
      .reserved_bytes[static_cast<size_t>(StatType::AGGREGATE)]
      .current;
}

std::unique_ptr<CapturedLoop> capture_loop(StepLoop loop, const std::vector<at::Tensor>& statics) {
  const c10::cuda::CUDAStream user = c10::cuda::getCurrentCUDAStream();
  const c10::cuda::CUDAStream side = own_stream(user, OwnStream::kCapture);
  // Another thread is capturing there: no graph for this call (it does not
  // wait, so no lock is held while a loop may call back into Python).
  std::unique_lock<std::mutex> one_capture(capture_mutex(side.stream()), std::try_to_lock);
  if (!one_capture.owns_lock()) return nullptr;
  // After the replays enqueued so far on the user stream: the warm-up below
  // may take the capture stream's cuBLAS workspace, which they use.
  wait_for(side, user);
  const c10::cuda::CUDAStreamGuard on_side(side);
  // This thread's cuBLAS handle (and the capture stream's workspace) exist
  // before the capture: creating them inside it (a thread's first product,
  // under `always`) allocates device memory, which a capture forbids. So one
  // 1 x 1 product on the capture stream first, as torch.cuda.graph's warm-up
  // on its capture stream does (ATen's CUDAContext.h, which would give the
  // handle directly, needs cuSPARSE's headers, which a CUDA install may lack).
  {
    const at::Tensor one = at::empty(
        {1, 1}, at::TensorOptions().dtype(at::kFloat).device(at::kCUDA, side.device_index()));
    at::mm(one, one);
  }
  const c10::DeviceIndex device = side.device_index();
  const int64_t reserved_before = reserved_bytes(device);
  const at::cuda::MempoolId_t pool = at::cuda::graph_pool_handle();
  auto captured = std::make_unique<GraphLoop>(device, pool);
  {
    auto id = std::make_shared<unsigned long long>(0);
    const RouteToPool route(device, pool, id);
    captured->pool_made = true;
    // Thread-local: other threads' CUDA calls stay legal while this one
    // records (nothing runs during a capture).
    C10_CUDA_CHECK(cudaStreamBeginCapture(side.stream(), cudaStreamCaptureModeThreadLocal));
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    // Ends the capture: the graph, or null where it failed (its error is
    // cleared; a caller that can go on sees it in the status).
    auto end = [&]() -> cudaError_t {
      cudaGraph_t graph = nullptr;
      const cudaError_t err = cudaStreamEndCapture(side.stream(), &graph);
      if (err != cudaSuccess) {
        (void)cudaGetLastError();
        if (graph) C10_CUDA_CHECK_WARN(cudaGraphDestroy(graph));
        return err;
      }
      captured->graph_ = graph;
      return cudaSuccess;
    };
    try {
      C10_CUDA_CHECK(cudaStreamGetCaptureInfo(side.stream(), &status, id.get()));
      loop(statics);
    } catch (...) {
      end();  // so that the stream (and this thread) can go on
      throw;
    }
    C10_CUDA_CHECK(end());
  }
  // as torch.cuda.graph's (it frees what a graph allocated with
  // cudaMallocAsync, torch's other allocator backend, at each launch)
  C10_CUDA_CHECK(cudaGraphInstantiateWithFlags(&captured->exec_, captured->graph_,
                                               cudaGraphInstantiateFlagAutoFreeOnLaunch));
  // (an estimate: another thread's allocations meanwhile count too)
  captured->pool_bytes = std::max<int64_t>(0, reserved_bytes(device) - reserved_before);
  return captured;
}

}  // namespace cuda
}  // namespace fused_rnn

// run_loop (graphs.h): the choice, the key, the static tensors and the copies
// around a replay, on every device; the capture itself is csrc/cuda/graphs.cpp.
#include "fused_rnn/graphs.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <limits>
#include <mutex>

#include "fused_rnn/setting.h"
#include "sequence.h"

namespace fused_rnn {

GraphMode parse_graph_mode(const std::string& name) {
  if (name == "auto") return GraphMode::kAuto;
  if (name == "off") return GraphMode::kOff;
  if (name == "always") return GraphMode::kAlways;
  if (name == "emulate") return GraphMode::kEmulate;
  if (name == "emulate_auto") return GraphMode::kEmulateAuto;
  TORCH_CHECK_VALUE(false, "fused_rnn: unknown CUDA graph mode '", name,
                    "'; expected one of auto, off, always, emulate, emulate_auto");
}

const char* graph_mode_name(GraphMode mode) {
  switch (mode) {
    case GraphMode::kOff:
      return "off";
    case GraphMode::kAlways:
      return "always";
    case GraphMode::kEmulate:
      return "emulate";
    case GraphMode::kEmulateAuto:
      return "emulate_auto";
    default:
      return "auto";
  }
}

namespace {

EnvChoice<GraphMode>& mode_state() {
  static EnvChoice<GraphMode> state("FUSED_RNN_CUDA_GRAPHS", GraphMode::kAuto,
                                    &parse_graph_mode);
  return state;
}

struct Graph {
  std::vector<at::Tensor> statics;  // empty for a direct entry
#if defined(FUSED_RNN_WITH_CUDA)
  std::unique_ptr<cuda::CapturedLoop> graph;  // null where emulated
#endif
  // Held while a call enqueues its copies in, the replay and its copies out,
  // which must not interleave with another thread's on the same stream.
  std::mutex use;
};
// Shared, so that a call replays its entry outside the cache's lock while
// another thread may evict it from the cache.
using Entry = std::shared_ptr<Graph>;

// The lock is held to look up, count and insert, never while a loop runs
// (a loop's ATen calls may reach Python, a dispatch mode, say, which may
// call an op of ours).
std::mutex& cache_mutex() {
  static std::mutex m;
  return m;
}
// Never destroyed: its graphs and tensors would go back to CUDA and torch's
// allocator during the process's exit, in no defined order with them.
GraphCache<Entry>& cache() {
  static auto* c = new GraphCache<Entry>();
  return *c;
}

// Whether two of the tensors share memory where one of them is written: the
// static copies would not (an output written through one would not show in
// the other), so such a loop runs without a graph. None of the drivers'
// loops has such a pair; this keeps a future one correct.
bool written_alias(const std::vector<LoopTensor>& tensors) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& a = tensors[i].tensor;
    if (!a.defined() || a.numel() == 0) continue;
    for (size_t j = i + 1; j < tensors.size(); ++j) {
      const at::Tensor& b = tensors[j].tensor;
      if (!b.defined() || b.numel() == 0) continue;
      const bool written = tensors[i].role != LoopRole::kIn || tensors[j].role != LoopRole::kIn;
      if (written && a.storage().is_alias_of(b.storage())) return true;
    }
  }
  return false;
}

GraphKey make_key(const LoopShape& shape, const std::vector<LoopTensor>& tensors,
                  const at::Tensor& first) {
  GraphKey key;
  auto& v = key.values;
  v.push_back(0);  // a static entry's key (direct_key: 1)
  v.push_back(static_cast<int64_t>(std::hash<std::string>()(shape.name)));
  v.push_back(shape.steps);
  v.push_back(static_cast<int64_t>(shape.params.size()));
  v.insert(v.end(), shape.params.begin(), shape.params.end());
  v.push_back(static_cast<int64_t>(first.device().type()));
  v.push_back(first.device().index());
  for (const LoopTensor& t : tensors) {
    v.push_back(t.tensor.defined() ? static_cast<int64_t>(t.role) : -1);
    if (!t.tensor.defined()) continue;
    v.push_back(static_cast<int64_t>(t.tensor.scalar_type()));
    v.push_back(t.tensor.dim());
    for (const int64_t s : t.tensor.sizes()) v.push_back(s);
  }
#if defined(FUSED_RNN_WITH_CUDA)
  if (first.is_cuda()) {
    const std::vector<int64_t> settings = cuda::stream_and_blas_settings();
    v.insert(v.end(), settings.begin(), settings.end());
  }
#endif
  return key;
}

// The shape's key and where its tensors are: a direct entry's key.
GraphKey direct_key(const GraphKey& shape_key, const std::vector<LoopTensor>& tensors) {
  GraphKey key = shape_key;
  auto& v = key.values;
  v[0] = 1;
  for (const LoopTensor& t : tensors) {
    if (!t.tensor.defined()) continue;
    v.push_back(reinterpret_cast<int64_t>(t.tensor.data_ptr()));
    for (const int64_t s : t.tensor.strides()) v.push_back(s);
  }
  return key;
}

// The emulation (CPU) sets a call's own tensors, weights included, to NaN
// while it runs the loop on an entry's tensors: other threads read those
// tensors only under this lock (their copies in, and their loops where no
// copies come between), taken only in the emulation. Not across a call's
// copies in, replay and copies out: the entry's own lock keeps those
// together (what a GPU needs), and the tests check it.
class EmulationLock {
 public:
  // emulated: whether the call runs on the CPU (in the emulation)
  explicit EmulationLock(bool emulated) {
    if (emulated) lock_ = std::unique_lock<std::mutex>(mutex());
  }

 private:
  static std::mutex& mutex() {
    static std::mutex m;
    return m;
  }
  std::unique_lock<std::mutex> lock_;
};

void copy_in(const std::vector<LoopTensor>& tensors, const std::vector<at::Tensor>& statics,
             bool emulated) {
  const EmulationLock emulation(emulated);
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (tensors[i].tensor.defined() && tensors[i].role != LoopRole::kOut) {
      statics[i].copy_(tensors[i].tensor);
    }
  }
}

void copy_out(const std::vector<LoopTensor>& tensors, const std::vector<at::Tensor>& statics) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (tensors[i].tensor.defined() && tensors[i].role != LoopRole::kIn) {
      at::Tensor target = tensors[i].tensor;
      target.copy_(statics[i]);
    }
  }
}

// A direct entry's replay: the graph (emulated: the loop) on the call's own
// tensors.
void replay(Graph& entry, StepLoop loop, const std::vector<at::Tensor>& plain) {
#if defined(FUSED_RNN_WITH_CUDA)
  if (entry.graph) {
    entry.graph->replay();
    return;
  }
#endif
  loop(plain);
}

// A static entry's replay, its tensors filled by copy_in. Emulated: the loop
// itself on the static tensors, with the call's own tensors NaN meanwhile:
// a loop that reached for one of them instead of its argument (which a
// graph would replay on the capturing call's memory) then computes NaN, or
// writes where copy_out overwrites it. (The ops run below ADInplaceOrView:
// no version counter moves.)
void replay_on_statics(Graph& entry, StepLoop loop, const std::vector<LoopTensor>& tensors) {
#if defined(FUSED_RNN_WITH_CUDA)
  if (entry.graph) {
    entry.graph->replay();
    return;
  }
#endif
  const EmulationLock emulation(true);
  std::vector<at::Tensor> saved(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    at::Tensor t = tensors[i].tensor;
    // (an inference tensor outside inference mode takes no in-place write)
    if (!t.defined() || (t.is_inference() && !c10::InferenceMode::is_enabled())) continue;
    saved[i] = t.clone();
    t.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  loop(entry.statics);
  for (size_t i = 0; i < tensors.size(); ++i) {
    at::Tensor t = tensors[i].tensor;
    if (saved[i].defined()) t.copy_(saved[i]);
  }
}

std::atomic<int64_t> entry_bytes_override{0}, total_bytes_override{0};

}  // namespace

GraphLimits graph_limits(const at::Device& device) {
  int64_t entry = int64_t{64} << 20, total = int64_t{256} << 20;
#if defined(FUSED_RNN_WITH_CUDA)
  if (device.is_cuda()) {
    const int64_t memory = cuda::device_memory_bytes(device.index());
    entry = std::max(entry, memory / 256);
    total = std::max(total, memory / 64);
  }
#else
  (void)device;
#endif
  const int64_t entry_set = entry_bytes_override.load(), total_set = total_bytes_override.load();
  return {entry_set > 0 ? entry_set : entry, total_set > 0 ? total_set : total};
}

void set_graph_limits(int64_t entry_bytes, int64_t total_bytes) {
  TORCH_CHECK_VALUE(entry_bytes >= 0 && total_bytes >= 0,
                    "fused_rnn: CUDA graph cache limits must be >= 0 (0: the default), got ",
                    entry_bytes, " and ", total_bytes);
  entry_bytes_override.store(entry_bytes);
  total_bytes_override.store(total_bytes);
}

bool bidirectional_pairs_allowed() {
  static const bool allowed = [] {
    const char* value = std::getenv("FUSED_RNN_BIDIRECTIONAL");
    const std::string mode = value ? value : "";
    TORCH_CHECK(mode.empty() || mode == "auto" || mode == "separate",
                "FUSED_RNN_BIDIRECTIONAL must be 'auto' or 'separate', got '", mode, "'");
    return mode != "separate";
  }();
  return allowed;
}

void run_side_by_side(const at::Tensor& like, c10::function_ref<void()> first,
                      c10::function_ref<void()> second) {
#if defined(FUSED_RNN_WITH_CUDA)
  if (like.defined() && like.is_cuda() && bidirectional_pairs_allowed() &&
      !cuda::current_stream_capturing()) {
    cuda::run_side_by_side(first, second);
    return;
  }
#else
  (void)like;
#endif
  first();
  second();
}

GraphMode requested_graph_mode() { return mode_state().get(); }



void set_requested_graph_mode(GraphMode mode) { mode_state().set(mode); }

void run_loop(const LoopShape& shape, const std::vector<LoopTensor>& tensors, StepLoop loop) {
  std::vector<at::Tensor> plain;
  plain.reserve(tensors.size());
  const at::Tensor* first = nullptr;
  for (const LoopTensor& t : tensors) {
    plain.push_back(t.tensor);
    if (first == nullptr && t.tensor.defined()) first = &t.tensor;
  }
  const GraphMode mode = requested_graph_mode();
  bool graphed = false;
  if (first != nullptr && mode != GraphMode::kOff) {
    if (first->is_cuda()) {
      graphed = mode != GraphMode::kAuto ||
                (shape.steps >= kGraphMinSteps && shape.macs_per_step <= kGraphMaxMacsPerStep);
#if defined(FUSED_RNN_WITH_CUDA)
      // the caller's own capture records the loop's launches as they come
      graphed = graphed && !cuda::current_stream_capturing();
#endif
    } else {
      graphed = (mode == GraphMode::kEmulate || mode == GraphMode::kEmulateAuto) &&
                first->is_cpu();
    }
  }
  if (!graphed || written_alias(tensors)) {
    // (in the emulation, another thread's loop may have a tensor of this one
    // set to NaN meanwhile)
    const EmulationLock emulation(graphed && first->is_cpu());
    loop(plain);
    return;
  }

  const GraphKey key = make_key(shape, tensors, *first);
  const bool automatic = mode == GraphMode::kAuto || mode == GraphMode::kEmulateAuto;
  const GraphPolicy policy = automatic ? GraphPolicy{2, 3} : GraphPolicy{0, 1};
  const GraphKey direct = automatic ? direct_key(key, tensors) : GraphKey();
  int64_t bytes = 0;
  for (const LoopTensor& t : tensors) {
    if (t.tensor.defined()) bytes += t.tensor.numel() * t.tensor.element_size();
  }
  const GraphLimits limits = graph_limits(first->device());
  using Action = GraphCache<Entry>::Action;
  Action action;
  Entry found;
  {
    const std::lock_guard<std::mutex> lock(cache_mutex());
    action = cache().decide(key, direct, bytes, policy, limits);
    if (action == Action::kReplayDirect || action == Action::kReplayStatic) {
      found = cache().most_recent();
    }
  }
  switch (action) {
    case Action::kUncached: {
      const EmulationLock emulation(first->is_cpu());
      loop(plain);
      return;
    }
    case Action::kReplayDirect: {
      const PhaseRange phase("fused_rnn::cuda_graph_replay");
      const std::lock_guard<std::mutex> in_use(found->use);
      const EmulationLock emulation(first->is_cpu());
      replay(*found, loop, plain);
      return;
    }
    case Action::kReplayStatic: {
      const PhaseRange phase("fused_rnn::cuda_graph_replay");
      const std::lock_guard<std::mutex> in_use(found->use);
      copy_in(tensors, found->statics, first->is_cpu());
      replay_on_statics(*found, loop, tensors);
      copy_out(tensors, found->statics);
      return;
    }
    default:
      break;
  }

  const PhaseRange phase("fused_rnn::cuda_graph_capture");
  const bool is_direct = action == Action::kCaptureDirect;
  const GraphKey& entry_key = is_direct ? direct : key;
  auto entry = std::make_shared<Graph>();
  // The capture decide() answered does not happen: this call runs its loop
  // without a graph. kNoRoom: an allocation failed; the cache gives its
  // memory back, and the key may be captured later, when there is room.
  // kBusy: another thread captures for this stream. kFailed: never worse
  // than no graph, this key runs without one from now on (a real fault
  // shows again in the plain run).
  enum class NoGraph { kNoRoom, kBusy, kFailed };
  auto without_graph = [&](NoGraph why) {
    entry.reset();
    {
      const std::lock_guard<std::mutex> lock(cache_mutex());
      if (why == NoGraph::kNoRoom) cache().evict_all();
      if (why == NoGraph::kFailed) {
        cache().give_up(entry_key);
      } else {
        cache().capture_skipped(entry_key);
      }
    }
    const EmulationLock emulation(first->is_cpu());
    loop(plain);
  };
  if (!is_direct) {
    entry->statics.reserve(tensors.size());
    try {
      // ordinary tensors, also when this call runs under inference mode: a
      // later call outside it copies into them
      const c10::InferenceMode not_inference(false);
      for (const LoopTensor& t : tensors) {
        entry->statics.push_back(
            t.tensor.defined()
                ? at::empty(t.tensor.sizes(),
                            t.tensor.options().memory_format(at::MemoryFormat::Contiguous))
                : at::Tensor());
      }
    } catch (const c10::OutOfMemoryError&) {
      without_graph(NoGraph::kNoRoom);
      return;
    }
  }
#if defined(FUSED_RNN_WITH_CUDA)
  if (first->is_cuda()) {
    try {
      entry->graph = cuda::capture_loop(loop, is_direct ? plain : entry->statics);
    } catch (const c10::OutOfMemoryError&) {  // what the loop allocates inside
      without_graph(NoGraph::kNoRoom);
      return;
    } catch (const c10::Error& e) {
      TORCH_WARN_ONCE("fused_rnn: capturing the ", shape.name,
                      " loop into a CUDA graph failed, so it runs without one (",
                      e.what_without_backtrace(), ")");
      without_graph(NoGraph::kFailed);
      return;
    }
    if (!entry->graph) {
      without_graph(NoGraph::kBusy);
      return;
    }
  }
#endif
  int64_t kept = is_direct ? 0 : bytes;  // the static tensors, and the graph's pool
#if defined(FUSED_RNN_WITH_CUDA)
  if (entry->graph) kept += entry->graph->pool_bytes;
#endif
  const std::lock_guard<std::mutex> in_use(entry->use);
  {
    const std::lock_guard<std::mutex> lock(cache_mutex());
    cache().insert(entry_key, kept, entry, limits);
  }
  if (is_direct) {
    const EmulationLock emulation(first->is_cpu());
    replay(*entry, loop, plain);
    return;
  }
  copy_in(tensors, entry->statics, first->is_cpu());
  replay_on_statics(*entry, loop, tensors);
  copy_out(tensors, entry->statics);
}

GraphCacheInfo graph_cache_info() {
  const std::lock_guard<std::mutex> lock(cache_mutex());
  return cache().info();
}

void clear_graph_cache() {
  const std::lock_guard<std::mutex> lock(cache_mutex());
  cache().clear();
}

namespace {

void set_cuda_graphs_op(c10::string_view mode) {
  set_requested_graph_mode(parse_graph_mode(std::string(mode)));
}

std::string get_cuda_graphs_op() { return graph_mode_name(requested_graph_mode()); }

std::vector<int64_t> cuda_graph_limits_op(const at::Tensor& like) {
  const GraphLimits limits = graph_limits(like.device());
  return {limits.entry_bytes, limits.total_bytes};
}

std::vector<int64_t> cuda_graph_cache_info_op() {
  const GraphCacheInfo info = graph_cache_info();
  return {info.captures, info.replays, info.uncached, info.evictions, info.entries, info.bytes};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fused_rnn, m) {
  m.def("set_cuda_graphs(str mode) -> ()", &set_cuda_graphs_op);
  m.def("get_cuda_graphs() -> str", &get_cuda_graphs_op);
  m.def("cuda_graph_cache_info() -> int[]", &cuda_graph_cache_info_op);
  m.def("clear_cuda_graphs() -> ()", &clear_graph_cache);
  m.def("set_cuda_graph_limits(int entry_bytes, int total_bytes) -> ()", &set_graph_limits);
  m.def("cuda_graph_limits(Tensor like) -> int[]");
}

TORCH_LIBRARY_IMPL(fused_rnn, CPU, m) { m.impl("cuda_graph_limits", &cuda_graph_limits_op); }
#if defined(FUSED_RNN_WITH_CUDA)
TORCH_LIBRARY_IMPL(fused_rnn, CUDA, m) { m.impl("cuda_graph_limits", &cuda_graph_limits_op); }
#endif

}  // namespace fused_rnn

// A per-step loop replayed as a CUDA graph: the general path's, and the
// stepwise launches' (persistent_launch.cuh, run_plan).
//
// On CUDA the general path issues per step a cuBLAS GEMM and a pointwise
// kernel (backward: the pointwise kernel, a GEMM, for GRU an add), each
// through ATen on the host; the stepwise launches one kernel per step. At
// small and medium batches the host is the bottleneck: on the H200 of
// bench/results a general forward step took ~17-30 us of which the GPU was
// busy a fraction, cuDNN ~12-20 us. Replayed from a CUDA graph, the whole
// loop is one host call and the GPU runs the kernels back to back.
//
// A graph holds the addresses it was captured with. Two kinds of entries:
// - direct: captured on the call's own tensors, replayed when a later call
//   of the same shape has its tensors at the same addresses, shapes and
//   strides (it then computes exactly what the loop would on them). A
//   training or inference loop that repeats its shapes mostly gets its
//   tensors at the same few addresses from torch's caching allocator, so
//   this costs no memory and no copies.
// - static: captured once per shape on tensors of the entry's own; each
//   call copies its inputs into them, replays, and copies the outputs out
//   (device copies of a few large tensors instead of two launches per
//   step), for calls whose addresses do not repeat. Memory: about the
//   loop's tensors once more, within GraphLimits.
// The loop is given every tensor it touches through its argument (a loop
// that reached for a tensor of the call by other means would replay on the
// capturing call's memory); what it allocates inside (a scratch row) lives
// in the graph's private memory pool.
//
// When (FUSED_RNN_CUDA_GRAPHS, or set_cuda_graphs; process-wide):
//   auto    the default, on loops of at least kGraphMinSteps steps whose
//           per-step products are small enough for the host to be the
//           bottleneck (kGraphMaxMacsPerStep): a direct entry the second
//           time the same addresses come (a call seen once may never come
//           back), a static entry the third time a shape comes without
//           (its addresses keep changing);
//   always  a static entry for every loop at its first call, whatever its
//           steps and products (within GraphLimits; tests);
//   off     never;
//   emulate on the CPU too, as always, with the loop run on the static
//           tensors in place of a replay and the call's own tensors NaN
//           meanwhile: the copies, the roles and the cache, without a GPU
//           (tests);
//   emulate_auto  on the CPU too, auto's choices without its size rules,
//           the loop run in place of each replay (tests of the choices).
// Never while the current stream is being captured (the user's own graph, or
// torch.compile's reduce-overhead mode, then records the loop's launches).
//
// The cache: at most kGraphMaxEntries entries and GraphLimits::total_bytes
// of static tensors and graphs' memory (what the loops allocate inside) in
// all, no static entry's tensors larger than GraphLimits::entry_bytes (the
// rest runs without a graph); the least recently used entry goes first. A
// key captured kGraphMaxCaptures times (captured, evicted, seen again) runs
// without a graph from then on: a working set larger than the cache would
// otherwise pay a capture on every call. A static entry the allocator
// cannot make room for empties the cache, and the call runs without a
// graph. clear_cuda_graphs() empties it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/FunctionRef.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace fused_rnn {

enum class GraphMode { kAuto = 0, kOff = 1, kAlways = 2, kEmulate = 3, kEmulateAuto = 4 };
GraphMode requested_graph_mode();
void set_requested_graph_mode(GraphMode mode);
GraphMode parse_graph_mode(const std::string& name);
const char* graph_mode_name(GraphMode mode);

constexpr int64_t kGraphMinSteps = 8;
// Rows x columns x summed dimension of one step's recurrent product: up to
// 2^28 (B=256, H=512 LSTM; B=64, H=1024) a step's kernels take the GPU ~10 us
// or less, under the host's ~20 us for launching them.
constexpr int64_t kGraphMaxMacsPerStep = int64_t{1} << 28;
constexpr int64_t kGraphMaxEntries = 64;
constexpr int kGraphMaxCaptures = 2;

// Bytes of static tensors an entry may hold, and the cache in all: by
// default 1/256 and 1/64 of the device's memory (on an 80 GB H100 312 MiB
// and 1.25 GiB: an LSTM training step at B=64, H=512, T=256), at least
// 64 and 256 MiB (the CPU emulation: those); set_graph_limits overrides
// either (0: the default).
struct GraphLimits {
  int64_t entry_bytes;
  int64_t total_bytes;
};
GraphLimits graph_limits(const at::Device& device);
void set_graph_limits(int64_t entry_bytes, int64_t total_bytes);

// What the loop does with each of its tensors: reads it (copied in before a
// replay; the loop may also use it as scratch, which is never copied out),
// writes it (copied out after), or both. Every tensor a loop writes
// must be one of these and none may share memory with another.
enum class LoopRole { kIn, kOut, kInOut };
struct LoopTensor {
  at::Tensor tensor;  // may be undefined (the loop sees an undefined tensor)
  LoopRole role;
};

// A loop over the steps of a recurrence, on the tensors it is given (in the
// order of the LoopTensor list).
using StepLoop = c10::function_ref<void(const std::vector<at::Tensor>&)>;

struct LoopShape {
  const char* name;                // which loop, e.g. "lstm_forward"
  std::vector<int64_t> params;     // everything else the launches depend on
                                   // (flags, the schedule's batch sizes)
  int64_t steps;                   // T
  int64_t macs_per_step;           // of the widest step's recurrent product
};

// Runs loop(tensors): through a captured graph where the mode and the cache
// take it (above), else directly on the tensors given.
void run_loop(const LoopShape& shape, const std::vector<LoopTensor>& tensors, StepLoop loop);

// FUSED_RNN_BIDIRECTIONAL (read once): auto (the default) or separate.
// Whether the two directions of a bidirectional layer may run at once: in
// one launch of the persistent kernels (persistent.h), or, on the general
// path, their per-step loops side by side (run_side_by_side); separate runs
// them one after the other everywhere, for comparison.
bool bidirectional_pairs_allowed();

// Runs two independent per-step loops (the recurrences of a bidirectional
// layer's directions on the general path). On CUDA, where
// bidirectional_pairs_allowed() and the current stream is not being
// captured, side by side: `first` on a stream of its own (one per current
// stream, so that its graph cache entries come back) that waits for the
// work the current stream has so far, `second` on the current stream,
// which then waits for `first`; so the GPU runs the two recurrences at
// once, each step's small products and launches overlapping the other's.
// Otherwise first, then second. Each loop may only touch tensors made
// before the call, or its own (it writes its own outputs; the caller
// reads them after).
void run_side_by_side(const at::Tensor& like, c10::function_ref<void()> first,
                      c10::function_ref<void()> second);

// What the cache has done since the process started (or the last clear);
// bytes: of the static entries' tensors and, on CUDA, of the memory the
// graphs keep.
struct GraphCacheInfo {
  int64_t captures = 0, replays = 0, uncached = 0, evictions = 0, entries = 0, bytes = 0;
};
GraphCacheInfo graph_cache_info();
void clear_graph_cache();

// The cache's bookkeeping, apart from what an entry holds (tested through
// the emulate mode on the CPU).
struct GraphKey {
  std::vector<int64_t> values;
  bool operator==(const GraphKey& other) const { return values == other.values; }
};
struct GraphKeyHash {
  size_t operator()(const GraphKey& key) const {
    size_t h = 0x9e3779b97f4a7c15ULL;
    for (const int64_t v : key.values) {
      h ^= std::hash<int64_t>()(v) + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
    }
    return h;
  }
};

// When a call without an entry captures one: at the n-th sighting of its
// addresses (direct) or of its shape (static); 0: never.
struct GraphPolicy {
  int direct_after;
  int static_after;
};

template <typename Entry>
class GraphCache {
 public:
  enum class Action { kUncached, kCaptureDirect, kCaptureStatic, kReplayDirect, kReplayStatic };

  // What to do with a loop of this shape (and addresses: direct) and size
  // now; for a replay, most_recent() gives the entry (it becomes the most
  // recently used).
  Action decide(const GraphKey& shape, const GraphKey& direct, int64_t bytes,
                const GraphPolicy& policy, const GraphLimits& limits) {
    if (policy.direct_after > 0 && touch(direct)) return replayed(Action::kReplayDirect);
    if (policy.static_after > 0 && touch(shape)) return replayed(Action::kReplayStatic);
    if (history_.size() > kHistoryLimit) history_.clear();
    if (policy.direct_after > 0) {
      History& h = history_[direct];
      if (++h.sightings >= policy.direct_after && h.captures < kGraphMaxCaptures) {
        ++h.captures;
        return Action::kCaptureDirect;
      }
    }
    if (policy.static_after > 0) {
      History& h = history_[shape];
      if (++h.sightings >= policy.static_after && h.captures < kGraphMaxCaptures &&
          bytes <= std::min(limits.entry_bytes, limits.total_bytes)) {
        ++h.captures;
        return Action::kCaptureStatic;
      }
    }
    ++info_.uncached;
    return Action::kUncached;
  }

  // A capture of this key failed: it runs without a graph from now on.
  void give_up(const GraphKey& key) { history_[key].captures = kGraphMaxCaptures; }
  // A capture decide() answered did not happen (another thread was
  // capturing, or memory ran out): it does not count against the key.
  void capture_skipped(const GraphKey& key) {
    History& h = history_[key];
    if (h.captures > 0) --h.captures;
    ++info_.uncached;
  }

  // Drops every entry, keeping the counts and what was seen (the allocator
  // needs the memory back).
  void evict_all() {
    while (!lru_.empty()) {
      evict_last();
      ++info_.evictions;
    }
  }

  // Adds the entry of a key decide() answered a capture for (bytes: of its
  // static tensors and of the memory its graph keeps), evicting the least
  // recently used entries to make room.
  Entry& insert(const GraphKey& key, int64_t bytes, Entry entry, const GraphLimits& limits) {
    erase(key);  // another thread's capture of the same key, in the meantime
    while (!lru_.empty() && (static_cast<int64_t>(lru_.size()) >= kGraphMaxEntries ||
                             info_.bytes + bytes > limits.total_bytes)) {
      evict_last();
      ++info_.evictions;
    }
    lru_.push_front(Item{key, bytes, std::move(entry)});
    index_[key] = lru_.begin();
    info_.bytes += bytes;
    ++info_.captures;
    info_.entries = static_cast<int64_t>(lru_.size());
    return lru_.front().entry;
  }

  // The entry of the key decide() last answered a replay for.
  Entry& most_recent() { return lru_.front().entry; }

  void erase(const GraphKey& key) {
    auto found = index_.find(key);
    if (found == index_.end()) return;
    info_.bytes -= found->second->bytes;
    lru_.erase(found->second);
    index_.erase(found);
    info_.entries = static_cast<int64_t>(lru_.size());
  }

  void clear() {
    lru_.clear();
    index_.clear();
    history_.clear();
    info_ = GraphCacheInfo();
  }

  const GraphCacheInfo& info() const { return info_; }

 private:
  struct Item {
    GraphKey key;
    int64_t bytes;
    Entry entry;
  };
  struct History {
    int sightings = 0;
    int captures = 0;
  };
  static constexpr size_t kHistoryLimit = 4096;

  // Moves the key's entry, if any, to the front.
  bool touch(const GraphKey& key) {
    auto found = index_.find(key);
    if (found == index_.end()) return false;
    lru_.splice(lru_.begin(), lru_, found->second);
    return true;
  }
  Action replayed(Action action) {
    ++info_.replays;
    return action;
  }
  void evict_last() {
    const GraphKey key = lru_.back().key;  // (erase destroys the item)
    erase(key);
  }

  std::list<Item> lru_;
  std::unordered_map<GraphKey, typename std::list<Item>::iterator, GraphKeyHash> index_;
  std::unordered_map<GraphKey, History, GraphKeyHash> history_;
  GraphCacheInfo info_;
};

#if defined(FUSED_RNN_WITH_CUDA)
namespace cuda {
// A loop captured into a CUDA graph (csrc/cuda/graphs.cpp).
class CapturedLoop {
 public:
  virtual ~CapturedLoop() = default;
  // Launches the graph on the current stream.
  virtual void replay() = 0;
  // Device memory the graph keeps (its private pool: what the loop
  // allocated inside), as the caching allocator's reserved bytes grew
  // during the capture.
  int64_t pool_bytes = 0;
};
// Captures loop(statics) on a stream of its own (nothing runs), for
// replays on the current stream; throws where the capture fails; null
// (nothing captured, nothing run) while another thread captures a loop for
// the same stream.
std::unique_ptr<CapturedLoop> capture_loop(StepLoop loop, const std::vector<at::Tensor>& statics);
// Whether the current stream is being captured into a graph now.
bool current_stream_capturing();
// An id of the current stream, and the cuBLAS settings a capture bakes in.
std::vector<int64_t> stream_and_blas_settings();
// The device's memory in bytes (read once per device).
int64_t device_memory_bytes(c10::DeviceIndex device);
// run_side_by_side's CUDA half: first on the current stream's side stream,
// second on the current stream, joined.
void run_side_by_side(c10::function_ref<void()> first, c10::function_ref<void()> second);
}  // namespace cuda
#endif

}  // namespace fused_rnn

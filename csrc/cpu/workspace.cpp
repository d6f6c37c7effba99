// The CPU workspace cache (fused_rnn/workspace.h).
#include "fused_rnn/workspace.h"

#include <ATen/Context.h>
#include <ATen/EmptyTensor.h>
#include <ATen/native/TensorFactories.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <list>
#include <mutex>
#include <string>
#include <vector>

namespace fused_rnn {
namespace cpu {
namespace {

// Smaller blocks stay with the C library, whose bins reuse them without
// returning them to the system.
constexpr std::size_t kMinCachedBytes = std::size_t{256} << 10;
// Block sizes are multiples of this, so that requests of nearly one size
// (packed batches of other lengths) share blocks.
constexpr std::size_t kGranule = std::size_t{64} << 10;

std::size_t limit_from_env() {
  const char* env = std::getenv("FUSED_RNN_CPU_CACHE_MB");
  if (env == nullptr || *env == '\0') return std::size_t{64} << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(env, &end, 10);
  TORCH_CHECK_VALUE(end != env && *end == '\0' && mb >= 0,
                    "FUSED_RNN_CPU_CACHE_MB=", env, ": expected a number of MiB (0: no cache)");
  return static_cast<std::size_t>(mb) << 20;
}

struct Block {
  void* ptr;
  std::size_t size;
};

class Cache {
 public:
  // A block of at least `bytes` (a multiple of kGranule): a cached one of at
  // most 5/4 of that, else a new one.
  Block take(std::size_t bytes) {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      auto best = free_.end();
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->size >= bytes && it->size <= bytes + bytes / 4 &&
            (best == free_.end() || it->size < best->size)) {
          best = it;
        }
      }
      if (best != free_.end()) {
        const Block block = *best;
        cached_ -= block.size;
        free_.erase(best);
        return block;
      }
    }
    return {c10::alloc_cpu(bytes), bytes};
  }

  // Keeps a freed block (most recent last), evicting the least recently
  // freed ones beyond the limit.
  void give(Block block) {
    std::list<Block> evicted;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      if (block.size <= limit()) {
        free_.push_back(block);
        cached_ += block.size;
        block.ptr = nullptr;
      }
      while (cached_ > limit() && !free_.empty()) {
        cached_ -= free_.front().size;
        evicted.splice(evicted.end(), free_, free_.begin());
      }
    }
    if (block.ptr != nullptr) c10::free_cpu(block.ptr);
    for (const Block& b : evicted) c10::free_cpu(b.ptr);
  }

  void clear() {
    std::list<Block> all;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      all.swap(free_);
      cached_ = 0;
    }
    for (const Block& b : all) c10::free_cpu(b.ptr);
  }

  std::size_t cached() {
    const std::lock_guard<std::mutex> lock(mutex_);
    return cached_;
  }

  std::size_t limit() {
    static const std::size_t value = limit_from_env();
    return value;
  }

 private:
  std::mutex mutex_;
  std::list<Block> free_;  // least recently freed first
  std::size_t cached_ = 0;
};

// Never destroyed: tensors may be freed during the process's exit, after
// static destructors have run.
Cache& cache() {
  static Cache* instance = new Cache();
  return *instance;
}

void release(void* context) {
  Block* block = static_cast<Block*>(context);
  cache().give(*block);
  delete block;
}

class WorkspaceAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(std::size_t nbytes) override {
    if (nbytes < kMinCachedBytes || cache().limit() == 0) {
      return c10::GetDefaultCPUAllocator()->allocate(nbytes);
    }
    const std::size_t bytes = (nbytes + kGranule - 1) / kGranule * kGranule;
    Block* block = new Block(cache().take(bytes));
    return {block->ptr, block, &release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

WorkspaceAllocator& allocator() {
  static WorkspaceAllocator* instance = new WorkspaceAllocator();
  return *instance;
}

void empty_cpu_cache_op() { cache().clear(); }

std::vector<int64_t> cpu_cache_info_op() {
  return {static_cast<int64_t>(cache().cached()), static_cast<int64_t>(cache().limit())};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fused_rnn, m) {
  m.def("empty_cpu_cache() -> ()", &empty_cpu_cache_op);
  m.def("cpu_cache_info() -> int[]", &cpu_cache_info_op);
}

}  // namespace cpu

at::Tensor workspace_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (!options.device().is_cpu() || options.layout() != c10::kStrided) {
    return at::empty(sizes, options);
  }
  at::Tensor out = at::detail::empty_generic(sizes, &cpu::allocator(),
                                             c10::DispatchKeySet(c10::DispatchKey::CPU),
                                             c10::typeMetaToScalarType(options.dtype()),
                                             c10::nullopt);
  // as at::empty under torch.use_deterministic_algorithms(True): memory
  // nobody wrote reads as NaN, not as whatever a cached block last held
  if (at::globalContext().deterministicAlgorithms() &&
      at::globalContext().deterministicFillUninitializedMemory()) {
    at::native::fill_empty_deterministic_(out);
  }
  return out;
}

}  // namespace fused_rnn

// A CPU emulation of the few CUDA features the persistent kernels use, so
// that their source (csrc/cuda/persistent.cuh) runs on a machine without a
// GPU. Every CUDA thread is a fiber (ucontext) on the calling OS thread;
// __syncthreads, warp shuffles, the cooperative grid barrier and a
// thread-block cluster's barrier are fiber barriers; dynamic shared memory
// is a per-block buffer, which the blocks of a cluster reach in each other
// (map_shared_rank); ld.global.cg is a plain load.
//
// Fibers run from one barrier to the next, warp by warp, in ascending or
// descending thread order (`launch`'s `order`): a kernel whose result
// depends on which thread of a phase runs first (a missing barrier) gives a
// different result in one of the two orders. Descending, the last block also
// runs ahead of the others as far as barriers let it. A barrier that can never
// complete (threads of a block taking different numbers of __syncthreads,
// blocks taking different numbers of grid barriers: a hang on a GPU) is
// reported as an error instead of hanging. What it cannot show: timing, bank
// conflicts, the memory model's corner cases.
//
// Compiled with -DFUSED_RNN_EMULATION (tests/test_persistent_emulation.py).
#pragma once

#include <setjmp.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__

struct dim3_emu {
  unsigned x = 0, y = 0, z = 0;
};

namespace fused_rnn_emu {

struct Barrier {
  int count = 0, arrived = 0;
  uint64_t generation = 0;
};

struct Fiber {
  ucontext_t context;  // the first entry
  jmp_buf resume;      // where it yielded
  char* stack = nullptr;  // kStackBytes from stack_pool()
  dim3_emu thread_idx, block_idx;
  bool started = false, done = false;
  const struct Barrier* waiting = nullptr;  // and on which generation
  uint64_t waiting_generation = 0;
};

struct Launch {
  int blocks = 0, threads = 0;
  dim3_emu block_dim, grid_dim;
  std::vector<Fiber> fibers;
  std::vector<std::vector<unsigned char>> shared;
  std::vector<Barrier> block_barriers, warp_barriers;
  std::vector<double> lanes;  // one slot per thread, for shuffles
  Barrier grid;
  int cluster = 0;  // blocks per thread-block cluster (0: no clusters)
  std::vector<Barrier> cluster_barriers;
  size_t shared_bytes = 0;
  ucontext_t scheduler;
  jmp_buf scheduler_resume;
  int current = -1;
  uint64_t progress = 0;  // barrier arrivals and finished fibers
  const std::function<void()>* kernel = nullptr;
};

constexpr size_t kStackBytes = 64 * 1024;

// The fibers' stacks, kept from one launch to the next: a stepwise test
// makes a launch per step, and fresh zeroed stacks for every thread of
// every launch cost more than the kernels.
inline char* stack_pool(size_t fibers) {
  static std::unique_ptr<char[]> pool;
  static size_t size = 0;
  if (size < fibers) {
    pool.reset(new char[fibers * kStackBytes]);
    size = fibers;
  }
  return pool.get();
}

inline Launch*& active() {
  static Launch* launch = nullptr;
  return launch;
}

inline Fiber& self() { return active()->fibers[active()->current]; }

inline void yield() {
  Launch& l = *active();
  if (_setjmp(l.fibers[l.current].resume) == 0) _longjmp(l.scheduler_resume, 1);
}

inline void wait(Barrier& b) {
  Launch& l = *active();
  ++l.progress;
  const uint64_t generation = b.generation;
  if (++b.arrived == b.count) {
    b.arrived = 0;
    ++b.generation;
    return;
  }
  Fiber& f = l.fibers[l.current];
  f.waiting = &b;
  f.waiting_generation = generation;
  while (b.generation == generation) yield();
  f.waiting = nullptr;
}

// Block `block`'s dynamic shared memory, 64-byte aligned, as a GPU's
// shared memory window is at least 16-byte.
inline unsigned char* shared_of(int block) {
  auto& buffer = active()->shared[block];
  return reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(buffer.data()) + 63) / 64 * 64);
}
inline unsigned char* dynamic_shared() { return shared_of(self().block_idx.x); }

// The cluster barrier of the calling thread's cluster: every thread of
// its blocks.
inline void cluster_sync() {
  Launch& l = *active();
  if (l.cluster <= 0) throw std::logic_error("cluster barrier in a launch without clusters");
  wait(l.cluster_barriers[self().block_idx.x / l.cluster]);
}

// `p`, an address in the calling block's dynamic shared memory, in that of
// block `rank` of its cluster (DSMEM); an address outside the window or a
// rank outside the cluster throws.
inline void* map_shared_rank(void* p, int rank) {
  Launch& l = *active();
  if (l.cluster <= 0) throw std::logic_error("map_shared_rank in a launch without clusters");
  if (rank < 0 || rank >= l.cluster) throw std::out_of_range("map_shared_rank: rank");
  const int block = self().block_idx.x;
  unsigned char* mine = shared_of(block);
  const ptrdiff_t offset = static_cast<unsigned char*>(p) - mine;
  if (offset < 0 || static_cast<size_t>(offset) >= l.shared_bytes)
    throw std::out_of_range("map_shared_rank: not an address of the block's shared memory");
  return shared_of(block / l.cluster * l.cluster + rank) + offset;
}

[[noreturn]] inline void fiber_main() {
  Launch& l = *active();
  (*l.kernel)();
  l.fibers[l.current].done = true;
  ++l.progress;
  _longjmp(l.scheduler_resume, 1);  // never return: uc_link would resume a stale frame
}

// Runs kernel() as `blocks` x `threads` CUDA threads of a cooperative
// launch; order 0 schedules threads in ascending order, 1 in descending;
// cluster: blocks per thread-block cluster (0: none).
inline void launch(int blocks, int threads, size_t shared_bytes, int order,
                   const std::function<void()>& kernel, int cluster = 0) {
  if (threads % 32 != 0) throw std::invalid_argument("threads must be a multiple of 32");
  if (cluster < 0 || (cluster > 0 && blocks % cluster != 0))
    throw std::invalid_argument("the grid must be whole clusters");
  if (active() != nullptr) throw std::logic_error("nested emulated launch");
  auto l = std::make_unique<Launch>();
  l->blocks = blocks;
  l->threads = threads;
  l->block_dim.x = threads;
  l->grid_dim.x = blocks;
  l->kernel = &kernel;
  const int total = blocks * threads;
  l->fibers.resize(total);
  l->shared.assign(blocks, std::vector<unsigned char>(shared_bytes + 64, 0xFF));
  l->block_barriers.assign(blocks, Barrier{threads});
  l->warp_barriers.assign(total / 32, Barrier{32});
  l->lanes.assign(total, 0.0);
  l->grid.count = total;
  l->cluster = cluster;
  l->shared_bytes = shared_bytes;
  if (cluster > 0) l->cluster_barriers.assign(blocks / cluster, Barrier{cluster * threads});
  active() = l.get();
  char* stacks = stack_pool(total);
  for (int i = 0; i < total; ++i) {
    Fiber& f = l->fibers[i];
    f.thread_idx.x = i % threads;
    f.block_idx.x = i / threads;
    f.stack = stacks + i * kStackBytes;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack;
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = nullptr;
    makecontext(&f.context, reinterpret_cast<void (*)()>(fiber_main), 0);
  }
  // Resumes fiber i unless it waits on a barrier that has not completed.
  auto resume = [&](int i) {
    Fiber& f = l->fibers[i];
    if (f.done || (f.waiting && f.waiting->generation == f.waiting_generation)) return;
    l->current = i;
    if (_setjmp(l->scheduler_resume) == 0) {
      if (!f.started) {
        f.started = true;
        swapcontext(&l->scheduler, &f.context);
      } else {
        _longjmp(f.resume, 1);
      }
    }
  };
  // Passes over the warps; each warp runs until it waits on a block, grid
  // or cluster barrier (or ends), so a pass advances many shuffles. In
  // descending order a pass starts again from the highest warp after every
  // warp that moved on: the last block runs ahead of the others as far as
  // the barriers between blocks let it (a block that reads what another
  // wrote without a barrier between them reads it too early), where
  // ascending passes keep the blocks in step.
  const int warps = total / 32;
  for (;;) {
    const uint64_t before = l->progress;
    for (int k = 0; k < warps; ++k) {
      const int w = order == 0 ? k : warps - 1 - k;
      uint64_t step;
      do {
        step = l->progress;
        for (int lane = 0; lane < 32; ++lane) resume(w * 32 + (order == 0 ? lane : 31 - lane));
      } while (l->progress != step);
      if (order == 1 && l->progress != before) break;
    }
    bool all_done = true;
    for (const Fiber& f : l->fibers) all_done &= f.done;
    if (all_done) break;
    if (l->progress == before) {
      active() = nullptr;
      throw std::runtime_error(
          "emulated kernel deadlock: a barrier can never complete (threads of a block reach "
          "different numbers of __syncthreads, or blocks different numbers of grid barriers)");
    }
  }
  active() = nullptr;
}

}  // namespace fused_rnn_emu

#define threadIdx (::fused_rnn_emu::self().thread_idx)
#define blockIdx (::fused_rnn_emu::self().block_idx)
#define blockDim (::fused_rnn_emu::active()->block_dim)
#define gridDim (::fused_rnn_emu::active()->grid_dim)

inline void __syncthreads() {
  auto* l = ::fused_rnn_emu::active();
  ::fused_rnn_emu::wait(l->block_barriers[l->current / l->threads]);
}

template <typename T>
inline T __shfl_xor_sync(unsigned /*mask*/, T value, int offset) {
  static_assert(sizeof(T) <= sizeof(double), "shuffle of a wide type");
  auto* l = ::fused_rnn_emu::active();
  const int me = l->current, lane = me % 32, base = me - lane;
  auto& warp = l->warp_barriers[me / 32];
  std::memcpy(&l->lanes[me], &value, sizeof(T));
  ::fused_rnn_emu::wait(warp);
  T other;
  std::memcpy(&other, &l->lanes[base + (lane ^ offset)], sizeof(T));
  ::fused_rnn_emu::wait(warp);
  return other;
}

// A kernel's trap: an error no test expects (a tile the plan never takes).
[[noreturn]] inline void __trap() {
  throw std::logic_error("fused_rnn emulation: a kernel trapped");
}

template <typename T>
inline T __ldcg(const T* p) {
  return *p;
}

namespace cooperative_groups {
struct grid_group {
  void sync() { ::fused_rnn_emu::wait(::fused_rnn_emu::active()->grid); }
};
inline grid_group this_grid() { return {}; }
struct cluster_group {
  void sync() { ::fused_rnn_emu::cluster_sync(); }
  template <typename T>
  T* map_shared_rank(T* p, int rank) {
    return static_cast<T*>(::fused_rnn_emu::map_shared_rank(p, rank));
  }
};
inline cluster_group this_cluster() { return {}; }
}  // namespace cooperative_groups

// wmma, as the persistent kernels use it: every lane of a warp computes the
// whole fragment (the operations are warp-collective with identical
// arguments on every lane, so that is the same result). Pointers must be
// 32-byte aligned and leading dimensions multiples of 16 bytes, as the CUDA
// programming guide requires; a violation throws.
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

namespace precision {
struct tf32 {};  // fragments of float, loaded from float, rounded by __float_to_tf32
}  // namespace precision

// The element type a fragment holds and loads from memory.
template <typename T>
struct storage {
  using type = T;
};
template <>
struct storage<precision::tf32> {
  using type = float;
};

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = rows * cols;
  typename storage<T>::type x[rows * cols];  // row-major rows x cols
};

// cvt.rna.tf32.f32: to the nearest TF32 value (8 exponent bits, 10 of the
// mantissa; the low 13 bits zero), ties away from zero; NaN and infinity
// kept.
inline float __float_to_tf32(float in) {
  uint32_t bits;
  std::memcpy(&bits, &in, sizeof bits);
  if ((bits & 0x7f800000u) != 0x7f800000u) bits = (bits + 0x1000u) & ~0x1fffu;
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

inline void check_access(const void* p, unsigned ldm, size_t element) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0)
    throw std::runtime_error("wmma: pointer not 256-bit aligned");
  if ((ldm * element) % 16 != 0)
    throw std::runtime_error("wmma: leading dimension not a multiple of 16 bytes");
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f,
                             const typename storage<T>::type* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, Layout>;
  check_access(p, ldm, sizeof(*p));
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c)
      f.x[r * F::cols + c] = std::is_same_v<Layout, row_major> ? p[r * ldm + c] : p[c * ldm + r];
}

template <int M, int N, int K, typename T>
inline void fill_fragment(fragment<accumulator, M, N, K, T>& f, T value) {
  for (auto& v : f.x) v = value;
}

template <int M, int N, int K, typename Tab, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d,
                     const fragment<matrix_a, M, N, K, Tab, LA>& a,
                     const fragment<matrix_b, M, N, K, Tab, LB>& b,
                     const fragment<accumulator, M, N, K, float>& c) {
  fragment<accumulator, M, N, K, float> out;
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      float sum = c.x[m * N + n];
      for (int k = 0; k < K; ++k)
        sum += static_cast<float>(a.x[m * K + k]) * static_cast<float>(b.x[k * N + n]);
      out.x[m * N + n] = sum;
    }
  d = out;
}

template <int M, int N, int K>
inline void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f,
                              unsigned ldm, layout_t layout) {
  check_access(p, ldm, sizeof(float));
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n)
      (layout == mem_row_major ? p[m * ldm + n] : p[n * ldm + m]) = f.x[m * N + n];
}
}  // namespace wmma
}  // namespace nvcuda

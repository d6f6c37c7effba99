// Device side of the persistent whole-sequence kernels (see
// fused_rnn/persistent.h for what they compute and the shape legend).
//
// Block k owns hidden units j0 = k*J .. j0+J-1 (the last block may own
// fewer). Its weight slice, `rows` x `k` in shared memory:
//   forward   rows = G*J, row q*J + jj = W_hh row q*H + j0 + jj, k = H
//   backward  rows = J,   row jj = W_hh column j0 + jj,          k = G*H
// Per step and pass of P batch rows, block_matvec multiplies the slice by
// P rows of a vector the whole grid wrote during the previous step (h_{t-1}
// forward, the next step's gate gradients backward), staged in shared memory
// in chunks of columns; the cell math of cells.h then runs over the block's
// units and the pass's rows, and after the last pass the grid meets at one
// barrier. A pass is bsplits batch tiles of BT rows: warps that the
// block's weight rows leave free take further batch tiles side by side
// (before they split the columns), so that a batch of 64 costs one pass,
// not eight one after another. Math in at::opmath_type (float for
// half and bfloat16, with fp32 accumulation and an fp32 cell state);
// float32 is exact fp32 FMA.
//
// Memory ordering: data written by other blocks during the launch are read
// with ld.global.cg (L2, never a stale L1 line); the grid barrier orders
// every block's writes of a step before any read of the next (the tagged
// exchange: each value's own tag; the cluster exchange: the cluster
// barrier, release then acquire, orders the stores into the peers' shared
// memory).
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <cooperative_groups.h>
#if !defined(FUSED_RNN_EMULATION)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#endif

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "fused_rnn/cells.h"
#include "fused_rnn/graphs.h"
#include "fused_rnn/persistent.h"

// The block's dynamic shared memory (a per-block buffer in the CPU
// emulation, tests/emulation/cuda_emu.h).
#if defined(FUSED_RNN_EMULATION)
#define FR_DYNAMIC_SHARED(name) unsigned char* name = ::fused_rnn_emu::dynamic_shared()
#else
#define FR_DYNAMIC_SHARED(name) extern __shared__ __align__(128) unsigned char name[]
#endif
// A kernel parameter read in place, by reference (not copied to local memory).
#if defined(FUSED_RNN_EMULATION)
#define FR_GRID_CONSTANT
#else
#define FR_GRID_CONSTANT __grid_constant__
#endif

namespace fused_rnn {
namespace cuda {
namespace persistent {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerWarp = 4;
// At most this many weight rows per block (kWarps row groups of kRowsPerWarp).
constexpr int kMaxRows = kWarps * kRowsPerWarp;
// Columns of the staged input tile for one batch tile by default (smaller
// in the CPU emulation's build, tests/emulation/, so that small shapes
// cover several chunks); a pass of bsplits tiles stages kChunk / bsplits
// columns at a time (at least 16). The plan widens the chunk, up to all k
// columns, where the block's shared memory holds it (widest_chunk in
// persistent.cu): one staging and two __syncthreads per pass instead of
// one per chunk.
#if defined(FUSED_RNN_EMULATION_CHUNK)
constexpr int kChunk = FUSED_RNN_EMULATION_CHUNK;
#else
constexpr int kChunk = 1024;
#endif
// The batch tiles. Float and double: 1 and kMaxBatchTile, with FMA into
// registers. Half and bfloat16: 1 (FMA) and kMmaTile, with tensor cores
// (wmma 16x16x16, fp32 accumulation). Float also kMmaTile, on tensor cores
// in TF32 (wmma 16x16x8, operands rounded to TF32, fp32 accumulation),
// where torch's cuDNN RNN flag allows TF32 (the plan's choice). The
// pointwise phase gives each thread at most one (tile row, unit) pair:
// tile * units <= kThreads.
constexpr int kMaxBatchTile = 8;
constexpr int kMmaTile = 16;
// Tensor cores: the shared-memory rows that wmma loads (weights, staged
// input) are 16 bytes longer than the columns they hold (8 half or 4 float
// elements), so that the 8 rows of an 8x8 piece (8x4 in TF32) fall in
// different banks; rows a multiple of 128 bytes long (k = 256, 512, 1024)
// would put them all in the same 4 banks, an 8-way conflict on every
// fragment load.
__host__ __device__ constexpr int mma_skew(size_t element) {
  return static_cast<int>(16 / element);
}
static_assert(kMaxBatchTile * kMaxRows <= kThreads, "one (row, unit) pair per thread");
// The tensor-core product gives each warp a row group of 16 (make_tiling):
// up to kWarps * 16 rows per block, where the FMA product's warps hold
// kRowsPerWarp rows each (kMaxRows) in one round. With a window (the
// cluster exchange: the whole rows in place, nothing staged again) the FMA
// product takes further row groups in rounds (block_matvec), up to as many
// rows as the tensor cores.
constexpr int kMaxRowsMma = kWarps * 16;
__host__ __device__ constexpr int max_rows(int batch_tile, bool window = false) {
  return batch_tile == kMmaTile || window ? kMaxRowsMma : kMaxRows;
}
static_assert(kRowsPerWarp * kMaxBatchTile <= 32, "a warp's sums: at most one per lane");

// The compute capability (major * 10 + minor) from which wmma multiplies
// a dtype: half from 7.0, bfloat16 and float (as TF32) from 8.0.
inline int mma_arch(at::ScalarType dtype) { return dtype == at::kHalf ? 70 : 80; }
inline bool is_half(at::ScalarType dtype) {
  return dtype == at::kHalf || dtype == at::kBFloat16;
}
// The tile for a batch on a device of compute capability `arch`: 1 for one
// sequence; else tensor cores in half types where the device multiplies
// them (else 1: FMA), and in float where TF32 is allowed (tf32), the
// device has TF32 and the batch is wider than the FMA tile (up to 8
// sequences the exact FMA tile covers the batch in one pass, as fast as a
// half-empty tensor-core tile); FMA otherwise.
inline int batch_tile(int64_t batch, at::ScalarType dtype, bool tf32, int arch) {
  if (batch == 1) return 1;
  const bool mma = arch >= mma_arch(dtype);
  if (is_half(dtype)) return mma ? kMmaTile : 1;
  return dtype == at::kFloat && tf32 && mma && batch > kMaxBatchTile ? kMmaTile
                                                                     : kMaxBatchTile;
}

// Batch tiles side by side in a pass (bsplits): as many as the warps that
// the `groups` row groups leave free, the batch's tiles and one (pass row,
// unit) pair per thread in the pointwise phase allow.
__host__ __device__ inline int batch_splits(int groups, int64_t batch, int batch_tile,
                                            int units) {
  int s = groups >= kWarps ? 1 : kWarps / groups;
  const int64_t tiles = (batch + batch_tile - 1) / batch_tile;
  if (tiles < s) s = static_cast<int>(tiles);
  const int by_threads = kThreads / (batch_tile * units);
  if (by_threads < s) s = by_threads;
  return s < 1 ? 1 : s;
}

__host__ __device__ constexpr int round_up(int n, int m) { return (n + m - 1) / m * m; }
__host__ __device__ constexpr size_t align128(size_t bytes) { return (bytes + 127) / 128 * 128; }

// How a block holds and splits its product, and its dynamic shared memory:
// the weight slice (rows_pad x ldw of the storage type, zeros past rows and
// past k), the staged input (pass x tile_ld: the math type for FMA, the
// storage type for tensor cores) and the partial sums (splits x rows_pad x
// pass of the math type). Tensor-core tiles pad rows and columns to 16.
// Warp w takes row group w % groups, batch tile (w / groups) % bsplits and
// column split w / (groups * bsplits). Host (plan) and device compute it
// alike from the launch's shape and `chunk` (the plan's staged columns, a
// multiple of 16 or all of them; 0: the default, kChunk / bsplits). The
// stepwise launches read the weight slice from global memory
// (pack_slices_kernel lays it out the same way) and hold only the staged
// input and the partial sums (weights_shared false). A launch whose blocks
// form one thread-block cluster (window true: the cluster exchange) holds,
// in place of the staged input, its window: two buffers (by the parity of
// the step that wrote them) of every input row of a step, all kpad columns
// (window_rows rows: the batch rounded up to whole passes), which the
// cluster's blocks fill in each other's shared memory.
struct Tiling {
  int rows, rows_pad;  // weight rows used and held
  int kpad;            // columns held: k, rounded up to 16 on tensor cores
  int ldw;             // weight row stride: kpad (+ mma_skew on tensor cores)
  int groups;          // row groups (kRowsPerWarp rows, or 16 on tensor cores)
  int bsplits;         // batch tiles side by side in a pass
  int pass;            // batch rows per pass: bsplits * BT
  int chunk;           // columns staged at once
  int tile_ld;         // stride of staged rows: chunk (+ mma_skew on tensor cores)
  int splits;          // warps splitting the columns of one row group and batch tile
  int window_rows;     // rows of one window buffer (the cluster exchange), else 0
  size_t tile_offset, partial_offset, bytes;
};
__host__ __device__ inline Tiling make_tiling(int rows, int k, int batch_tile, int64_t batch,
                                              int units, size_t element, size_t math_element,
                                              bool weights_shared = true, int chunk = 0,
                                              bool window = false) {
  const bool mma = batch_tile == kMmaTile;
  Tiling t{};
  t.rows = rows;
  t.rows_pad = mma ? round_up(rows, 16) : rows;
  t.kpad = mma ? round_up(k, 16) : k;
  t.ldw = mma ? t.kpad + mma_skew(element) : k;
  t.groups = mma ? t.rows_pad / 16 : (rows + kRowsPerWarp - 1) / kRowsPerWarp;
  t.bsplits = batch_splits(t.groups, batch, batch_tile, units);
  t.pass = t.bsplits * batch_tile;
  if (window) chunk = t.kpad;  // the whole rows, in place
  if (chunk <= 0) {
    chunk = kChunk / t.bsplits / 16 * 16;
    if (chunk < 16) chunk = 16;
  }
  t.chunk = t.kpad < chunk ? t.kpad : chunk;
  t.tile_ld = mma ? t.chunk + mma_skew(element) : t.chunk;
  const int used = t.groups * t.bsplits;
  t.splits = used >= kWarps ? 1 : kWarps / used;
  t.window_rows = window ? static_cast<int>((batch + t.pass - 1) / t.pass * t.pass) : 0;
  t.tile_offset =
      weights_shared ? align128(static_cast<size_t>(t.rows_pad) * t.ldw * element) : 0;
  const size_t tile_rows = window ? 2 * static_cast<size_t>(t.window_rows) : t.pass;
  t.partial_offset =
      t.tile_offset + align128(tile_rows * t.tile_ld * (mma ? element : math_element));
  t.bytes = t.partial_offset +
            align128(static_cast<size_t>(t.splits) * t.rows_pad * t.pass * math_element);
  return t;
}

// ------------------------------------------------------------ parameters
// What a launch runs: every step, with a grid barrier after each (the
// persistent kernel, one cooperative launch, the weight slices in shared
// memory), or one step (a stepwise launch: one per step, the kernel
// boundary for the barrier, the slices read from global memory where
// pack_slices_kernel put them).
struct LaunchSteps {
  int64_t begin, end;  // forward: steps [begin, end); backward: begin down to end
  bool cooperative;    // a grid barrier after each step
};

// The rows of one processed step s of the (N, *) sequence tensors. Dense
// input (T, B, *): every step has B rows, step t's at t*B. Packed input:
// time step t has batch_sizes[t] rows
// (non-increasing in t) after the earlier steps' rows; row b of a step is
// sequence b, row b of the (B, *) states. Steps are processed in time order
// or in reverse.
struct StepRows {
  int64_t row0;       // first row of step s (when rows > 0)
  int64_t rows;       // rows of step s (0 for s outside the sequence)
  int64_t prev_row0;  // first row of step s - 1 (when carried > 0)
  int64_t carried;    // rows of step s that continue step s - 1; the others
                      // (reverse packed input only) start from the initial state
  int64_t next_row0;  // first row of step s + 1 (when next_rows > 0)
  int64_t next_rows;  // rows of step s + 1 (0 after the last): rows of step s
                      // past it end there (forward: hy, cy; backward: grad_hy)
};

// StepRows of dense input, on host and device.
__host__ __device__ inline StepRows dense_step_rows(int64_t s, int64_t steps, int64_t batch,
                                                    bool reverse) {
  auto first_row = [&](int64_t i) { return (reverse ? steps - 1 - i : i) * batch; };
  const bool in_sequence = s >= 0 && s < steps;
  StepRows r{};
  r.rows = in_sequence ? batch : 0;
  r.row0 = in_sequence ? first_row(s) : 0;
  r.carried = in_sequence && s > 0 ? batch : 0;
  r.prev_row0 = r.carried > 0 ? first_row(s - 1) : 0;
  r.next_rows = s + 1 < steps ? batch : 0;
  r.next_row0 = r.next_rows > 0 ? first_row(s + 1) : 0;
  return r;
}

// StepRows of step s from the rows of every time step (sizes, batch_sizes
// of packed input) and their first rows (first): on the host for the
// stepwise launches, on the device from the step table of a cooperative one.
__host__ __device__ inline StepRows packed_step_rows(const int64_t* sizes, const int64_t* first,
                                                     int64_t steps, int64_t s, bool reverse) {
  auto t = [&](int64_t i) { return reverse ? steps - 1 - i : i; };
  const bool in_sequence = s >= 0 && s < steps;
  StepRows r{};
  r.rows = in_sequence ? sizes[t(s)] : 0;
  r.row0 = in_sequence ? first[t(s)] : 0;
  r.carried = in_sequence && s > 0 ? (r.rows < sizes[t(s - 1)] ? r.rows : sizes[t(s - 1)]) : 0;
  r.prev_row0 = r.carried > 0 ? first[t(s - 1)] : 0;
  r.next_rows = s + 1 < steps ? sizes[t(s + 1)] : 0;
  r.next_row0 = r.next_rows > 0 ? first[t(s + 1)] : 0;
  return r;
}

// The step table of packed input (batch_sizes, T non-increasing sizes):
// the sizes, then the first row of each time step in the (N, *) tensors.
// A cooperative launch reads it on the device (the kernels' step_table).
inline std::vector<int64_t> packed_step_table(const std::vector<int64_t>& batch_sizes) {
  const size_t steps = batch_sizes.size();
  std::vector<int64_t> table(2 * steps);
  for (size_t t = 0; t < steps; ++t) {
    table[t] = batch_sizes[t];
    table[steps + t] = t == 0 ? 0 : table[steps + t - 1] + batch_sizes[t - 1];
  }
  return table;
}

// The launches of a stepwise run, in order: launch(s, rows) for forward
// steps 0 .. T-1, backward T-1 down to -1 (grad_hx), where rows(reverse)
// gives the StepRows of processed step s in that direction (a launch may
// run both directions of a layer); batch_sizes: the rows of each time step
// of packed input, empty for dense input. The CUDA launcher
// (persistent_launch.cuh) and the CPU emulation both use it.
template <bool kBackward, typename Launch>
void for_each_step(int64_t steps, int64_t batch, const std::vector<int64_t>& batch_sizes,
                   Launch launch) {
  const std::vector<int64_t> table = packed_step_table(batch_sizes);
  for (int64_t s = kBackward ? steps - 1 : 0; kBackward ? s >= -1 : s < steps;
       s += kBackward ? -1 : 1) {
    launch(s, [&](bool reverse) {
      return batch_sizes.empty()
                 ? dense_step_rows(s, steps, batch, reverse)
                 : packed_step_rows(table.data(), table.data() + steps, steps, s, reverse);
    });
  }
}

// The input rows of a block product: row b comes from `in` (the previous
// step's rows) for b < carried, and from `alt` past it (the initial state),
// or is zero where alt is null; rows `stride` apart. A cooperative launch
// with the tagged exchange reads rows b < carried from `ring` instead (the
// slot of the step that wrote them, rows `stride` elements apart, each
// element waited for until it carries `tag`); with the cluster exchange
// they are already in buffer `window` of the block's window (Tiling), where
// the cluster's blocks put them, and only the others are staged.
template <typename scalar_t>
struct InputRows {
  const scalar_t* in;
  const scalar_t* alt;
  int64_t carried;
  int64_t stride;
  const uint64_t* ring = nullptr;
  uint32_t tag = 0;
  int window = -1;  // 0 or 1: the window buffer; -1: no window
  __device__ __forceinline__ const scalar_t* row(int64_t b) const {
    return b < carried ? in + b * stride : alt ? alt + b * stride : nullptr;
  }
};

template <typename scalar_t>
struct ForwardParams {
  using scalar_type = scalar_t;
  using T = at::opmath_type<scalar_t>;
  int64_t steps, batch;  // T, B (the rows of the states)
  int hidden, units;  // H, J
  int chunk;          // staged columns (make_tiling; 0: the default)
  bool reverse, keep_gates;
  LaunchSteps run;
  StepRows step;               // stepwise: the rows of step run.begin
  const int64_t* step_table;   // packed input in one cooperative launch: (2, T)
                               // batch_sizes, then each time step's first row; else null
  uint64_t* exchange;          // a cooperative launch's tagged ring (2, B, H, words),
                               // zeroed; null: a grid barrier per step (see exchange_put)
  int cluster;                 // the cluster exchange (kernels with kCluster): the
                               // blocks of the direction's cluster, all of its blocks
  const scalar_t* slices;      // (blocks, rows_pad, ldw) stepwise, or null
  scalar_t* xw;                // (T*B, G*H)
  const scalar_t* bias;        // (G*H) or null
  const scalar_t* bias_hh;     // (G*H) GRU, or null
  const scalar_t* w_hh;        // (G*H, H)
  const scalar_t* hx;          // (B, H)
  const scalar_t* cx;          // (B, H) LSTM
  scalar_t* out;               // (T*B, H)
  scalar_t* hy;                // (B, H)
  scalar_t* cy;                // (B, H) LSTM
  scalar_t* cells;             // (T*B, H) or null
  scalar_t* hn;                // (T*B, H) or null
  T* state;                    // (B, H) LSTM's running cell state
};

template <typename scalar_t>
struct BackwardParams {
  using scalar_type = scalar_t;
  using T = at::opmath_type<scalar_t>;
  int64_t steps, batch;
  int hidden, units;
  int chunk;  // as ForwardParams'
  bool reverse;
  LaunchSteps run;             // processed steps begin down to end (-1: grad_hx)
  StepRows step;               // stepwise: the rows of step run.begin
  const int64_t* step_table;   // packed input in one cooperative launch, as ForwardParams'
  uint64_t* exchange;          // as ForwardParams', (2, B, G*H, words): the rows the
                               // next product reads (LSTM, RNN dgates; GRU dgates_h)
  int cluster;                 // as ForwardParams'
  const scalar_t* slices;      // (blocks, rows_pad, ldw) stepwise, or null
  const scalar_t* w_hh;      // (G*H, H)
  const scalar_t* grad_out;  // (T*B, H)
  const scalar_t* grad_hy;   // (B, H)
  const scalar_t* grad_cy;   // (B, H) LSTM
  const scalar_t* out;       // (T*B, H) GRU, RNN
  const scalar_t* hx;        // (B, H) GRU
  const scalar_t* cx;        // (B, H) LSTM
  const scalar_t* gates;     // (T*B, G*H) LSTM, GRU
  const scalar_t* cells;     // (T*B, H) LSTM
  const scalar_t* hn;        // (T*B, H) GRU
  scalar_t* dgates;          // (T*B, G*H)
  scalar_t* dgates_h;        // (T*B, 3H) GRU
  scalar_t* grad_hx;         // (B, H)
  scalar_t* grad_cx;         // (B, H) LSTM
  T* carry;                  // (B, H) LSTM: dc; GRU: z * dh, the direct part of dh_{t-1}
};

// What one launch runs: one layer in one direction, or both directions of a
// bidirectional layer side by side (blocks [0, blocks) run dir[0], blocks
// [blocks, 2 * blocks) dir[1]; same shapes, each its own tensors, ring and
// `reverse`). Both walk the same number of steps, so that in a cooperative
// launch without the tagged exchange every block meets the other
// direction's blocks at each step's grid barrier. Passed as a
// __grid_constant__ kernel parameter: a block reads its direction's
// parameters in place (constant memory), with no copy to local memory. The
// kernels take it with kPaired false (count 1) or true (count 2).
template <typename Params>
struct Directions {
  Params dir[2];
  int count;   // 1 or 2 (the launcher's; a kernel knows it from kPaired)
  int blocks;  // per direction
  // (kPaired kernels only)
  __device__ __forceinline__ int direction_of_block() const {
    return static_cast<int>(blockIdx.x) >= blocks ? 1 : 0;
  }
  __device__ __forceinline__ int block_in_direction(int direction) const {
    return static_cast<int>(blockIdx.x) - direction * blocks;
  }
};

template <PersistentCell kCell>
constexpr int gate_count() {
  return kCell == PersistentCell::kLstm ? 4 : kCell == PersistentCell::kGru ? 3 : 1;
}

// A request's tensor as a kernel pointer (null where undefined): a
// contiguous CUDA tensor (a CPU one in the emulation).
template <typename scalar_t>
scalar_t* data(const at::Tensor& t) {
  if (!t.defined()) return nullptr;
#if defined(FUSED_RNN_EMULATION)
  const bool on_device = t.is_cpu();
#else
  const bool on_device = t.is_cuda();
#endif
  TORCH_INTERNAL_ASSERT(on_device && t.is_contiguous(),
                        "fused_rnn: a persistent kernel tensor is not a contiguous device tensor");
  return t.data_ptr<scalar_t>();
}

// A direction's kernel parameters from its request, `units` hidden units per
// block; state: LSTM's running cell state (B, H) in the math type (else
// undefined). The launcher sets the rest (chunk, run, step, step_table,
// exchange, cluster, slices).
template <typename scalar_t>
ForwardParams<scalar_t> forward_params(const PersistentForward& a, int units,
                                       const at::Tensor& state) {
  using T = at::opmath_type<scalar_t>;
  ForwardParams<scalar_t> p{};
  p.steps = a.steps;
  p.batch = a.batch;
  p.hidden = static_cast<int>(a.w_hh.size(1));
  p.units = units;
  p.reverse = a.reverse;
  p.keep_gates = a.keep_gates;
  p.xw = data<scalar_t>(a.xw);
  p.bias = data<scalar_t>(a.bias);
  p.bias_hh = data<scalar_t>(a.bias_hh);
  p.w_hh = data<scalar_t>(a.w_hh);
  p.hx = data<scalar_t>(a.hx);
  p.cx = data<scalar_t>(a.cx);
  p.out = data<scalar_t>(a.out);
  p.hy = data<scalar_t>(a.hy);
  p.cy = data<scalar_t>(a.cy);
  p.cells = data<scalar_t>(a.cells);
  p.hn = data<scalar_t>(a.hn);
  p.state = data<T>(state);
  return p;
}

// As forward_params; carry: LSTM's dc or GRU's z * dh (B, H) in the math
// type between steps (else undefined).
template <typename scalar_t>
BackwardParams<scalar_t> backward_params(const PersistentBackward& a, int units,
                                         const at::Tensor& carry) {
  using T = at::opmath_type<scalar_t>;
  BackwardParams<scalar_t> p{};
  p.steps = a.steps;
  p.batch = a.batch;
  p.hidden = static_cast<int>(a.w_hh.size(1));
  p.units = units;
  p.reverse = a.reverse;
  p.w_hh = data<scalar_t>(a.w_hh);
  p.grad_out = data<scalar_t>(a.grad_out);
  p.grad_hy = data<scalar_t>(a.grad_hy);
  p.grad_cy = data<scalar_t>(a.grad_cy);
  p.out = data<scalar_t>(a.out);
  p.hx = data<scalar_t>(a.hx);
  p.cx = data<scalar_t>(a.cx);
  p.gates = data<scalar_t>(a.gates);
  p.cells = data<scalar_t>(a.cells);
  p.hn = data<scalar_t>(a.hn);
  p.dgates = data<scalar_t>(a.dgates);
  p.dgates_h = data<scalar_t>(a.dgates_h);
  p.grad_hx = data<scalar_t>(a.grad_hx);
  p.grad_cx = data<scalar_t>(a.grad_cx);
  p.carry = data<T>(carry);
  return p;
}

// Runs launch(first, second) (second null for one direction) through
// run_loop (graphs.h; the CPU emulation's tests give their own) with every
// tensor of the requests: for the stepwise launches, a loop of T launches
// that a CUDA graph replays as one. launch must reach the requests' tensors
// only through the copies it is given (rebound to the tensors of a capture
// or of an entry's own), and allocate its scratch (a running state, the
// packed weight slices) itself. params: what else the launches depend on
// (run_as_loop adds each direction's `reverse`, the count and batch_sizes).
using LoopRunner = void (*)(const LoopShape&, const std::vector<LoopTensor>&, StepLoop);
template <typename Request, typename Launch>
void run_as_loop(const char* name, std::vector<int64_t> params, int64_t macs_per_step,
                 const Request& first, const Request* second, Launch launch,
                 LoopRunner runner) {
  const int count = second ? 2 : 1;
  Request requests[2] = {first, second ? *second : first};
  std::vector<LoopTensor> tensors;
  for (int d = 0; d < count; ++d) {
    for_each_tensor(requests[d], [&](at::Tensor& t, LoopRole role) {
      tensors.push_back({t, role});
    });
    params.push_back(requests[d].reverse);
  }
  params.push_back(count);
  params.insert(params.end(), first.batch_sizes.begin(), first.batch_sizes.end());
  const LoopShape shape{name, std::move(params), first.steps, macs_per_step};
  runner(shape, tensors, [&](const std::vector<at::Tensor>& given) {
    Request bound[2] = {requests[0], requests[1]};
    size_t i = 0;
    for (int d = 0; d < count; ++d) {
      for_each_tensor(bound[d], [&](at::Tensor& t, LoopRole) { t = given[i++]; });
    }
    launch(bound[0], count == 2 ? &bound[1] : nullptr);
  });
}

// ------------------------------------------------------------ helpers
template <typename scalar_t>
__device__ __forceinline__ scalar_t load_l2(const scalar_t* p);
template <>
__device__ __forceinline__ float load_l2(const float* p) {
  return __ldcg(p);
}
template <>
__device__ __forceinline__ double load_l2(const double* p) {
  return __ldcg(p);
}
template <>
__device__ __forceinline__ c10::Half load_l2(const c10::Half* p) {
  return c10::Half(__ldcg(reinterpret_cast<const unsigned short*>(p)), c10::Half::from_bits());
}
template <>
__device__ __forceinline__ c10::BFloat16 load_l2(const c10::BFloat16* p) {
  return c10::BFloat16(__ldcg(reinterpret_cast<const unsigned short*>(p)),
                       c10::BFloat16::from_bits());
}

__device__ __forceinline__ float mul_add(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double mul_add(double a, double b, double c) { return fma(a, b, c); }

// The wmma operands of a storage type: the element type that wmma loads
// from memory (the same bits), the fragments' element type and the depth
// of one product (16 in half types; float as TF32: 8, the operands rounded
// to TF32 once loaded).
//
// wmma multiplies half from compute capability 7.0 (Volta, Turing),
// bfloat16 and TF32 from 8.0 (Ampere): mma.h declares those fragments in
// the host pass and in device passes for 8.0 and newer, the condition
// below. (Not mma.h's own __CUDA_AMPERE_MMA__: CUDA 13's mma.h undefines it
// at its end, which left every device pass without these tiles, compiled
// to the trap.) In a device pass for 7.x the bfloat16 and float tensor-core
// tiles compile to a trap (mma_compiled): the plan never takes them on such
// a device (mma_arch). tests/test_cuda_archs.py reads the PTX for both.
#if defined(FUSED_RNN_EMULATION) || !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define FR_AMPERE_MMA 1
#else
#define FR_AMPERE_MMA 0
#endif
template <typename Memory, typename Fragment = Memory, int K = 16>
struct MmaOperands {
  using type = Memory;
  using fragment = Fragment;
  static constexpr int k = K;
#if FR_AMPERE_MMA
  static constexpr bool tf32 = std::is_same_v<Fragment, nvcuda::wmma::precision::tf32>;
#else
  static constexpr bool tf32 = false;
#endif
};
template <typename scalar_t>
struct MmaType : MmaOperands<scalar_t> {};
#if !defined(FUSED_RNN_EMULATION)
template <>
struct MmaType<c10::Half> : MmaOperands<__half> {};
template <>
struct MmaType<c10::BFloat16> : MmaOperands<__nv_bfloat16> {};
#endif
#if FR_AMPERE_MMA
template <>
struct MmaType<float> : MmaOperands<float, nvcuda::wmma::precision::tf32, 8> {};
#endif
// Whether this compilation pass has the tensor-core tile of scalar_t.
template <typename scalar_t>
__host__ __device__ constexpr bool mma_compiled() {
  return std::is_same_v<scalar_t, c10::Half> || FR_AMPERE_MMA;
}

// The warp-wide sums of N values per lane (N a power of two, at most 32)
// in N - 1 + 5 - log2(N) shuffles (31 for N = 32, 6 for N = 4) instead of
// 5 N. Each halving step trades half of the values with the lane `offset`
// away (the lane with that bit set keeps the upper half); afterwards lane l
// holds in v[0] the sum of value l / (32 / N) over the warp. Recursion on
// compile-time counts, so that every index into v is a constant and v stays
// in registers.
template <int n, int offset, int N, typename T>
__device__ __forceinline__ void warp_sums_step(T (&v)[N], int lane) {
  if constexpr (n > 1) {
    const bool upper = (lane & offset) != 0;
#pragma unroll
    for (int i = 0; i < n / 2; ++i) {
      const T send = upper ? v[i] : v[i + n / 2];
      const T keep = upper ? v[i + n / 2] : v[i];
      v[i] = keep + __shfl_xor_sync(0xffffffffu, send, offset);
    }
    warp_sums_step<n / 2, offset / 2>(v, lane);
  } else if constexpr (offset > 0) {
    v[0] += __shfl_xor_sync(0xffffffffu, v[0], offset);
    warp_sums_step<1, offset / 2>(v, lane);
  }
}
template <int N, typename T>
__device__ __forceinline__ void warp_sums(T (&v)[N], int lane) {
  static_assert(N >= 1 && N <= 32 && (N & (N - 1)) == 0, "N: a power of two up to 32");
  warp_sums_step<N, 16>(v, lane);
}

// ------------------------------------------------------------ exchange
// The tagged exchange: in one cooperative launch the blocks pass each
// step's rows (forward h_t, backward the gradients the next product reads)
// through a ring in global memory instead of meeting at a grid barrier. An
// element is exchange_words() 64-bit words, each a 32-bit piece of the
// value's bits (low piece first) in its low half and the tag of the step
// that wrote it, s + 1, in its high half. A naturally aligned 64-bit store
// is single-copy atomic (a strong relaxed access at GPU scope), so a reader
// that sees the tag it waits for sees the piece written with it: the data
// is its own flag, as in NCCL's LL protocol, and a step costs one trip
// through L2 instead of a barrier (an atomic per block, a poll) followed by
// that trip (ExchangeSlot). Two slots, by the parity of the step: a block writes rows of
// step s+1 into step s-1's slot only after every block wrote those rows of
// step s, which each did after reading them from step s-1 (the product
// that a row's output depends on reads the whole row), so no row is
// overwritten while a block still needs it. The ring is zeroed before the
// launch and tags start at 1: nothing left from earlier use matches. The
// grid is co-resident (a cooperative launch), so every wait ends; a wait
// past kExchangeTimeoutNs (20 s; a step takes microseconds, milliseconds
// under compute-sanitizer) traps, an error instead of a hang, should that
// ever fail.
__host__ __device__ constexpr int exchange_words_for(size_t element_bytes) {
  return element_bytes > 4 ? 2 : 1;
}
template <typename scalar_t>
__host__ __device__ constexpr int exchange_words() {
  return exchange_words_for(sizeof(scalar_t));
}
// The 64-bit words of a ring: two slots of `batch` rows of `width` values.
template <typename scalar_t>
__host__ __device__ inline int64_t exchange_ring_words(int64_t batch, int64_t width) {
  return 2 * batch * width * exchange_words<scalar_t>();
}
constexpr uint64_t kExchangeTimeoutNs = 20ull * 1000 * 1000 * 1000;

__device__ __forceinline__ uint64_t load_relaxed(const uint64_t* p) {
#if defined(FUSED_RNN_EMULATION)
  return *static_cast<const volatile uint64_t*>(p);
#else
  uint64_t v;
  asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
#endif
}
__device__ __forceinline__ void store_relaxed(uint64_t* p, uint64_t v) {
#if defined(FUSED_RNN_EMULATION)
  *static_cast<volatile uint64_t*>(p) = v;
#else
  asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
#endif
}

// Element `at` of a ring slot := v, tagged.
template <typename scalar_t>
__device__ __forceinline__ void exchange_put(uint64_t* at, scalar_t v, uint32_t tag) {
  constexpr int W = exchange_words<scalar_t>();
  uint32_t pieces[W] = {};
  memcpy(pieces, &v, sizeof(scalar_t));
#pragma unroll
  for (int w = 0; w < W; ++w) store_relaxed(at + w, static_cast<uint64_t>(tag) << 32 | pieces[w]);
}

// `word`, a load of *at, or the first later load of it that carries `tag`.
__device__ __forceinline__ uint64_t exchange_wait(const uint64_t* at, uint64_t word,
                                                  uint32_t tag) {
#if !defined(FUSED_RNN_EMULATION)
  uint32_t polls = 0;
  uint64_t start = 0;
#endif
  while (static_cast<uint32_t>(word >> 32) != tag) {
#if defined(FUSED_RNN_EMULATION)
    ::fused_rnn_emu::yield();  // let the writer run
#else
    if (++polls % 4096 == 0) {
      uint64_t now;
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
      if (start == 0) {
        start = now;
      } else if (now - start > kExchangeTimeoutNs) {
        __trap();
      }
    }
#endif
    word = load_relaxed(at);
  }
  return word;
}

// Step s's slot of a ring (null: no tagged exchange): rows of `width`
// values, written and awaited with step s's tag.
template <typename scalar_t>
struct ExchangeSlot {
  uint64_t* words;
  uint32_t tag;
  // Value `index` (row b, column col: b * width + col) := v, tagged
  // (nothing without a ring).
  __device__ __forceinline__ void put(int64_t index, scalar_t v) const {
    if (words) exchange_put(words + index * exchange_words<scalar_t>(), v, tag);
  }
};
template <typename scalar_t>
__device__ __forceinline__ ExchangeSlot<scalar_t> exchange_slot(uint64_t* ring, int64_t s,
                                                                int64_t batch, int64_t width) {
  return {ring ? ring + (s & 1) * batch * width * exchange_words<scalar_t>() : nullptr,
          static_cast<uint32_t>(s + 1)};
}

// ------------------------------------------------------------ cluster exchange
// The cluster exchange (compute capability 9.0, thread-block clusters):
// where all blocks of a direction form one cluster, each block puts the
// rows it computes in a step (forward h_t, backward the gradients the next
// product reads) straight into the shared memory of every block of the
// cluster, its own included (the window, Tiling: buffer s & 1 for step s),
// and the step ends at one cluster barrier (release, then acquire): no trip
// through L2 and no grid barrier, and the next product reads its input in
// place. Two buffers: while a block puts step s's rows into buffer s & 1,
// a slower peer may still be reading step s-1's from the other one; buffer
// s & 1 was last read during step s-1, before the barrier that ended it.
// The rows a step does not take from the previous one (the initial state:
// every row at step 0, those that start late in reverse packed input) are
// staged by each block into its own buffer before its product, as the
// other exchanges stage them. The window is zeroed and the cluster meets
// once before the first step, so that no block puts rows into a peer that
// has not started; every step that puts rows ends at a barrier, so that no
// block exits while a peer may still write to it.
#if defined(FUSED_RNN_EMULATION) || defined(_CG_HAS_CLUSTER_GROUP)
#define FR_CLUSTERS 1
#else
#define FR_CLUSTERS 0  // a device pass before 9.0: the plan never takes it (DeviceLimits::cluster)
#endif

// The kernels of the cluster exchange (kCluster) are compiled for float32
// and the half types: float64 is for gradcheck and accuracy, and the plan
// leaves it on the grid of all SMs.
inline bool has_cluster_kernels(at::ScalarType dtype) { return dtype != at::kDouble; }
template <typename scalar_t>
constexpr bool has_cluster_kernels() {
  return !std::is_same_v<scalar_t, double>;
}

// f(paired, cluster), each an std::integral_constant<bool, ...>, for the
// kernel variant of a launch: both directions of a layer in it or one
// (kPaired), the cluster exchange or not (kCluster); with_clusters false:
// no cluster variant exists (a cluster asked for is an error).
template <bool with_clusters, typename F>
void with_variant(bool paired, bool cluster, F&& f) {
  using yes = std::integral_constant<bool, true>;
  using no = std::integral_constant<bool, false>;
  if (cluster) {
    if constexpr (with_clusters) {
      return paired ? f(yes{}, yes{}) : f(no{}, yes{});
    }
    TORCH_CHECK(false, "fused_rnn: no cluster-exchange kernel for this dtype");
  }
  return paired ? f(yes{}, no{}) : f(no{}, no{});
}

// The staged type of a product's input: the math type on FMA units, the
// storage type on tensor cores (what the window holds).
template <int BT, typename scalar_t>
using staged_t = std::conditional_t<BT == kMmaTile, scalar_t, at::opmath_type<scalar_t>>;

__device__ __forceinline__ void cluster_sync() {
#if FR_CLUSTERS
  cooperative_groups::this_cluster().sync();
#else
  __trap();
#endif
}

// v into *local's place in the shared memory of blocks 0 .. ranks-1 of the
// cluster, starting from `first` (each block its own rank, so that the
// blocks' stores spread over their peers).
template <typename S>
__device__ __forceinline__ void cluster_put(S* local, int ranks, int first, S v) {
#if FR_CLUSTERS
  auto cluster = cooperative_groups::this_cluster();
  for (int i = 0; i < ranks; ++i) {
    const int rank = first + i < ranks ? first + i : first + i - ranks;
    *cluster.map_shared_rank(local, rank) = v;
  }
#else
  __trap();
#endif
}

// Buffer `buffer` (0 or 1) of a block's window, as the staged type.
template <typename S>
__device__ __forceinline__ S* window_buffer(unsigned char* shared, const Tiling& tl,
                                            int buffer) {
  return reinterpret_cast<S*>(shared + tl.tile_offset) +
         static_cast<int64_t>(buffer) * tl.window_rows * tl.tile_ld;
}

// Before the first step of the cluster exchange: both buffers of the
// block's window zeroed (columns past k and rows past the batch stay so),
// then every block of the cluster started and done zeroing.
template <typename S>
__device__ __forceinline__ void window_open(unsigned char* shared, const Tiling& tl) {
  S* window = window_buffer<S>(shared, tl, 0);
  const int64_t elements = 2 * static_cast<int64_t>(tl.window_rows) * tl.tile_ld;
  for (int64_t i = threadIdx.x; i < elements; i += kThreads) window[i] = S(0);
  cluster_sync();
}

// Where step s's rows go: the tagged ring's slot of step s, and (the
// cluster exchange) buffer s & 1 of every block's window; either may be
// absent (a grid barrier per step, or one launch per step: the rows are
// read from the outputs).
template <typename scalar_t, typename S, bool kCluster>
struct StepExchange {
  ExchangeSlot<scalar_t> slot;  // (not with kCluster)
  int64_t width;  // values per row
  S* window;      // this block's buffer (kCluster)
  int ld, ranks, rank;
  // Row b, column col := v.
  __device__ __forceinline__ void put(int64_t b, int col, scalar_t v) const {
    if constexpr (kCluster) {
      cluster_put(window + b * ld + col, ranks, rank, static_cast<S>(v));
    } else {
      slot.put(b * width + col, v);
    }
  }
};
template <bool kCluster, typename S, typename Params>
__device__ __forceinline__ StepExchange<typename Params::scalar_type, S, kCluster> step_exchange(
    const Params& p, int64_t s, int64_t width, unsigned char* shared, const Tiling& tl,
    int block) {
  using scalar_t = typename Params::scalar_type;
  if constexpr (kCluster) {
    return {{nullptr, 0}, width, window_buffer<S>(shared, tl, static_cast<int>(s & 1)),
            tl.tile_ld, p.cluster, block};
  } else {
    return {exchange_slot<scalar_t>(p.exchange, s, p.batch, width), width, nullptr, 0, 0, 0};
  }
}
// The window buffer step s's rows are in (the cluster exchange), else -1.
template <bool kCluster>
__device__ __forceinline__ int window_of(int64_t s) {
  return kCluster ? static_cast<int>(s & 1) : -1;
}

// 16 bytes of a row in global memory (V = 16 / sizeof(scalar_t) elements),
// from L2 as load_l2 reads one element: one load instruction.
struct alignas(16) Vec16 {
  uint32_t word[4];
};
__device__ __forceinline__ Vec16 load_l2_vec(const void* p) {
  Vec16 v;
#if defined(FUSED_RNN_EMULATION)
  memcpy(&v, p, sizeof v);
#else
  const uint4 u = __ldcg(reinterpret_cast<const uint4*>(p));
  v.word[0] = u.x;
  v.word[1] = u.y;
  v.word[2] = u.z;
  v.word[3] = u.w;
#endif
  return v;
}

// The plain (no ring) staging of stage_rows, 16 bytes per load: where the
// rows' columns are whole 16-byte pieces (k, width, c0 and the row stride
// multiples of V = 16 / sizeof(scalar_t), the rows 16-byte aligned). A
// thread keeps up to 4 loads in flight (2 where kTight, as many registers
// as the element loads of stage_rows): 2x (float32) to 4x (half types)
// the bytes in flight of element loads, and a step's staging in fewer
// round trips to L2 (at B=64, H=1024 in bfloat16 a block stages 128 KiB
// per step: 16 round trips of 8 KiB with element loads, 4 of 32 KiB).
template <bool kTight, typename S, typename scalar_t>
__device__ __forceinline__ void stage_rows_vec(S* __restrict__ tile, int ld,
                                               const InputRows<scalar_t>& in, int64_t b0,
                                               int nb, int c0, int width, int k, int pass) {
  constexpr int V = 16 / sizeof(scalar_t);
  constexpr int kLoads = kTight ? 2 : 4;
  const int vwidth = width / V, total = pass * vwidth;
  // the staged type is the storage type (tensor cores) and its rows whole
  // pieces too: one 16-byte store
  const bool whole = sizeof(S) == sizeof(scalar_t) && ld % V == 0;
  for (int base = threadIdx.x; base < total; base += kThreads * kLoads) {
    Vec16 v[kLoads];
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      const int i = base + u * kThreads;
      const int pb = i / vwidth, col = (i - pb * vwidth) * V;
      const scalar_t* src = i < total && pb < nb && c0 + col < k ? in.row(b0 + pb) : nullptr;
      v[u] = src ? load_l2_vec(src + c0 + col) : Vec16{};
    }
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      const int i = base + u * kThreads;
      const int pb = i / vwidth, col = (i - pb * vwidth) * V;
      if (i >= total) continue;
      S* dst = tile + pb * ld + col;
      if (whole) {
        *reinterpret_cast<Vec16*>(dst) = v[u];
      } else {
        scalar_t e[V];
        memcpy(e, &v[u], sizeof(Vec16));
#pragma unroll
        for (int t = 0; t < V; ++t) dst[t] = static_cast<S>(e[t]);
      }
    }
  }
}

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// Stages columns c0 .. c0+width-1 of input rows b0 .. b0+pass-1 into
// tile (pass rows, `ld` apart) as type S: zeros for rows past nb, rows
// without a source and columns past k. Rows of whole 16-byte pieces (not
// from the tagged ring, not float64) take stage_rows_vec. Else each thread
// first issues up to 8 loads (2 for double, whose batch-tile-8 kernels are
// at the register limit), then stores them: the loads (from L2, written by
// other blocks during the previous step) are in flight together instead of
// one after another, which at B=64, H=256 was 32 round trips to L2 per
// thread and step. Tagged
// words take two registers each while in flight: kTight (the FMA kernels
// with the wide batch tile, whose sums fill the registers, and the TF32
// tensor-core kernels, where ptxas spilled 8 bytes in the GRU forward
// without it) halves the loads issued at once from the ring.
template <bool kTight, typename S, typename scalar_t>
__device__ __forceinline__ void stage_rows(S* __restrict__ tile, int ld,
                                           const InputRows<scalar_t>& in, int64_t b0, int nb,
                                           int c0, int width, int k, int pass) {
  constexpr int kStageLoads = sizeof(S) > 4 ? 2 : 8;
  const int total = pass * width;
  if (in.ring == nullptr) {
    // float64 (for accuracy, not speed) keeps element loads: its wide-tile
    // kernels are at the register limit, and a second path spilled more
    if constexpr (sizeof(scalar_t) <= 4) {
      constexpr int V = 16 / sizeof(scalar_t);
      if (k % V == 0 && width % V == 0 && c0 % V == 0 && in.stride % V == 0 &&
          aligned16(in.in) && aligned16(in.alt)) {
        stage_rows_vec<kTight>(tile, ld, in, b0, nb, c0, width, k, pass);
        return;
      }
    }
    for (int base = threadIdx.x; base < total; base += kThreads * kStageLoads) {
      S v[kStageLoads];
#pragma unroll
      for (int u = 0; u < kStageLoads; ++u) {
        const int i = base + u * kThreads;
        const int pb = i / width, col = i - pb * width;
        const scalar_t* src = i < total && pb < nb && c0 + col < k ? in.row(b0 + pb) : nullptr;
        v[u] = src ? static_cast<S>(load_l2(src + c0 + col)) : S(0);
      }
#pragma unroll
      for (int u = 0; u < kStageLoads; ++u) {
        const int i = base + u * kThreads;
        const int pb = i / width, col = i - pb * width;
        if (i < total) tile[pb * ld + col] = v[u];
      }
    }
    return;
  }
  // The tagged exchange: rows below carried from the ring, each word
  // waited for once the loads of the round are in flight; the others from
  // alt (as scalar_t bits in the low word, tagged as awaited) or zero.
  constexpr int W = exchange_words<scalar_t>();
  constexpr int kRingLoads = kTight ? kStageLoads / 2 : kStageLoads;
  for (int base = threadIdx.x; base < total; base += kThreads * kRingLoads) {
    uint64_t raw[kRingLoads][W];
    unsigned waiting = 0;  // bit u: element u comes from the ring
#pragma unroll
    for (int u = 0; u < kRingLoads; ++u) {
      const int i = base + u * kThreads;
      const int pb = i / width, col = i - pb * width;
      const int64_t b = b0 + pb;
      const bool valid = i < total && pb < nb && c0 + col < k;
#pragma unroll
      for (int w = 0; w < W; ++w) raw[u][w] = static_cast<uint64_t>(in.tag) << 32;
      if (valid && b < in.carried) {
        const uint64_t* at = in.ring + (b * in.stride + c0 + col) * W;
#pragma unroll
        for (int w = 0; w < W; ++w) raw[u][w] = load_relaxed(at + w);
        waiting |= 1u << u;
      } else if (valid && in.alt) {
        const scalar_t x = load_l2(in.alt + b * in.stride + c0 + col);
        uint32_t pieces[W] = {};
        memcpy(pieces, &x, sizeof(scalar_t));
#pragma unroll
        for (int w = 0; w < W; ++w) raw[u][w] |= pieces[w];
      }
    }
#pragma unroll
    for (int u = 0; u < kRingLoads; ++u) {
      const int i = base + u * kThreads;
      const int pb = i / width, col = i - pb * width;
      if (waiting & (1u << u)) {
        const uint64_t* at = in.ring + ((b0 + pb) * in.stride + c0 + col) * W;
#pragma unroll
        for (int w = 0; w < W; ++w) raw[u][w] = exchange_wait(at + w, raw[u][w], in.tag);
      }
      if (i < total) {
        uint32_t pieces[W];
#pragma unroll
        for (int w = 0; w < W; ++w) pieces[w] = static_cast<uint32_t>(raw[u][w]);
        scalar_t x;
        memcpy(&x, pieces, sizeof(scalar_t));
        tile[pb * ld + col] = static_cast<S>(x);
      }
    }
  }
}

// The cluster exchange, at the start of a step, before its product: rows
// `in.carried` .. rows-1 of the window buffer in.window, which the previous
// step's blocks did not put there (the initial state from alt, or zeros),
// all kpad columns (zeros past k). Outside the product, so that it takes no
// registers beside the product's sums; block_product's first __syncthreads
// orders it before the reads. The rows past `rows` hold zeros or an earlier
// step's values: the product of a row never reaches another row's sums,
// and a pass's rows past its nb are not used.
template <int BT, typename scalar_t>
__device__ void window_stage_rest(unsigned char* shared, const Tiling& tl,
                                  const InputRows<scalar_t>& in, int64_t rows, int k) {
  using S = staged_t<BT, scalar_t>;
  if (in.carried >= rows) return;
  S* window = window_buffer<S>(shared, tl, in.window);
  const int64_t total = (rows - in.carried) * tl.kpad;
  for (int64_t i = threadIdx.x; i < total; i += kThreads) {
    const int64_t b = in.carried + i / tl.kpad;
    const int col = static_cast<int>(i % tl.kpad);
    const scalar_t* src = col < k ? in.row(b) : nullptr;
    window[b * tl.tile_ld + col] = src ? static_cast<S>(load_l2(src + col)) : S(0);
  }
}

// partial[(split * rows_pad + r) * pass + pb] = the sum over this split's
// columns of w[r][col] * in.row(b0 + pb)[col], for r < rows and pb < nb
// (input rows past nb count as zeros; tiles wholly past nb are skipped);
// see product(). Call from every thread of the block; it synchronises the
// block before it stages the input and before it returns.
//   w       (rows_pad, ldw) in shared or global memory (Tiling)
//   in      rows of k columns in global memory, written by other blocks
//   tile    (pass, tile_ld), partial (splits, rows_pad, pass): shared (Tiling);
//           kWindow: the pass's rows of the window, in place (nothing staged)
//
// FMA version (float, double, and half types at BT = 1): warps take groups
// of kRowsPerWarp rows, a batch tile and interleaved columns; each lane
// keeps kRowsPerWarp x BT sums in registers, reduced across the warp at the
// end.
template <int BT, bool kWindow, typename scalar_t>
__device__ void block_matvec(const scalar_t* __restrict__ w, const Tiling& tl, int k,
                             const InputRows<scalar_t>& in, int64_t b0, int nb,
                             at::opmath_type<scalar_t>* __restrict__ tile,
                             at::opmath_type<scalar_t>* __restrict__ partial) {
  using T = at::opmath_type<scalar_t>;
  const int rows = tl.rows, chunk = tl.chunk, splits = tl.splits, groups = tl.groups;
  const int pass = tl.pass;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // A warp's task: a row group, a batch tile and a column split. More row
  // groups than warps (more than kMaxRows rows: only with kWindow, the
  // cluster exchange's blocks, whose window holds the whole rows) are taken
  // in rounds of kWarps tasks, each round the whole product of its rows;
  // otherwise one round.
  const int tasks = groups * tl.bsplits * splits;
  auto product_round = [&](int task) {
    const int r0 = (task % groups) * kRowsPerWarp;
    const int tile0 = ((task / groups) % tl.bsplits) * BT;  // this warp's first pass row
    const int split = task / (groups * tl.bsplits);
    const bool active = task < tasks && tile0 < nb;

    T acc[kRowsPerWarp][BT];
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i)
#pragma unroll
      for (int bb = 0; bb < BT; ++bb) acc[i][bb] = T(0);

    for (int c0 = 0; c0 < k; c0 += chunk) {
      const int width = k - c0 < chunk ? k - c0 : chunk;
      __syncthreads();  // the tile's previous readers are done
      // (a window holds its rows already: window_stage_rest)
      if constexpr (!kWindow) {
        stage_rows<(BT > 1)>(tile, tl.tile_ld, in, b0, nb, c0, width, k, pass);
      }
      __syncthreads();
      if (active) {
        for (int col = split * 32 + lane; col < width; col += splits * 32) {
          T x[BT];
#pragma unroll
          for (int bb = 0; bb < BT; ++bb) x[bb] = tile[(tile0 + bb) * tl.tile_ld + col];
#pragma unroll
          for (int i = 0; i < kRowsPerWarp; ++i) {
            const int r = r0 + i;
            const T wv = r < rows ? static_cast<T>(w[r * tl.ldw + c0 + col]) : T(0);
#pragma unroll
            for (int bb = 0; bb < BT; ++bb) acc[i][bb] = mul_add(wv, x[bb], acc[i][bb]);
          }
        }
      }
    }
    if (active) {
      constexpr int N = kRowsPerWarp * BT;
      constexpr int stride = 32 / N;
      T v[N];
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i)
#pragma unroll
        for (int bb = 0; bb < BT; ++bb) v[i * BT + bb] = acc[i][bb];
      warp_sums(v, lane);
      const int i = lane / stride / BT, bb = lane / stride % BT;
      if (lane % stride == 0 && r0 + i < rows) {
        partial[(split * tl.rows_pad + r0 + i) * pass + tile0 + bb] = v[0];
      }
    }
  };
  if constexpr (kWindow) {
    for (int task = warp; task < (tasks + kWarps - 1) / kWarps * kWarps; task += kWarps) {
      product_round(task);
    }
  } else {
    product_round(warp);  // (tasks <= kWarps: max_rows)
  }
  __syncthreads();
}

// Tensor-core version (BT = kMmaTile = 16; half types, and float as TF32):
// warps take 16-row groups, a batch tile and interleaved 16-column steps
// (two wmma products of depth 8 each in TF32); wmma 16x16x16 (TF32:
// 16x16x8) with the weights as A (row major), the staged rows as B (column
// major: pass row pb is column pb) and an fp32 accumulator stored to
// partial. Rows and columns past rows and k are zeros in w and in the
// staged rows.
template <typename Mma, typename Fragment>
__device__ __forceinline__ void round_operand(Fragment& f) {
#if FR_AMPERE_MMA
  if constexpr (Mma::tf32) {
#pragma unroll
    for (int i = 0; i < f.num_elements; ++i) f.x[i] = nvcuda::wmma::__float_to_tf32(f.x[i]);
  }
#endif
}

template <bool kWindow, typename scalar_t>
__device__ void block_matvec_mma(const scalar_t* __restrict__ w, const Tiling& tl, int k,
                                 const InputRows<scalar_t>& in, int64_t b0, int nb,
                                 scalar_t* __restrict__ tile, float* __restrict__ partial) {
  namespace wmma = nvcuda::wmma;
  using Mma = MmaType<scalar_t>;
  using mma_t = typename Mma::type;
  using frag_t = typename Mma::fragment;
  constexpr int BT = kMmaTile, K = Mma::k;
  const int chunk = tl.chunk, splits = tl.splits, groups = tl.groups, pass = tl.pass;
  const int warp = threadIdx.x / 32;
  const int m0 = (warp % groups) * 16;
  const int tile0 = ((warp / groups) % tl.bsplits) * BT;
  const int split = warp / (groups * tl.bsplits);
  const bool active = warp < groups * tl.bsplits * splits && tile0 < nb;

  wmma::fragment<wmma::accumulator, 16, 16, K, float> acc;
  wmma::fill_fragment(acc, 0.0f);
  for (int c0 = 0; c0 < tl.kpad; c0 += chunk) {
    const int width = tl.kpad - c0 < chunk ? tl.kpad - c0 : chunk;  // a multiple of 16
    __syncthreads();  // the tile's previous readers are done
    if constexpr (!kWindow) {
      stage_rows<Mma::tf32>(tile, tl.tile_ld, in, b0, nb, c0, width, k, pass);
    }
    __syncthreads();
    if (active) {
      for (int kt = split; kt < width / 16; kt += splits) {
#pragma unroll
        for (int kk = 0; kk < 16; kk += K) {
          wmma::fragment<wmma::matrix_a, 16, 16, K, frag_t, wmma::row_major> a;
          wmma::fragment<wmma::matrix_b, 16, 16, K, frag_t, wmma::col_major> b;
          wmma::load_matrix_sync(
              a, reinterpret_cast<const mma_t*>(w) + m0 * tl.ldw + c0 + kt * 16 + kk, tl.ldw);
          wmma::load_matrix_sync(
              b, reinterpret_cast<const mma_t*>(tile) + tile0 * tl.tile_ld + kt * 16 + kk,
              tl.tile_ld);
          round_operand<Mma>(a);
          round_operand<Mma>(b);
          wmma::mma_sync(acc, a, b, acc);
        }
      }
    }
  }
  if (active) {
    wmma::store_matrix_sync(partial + (split * tl.rows_pad + m0) * pass + tile0, acc, pass,
                            wmma::mem_row_major);
  }
  __syncthreads();
}

// The product of the block's weight rows and the staged input rows: the
// FMA or the tensor-core version by batch tile. `shared` as Tiling lays it out.
template <int BT, bool kWindow, typename scalar_t>
__device__ __forceinline__ void block_product(const scalar_t* w, const Tiling& tl, int k,
                                              const InputRows<scalar_t>& in, int64_t b0,
                                              int nb, unsigned char* shared) {
  using T = at::opmath_type<scalar_t>;
  using S = staged_t<BT, scalar_t>;
  T* partial = reinterpret_cast<T*>(shared + tl.partial_offset);
  // the staged rows: the tile, or the pass's rows of the window (the cluster exchange)
  S* tile = kWindow ? window_buffer<S>(shared, tl, in.window) + b0 * tl.tile_ld
                   : reinterpret_cast<S*>(shared + tl.tile_offset);
  if constexpr (BT == kMmaTile) {
    if constexpr (mma_compiled<scalar_t>()) {
      block_matvec_mma<kWindow>(w, tl, k, in, b0, nb, tile, partial);
    } else {
      __trap();  // never launched: see mma_arch
    }
  } else {
    block_matvec<BT, kWindow>(w, tl, k, in, b0, nb, tile, partial);
  }
}

// Row r, pass row pb of the last block_product.
template <typename T>
__device__ __forceinline__ T product(const T* partial, const Tiling& tl, int r, int pb) {
  T sum = T(0);
  for (int s = 0; s < tl.splits; ++s) sum += partial[(s * tl.rows_pad + r) * tl.pass + pb];
  return sum;
}

// Whether a step's pointwise inputs are loaded before the block product
// (their latency hidden behind it) or after: after only in the float64
// kernels with the wide batch tile, whose 4 x 8 double sums leave no
// registers to hold them (ptxas: spills otherwise; float64 is for accuracy,
// not speed).
template <int BT, typename T>
__host__ __device__ constexpr bool preload() {
  return !(sizeof(T) > 4 && BT > 1);
}

// ------------------------------------------------------------ weight slices
// Block `block`'s forward slice into w (rows_pad x ldw): row q*J + jj holds
// W_hh row q*H + j0 + jj, j0 = block*J (zeros past H, past the rows and
// past the columns). Call from every thread of the block.
template <typename scalar_t>
__device__ void load_forward_slice(scalar_t* __restrict__ w, const Tiling& tl,
                                   const scalar_t* __restrict__ w_hh, int H, int J, int block) {
  const int j0 = block * J;
  for (int i = threadIdx.x; i < tl.rows_pad * tl.ldw; i += kThreads) {
    const int r = i / tl.ldw, col = i - r * tl.ldw;
    const int q = r / J, j = j0 + (r - q * J);
    w[i] = r < tl.rows && j < H && col < H ? w_hh[static_cast<int64_t>(q * H + j) * H + col]
                                           : scalar_t(0);
  }
}

// Block `block`'s backward slice (of W_hh^T): row jj holds W_hh column
// j0 + jj over the k = G*H rows of W_hh (zeros past H, past the rows and
// past the columns). Neighbouring threads read neighbouring columns of one
// W_hh row.
template <typename scalar_t>
__device__ void load_backward_slice(scalar_t* __restrict__ w, const Tiling& tl,
                                    const scalar_t* __restrict__ w_hh, int H, int J, int k,
                                    int block) {
  const int j0 = block * J;
  for (int i = threadIdx.x; i < tl.rows_pad * tl.ldw; i += kThreads) {
    const int col = i / tl.rows_pad, jj = i - col * tl.rows_pad, j = j0 + jj;
    w[jj * tl.ldw + col] =
        jj < tl.rows && j < H && col < k ? w_hh[static_cast<int64_t>(col) * H + j] : scalar_t(0);
  }
}

// The elements of one block's slice in the stepwise layout.
inline __host__ __device__ int64_t slice_elements(const Tiling& tl) {
  return static_cast<int64_t>(tl.rows_pad) * tl.ldw;
}

// For the stepwise launches: every block's slice, laid out as a persistent
// block holds it in shared memory, one after another in global memory
// (slices: blocks x slice_elements), written once per call. Launched with
// the kernels' grid and block size.
template <int G, bool kBackward, int BT, typename scalar_t>
__global__ void __launch_bounds__(kThreads) pack_slices_kernel(const scalar_t* __restrict__ w_hh,
                                                               scalar_t* __restrict__ slices,
                                                               int H, int J, int64_t batch) {
  const int rows = kBackward ? J : G * J, k = kBackward ? G * H : H;
  const Tiling tl = make_tiling(rows, k, BT, batch, J, sizeof(scalar_t),
                                sizeof(at::opmath_type<scalar_t>), false);
  scalar_t* w = slices + blockIdx.x * slice_elements(tl);
  if constexpr (kBackward) {
    load_backward_slice(w, tl, w_hh, H, J, k, blockIdx.x);
  } else {
    load_forward_slice(w, tl, w_hh, H, J, blockIdx.x);
  }
}

// The weight slice a block multiplies by: its stepwise slice in global
// memory, or (persistent) the block's copy in shared memory, loaded here.
// block_product synchronises the block before it reads w.
template <bool kBackward, typename scalar_t>
__device__ __forceinline__ const scalar_t* block_slice(const scalar_t* slices, const Tiling& tl,
                                                       unsigned char* shared,
                                                       const scalar_t* w_hh, int H, int J,
                                                       int k, int block) {
  if (slices) return slices + block * slice_elements(tl);
  scalar_t* w = reinterpret_cast<scalar_t*>(shared);
  if constexpr (kBackward) {
    load_backward_slice(w, tl, w_hh, H, J, k, block);
  } else {
    load_forward_slice(w, tl, w_hh, H, J, block);
  }
  return w;
}

// The rows of processed step s in a launch: those the stepwise launch was
// given, or (one cooperative launch for every step) from the step table of
// packed input or the dense rule.
template <typename Params>
__device__ __forceinline__ StepRows rows_of_step(const Params& p, int64_t s) {
  if (!p.run.cooperative) return p.step;
  if (p.step_table) {
    return packed_step_rows(p.step_table, p.step_table + p.steps, p.steps, s, p.reverse);
  }
  return dense_step_rows(s, p.steps, p.batch, p.reverse);
}

// ------------------------------------------------------------ forward
// kPaired: both directions of a layer in one launch (Directions). kCluster:
// the cluster exchange (each direction's blocks one thread-block cluster,
// p.cluster of them; launch_cluster), a flag of the template so that the
// kernels without it carry none of its registers, and those with it none
// of the tagged ring's (compiled for float32 and the half types:
// has_cluster_kernels).
template <PersistentCell kCell, int BT, typename scalar_t, bool kPaired, bool kCluster>
__global__ void __launch_bounds__(kThreads, 1)
    forward_kernel(const FR_GRID_CONSTANT Directions<ForwardParams<scalar_t>> launch) {
  using T = at::opmath_type<scalar_t>;
  constexpr int G = gate_count<kCell>();
  FR_DYNAMIC_SHARED(shared);
  // One direction: its parameters at a constant place (constant-bank
  // operands, as a by-value parameter); paired: indexed by the block's
  // direction (loads into registers: a separate instantiation, so that
  // one-direction launches do not pay for it in registers).
  const int direction = kPaired ? launch.direction_of_block() : 0;
  const ForwardParams<scalar_t>& p = launch.dir[direction];
  const int block = launch.block_in_direction(direction);
  const int H = p.hidden, J = p.units, rows = G * J;
  const int j0 = block * J;
  const int64_t B = p.batch;
  using S = staged_t<BT, scalar_t>;
  const Tiling tl = make_tiling(rows, H, BT, B, J, sizeof(scalar_t), sizeof(T),
                                p.slices == nullptr, p.chunk, kCluster);
  const scalar_t* w = block_slice<false>(p.slices, tl, shared, p.w_hh, H, J, H, block);
  const T* partial = reinterpret_cast<const T*>(shared + tl.partial_offset);
  if constexpr (kCluster) window_open<S>(shared, tl);

  for (int64_t s = p.run.begin; s < p.run.end; ++s) {
    const StepRows sr = rows_of_step(p, s);
    // h_{t-1}: the previous step's output rows, the initial state past them
    const auto prev_slot = exchange_slot<scalar_t>(p.exchange, s - 1, B, H);
    const InputRows<scalar_t> h_prev{p.out + sr.prev_row0 * H, p.hx, sr.carried, H,
                                     prev_slot.words, prev_slot.tag, window_of<kCluster>(s - 1)};
    if constexpr (kCluster) window_stage_rest<BT>(shared, tl, h_prev, sr.rows, H);
    for (int64_t b0 = 0; b0 < sr.rows; b0 += tl.pass) {
      const int nb = static_cast<int>(sr.rows - b0 < tl.pass ? sr.rows - b0 : tl.pass);
      // One (pass row, unit) per thread: nb * J <= pass * J <= kThreads (batch_splits).
      const int bb = threadIdx.x / J, jj = threadIdx.x - bb * J, j = j0 + jj;
      const bool mine = bb < nb && j < H;
      const int64_t b = b0 + bb;
      const bool starts = b >= sr.carried;  // from the initial state
      const bool ends = b >= sr.next_rows;  // this sequence's last step: hy, cy
      const int64_t row = sr.row0 + b;  // of the (N, *) sequence tensors
      const int64_t unit = b * H + j;   // of the (B, H) states
      scalar_t* x = p.xw + row * G * H + j;
      // This thread's inputs besides the product: x_t W_ih^T plus the
      // input-side bias per gate; GRU's recurrent-side bias and h_prev;
      // LSTM's c_prev. Loaded before the product so that their latency
      // overlaps it (kPreload), except where they would not fit in
      // registers beside its sums.
      T in[G], in_h[G], prev = T(0);
      auto load = [&] {
#pragma unroll
        for (int q = 0; q < G; ++q) in[q] = in_h[q] = T(0);
        if (!mine) return;
#pragma unroll
        for (int q = 0; q < G; ++q) {
          in[q] = static_cast<T>(x[q * H]);
          if (p.bias) in[q] += static_cast<T>(p.bias[q * H + j]);
          if (kCell == PersistentCell::kGru && p.bias_hh) in_h[q] = static_cast<T>(p.bias_hh[q * H + j]);
        }
        if constexpr (kCell == PersistentCell::kLstm) {
          prev = starts ? static_cast<T>(p.cx[unit]) : p.state[unit];
        } else if constexpr (kCell == PersistentCell::kGru) {
          prev = static_cast<T>(load_l2(h_prev.row(b) + j));
        }
      };
      if constexpr (preload<BT, T>()) load();
      block_product<BT, kCluster>(w, tl, H, h_prev, b0, nb, shared);
      if constexpr (!preload<BT, T>()) load();
      if (!mine) continue;
      // This step's rows for the next, when the blocks exchange them
      // (tagged or through the cluster's windows); made after the product,
      // so that it holds no registers during it.
      const auto slot = step_exchange<kCluster, S>(p, s, H, shared, tl, block);
      // h_t of this row and unit: the output and the exchange.
      auto emit_h = [&](T h) {
        p.out[row * H + j] = static_cast<scalar_t>(h);
        slot.put(b, j, static_cast<scalar_t>(h));
      };
      if constexpr (kCell == PersistentCell::kLstm) {
        T g[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) g[q] = in[q] + product(partial, tl, q * J + jj, bb);
        T c, h;
        lstm_forward_point<T>(g[0], g[1], g[2], g[3], prev, c, h);
        p.state[unit] = c;
        emit_h(h);
        if (p.keep_gates) {
#pragma unroll
          for (int q = 0; q < 4; ++q) x[q * H] = static_cast<scalar_t>(g[q]);
        }
        if (p.cells) p.cells[row * H + j] = static_cast<scalar_t>(c);
        if (ends) {
          p.hy[unit] = static_cast<scalar_t>(h);
          p.cy[unit] = static_cast<scalar_t>(c);
        }
      } else if constexpr (kCell == PersistentCell::kGru) {
        T r = in[0], z = in[1], n = in[2];
        const T hr = in_h[0] + product(partial, tl, jj, bb);
        const T hz = in_h[1] + product(partial, tl, J + jj, bb);
        const T hn = in_h[2] + product(partial, tl, 2 * J + jj, bb);
        T h;
        gru_forward_point<T>(r, z, n, hr, hz, hn, prev, h);
        emit_h(h);
        if (p.keep_gates) {
          x[0] = static_cast<scalar_t>(r);
          x[H] = static_cast<scalar_t>(z);
          x[2 * H] = static_cast<scalar_t>(n);
        }
        if (p.hn) p.hn[row * H + j] = static_cast<scalar_t>(hn);
        if (ends) p.hy[unit] = static_cast<scalar_t>(h);
      } else {
        const T h = rnn_forward_point<kCell == PersistentCell::kRnnRelu, T>(
            in[0] + product(partial, tl, jj, bb));
        emit_h(h);
        if (ends) p.hy[unit] = static_cast<scalar_t>(h);
      }
    }
    if constexpr (kCluster) {
      cluster_sync();
    } else if (p.run.cooperative && !p.exchange) {
      cooperative_groups::this_grid().sync();
    }
  }
}

// ------------------------------------------------------------ backward
// Processed steps s = T-1 .. 0 (step s is time t = s, or T-1-s in reverse),
// then s = -1 for grad_hx. Step s needs the recurrent gradient
// dh_rec = (gate gradients of step s+1) @ W_hh, which block_matvec forms
// from the slice of W_hh^T. kPaired and kCluster as forward_kernel's.
template <PersistentCell kCell, int BT, typename scalar_t, bool kPaired, bool kCluster>
__global__ void __launch_bounds__(kThreads, 1)
    backward_kernel(const FR_GRID_CONSTANT Directions<BackwardParams<scalar_t>> launch) {
  using T = at::opmath_type<scalar_t>;
  constexpr int G = gate_count<kCell>();
  FR_DYNAMIC_SHARED(shared);
  // One direction: its parameters at a constant place (constant-bank
  // operands, as a by-value parameter); paired: indexed by the block's
  // direction (loads into registers: a separate instantiation, so that
  // one-direction launches do not pay for it in registers).
  const int direction = kPaired ? launch.direction_of_block() : 0;
  const BackwardParams<scalar_t>& p = launch.dir[direction];
  const int block = launch.block_in_direction(direction);
  const int H = p.hidden, J = p.units, rows = J, k = G * H;
  const int j0 = block * J;
  const int64_t B = p.batch;
  using S = staged_t<BT, scalar_t>;
  const Tiling tl = make_tiling(rows, k, BT, B, J, sizeof(scalar_t), sizeof(T),
                                p.slices == nullptr, p.chunk, kCluster);
  // (step T-1 does not read the slice)
  const scalar_t* w = block_slice<true>(p.slices, tl, shared, p.w_hh, H, J, k, block);
  const T* partial = reinterpret_cast<const T*>(shared + tl.partial_offset);
  if constexpr (kCluster) window_open<S>(shared, tl);

  // The gradients the next matvec reads: LSTM and RNN dgates, GRU dgates_h.
  const scalar_t* recurrent = kCell == PersistentCell::kGru ? p.dgates_h : p.dgates;

  for (int64_t s = p.run.begin; s >= p.run.end; --s) {
    const StepRows sr = rows_of_step(p, s);
    const bool has_next = sr.next_rows > 0;
    // dh_rec = (the gradients of step s+1) @ W_hh, zero past that step's rows
    const auto next_slot = exchange_slot<scalar_t>(p.exchange, s + 1, B, k);
    const InputRows<scalar_t> next{recurrent + sr.next_row0 * k, nullptr, sr.next_rows, k,
                                   next_slot.words, next_slot.tag, window_of<kCluster>(s + 1)};
    // The rows of step s, and those of step s+1 past them: sequences that
    // start at step s+1 (every row at s = -1; some at other steps in reverse
    // over packed input), whose dh_rec is the gradient of the initial state.
    const int64_t span = sr.rows > sr.next_rows ? sr.rows : sr.next_rows;
    if constexpr (kCluster) {
      if (has_next) window_stage_rest<BT>(shared, tl, next, span, k);
    }
    for (int64_t b0 = 0; b0 < span; b0 += tl.pass) {
      const int nb = static_cast<int>(span - b0 < tl.pass ? span - b0 : tl.pass);
      // One (pass row, unit) per thread: nb * J <= pass * J <= kThreads (batch_splits).
      const int bb = threadIdx.x / J, jj = threadIdx.x - bb * J, j = j0 + jj;
      const bool mine = bb < nb && j < H;
      const int64_t b = b0 + bb;
      const bool in_step = b < sr.rows;
      const bool ends = b >= sr.next_rows;  // its last step: grad_hy and grad_cy enter
      const bool starts = b >= sr.carried;  // its first step: from hx, cx; grad_cx
      const int64_t row = sr.row0 + b;
      const int64_t prev_row = sr.prev_row0 + b;
      const int64_t unit = b * H + j;
      // This thread's inputs besides dh_rec: dh (the output's gradient,
      // plus grad_hy or GRU's carried z * dh), what the forward saved,
      // LSTM's dc. Loaded before the product so that their latency overlaps
      // it (kPreload), except where they would not fit in registers beside
      // its sums.
      T dh = T(0), dc = T(0), prev = T(0), saved = T(0), g[G];
      auto load = [&] {
#pragma unroll
        for (int q = 0; q < G; ++q) g[q] = T(0);
        if (!(mine && in_step)) return;
        dh = static_cast<T>(p.grad_out[row * H + j]);
        if (ends) {
          dh += static_cast<T>(p.grad_hy[unit]);
        } else if constexpr (kCell == PersistentCell::kGru) {
          dh += p.carry[unit];
        }
        if constexpr (kCell == PersistentCell::kLstm) {
          dc = ends ? static_cast<T>(p.grad_cy[unit]) : p.carry[unit];
          prev = starts ? static_cast<T>(p.cx[unit]) : static_cast<T>(p.cells[prev_row * H + j]);
          saved = static_cast<T>(p.cells[row * H + j]);
        } else if constexpr (kCell == PersistentCell::kGru) {
          prev = starts ? static_cast<T>(p.hx[unit]) : static_cast<T>(p.out[prev_row * H + j]);
          saved = static_cast<T>(p.hn[row * H + j]);
        } else {
          saved = static_cast<T>(p.out[row * H + j]);
        }
        if constexpr (kCell != PersistentCell::kRnnTanh && kCell != PersistentCell::kRnnRelu) {
#pragma unroll
          for (int q = 0; q < G; ++q) g[q] = static_cast<T>(p.gates[row * G * H + q * H + j]);
        }
      };
      if constexpr (preload<BT, T>()) load();
      if (has_next) block_product<BT, kCluster>(w, tl, k, next, b0, nb, shared);
      if constexpr (!preload<BT, T>()) load();
      if (!mine) continue;
      const T dh_rec = has_next ? product(partial, tl, jj, bb) : T(0);
      if (!in_step) {  // b < next_rows: a sequence that starts at step s+1
        T grad = dh_rec;
        if constexpr (kCell == PersistentCell::kGru) grad += p.carry[unit];
        p.grad_hx[unit] = static_cast<scalar_t>(grad);
        continue;
      }
      dh += dh_rec;
      // This step's gradients for the next product, when the blocks
      // exchange them (tagged or through the cluster's windows); made after
      // the product, so that it holds no registers during it.
      const auto slot = step_exchange<kCluster, S>(p, s, k, shared, tl, block);
      if constexpr (kCell == PersistentCell::kLstm) {
        T d[4], dc_prev;
        lstm_backward_point<T>(g[0], g[1], g[2], g[3], saved, prev, dh, dc, d[0], d[1], d[2],
                               d[3], dc_prev);
        scalar_t* dg = p.dgates + row * 4 * H + j;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const scalar_t v = static_cast<scalar_t>(d[q]);
          dg[q * H] = v;
          slot.put(b, q * H + j, v);
        }
        p.carry[unit] = dc_prev;
        if (starts) p.grad_cx[unit] = static_cast<scalar_t>(dc_prev);
      } else if constexpr (kCell == PersistentCell::kGru) {
        T dxr, dxz, dxn, dhn, dh_direct;
        gru_backward_point<T>(g[0], g[1], g[2], saved, prev, dh, dxr, dxz, dxn, dhn, dh_direct);
        scalar_t* dx = p.dgates + row * 3 * H + j;
        scalar_t* dhg = p.dgates_h + row * 3 * H + j;
        // the gradients of W_hh h + b_hh, which the next product reads
        const scalar_t dh_gates[3] = {static_cast<scalar_t>(dxr), static_cast<scalar_t>(dxz),
                                      static_cast<scalar_t>(dhn)};
#pragma unroll
        for (int q = 0; q < 3; ++q) {
          dhg[q * H] = dh_gates[q];
          slot.put(b, q * H + j, dh_gates[q]);
        }
        dx[0] = dh_gates[0];
        dx[H] = dh_gates[1];
        dx[2 * H] = static_cast<scalar_t>(dxn);
        p.carry[unit] = dh_direct;
      } else {
        const scalar_t d = static_cast<scalar_t>(
            rnn_backward_point<kCell == PersistentCell::kRnnRelu, T>(saved, dh));
        p.dgates[row * H + j] = d;
        slot.put(b, j, d);
      }
    }
    // (step -1 puts no rows and is the last)
    if constexpr (kCluster) {
      if (s >= 0) cluster_sync();
    } else if (s >= 0 && p.run.cooperative && !p.exchange) {
      cooperative_groups::this_grid().sync();
    }
  }
}

}  // namespace persistent
}  // namespace cuda
}  // namespace fused_rnn

// The packed float32 GEMM of gemm.h and GemmWeight.
//
// Kernel: b is packed into panels of kPanel = 32 columns (two 16-float
// AVX-512 vectors), k-major, so a panel streams from consecutive addresses.
// A micro-kernel keeps a kRows x 32 tile of the result in 24 zmm registers
// (two partial sums each, over even and odd k) and, per k, loads the
// panel's two vectors once and broadcasts one element of each of its rows
// of `a`. Loops: blocks of kRowBlock rows of `a`, then
// kDepth-long slices of K (an a block of 240 x 256 floats stays in L2, a
// panel slice of 256 x 32 in L1/L2), then panels, then row tiles. Work is split
// over (row block, panel) pairs with at::parallel_for; with few rows (the
// per-step products) each thread keeps the same panels every step, so its
// slice of W_hh stays in its own cache.
#include "fused_rnn/gemm.h"
#include "fused_rnn/cpu_convert.h"
#include "fused_rnn/setting.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <memory>
#include <utility>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FR_HAVE_AVX512_GEMM 1
#include <immintrin.h>
#define FR_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,avx2,fma")))
#define FR_AVX512_BF16 \
  __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx512bf16,avx2,fma")))
// The tile's loops over its rows must unroll, or its accumulators live on
// the stack instead of in zmm registers.
#if defined(__clang__)
#define FR_UNROLL _Pragma("clang loop unroll(full)")
#else
#define FR_UNROLL _Pragma("GCC unroll 16")
#endif
#else
#define FR_HAVE_AVX512_GEMM 0
#endif

namespace fused_rnn {
namespace cpu {
namespace {

constexpr int64_t kRows = 6;         // rows of a micro tile
constexpr int64_t kDepth = 256;      // K per slice
constexpr int64_t kRowBlock = 240;   // rows of a per task (a multiple of kRows)
// Products adding up to fewer rows than this use ATen's mm: packing reads
// and writes all of b once, which a product of that few rows does not repay.
constexpr int64_t kMinRowsToPack = 8;

GemmChoice parse_gemm(const std::string& name) {
  if (name == "auto") return GemmChoice::kAuto;
  if (name == "aten") return GemmChoice::kAten;
  TORCH_CHECK_VALUE(false, "fused_rnn: unknown CPU GEMM '", name,
                    "'; expected one of auto, aten");
}

EnvChoice<GemmChoice>& gemm_state() {
  static EnvChoice<GemmChoice> state("FUSED_RNN_CPU_GEMM", GemmChoice::kAuto, &parse_gemm);
  return state;
}

bool cpu_has_avx512() {
#if FR_HAVE_AVX512_GEMM
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512vl");
  return has;
#else
  return false;
#endif
}

// AVX512-BF16's dot product of bfloat16 pairs into float32 (vdpbf16ps),
// as oneDNN multiplies bfloat16 on these CPUs.
bool cpu_has_avx512_bf16() {
#if FR_HAVE_AVX512_GEMM
  static const bool has = cpu_has_avx512() && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}

// The first min(max(n, 0), 16) lanes of a vector.
inline __mmask16 column_mask(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}

#if FR_HAVE_AVX512_GEMM
// c (R, 32 or fewer: `cols`) (+)= a (R, kc) @ panel slice (kc, 32).
template <int R>
FR_AVX512 void micro_tile(int64_t kc, const float* a, int64_t lda, const float* b,
                          float* c, int64_t ldc, int64_t cols, bool add) {
  // Two sums per element, over even and over odd k, added at the end: half
  // the length of each rounding chain (the error of one chain of 256 FMAs
  // measured up to ~1.8x that of ATen's mm at small N), at no cost in loads
  // per multiply-add.
  __m512 even[R][2], odd[R][2];
  FR_UNROLL
  for (int i = 0; i < R; ++i) {
    even[i][0] = even[i][1] = odd[i][0] = odd[i][1] = _mm512_setzero_ps();
  }
  int64_t k = 0;
  for (; k + 1 < kc; k += 2) {
    const __m512 b0 = _mm512_loadu_ps(b + k * kPanel);
    const __m512 b1 = _mm512_loadu_ps(b + k * kPanel + 16);
    const __m512 b2 = _mm512_loadu_ps(b + (k + 1) * kPanel);
    const __m512 b3 = _mm512_loadu_ps(b + (k + 1) * kPanel + 16);
    const float* ak = a + k;
    FR_UNROLL
  for (int i = 0; i < R; ++i) {
      const __m512 a0 = _mm512_set1_ps(ak[i * lda]);
      const __m512 a1 = _mm512_set1_ps(ak[i * lda + 1]);
      even[i][0] = _mm512_fmadd_ps(a0, b0, even[i][0]);
      even[i][1] = _mm512_fmadd_ps(a0, b1, even[i][1]);
      odd[i][0] = _mm512_fmadd_ps(a1, b2, odd[i][0]);
      odd[i][1] = _mm512_fmadd_ps(a1, b3, odd[i][1]);
    }
  }
  if (k < kc) {
    const __m512 b0 = _mm512_loadu_ps(b + k * kPanel);
    const __m512 b1 = _mm512_loadu_ps(b + k * kPanel + 16);
    FR_UNROLL
  for (int i = 0; i < R; ++i) {
      const __m512 a0 = _mm512_set1_ps(a[i * lda + k]);
      even[i][0] = _mm512_fmadd_ps(a0, b0, even[i][0]);
      even[i][1] = _mm512_fmadd_ps(a0, b1, even[i][1]);
    }
  }
  __m512 acc[R][2];
  FR_UNROLL
  for (int i = 0; i < R; ++i) {
    acc[i][0] = _mm512_add_ps(even[i][0], odd[i][0]);
    acc[i][1] = _mm512_add_ps(even[i][1], odd[i][1]);
  }
  // Columns past `cols` are masked off (the panel's zero padding).
  const __mmask16 m0 = column_mask(cols), m1 = column_mask(cols - 16);
  FR_UNROLL
  for (int i = 0; i < R; ++i) {
    float* ci = c + i * ldc;
    __m512 v0 = acc[i][0], v1 = acc[i][1];
    if (add) {
      v0 = _mm512_add_ps(_mm512_maskz_loadu_ps(m0, ci), v0);
      v1 = _mm512_add_ps(_mm512_maskz_loadu_ps(m1, ci + 16), v1);
    }
    _mm512_mask_storeu_ps(ci, m0, v0);
    _mm512_mask_storeu_ps(ci + 16, m1, v1);
  }
}

using TileFn = void (*)(int64_t, const float*, int64_t, const float*, float*, int64_t, int64_t,
                        bool);

template <int... R>
constexpr auto make_tile_table(std::integer_sequence<int, R...>) {
  return std::array<TileFn, sizeof...(R)>{&micro_tile<R + 1>...};
}
// kTiles[r - 1] computes an r-row tile.
constexpr auto kTiles = make_tile_table(std::make_integer_sequence<int, kRows>{});

struct GemmArgs {
  int64_t M, N, K;
  const float* a;  // row-major
  int64_t lda;
  const float* packed;
  float* c;
  int64_t ldc;
  bool accumulate;
};

// Rows [m0, m1) of the result, panels [p0, p1).
FR_AVX512 void gemm_block(const GemmArgs& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  for (int64_t k0 = 0; k0 < g.K; k0 += kDepth) {
    const int64_t kc = std::min(kDepth, g.K - k0);
    const bool add = g.accumulate || k0 > 0;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * kPanel;
      const int64_t cols = std::min(kPanel, g.N - n0);
      const float* b = g.packed + p * g.K * kPanel + k0 * kPanel;
      for (int64_t m = m0; m < m1; m += kRows) {
        kTiles[std::min(kRows, m1 - m) - 1](kc, g.a + m * g.lda + k0, g.lda, b,
                                            g.c + m * g.ldc + n0, g.ldc, cols, add);
      }
    }
  }
}

// bfloat16 weights on CPUs with AVX512-BF16: the panel holds pairs of k,
// (ceil(K / 2), kPanel) 32-bit words, word (kk, j) = b[2kk][j] (low half)
// and b[2kk+1][j] (high half); a row of `a` is read as the same pairs. Per
// pair of k one vdpbf16ps per 16 columns adds both products to the float32
// sums. c (R, 32) = a (R, 2 * k2) @ panel.
template <int R>
FR_AVX512_BF16 void micro_tile_bf16(int64_t k2, const uint32_t* a, int64_t lda,
                                    const uint32_t* b, float* c, int64_t ldc) {
  __m512 acc[R][2];
  FR_UNROLL
  for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < k2; ++kk) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + kk * kPanel);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + kk * kPanel + 16);
    FR_UNROLL
    for (int i = 0; i < R; ++i) {
      const __m512bh ai = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[i * lda + kk]));
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], ai, b0);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], ai, b1);
    }
  }
  FR_UNROLL
  for (int i = 0; i < R; ++i) {
    _mm512_storeu_ps(c + i * ldc, acc[i][0]);
    _mm512_storeu_ps(c + i * ldc + 16, acc[i][1]);
  }
}

// Rounds a tile's float32 sums (rows x cols, rows kPanel apart) into out
// (rows ldo apart) as bfloat16, round to nearest even, added to out first
// when accumulating: 16 columns a vector (vcvtneps2bf16).
FR_AVX512_BF16 void round_bf16_tile(const float* sums, int64_t rows, int64_t cols,
                                    c10::BFloat16* out, int64_t ldo, bool accumulate) {
  for (int64_t i = 0; i < rows; ++i) {
    uint16_t* row = reinterpret_cast<uint16_t*>(out + i * ldo);
    for (int64_t j = 0; j < cols; j += 16) {
      const __mmask16 mask = column_mask(cols - j);
      __m512 v = _mm512_loadu_ps(sums + i * kPanel + j);
      if (accumulate) {
        const __m256i old = _mm256_maskz_loadu_epi16(mask, row + j);
        v = _mm512_add_ps(
            v, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(old), 16)));
      }
      _mm256_mask_storeu_epi16(row + j, mask, (__m256i)_mm512_cvtneps_pbh(v));
    }
  }
}

using TileBf16Fn = void (*)(int64_t, const uint32_t*, int64_t, const uint32_t*, float*, int64_t);
template <int... R>
constexpr auto make_bf16_table(std::integer_sequence<int, R...>) {
  return std::array<TileBf16Fn, sizeof...(R)>{&micro_tile_bf16<R + 1>...};
}
constexpr int64_t kRowsBf16 = 12;
constexpr auto kTilesBf16 = make_bf16_table(std::make_integer_sequence<int, kRowsBf16>{});
#endif  // FR_HAVE_AVX512_GEMM

// One panel: out (K, kPanel) = columns [0, cols) of src^T, src holding the
// panel's first row of b with strides sn (rows) and sk (k), zero beyond.
void pack_panel_scalar(const float* src, int64_t sn, int64_t sk, int64_t K, int64_t cols,
                       float* out) {
  for (int64_t k = 0; k < K; ++k) {
    float* row = out + k * kPanel;
    for (int64_t j = 0; j < cols; ++j) row[j] = src[j * sn + k * sk];
    for (int64_t j = cols; j < kPanel; ++j) row[j] = 0.f;
  }
}

#if FR_HAVE_AVX512_GEMM
// GCC 12's shuffle and unpack intrinsics pass _mm512_undefined_ps() as the
// unused merge source, which -Wmaybe-uninitialized reports; nothing is read
// from it (no mask is applied).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
// In-register transpose of a 16 x 16 block: r[i] holds row i; afterwards
// r[c] holds column c.
FR_AVX512 inline void transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  // u[4q + c] holds, per 128-bit lane L, column 4L + c of rows 4q .. 4q + 3.
  for (int q = 0; q < 4; ++q) {
    const __m512 lo0 = t[4 * q], hi0 = t[4 * q + 1], lo1 = t[4 * q + 2], hi1 = t[4 * q + 3];
    u[4 * q + 0] = _mm512_shuffle_ps(lo0, lo1, _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * q + 1] = _mm512_shuffle_ps(lo0, lo1, _MM_SHUFFLE(3, 2, 3, 2));
    u[4 * q + 2] = _mm512_shuffle_ps(hi0, hi1, _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * q + 3] = _mm512_shuffle_ps(hi0, hi1, _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int c = 0; c < 4; ++c) {
    // Rows 0-7 and 8-15 of columns c, c + 8 (even) and c + 4, c + 12 (odd).
    const __m512 a_even = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88);
    const __m512 a_odd = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xdd);
    const __m512 b_even = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);
    const __m512 b_odd = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xdd);
    r[c] = _mm512_shuffle_f32x4(a_even, b_even, 0x88);
    r[c + 8] = _mm512_shuffle_f32x4(a_even, b_even, 0xdd);
    r[c + 4] = _mm512_shuffle_f32x4(a_odd, b_odd, 0x88);
    r[c + 12] = _mm512_shuffle_f32x4(a_odd, b_odd, 0xdd);
  }
}

// The same with vector loads: one masked copy of kPanel floats per k where
// the panel's columns are contiguous (b^T row-major: sn == 1); 16 x 16
// blocks read row by row and transposed in registers where b is row-major
// (sk == 1, the weights as torch keeps them).
FR_AVX512 void pack_panel_avx512(const float* src, int64_t sn, int64_t sk, int64_t K,
                                 int64_t cols, float* out) {
  if (sn == 1) {
    const __mmask16 m0 = column_mask(cols), m1 = column_mask(cols - 16);
    for (int64_t k = 0; k < K; ++k) {
      const float* in = src + k * sk;
      _mm512_storeu_ps(out + k * kPanel, _mm512_maskz_loadu_ps(m0, in));
      _mm512_storeu_ps(out + k * kPanel + 16, _mm512_maskz_loadu_ps(m1, in + 16));
    }
    return;
  }
  for (int64_t k0 = 0; k0 < K; k0 += 16) {
    const int64_t kv = std::min<int64_t>(16, K - k0);
    const __mmask16 km = kv == 16 ? __mmask16(0xFFFF) : __mmask16((1u << kv) - 1);
    for (int64_t half = 0; half < 2; ++half) {
      __m512 r[16];
      for (int64_t i = 0; i < 16; ++i) {
        const int64_t j = half * 16 + i;
        r[i] = j < cols ? _mm512_maskz_loadu_ps(km, src + j * sn + k0) : _mm512_setzero_ps();
      }
      transpose16(r);
      for (int64_t c = 0; c < kv; ++c) _mm512_storeu_ps(out + (k0 + c) * kPanel + half * 16, r[c]);
    }
  }
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif

void pack_panel(const float* src, int64_t sn, int64_t sk, int64_t K, int64_t cols, float* out) {
#if FR_HAVE_AVX512_GEMM
  if (cpu_has_avx512() && (sn == 1 || sk == 1)) {
    pack_panel_avx512(src, sn, sk, K, cols, out);
    return;
  }
#endif
  pack_panel_scalar(src, sn, sk, K, cols, out);
}

}  // namespace

GemmChoice requested_gemm() { return gemm_state().get(); }

void set_requested_gemm(GemmChoice choice) { gemm_state().set(choice); }

bool packed_gemm_active() { return requested_gemm() == GemmChoice::kAuto && cpu_has_avx512(); }

std::string gemm_description() {
  if (packed_gemm_active()) {
    return std::string(
               "float32 products: fused_rnn's packed AVX-512 GEMM (weights packed once per "
               "call); bfloat16 / float16 per-step products: the same kernel (") +
           (cpu_has_avx512_bf16() ? "bfloat16 on AVX512-BF16 dot products, float16 widened"
                                  : "widened to float32") +
           "); the backward's input and weight gradients too (from 8 rows); float64 and "
           "products under 32 columns: ATen's mm";
  }
  return std::string("ATen's mm for every product (") +
         (requested_gemm() == GemmChoice::kAten ? "FUSED_RNN_CPU_GEMM=aten"
                                                : "this CPU has no AVX-512") +
         ")";
}

at::Tensor pack_gemm_operand(const at::Tensor& b_any) {
  TORCH_INTERNAL_ASSERT(b_any.dim() == 2 && b_any.device().is_cpu());
  // bfloat16 and float16 weights are packed as float32 (exactly).
  const at::Tensor b = b_any.scalar_type() == at::kFloat ? b_any : b_any.to(at::kFloat);
  const int64_t N = b.size(0), K = b.size(1);
  const int64_t panels = (N + kPanel - 1) / kPanel;
  at::Tensor packed = at::empty({panels, K, kPanel}, b.options());
  const float* src = b.data_ptr<float>();
  float* dst = packed.data_ptr<float>();
  const int64_t sn = b.stride(0), sk = b.stride(1);
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, K * kPanel));
  at::parallel_for(0, panels, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      pack_panel(src + p * kPanel * sn, sn, sk, K, std::min(kPanel, N - p * kPanel),
                 dst + p * K * kPanel);
    }
  });
  if (b_any.scalar_type() != at::kBFloat16 || !cpu_has_avx512_bf16()) return packed;
  // bfloat16 pairs of k for the AVX512-BF16 tiles (the float32 values are
  // bfloat16 values: exact), zero past K.
  const int64_t k2 = (K + 1) / 2;
  at::Tensor pairs = at::empty({panels, k2, 2 * kPanel}, b_any.options());
  uint16_t* out = reinterpret_cast<uint16_t*>(pairs.data_ptr<c10::BFloat16>());
  at::parallel_for(0, panels, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t kk = 0; kk < k2; ++kk) {
        for (int64_t j = 0; j < kPanel; ++j) {
          for (int64_t e = 0; e < 2; ++e) {
            const int64_t k = 2 * kk + e;
            out[((p * k2 + kk) * kPanel + j) * 2 + e] =
                k < K ? narrow_to<c10::BFloat16>(dst[(p * K + k) * kPanel + j]).x : uint16_t{0};
          }
        }
      }
    }
  });
  return pairs;
}

namespace {

// c (M, N; row stride ldc) (+)= a (M, K; row stride lda, unit k stride) @
// the packed operand, all float32.
void gemm_float(int64_t M, int64_t N, int64_t K, const float* a, int64_t lda,
                const float* packed, int64_t panels, float* c, int64_t ldc, bool accumulate) {
#if FR_HAVE_AVX512_GEMM
  TORCH_INTERNAL_ASSERT(cpu_has_avx512());
  const GemmArgs g{M, N, K, a, lda, packed, c, ldc, accumulate};
  // Row blocks of equal size (a multiple of kRows, at most kRowBlock), so
  // the threads' shares of tasks are equal work.
  const int64_t blocks = (M + kRowBlock - 1) / kRowBlock;
  const int64_t block_rows = ((M + blocks - 1) / blocks + kRows - 1) / kRows * kRows;
  // A task is (row block, panel), panels inner so neighbouring tasks share
  // their rows of a; at least ~64K multiply-adds per thread's share.
  const int64_t task_work = std::min(M, block_rows) * kPanel * K;
  const int64_t grain = std::max<int64_t>(1, 65536 / task_work);
  at::parallel_for(0, blocks * panels, grain, [&](int64_t t0, int64_t t1) {
    // This thread's tasks, a row block at a time.
    for (int64_t t = t0; t < t1;) {
      const int64_t blk = t / panels, p0 = t % panels;
      const int64_t p1 = std::min(panels, p0 + (t1 - t));
      const int64_t m0 = blk * block_rows;
      if (m0 < M) gemm_block(g, m0, std::min(M, m0 + block_rows), p0, p1);
      t += p1 - p0;
    }
  });
#else
  (void)M, (void)N, (void)K, (void)a, (void)lda, (void)packed, (void)panels, (void)c, (void)ldc,
      (void)accumulate;
  TORCH_INTERNAL_ASSERT(false, "fused_rnn: the packed GEMM is not built for this CPU");
#endif
}

// out (M, N) (+)= the float32 product c (M, ldc), rounded once to out's type.
template <typename scalar_t>
void finish_reduced(const at::Tensor& out, const float* c, int64_t ldc, bool accumulate) {
  const int64_t M = out.size(0), N = out.size(1);
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t ldo = out.stride(0);
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / N), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      scalar_t* row = op + m * ldo;
      const float* sum = c + m * ldc;
      for (int64_t n = 0; n < N; ++n) {
        row[n] = narrow_to<scalar_t>(accumulate ? static_cast<float>(row[n]) + sum[n] : sum[n]);
      }
    }
  });
}

// bfloat16 / float16 operands: a is widened to float32, the product formed
// in float32 and added to out in float32, rounded once (as ATen's CPU
// addmm does for these types, with float32 accumulation).
template <typename scalar_t>
void gemm_reduced(const at::Tensor& out, const at::Tensor& a, const at::Tensor& packed,
                  bool accumulate) {
  const int64_t M = a.size(0), K = a.size(1), N = out.size(1);
  const std::unique_ptr<float[]> a32(new float[M * K]), c32(new float[M * N]);
  const scalar_t* ap = a.data_ptr<scalar_t>();
  const int64_t sm = a.stride(0), sk = a.stride(1);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K; ++k) a32[m * K + k] = static_cast<float>(ap[m * sm + k * sk]);
  }
  gemm_float(M, N, K, a32.get(), K, packed.data_ptr<float>(), packed.size(0), c32.get(), N,
             false);
  finish_reduced<scalar_t>(out, c32.get(), N, accumulate);
}

// out (M, N) in bfloat16 (+)= a (M, K) @ b^T with b packed as bfloat16
// pairs (AVX512-BF16): float32 sums of the products, rounded once; like
// oneDNN's, vdpbf16ps treats denormal inputs as zero.
void gemm_bf16_pairs(const at::Tensor& out, const at::Tensor& a, const at::Tensor& packed,
                     bool accumulate) {
#if FR_HAVE_AVX512_GEMM
  const int64_t M = a.size(0), K = a.size(1);
  const int64_t k2 = (K + 1) / 2, panels = packed.size(0);
  // a's rows as the same pairs of k, zero past K.
  const std::unique_ptr<uint32_t[]> a2(new uint32_t[M * k2]);
  const uint16_t* ap = reinterpret_cast<const uint16_t*>(a.data_ptr<c10::BFloat16>());
  const int64_t sm = a.stride(0), sk = a.stride(1);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t kk = 0; kk < k2; ++kk) {
      const uint32_t lo = ap[m * sm + 2 * kk * sk];
      const uint32_t hi = 2 * kk + 1 < K ? ap[m * sm + (2 * kk + 1) * sk] : 0u;
      a2[m * k2 + kk] = lo | (hi << 16);
    }
  }
  const uint32_t* words = reinterpret_cast<const uint32_t*>(packed.data_ptr<c10::BFloat16>());
  c10::BFloat16* op = out.data_ptr<c10::BFloat16>();
  const int64_t N = out.size(1), ldo = out.stride(0);
  const int64_t blocks = (M + kRowBlock - 1) / kRowBlock;
  const int64_t block_rows = (M + blocks - 1) / blocks;
  const int64_t grain = std::max<int64_t>(1, 65536 / (std::min(M, block_rows) * kPanel * K));
  at::parallel_for(0, blocks * panels, grain, [&](int64_t t0, int64_t t1) {
    // A tile's float32 sums, rounded into out (added to it when
    // accumulating) while they are in L1: no (M, N) float32 buffer and no
    // second pass over it.
    alignas(64) float sums[kRowsBf16 * kPanel];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t blk = t / panels, p = t % panels;
      const int64_t m1 = std::min(M, (blk + 1) * block_rows);
      const int64_t n0 = p * kPanel, cols = std::min(kPanel, N - n0);
      for (int64_t m = blk * block_rows; m < m1; m += kRowsBf16) {
        const int64_t rows = std::min(kRowsBf16, m1 - m);
        kTilesBf16[rows - 1](k2, a2.get() + m * k2, k2, words + p * k2 * kPanel, sums, kPanel);
        round_bf16_tile(sums, rows, cols, op + m * ldo + n0, ldo, accumulate);
      }
    }
  });
#else
  (void)out, (void)a, (void)packed, (void)accumulate;
  TORCH_INTERNAL_ASSERT(false, "fused_rnn: the packed GEMM is not built for this CPU");
#endif
}

}  // namespace

void packed_gemm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& packed,
                 bool accumulate) {
  const int64_t M = a.size(0), K = a.size(1), N = out.size(1);
  const auto dtype = out.scalar_type();
  if (packed.scalar_type() == at::kBFloat16) {
    TORCH_INTERNAL_ASSERT(dtype == at::kBFloat16 && a.scalar_type() == dtype &&
                          out.size(0) == M && packed.dim() == 3 &&
                          packed.size(1) == (K + 1) / 2 && packed.size(2) == 2 * kPanel &&
                          packed.size(0) == (N + kPanel - 1) / kPanel &&
                          (out.stride(1) == 1 || N <= 1));
    if (M == 0 || N == 0) return;
    if (K == 0) {
      if (!accumulate) out.zero_();
      return;
    }
    gemm_bf16_pairs(out, a, packed, accumulate);
    return;
  }
  TORCH_INTERNAL_ASSERT(out.size(0) == M && packed.dim() == 3 && packed.size(1) == K &&
                        packed.size(0) == (N + kPanel - 1) / kPanel &&
                        packed.scalar_type() == at::kFloat && (out.stride(1) == 1 || N <= 1) &&
                        a.scalar_type() == dtype &&
                        (dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf));
  if (M == 0 || N == 0) return;
  if (K == 0) {
    if (!accumulate) out.zero_();
    return;
  }
  if (dtype != at::kFloat) {
    AT_DISPATCH_REDUCED_FLOATING_TYPES(dtype, "fused_rnn_packed_gemm", [&] {
      gemm_reduced<scalar_t>(out, a, packed, accumulate);
    });
    return;
  }
  // The tiles read rows of a along K; a transposed operand is copied first.
  const at::Tensor a_rows = a.stride(1) == 1 || K == 1 ? a : a.contiguous();
  gemm_float(M, N, K, a_rows.data_ptr<float>(), a_rows.stride(0), packed.data_ptr<float>(),
             packed.size(0), out.data_ptr<float>(), out.stride(0), accumulate);
}

namespace {

void set_cpu_gemm_op(c10::string_view choice) {
  set_requested_gemm(parse_gemm(std::string(choice)));
}

std::string get_cpu_gemm_op() {
  return requested_gemm() == GemmChoice::kAten ? "aten" : "auto";
}

std::string explain_cpu_gemm_op() { return gemm_description(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(fused_rnn, m) {
  m.def("set_cpu_gemm(str choice) -> ()", &set_cpu_gemm_op);
  m.def("get_cpu_gemm() -> str", &get_cpu_gemm_op);
  m.def("explain_cpu_gemm() -> str", &explain_cpu_gemm_op);
}

}  // namespace cpu

GemmWeight::GemmWeight(const at::Tensor& w, int64_t total_rows, bool per_step)
    : w_(w), w_t_(w.t()) {
  const auto dtype = w.scalar_type();
  const bool packable =
      dtype == at::kFloat || (per_step && (dtype == at::kBFloat16 || dtype == at::kHalf));
  // Fewer columns than a panel: the tile's lanes would mostly multiply zero
  // padding, and ATen's mm (a dot-product kernel there) is the more
  // accurate one.
  // The choice is read first, so that a bad FUSED_RNN_CPU_GEMM fails every
  // CPU call, whatever its shape.
  if (w.device().is_cpu() && cpu::packed_gemm_active() && packable &&
      w.size(0) >= cpu::kPanel && total_rows >= cpu::kMinRowsToPack) {
    packed_ = cpu::pack_gemm_operand(w);
  }
}

void GemmWeight::product_into(const at::Tensor& out, const at::Tensor& a, bool accumulate) const {
  if (packed_.defined()) {
    cpu::packed_gemm(out, a, packed_, accumulate);
  } else if (accumulate) {
    // addmm_ on a view writes through it.
    at::Tensor target = out;
    target.addmm_(a, w_t_);
  } else {
    at::Tensor target = out;
    at::mm_out(target, a, w_t_);
  }
}

at::Tensor GemmWeight::product(const at::Tensor& a) const {
  at::Tensor out = at::empty({a.size(0), w_.size(0)}, a.options());
  product_into(out, a);
  return out;
}

}  // namespace fused_rnn

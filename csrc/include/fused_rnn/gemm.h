// The float32 matrix products of the CPU kernels: out (M, N) (+)= a (M, K) @
// b^T with b (N, K) packed once into panels and reused by many products (the
// recurrent weight over every step, the input weight over every block of
// steps). On x86-64 CPUs with AVX-512 a register-blocked kernel multiplies
// 6 rows of `a` by 32 columns of b at a time from the packed panels; it
// measured ~1.7x ATen's mm (MKL) for the shapes of an RNN on the 2-core
// AMD EPYC of bench/results (MKL takes a slower code path on AMD CPUs).
// Per-step products in bfloat16 and float16 take it too (float32
// accumulation, one rounding; bfloat16 weights packed as pairs of k for
// AVX512-BF16's dot product where the CPU has it, else both types widened
// to float32): ATen's CPU products in those types cost ~0.1 ms (bfloat16)
// to ~0.3 ms (float16) a call even at batch 1. Elsewhere (float64, other CPUs, or
// FUSED_RNN_CPU_GEMM=aten) `packed` stays undefined and the products are
// ATen's.
//
// Shape legend: M rows of the left operand, K the summed dimension, N
// columns of the result; kPanel columns per packed panel.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

namespace fused_rnn {
namespace cpu {

constexpr int64_t kPanel = 32;

// Which kernels the CPU products run: "auto" (the packed kernel where the
// CPU has AVX-512, else ATen) or "aten". Process-wide; read from
// FUSED_RNN_CPU_GEMM at the first use.
enum class GemmChoice { kAuto, kAten };
GemmChoice requested_gemm();
void set_requested_gemm(GemmChoice choice);
// Whether float32 products on this CPU take the packed kernel now.
bool packed_gemm_active();
// What runs, in words, for `fused-rnn explain`.
std::string gemm_description();

// b (N, K) on the CPU, any strides and floating type, as float32 (ceil(N /
// kPanel), K, kPanel): panel p holds columns [p*kPanel, (p+1)*kPanel) of
// b^T row by row, zero beyond N.
at::Tensor pack_gemm_operand(const at::Tensor& b);

// out (M, N) (+ when accumulate) = a (M, K) @ b^T, b packed by
// pack_gemm_operand from an (N, K) matrix. a and out: float32, bfloat16 or
// float16, the same; a: any strides (copied to row-major unless it is);
// out: unit column stride. Parallel over row blocks and panels.
void packed_gemm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& packed,
                 bool accumulate);

}  // namespace cpu

// The right operand of repeated products out = a @ w^T with one w: packed
// once where the packed kernel applies and the products add up to enough
// rows to pay for the packing, else the plain matrix for ATen's mm (on
// every device).
class GemmWeight {
 public:
  GemmWeight() = default;
  // w: (N, K), any strides. total_rows: the sum of M over the products this
  // weight will take (a guess is fine; it only decides whether to pack).
  // per_step: the products are a time step's rows each (the recurrence),
  // where the packed kernel also serves bfloat16 and float16; large
  // products in those types stay with ATen (oneDNN's bfloat16 GEMM).
  GemmWeight(const at::Tensor& w, int64_t total_rows, bool per_step = false);
  // out (M, N) (+)= a (M, K) @ w^T.
  void product_into(const at::Tensor& out, const at::Tensor& a, bool accumulate = false) const;
  // a (M, K) @ w^T as a new (M, N) tensor.
  at::Tensor product(const at::Tensor& a) const;
  bool packed() const { return packed_.defined(); }

 private:
  // w_t_: the transposed view, made once rather than on every step's product
  at::Tensor w_, w_t_, packed_;
};

}  // namespace fused_rnn

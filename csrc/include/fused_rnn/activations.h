// Activation functions shared by host and device code.
//
// On the device, float uses the CUDA math library (tanhf / expf, a few ulp).
// On the host, float uses branch-free polynomial versions (Cephes' expf and
// tanhf, within 2 ulp of the correctly rounded result) so that the gate loops
// of the CPU kernels auto-vectorise; libm's scalar calls would not.
// double always uses the library functions: it is the precision reference.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FR_HD __host__ __device__
#else
#define FR_HD
#endif

#if defined(__CUDA_ARCH__)
#define FR_INLINE __forceinline__
#elif defined(__GNUC__) || defined(__clang__)
#define FR_INLINE inline __attribute__((always_inline))
#else
#define FR_INLINE inline
#endif

namespace fused_rnn {
namespace detail {

#if !defined(__CUDA_ARCH__)
// Branch-free (selects, copysign, a magic-number rounding, a bit cast) so that
// loops calling these vectorise; that also needs -fno-trapping-math, which
// setup.py passes (it changes no result).

// exp(x) for float: x = n ln2 + r with n = round(x / ln2), |r| <= ln2/2,
// exp(r) by Cephes' degree-6 polynomial, 2^n by building the exponent bits.
FR_INLINE float exp_f32(float x) {
  x = x < -87.0f ? -87.0f : x;  // 2^n stays a normal float
  x = x > 88.0f ? 88.0f : x;
  constexpr float kRound = 12582912.0f;          // 1.5 * 2^23
  const float n = (x * 1.44269504088896341f + kRound) - kRound;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  const float z = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * z + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}

// tanh(x) for float: Cephes' odd polynomial below |x| = 0.625 (where
// 1 - 2/(e^2|x| + 1) would cancel), the exponential form above.
FR_INLINE float tanh_f32(float x) {
  const float ax = std::fabs(x);
  const float z = x * x;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const float small = p * z * x + x;
  const float e = exp_f32(2.0f * (ax > 44.0f ? 44.0f : ax));
  const float large = std::copysign(1.0f - 2.0f / (e + 1.0f), x);
  return ax < 0.625f ? small : large;
}
#endif

}  // namespace detail

FR_HD FR_INLINE float sigmoid(float x) {
#if defined(__CUDA_ARCH__)
  return 1.0f / (1.0f + expf(-x));
#else
  // exp_f32 clamps its argument so that 2^n stays a normal float; where
  // exp(-x) overflows (x below -88.72), torch's sigmoid is exactly 0, and so
  // is this one: a saturated gate then multiplies an inf state into NaN, as
  // in torch.nn, not into inf or a finite number.
  const float s = 1.0f / (1.0f + detail::exp_f32(-x));
  return x <= -88.72283935546875f ? 0.0f : s;
#endif
}

FR_HD FR_INLINE double sigmoid(double x) { return 1.0 / (1.0 + ::exp(-x)); }

FR_HD FR_INLINE float tanh_act(float x) {
#if defined(__CUDA_ARCH__)
  return tanhf(x);
#else
  return detail::tanh_f32(x);
#endif
}

FR_HD FR_INLINE double tanh_act(double x) { return ::tanh(x); }

template <typename T>
FR_HD FR_INLINE T relu(T x) {
  return x < T(0) ? T(0) : x;  // NaN passes through, as in torch.relu
}

}  // namespace fused_rnn

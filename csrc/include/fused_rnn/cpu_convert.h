// Conversions of the CPU kernels from their math type (float for the half
// types) to a tensor's type.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

#include "fused_rnn/activations.h"  // FR_INLINE

namespace fused_rnn {
namespace cpu {

// Stores a math-type value in the tensor's type. bfloat16 gets c10's round
// to nearest even written without a branch (c10's tests isnan first), so
// that the gate loops vectorise; the results are the same bits.
template <typename scalar_t, typename T>
FR_INLINE scalar_t narrow_to(T v) {
  return static_cast<scalar_t>(v);
}
template <>
FR_INLINE c10::BFloat16 narrow_to<c10::BFloat16, float>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  const uint16_t rounded = static_cast<uint16_t>((u + ((u >> 16) & 1u) + 0x7FFFu) >> 16);
  return c10::BFloat16(v != v ? uint16_t{0x7FC0} : rounded, c10::BFloat16::from_bits());
}

}  // namespace cpu
}  // namespace fused_rnn

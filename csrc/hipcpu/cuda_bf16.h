// CUDA's __nv_bfloat16 on HIP-CPU (see cuda_runtime.h), which has no bfloat16 type: the upper
// 16 bits of a float32, converted from float32 with rounding to nearest, ties to even, as
// CUDA's __float2bfloat16 does.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
  std::uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 value) {
  const std::uint32_t word = std::uint32_t(value.bits) << 16;
  float result;
  std::memcpy(&result, &word, sizeof result);
  return result;
}

inline __nv_bfloat16 __float2bfloat16(float value) {
  if (std::isnan(value)) return {0x7fff};  // CUDA's NaN
  std::uint32_t word;
  std::memcpy(&word, &value, sizeof word);
  word += 0x7fff + ((word >> 16) & 1);
  return {static_cast<std::uint16_t>(word >> 16)};
}

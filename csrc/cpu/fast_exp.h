// exp(x) in float without calls or branches, so that `omp simd` loops vectorise it (glibc's expf
// does not without -ffast-math): Cephes' range reduction x = n·ln2 + r, |r| <= ln2/2, and its
// degree-6 polynomial for e^r, scaled by 2^n built from exponent bits. Within 2 ulp of exp for
// x in [-87, 88]; x <= -88 gives n = -127, a scale of +0 and so exactly 0. Callers clamp x to
// their range (logprobs / sampling: the logits minus their max, <= 0; ppo_loss: the log-ratio,
// clamped to ±20). Under the AVX2 / AVX-512 clones GCC may contract the multiply-adds into
// FMAs, so results can differ from the baseline build in the last bit.
#pragma once

#include <cstdint>

namespace rlhf_fast {

__attribute__((always_inline)) inline float fast_exp(float x) {
  // round to nearest by the 1.5·2^23 trick: std::nearbyint is a libm call on baseline x86-64
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  // __builtin_bit_cast, not memcpy: with memcpy GCC 12 refuses to vectorise some loops
  return e * __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);
}

}  // namespace rlhf_fast

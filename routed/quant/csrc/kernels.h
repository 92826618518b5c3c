// routed's weight kernels (int_dot.cpp), for the native one-token layer (layer.cpp) to call without the dispatcher,
// and the AVX2 helpers both use.
#pragma once
#include <ATen/ATen.h>
#include <immintrin.h>

namespace routed {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline __m256 load8(const float* x) { return _mm256_loadu_ps(x); }
inline __m256 load8(const at::BFloat16* x) {  // bf16 -> fp32: the 16 bits into the high half
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

at::Tensor int8_dot(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale);
at::Tensor int4_dot(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales_zeros, int64_t group);
at::Tensor bf16_dot(const at::Tensor& x, const at::Tensor& w);
at::Tensor int8_experts(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights, const at::Tensor& gate,
                        const at::Tensor& gate_scale, const at::Tensor& up, const at::Tensor& up_scale,
                        const at::Tensor& down, const at::Tensor& down_scale);
at::Tensor int4_experts(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights,
                        const at::Tensor& gate_up, const at::Tensor& gate_up_sz, const at::Tensor& down,
                        const at::Tensor& down_sz, int64_t group);
at::Tensor bf16_experts(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights, const at::Tensor& gate,
                        const at::Tensor& up, const at::Tensor& down);

}  // namespace routed

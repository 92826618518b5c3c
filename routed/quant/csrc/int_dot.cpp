// routed's integer dot-product kernels for CPUs with AVX2 but without AVX-512 (AMD Zen 2/3, Intel before
// Skylake-X): y = x Wᵀ for int8 weights, with the activations quantized to 8 bits per block of 32 (as
// llama.cpp's Q8_0 activations), multiplied as integer dot products (`vpmaddubsw`: pairs of u8 x s8 products
// summed into 16 bits; with |w|, |x| <= 127 the pair sums stay below 32767 and cannot saturate).
//
// PyTorch's weight-only `_weight_int8pack_mm` widens every weight to fp32 and is compute-bound on AVX2
// (~5.5-7 GB/s of weights, 2 threads, Zen 3); this kernel reads its weights at 10-16 GB/s there (see
// BENCHMARKS.md). Every row of x is quantized and multiplied on its own: a row's result does not depend on
// the rows beside it (batch-invariant). Built at first use by `routed.quant.kernels`.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>

namespace {

constexpr int64_t QK = 32;        // activations per quantization block
constexpr int64_t PREFETCH = 512;  // bytes of weights ahead, within and across rows (rows are contiguous)

template <typename T>
void quantize_rows(const T* x, int64_t M, int64_t K, int8_t* q, float* d) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < K / QK; ++b) {
      const T* xb = x + m * K + b * QK;
      float v[QK], amax = 0.f;
      for (int i = 0; i < QK; ++i) {
        v[i] = static_cast<float>(xb[i]);
        amax = std::max(amax, std::fabs(v[i]));
      }
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      d[m * (K / QK) + b] = amax / 127.f;
      for (int i = 0; i < QK; ++i) q[m * K + b * QK + i] = static_cast<int8_t>(std::nearbyint(v[i] * inv));
    }
  }
}

inline __m256 dot32(const int8_t* w, const int8_t* x) {
  const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  const __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

template <typename T, typename S>
void int8_rows(const int8_t* W, const S* scale, const int8_t* xq, const float* xd, T* out, int64_t M, int64_t N,
               int64_t K, int64_t n0, int64_t n1) {
  const int64_t nb = K / QK;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* w = W + n * K;
    const float s = static_cast<float>(scale[n]);
    for (int64_t m = 0; m < M; ++m) {
      const int8_t* x = xq + m * K;
      const float* d = xd + m * nb;
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
      int64_t b = 0;
      for (; b + 2 <= nb; b += 2) {
        _mm_prefetch(reinterpret_cast<const char*>(w + b * QK + PREFETCH), _MM_HINT_T0);
        a0 = _mm256_fmadd_ps(dot32(w + b * QK, x + b * QK), _mm256_set1_ps(d[b]), a0);
        a1 = _mm256_fmadd_ps(dot32(w + (b + 1) * QK, x + (b + 1) * QK), _mm256_set1_ps(d[b + 1]), a1);
      }
      if (b < nb) a0 = _mm256_fmadd_ps(dot32(w + b * QK, x + b * QK), _mm256_set1_ps(d[b]), a0);
      out[m * N + n] = static_cast<T>(hsum(_mm256_add_ps(a0, a1)) * s);
    }
  }
}

// x [..., K] (fp32 or bf16), w int8 [N, K] contiguous, scale [N] (fp32 or bf16) -> [..., N] in x's dtype
at::Tensor int8_dot(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.is_contiguous(), "int8_dot: w must be a contiguous int8 [N, K]");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(K % QK == 0, "int8_dot: in_features must be a multiple of 32, got ", K);
  TORCH_CHECK(x.size(-1) == K, "int8_dot: x has ", x.size(-1), " features, w ", K);
  TORCH_CHECK(scale.numel() == N && scale.is_contiguous(), "int8_dot: scale must be a contiguous [N]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "int8_dot: x must be fp32 or bf16");
  TORCH_CHECK(scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kBFloat16, "int8_dot: scale must be fp32 or bf16");
  const at::Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = N;
  at::Tensor out = at::empty(shape, x.options());
  if (M == 0 || N == 0) return out;
  at::Tensor xq = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor xd = at::empty({M, K / QK}, x.options().dtype(at::kFloat));
  AT_DISPATCH_SWITCH(x.scalar_type(), "int8_dot", AT_DISPATCH_CASE(at::kFloat, [&] {
    quantize_rows(x2.data_ptr<scalar_t>(), M, K, xq.data_ptr<int8_t>(), xd.data_ptr<float>());
  }) AT_DISPATCH_CASE(at::kBFloat16, [&] {
    quantize_rows(x2.data_ptr<scalar_t>(), M, K, xq.data_ptr<int8_t>(), xd.data_ptr<float>());
  }));
  auto run = [&](auto* o, const auto* s) {
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      int8_rows(w.data_ptr<int8_t>(), s, xq.data_ptr<int8_t>(), xd.data_ptr<float>(), o, M, N, K, n0, n1);
    });
  };
  const bool xf = x.scalar_type() == at::kFloat, sf = scale.scalar_type() == at::kFloat;
  if (xf && sf) run(out.data_ptr<float>(), scale.data_ptr<float>());
  else if (xf) run(out.data_ptr<float>(), scale.data_ptr<at::BFloat16>());
  else if (sf) run(out.data_ptr<at::BFloat16>(), scale.data_ptr<float>());
  else run(out.data_ptr<at::BFloat16>(), scale.data_ptr<at::BFloat16>());
  return out;
}

}  // namespace

TORCH_LIBRARY(routed, m) { m.def("int8_dot(Tensor x, Tensor w, Tensor scale) -> Tensor"); }
TORCH_LIBRARY_IMPL(routed, CPU, m) { m.impl("int8_dot", &int8_dot); }

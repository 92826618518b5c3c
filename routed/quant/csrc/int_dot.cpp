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
#include <cstring>
#include <numeric>
#include <type_traits>

#include "kernels.h"

namespace routed {

constexpr int64_t QK = 32;        // activations per quantization block
// bytes of weights ahead of the loads, within and across rows (rows are contiguous): the integer kernels' and
// bf16's (which reads each line in more instructions). Decode on `small` against 512 for both, one process,
// alternating rounds: int8 1.11x, int4 1.04x (1536), bf16 1.04x (1024; 2048 0.90x) — BENCHMARKS.md
constexpr int64_t PREFETCH = 1536;
constexpr int64_t PREFETCH_BF16 = 1024;


// Each block of 32 activations rounded to steps of max|x| / 127 (to nearest, ties to even), vectorised; the
// block's step, and for int4 its float sum and the sum of its rounded values
template <typename T>
void quantize_rows(const T* x, int64_t M, int64_t K, int8_t* q, float* d, float* sums = nullptr,
                   int32_t* qsums = nullptr) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < K / QK; ++b) {
      const T* xb = x + m * K + b * QK;
      __m256 v[4];
      for (int i = 0; i < 4; ++i) v[i] = load8(xb + 8 * i);
      __m256 amax = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                  _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
      __m128 a = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
      a = _mm_max_ps(a, _mm_movehl_ps(a, a));
      a = _mm_max_ss(a, _mm_movehdup_ps(a));
      const float mx = _mm_cvtss_f32(a);
      const __m256 inv = _mm256_set1_ps(mx > 0.f ? 127.f / mx : 0.f);
      d[m * (K / QK) + b] = mx / 127.f;
      __m256i r[4];
      for (int i = 0; i < 4; ++i)
        r[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      if (sums) {
        sums[m * (K / QK) + b] = hsum(_mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])));
        const __m256i t = _mm256_add_epi32(_mm256_add_epi32(r[0], r[1]), _mm256_add_epi32(r[2], r[3]));
        alignas(32) int32_t lanes[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), t);
        int32_t qsum = 0;
        for (int i = 0; i < 8; ++i) qsum += lanes[i];
        qsums[m * (K / QK) + b] = qsum;
      }
      const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]), _mm256_packs_epi32(r[2], r[3]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + m * K + b * QK), _mm256_permutevar8x32_epi32(packed, order));
    }
  }
}

inline __m256 dot32(const int8_t* w, const int8_t* x) {
  const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  const __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
}


// The kernels' rows of x and of the output: row m, or rows[m] where a caller gives rows (a MoE layer's tokens that
// chose one expert, and their pairs' output rows: `run_experts`); out's rows `ldo` apart (0: N)
inline int64_t row_at(const int64_t* rows, int64_t m) { return rows ? rows[m] : m; }

template <typename T, typename S>
void int8_rows(const int8_t* W, const S* scale, const int8_t* xq, const float* xd, T* out, int64_t M, int64_t N,
               int64_t K, int64_t n0, int64_t n1, const int64_t* xrows = nullptr, const int64_t* orows = nullptr,
               int64_t ldo = 0) {
  const int64_t nb = K / QK;
  ldo = ldo ? ldo : N;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* w = W + n * K;
    const float s = static_cast<float>(scale[n]);
    for (int64_t m = 0; m < M; ++m) {
      const int8_t* x = xq + row_at(xrows, m) * K;
      const float* d = xd + row_at(xrows, m) * nb;
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
      int64_t b = 0;
      for (; b + 2 <= nb; b += 2) {
        _mm_prefetch(reinterpret_cast<const char*>(w + b * QK + PREFETCH), _MM_HINT_T0);
        a0 = _mm256_fmadd_ps(dot32(w + b * QK, x + b * QK), _mm256_set1_ps(d[b]), a0);
        a1 = _mm256_fmadd_ps(dot32(w + (b + 1) * QK, x + (b + 1) * QK), _mm256_set1_ps(d[b + 1]), a1);
      }
      if (b < nb) a0 = _mm256_fmadd_ps(dot32(w + b * QK, x + b * QK), _mm256_set1_ps(d[b]), a0);
      out[row_at(orows, m) * ldo + n] = static_cast<T>(hsum(_mm256_add_ps(a0, a1)) * s);
    }
  }
}

// x's rows quantized per block of 32 (with, for int4, the blocks' float and integer sums and the byte-pair table
// int4_blocks multiplies), in one scratch allocation: a decode step makes ~140 of these calls
struct Quantized {
  at::Tensor buffer;
  int8_t* q = nullptr;
  float* d = nullptr;
  float* sum = nullptr;
  int32_t* qsum = nullptr;
  int8_t* pairs = nullptr;
};

void pair_table(const int8_t* xq, int64_t M, int64_t K, int8_t* table);

Quantized quantize(const at::Tensor& x2, bool int4) {
  const int64_t M = x2.size(0), K = x2.size(1), nb = K / QK;
  auto aligned = [](int64_t n) { return (n + 63) / 64 * 64; };
  const int64_t q_bytes = aligned(M * K), f_bytes = aligned(M * nb * 4);
  const int64_t total = q_bytes + f_bytes + (int4 ? 2 * f_bytes + M * K * 32 : 0);
  Quantized r;
  r.buffer = at::empty({total + 64}, x2.options().dtype(at::kByte));
  uint8_t* base = r.buffer.data_ptr<uint8_t>();
  base += (64 - reinterpret_cast<uintptr_t>(base) % 64) % 64;
  r.q = reinterpret_cast<int8_t*>(base);
  r.d = reinterpret_cast<float*>(base + q_bytes);
  if (int4) {
    r.sum = reinterpret_cast<float*>(base + q_bytes + f_bytes);
    r.qsum = reinterpret_cast<int32_t*>(base + q_bytes + 2 * f_bytes);
    r.pairs = reinterpret_cast<int8_t*>(base + q_bytes + 3 * f_bytes);
  }
  AT_DISPATCH_SWITCH(x2.scalar_type(), "quantize", AT_DISPATCH_CASE(at::kFloat, [&] {
    quantize_rows(x2.data_ptr<scalar_t>(), M, K, r.q, r.d, r.sum, r.qsum);
  }) AT_DISPATCH_CASE(at::kBFloat16, [&] {
    quantize_rows(x2.data_ptr<scalar_t>(), M, K, r.q, r.d, r.sum, r.qsum);
  }));
  if (int4) pair_table(r.q, M, K, r.pairs);
  return r;
}

// x [..., K] as contiguous rows [M, K], fp32 or bf16 (what the kernels read)
at::Tensor rows_of(const at::Tensor& x, int64_t K, const char* op) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op, ": x must be fp32 or bf16");
  return x.reshape({-1, K}).contiguous();
}

// the result [..., N] in x's dtype
at::Tensor output_for(const at::Tensor& x, int64_t N) {
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = N;
  return at::empty(shape, x.options());
}

// x [..., K] (fp32 or bf16), w int8 [N, K] contiguous, scale [N] (fp32 or bf16) -> [..., N] in x's dtype
at::Tensor int8_dot(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.is_contiguous(), "int8_dot: w must be a contiguous int8 [N, K]");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(K % QK == 0, "int8_dot: in_features must be a multiple of 32, got ", K);
  TORCH_CHECK(x.size(-1) == K, "int8_dot: x has ", x.size(-1), " features, w ", K);
  TORCH_CHECK(scale.numel() == N && scale.is_contiguous(), "int8_dot: scale must be a contiguous [N]");
  TORCH_CHECK(scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kBFloat16, "int8_dot: scale must be fp32 or bf16");
  const at::Tensor x2 = rows_of(x, K, "int8_dot");
  const int64_t M = x2.size(0);
  at::Tensor out = output_for(x, N);
  if (M == 0 || N == 0) return out;
  const Quantized a = quantize(x2, false);
  auto run = [&](auto* o, const auto* s) {
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      int8_rows(w.data_ptr<int8_t>(), s, a.q, a.d, o, M, N, K, n0, n1);
    });
  };
  const bool xf = x.scalar_type() == at::kFloat, sf = scale.scalar_type() == at::kFloat;
  if (xf && sf) run(out.data_ptr<float>(), scale.data_ptr<float>());
  else if (xf) run(out.data_ptr<float>(), scale.data_ptr<at::BFloat16>());
  else if (sf) run(out.data_ptr<at::BFloat16>(), scale.data_ptr<float>());
  else run(out.data_ptr<at::BFloat16>(), scale.data_ptr<at::BFloat16>());
  return out;
}


// int4, read in place in the layout of PyTorch's `_weight_int4pack_mm_for_cpu` on AVX2 (`intq._packed_block`
// = 32): the packed [N, K/2] bytes are [N/32, K, 16], byte (b, k, j) holding row 32b + j in its low nibble and
// row 32b + 16 + j in its high one; scales and zeros [K/group, N, 2] (bf16), W = (q - 8) s + z.
// 32 bytes are columns k and k+1 of a block of 32 rows. Low nibbles (rows 0-15) and high ones (16-31) are
// multiplied by x_k in the low 128-bit lane and x_k+1 in the high one, once against (x, 0) byte pairs (even
// rows) and once against (0, x) (odd rows): `vpmaddubsw` with no shuffle of the weights. Each 16-bit lane sums
// 16 products of at most 15 * 127 per block of 32 activations (< 32767); per block, per row,
// y += s dx (dot - 8 sum(xq)) + z sum(x): the weights centred (q - 8) before the activations' rounding meets them,
// and the zero term exact (sum(x) the block's float sum).
inline __m256i widen_rows(__m256i even, __m256i odd, int half) {
  // int16 sums over the two lanes (columns k, k+1) of 8 even and 8 odd rows -> int32 rows 8*half .. 8*half+7
  const __m128i e = _mm_add_epi16(_mm256_castsi256_si128(even), _mm256_extracti128_si256(even, 1));
  const __m128i o = _mm_add_epi16(_mm256_castsi256_si128(odd), _mm256_extracti128_si256(odd, 1));
  const __m128i rows = half ? _mm_unpackhi_epi16(e, o) : _mm_unpacklo_epi16(e, o);  // r0 r1 r2 ... in order
  return _mm256_cvtepi16_epi32(rows);
}

template <typename T>
void int4_blocks(const uint8_t* P, const at::BFloat16* SZ, const int8_t* xpairs, const float* xd,
                 const float* xsum, const int32_t* xqsum, T* out, int64_t M, int64_t N, int64_t K, int64_t group, int64_t b0,
                 int64_t b1, const int64_t* xrows = nullptr, const int64_t* orows = nullptr, int64_t ldo = 0) {
  const int64_t nb = K / QK;
  ldo = ldo ? ldo : N;
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const __m256i hi_half = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t blk = b0; blk < b1; ++blk) {
    const uint8_t* pb = P + blk * K * 16;
    if (blk + 1 < b1) {  // the next block's scales: one 128-byte piece per group, each a row of groups apart
      for (int64_t g = 0; g < K / group; ++g) {
        const char* next = reinterpret_cast<const char*>(SZ + (g * N + (blk + 1) * 32) * 2);
        _mm_prefetch(next, _MM_HINT_T0);
        _mm_prefetch(next + 64, _MM_HINT_T0);
      }
    }
    for (int64_t m = 0; m < M; ++m) {
      const int64_t xr = row_at(xrows, m);
      const int8_t* xp = xpairs + xr * K * 32;  // per column pair: (x_k, 0) x8 | (x_k+1, 0) x8, then (0, x) x8 | ...
      __m256 f[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      for (int64_t b = 0; b < nb; ++b) {
        __m256i le = _mm256_setzero_si256(), lo = le, he = le, ho = le;
        for (int64_t p = 0; p < QK / 2; ++p) {
          const int64_t k = b * QK + 2 * p;
          _mm_prefetch(reinterpret_cast<const char*>(pb + k * 16 + PREFETCH), _MM_HINT_T0);
          const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pb + k * 16));
          const __m256i wl = _mm256_and_si256(w, m4), wh = _mm256_and_si256(_mm256_srli_epi16(w, 4), m4);
          const __m256i xe = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + k * 32));
          const __m256i xo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + k * 32 + 32));
          le = _mm256_add_epi16(le, _mm256_maddubs_epi16(wl, xe));
          lo = _mm256_add_epi16(lo, _mm256_maddubs_epi16(wl, xo));
          he = _mm256_add_epi16(he, _mm256_maddubs_epi16(wh, xe));
          ho = _mm256_add_epi16(ho, _mm256_maddubs_epi16(wh, xo));
        }
        const __m256i acc[4] = {widen_rows(le, lo, 0), widen_rows(le, lo, 1), widen_rows(he, ho, 0), widen_rows(he, ho, 1)};
        const __m256 d = _mm256_set1_ps(xd[xr * nb + b]), sx = _mm256_set1_ps(xsum[xr * nb + b]);
        const __m256i centre = _mm256_set1_epi32(8 * xqsum[xr * nb + b]);
        const at::BFloat16* sz = SZ + ((b * QK / group) * N + blk * 32) * 2;
        for (int r = 0; r < 4; ++r) {  // 8 rows' (scale, zero) bf16 pairs: one 32-bit lane each
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sz + r * 16));
          const __m256 sc = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
          const __m256 zr = _mm256_castsi256_ps(_mm256_and_si256(v, hi_half));
          f[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc[r], centre)), _mm256_mul_ps(sc, d), f[r]);
          f[r] = _mm256_fmadd_ps(zr, sx, f[r]);
        }
      }
      alignas(32) float o[32];
      for (int r = 0; r < 4; ++r) _mm256_store_ps(o + 8 * r, f[r]);
      for (int i = 0; i < 32; ++i) out[row_at(orows, m) * ldo + blk * 32 + i] = static_cast<T>(o[i]);
    }
  }
}

// x's quantized rows as the byte pairs int4_blocks multiplies: per row, per column pair (k, k+1), 64 bytes
void pair_table(const int8_t* xq, int64_t M, int64_t K, int8_t* table) {
  // from (x_k, x_k+1) broadcast: byte 0 or 1 of the pair into every other byte, -128 (0x80) gives a zero
  const __m256i even = _mm256_setr_epi8(0, -128, 0, -128, 0, -128, 0, -128, 0, -128, 0, -128, 0, -128, 0, -128,
                                        1, -128, 1, -128, 1, -128, 1, -128, 1, -128, 1, -128, 1, -128, 1, -128);
  const __m256i odd = _mm256_setr_epi8(-128, 0, -128, 0, -128, 0, -128, 0, -128, 0, -128, 0, -128, 0, -128, 0,
                                       -128, 1, -128, 1, -128, 1, -128, 1, -128, 1, -128, 1, -128, 1, -128, 1);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K; k += 2) {
      int16_t pair;
      std::memcpy(&pair, xq + m * K + k, 2);
      const __m256i v = _mm256_set1_epi16(pair);
      int8_t* t = table + m * K * 32 + k * 32;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(t), _mm256_shuffle_epi8(v, even));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(t + 32), _mm256_shuffle_epi8(v, odd));
    }
  }
}

// x [..., K] (fp32 or bf16), packed uint8 [N, K/2] (the AVX2 layout above), scales_zeros bf16 [K/group, N, 2]
at::Tensor int4_dot(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales_zeros, int64_t group) {
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "int4_dot: packed must be a contiguous uint8 [N, K/2]");
  const int64_t N = packed.size(0), K = 2 * packed.size(1);
  TORCH_CHECK(N % 32 == 0 && K % QK == 0, "int4_dot: out_features and in_features must be multiples of 32, got ", N, ", ", K);
  TORCH_CHECK(group % QK == 0 && K % group == 0, "int4_dot: the group size must be a multiple of 32 dividing ", K, ", got ", group);
  TORCH_CHECK(x.size(-1) == K, "int4_dot: x has ", x.size(-1), " features, the weight ", K);
  TORCH_CHECK(scales_zeros.scalar_type() == at::kBFloat16 && scales_zeros.is_contiguous() &&
              scales_zeros.dim() == 3 && scales_zeros.size(0) == K / group && scales_zeros.size(1) == N &&
              scales_zeros.size(2) == 2, "int4_dot: scales_zeros must be a contiguous bf16 [K/group, N, 2]");
  const at::Tensor x2 = rows_of(x, K, "int4_dot");
  const int64_t M = x2.size(0);
  at::Tensor out = output_for(x, N);
  if (M == 0) return out;
  const Quantized a = quantize(x2, true);
  auto run = [&](auto* o) {
    at::parallel_for(0, N / 32, 1, [&](int64_t b0, int64_t b1) {
      int4_blocks(packed.data_ptr<uint8_t>(), scales_zeros.data_ptr<at::BFloat16>(), a.pairs, a.d, a.sum, a.qsum, o,
                  M, N, K, group, b0, b1);
    });
  };
  if (x.scalar_type() == at::kFloat) run(out.data_ptr<float>());
  else run(out.data_ptr<at::BFloat16>());
  return out;
}


// ---- bf16 weights: y = x Wᵀ with fp32 sums, rows in sequence with a software prefetch ----
// x's rows widened to fp32 once; each weight row's bf16 widened by a shift (the 16 bits into the high half).
// Rows of x two at a time against each widened weight vector (a decode batch's): eight independent sums instead
// of one row's four, which a row's chain of fused multiply-adds left waiting on their latency (8 rows of a cold
// lm_head: 5.6 GB/s one row after the other) — each row summed in the same order as alone, so the same bits.
template <typename T>
void bf16_rows(const at::BFloat16* W, const float* xf, T* out, int64_t M, int64_t N, int64_t K, int64_t n0,
               int64_t n1, int64_t ldx = 0, const int64_t* xrows = nullptr, const int64_t* orows = nullptr,
               int64_t ldo = 0) {
  ldx = ldx ? ldx : K;  // x's row stride
  ldo = ldo ? ldo : N;
  for (int64_t n = n0; n < n1; ++n) {
    const at::BFloat16* w = W + n * K;
    int64_t m = 0;
    for (; m + 2 <= M; m += 2) {
      const float *x = xf + row_at(xrows, m) * ldx, *z = xf + row_at(xrows, m + 1) * ldx;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
      int64_t k = 0;
      for (; k + 32 <= K; k += 32) {
        if (m == 0) _mm_prefetch(reinterpret_cast<const char*>(w + k) + PREFETCH_BF16, _MM_HINT_T0);
        const __m256 w0 = load8(w + k), w1 = load8(w + k + 8), w2 = load8(w + k + 16), w3 = load8(w + k + 24);
        a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + k), a0);
        b0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(z + k), b0);
        a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + k + 8), a1);
        b1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(z + k + 8), b1);
        a2 = _mm256_fmadd_ps(w2, _mm256_loadu_ps(x + k + 16), a2);
        b2 = _mm256_fmadd_ps(w2, _mm256_loadu_ps(z + k + 16), b2);
        a3 = _mm256_fmadd_ps(w3, _mm256_loadu_ps(x + k + 24), a3);
        b3 = _mm256_fmadd_ps(w3, _mm256_loadu_ps(z + k + 24), b3);
      }
      for (; k + 8 <= K; k += 8) {
        const __m256 w0 = load8(w + k);
        a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + k), a0);
        b0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(z + k), b0);
      }
      float y = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
      float v = hsum(_mm256_add_ps(_mm256_add_ps(b0, b1), _mm256_add_ps(b2, b3)));
      for (; k < K; ++k) y += static_cast<float>(w[k]) * x[k], v += static_cast<float>(w[k]) * z[k];
      out[row_at(orows, m) * ldo + n] = static_cast<T>(y);
      out[row_at(orows, m + 1) * ldo + n] = static_cast<T>(v);
    }
    for (; m < M; ++m) {
      const float* x = xf + row_at(xrows, m) * ldx;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      int64_t k = 0;
      for (; k + 32 <= K; k += 32) {
        if (m == 0) _mm_prefetch(reinterpret_cast<const char*>(w + k) + PREFETCH_BF16, _MM_HINT_T0);
        a0 = _mm256_fmadd_ps(load8(w + k), _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(load8(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
        a2 = _mm256_fmadd_ps(load8(w + k + 16), _mm256_loadu_ps(x + k + 16), a2);
        a3 = _mm256_fmadd_ps(load8(w + k + 24), _mm256_loadu_ps(x + k + 24), a3);
      }
      for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(load8(w + k), _mm256_loadu_ps(x + k), a0);
      float y = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
      for (; k < K; ++k) y += static_cast<float>(w[k]) * x[k];
      out[row_at(orows, m) * ldo + n] = static_cast<T>(y);
    }
  }
}

// rows [M, K] (fp32 or bf16) in fp32, what bf16_rows reads: several rows each 64 bytes past a multiple of 4 KB
// apart, so that they do not all fall in the same sets of the L1 cache (8 rows of 1024 fp32 against a 256 x 1024
// weight in cache, one thread: 153 -> 102 us); a [M, K] view, its rows stride(0) apart
at::Tensor widened_rows(const at::Tensor& rows) {
  const int64_t M = rows.size(0), K = rows.size(1);
  const int64_t ldx = M > 1 ? (K + 15) / 16 * 16 + 16 : K;
  at::Tensor xf = at::empty({M, ldx}, rows.options().dtype(at::kFloat));
  xf.narrow(1, 0, K).copy_(rows);
  return xf.narrow(1, 0, K);
}

// x [..., K] (fp32 or bf16), w bf16 [N, K] contiguous -> [..., N] in x's dtype
at::Tensor bf16_dot(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16 && w.is_contiguous(),
              "bf16_dot: w must be a contiguous bf16 [N, K]");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(x.size(-1) == K, "bf16_dot: x has ", x.size(-1), " features, w ", K);
  const at::Tensor xf = widened_rows(rows_of(x, K, "bf16_dot"));
  const int64_t M = xf.size(0), ldx = xf.stride(0);
  at::Tensor out = output_for(x, N);
  if (M == 0 || N == 0) return out;
  auto run = [&](auto* o) {
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      bf16_rows(w.data_ptr<at::BFloat16>(), xf.data_ptr<float>(), o, M, N, K, n0, n1, ldx);
    });
  };
  if (x.scalar_type() == at::kFloat) run(out.data_ptr<float>());
  else run(out.data_ptr<at::BFloat16>());
  return out;
}

// ---- one MoE layer's routed experts for a few tokens: each chosen expert read in place, once for its tokens ----
// y[t] = sum_j w[t, j] down_e(silu(gate_e(x_t)) up_e(x_t)), e = ids[t, j], in two parallel passes over the chosen
// experts' rows (gate and up, then down) instead of a kernel call per projection and expert: a decode step's ~12
// calls per layer, each with its own activations' quantization and thread fork, become two. An expert that several
// tokens chose is read once for all of them (a decode batch of 8 on `small`: 48 pairs a layer, ~33 experts), the
// kernels taking its tokens' rows of x as their rows. Each product is computed as
// int8_dot / int4_dot computes it and rounded to x's dtype where the per-expert path's outputs are (gate and up,
// silu, its product with up, down); the weighted sum is fp32, in slot order, as `RoutedExperts._reference`'s.

// f(j, r0, r1) over the rows (or row blocks) [0, R) of each of the G experts that start[] delimits (the pairs
// start[j] .. start[j + 1] chose expert j), split across threads by rows times pairs: a row of an expert three
// tokens chose is three rows' products
template <typename F>
void over_rows(const std::vector<int64_t>& start, int64_t R, int64_t grain, const F& f) {
  const int64_t G = static_cast<int64_t>(start.size()) - 1;
  // thread ranges in units of (row, pair); an expert's rows are those whose first unit is in the range
  at::parallel_for(0, start[G] * R, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t j = 0; j < G; ++j) {
      const int64_t base = start[j] * R, M = start[j + 1] - start[j];
      const int64_t r0 = std::clamp<int64_t>((i0 - base + M - 1) / M, 0, R);
      const int64_t r1 = std::clamp<int64_t>((i1 - base + M - 1) / M, 0, R);
      if (r0 < r1) f(j, r0, r1);
    }
  });
}

// h [P, I] = silu(gate) * up from gu [P, 2I] (gate, then up), each step rounded to T as eager's bf16 ops round
template <typename T>
at::Tensor swiglu(const at::Tensor& gu, int64_t P, int64_t I) {
  at::Tensor h = at::empty({P, I}, gu.options());
  const T* g = gu.data_ptr<T>();
  T* o = h.data_ptr<T>();
  for (int64_t p = 0; p < P; ++p)
    for (int64_t i = 0; i < I; ++i) {
      const float a = static_cast<float>(g[p * 2 * I + i]);
      const T s = static_cast<T>(a / (1.f + std::exp(-a)));
      o[p * I + i] = static_cast<T>(static_cast<float>(s) * static_cast<float>(g[p * 2 * I + I + i]));
    }
  return h;
}

// out [T, D] fp32 = sum over slots j (in order) of float(y[t k + j]) w[t, j]
template <typename T>
at::Tensor weighted_sum(const at::Tensor& y, const at::Tensor& w, int64_t Tn, int64_t k, int64_t D) {
  at::Tensor out = at::zeros({Tn, D}, y.options().dtype(at::kFloat));
  const T* yp = y.data_ptr<T>();
  const float* wp = w.data_ptr<float>();
  float* o = out.data_ptr<float>();
  for (int64_t t = 0; t < Tn; ++t)
    for (int64_t j = 0; j < k; ++j)
      for (int64_t d = 0; d < D; ++d) o[t * D + d] += static_cast<float>(yp[(t * k + j) * D + d]) * wp[t * k + j];
  return out;
}

struct Routing {
  at::Tensor x;  // [T, D] contiguous, fp32 or bf16
  at::Tensor w;  // [T, k] fp32
  at::Tensor held_ids;  // [T, k] int64 contiguous, which `ids` points into
  const int64_t* ids = nullptr;
  int64_t T = 0, k = 0, P = 0;
};

// checks shared by the two ops: x [T, D], ids [T, k] int64 in [0, E), weights [T, k]
Routing routing(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights, int64_t E, int64_t D,
                const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == D, op, ": x must be [tokens, ", D, "], got ", x.sizes());
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == x.size(0) && ids.scalar_type() == at::kLong, op,
              ": ids must be int64 [tokens, k]");
  TORCH_CHECK(weights.sizes() == ids.sizes(), op, ": weights must be the ids' shape [tokens, k]");
  Routing r;
  r.x = rows_of(x, D, op);
  r.w = weights.to(at::kFloat).contiguous();
  r.held_ids = ids.contiguous();
  r.T = ids.size(0), r.k = ids.size(1), r.P = r.T * r.k;
  r.ids = r.held_ids.data_ptr<int64_t>();
  for (int64_t p = 0; p < r.P; ++p)
    TORCH_CHECK(r.ids[p] >= 0 && r.ids[p] < E, op, ": expert id ", r.ids[p], " is not in [0, ", E, ")");
  return r;
}

// the two passes over the chosen experts' rows, in units of `unit` rows (int4: blocks of 32): `prep` turns rows of
// activations (x, then h) into what the products read; gate_up(a, tokens, pairs, M, expert, n0, n1, gu) writes
// rows [n0, n1) of the [2I] outputs of the M pairs that chose the expert (row pairs[m] of gu, from row tokens[m] of
// a), down(h, pairs, M, expert, n0, n1, y) rows [n0, n1) of their [D] outputs (row pairs[m] of y, from h's)
template <typename T, typename Prep, typename GateUp, typename Down>
at::Tensor run_experts(const Routing& r, int64_t D, int64_t I, int64_t unit, const Prep& prep, const GateUp& gate_up,
                       const Down& down) {
  std::vector<int64_t> pairs(r.P), tokens(r.P), start;  // the pairs by expert, in pair order within one
  std::iota(pairs.begin(), pairs.end(), 0);
  std::stable_sort(pairs.begin(), pairs.end(), [&](int64_t a, int64_t b) { return r.ids[a] < r.ids[b]; });
  for (int64_t i = 0; i < r.P; ++i) {
    tokens[i] = pairs[i] / r.k;
    if (i == 0 || r.ids[pairs[i]] != r.ids[pairs[i - 1]]) start.push_back(i);
  }
  start.push_back(r.P);
  const auto a = prep(r.x);
  at::Tensor gu = at::empty({r.P, 2 * I}, r.x.options());
  T* g = gu.data_ptr<T>();
  const int64_t grain = unit == 1 ? 16 : 1;
  over_rows(start, 2 * I / unit, grain, [&](int64_t j, int64_t u0, int64_t u1) {
    const int64_t i = start[j];
    gate_up(a, tokens.data() + i, pairs.data() + i, start[j + 1] - i, r.ids[pairs[i]], u0 * unit, u1 * unit, g);
  });
  const auto h = prep(swiglu<T>(gu, r.P, I));
  at::Tensor y = at::empty({r.P, D}, r.x.options());
  T* yp = y.data_ptr<T>();
  over_rows(start, D / unit, grain, [&](int64_t j, int64_t u0, int64_t u1) {
    const int64_t i = start[j];
    down(h, pairs.data() + i, start[j + 1] - i, r.ids[pairs[i]], u0 * unit, u1 * unit, yp);
  });
  return weighted_sum<T>(y, r.w, r.T, r.k, D);
}

// calls f(T*) with x's dtype as T (fp32 or bf16)
template <typename F>
at::Tensor in_dtype(const at::Tensor& x, const F& f) {
  return x.scalar_type() == at::kFloat ? f(static_cast<float*>(nullptr)) : f(static_cast<at::BFloat16*>(nullptr));
}

// int8: gate, up [E, I, D] and down [E, D, I] int8 contiguous, their scales [E, I] / [E, D] (fp32 or bf16)
at::Tensor int8_experts(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights, const at::Tensor& gate,
                        const at::Tensor& gate_scale, const at::Tensor& up, const at::Tensor& up_scale,
                        const at::Tensor& down, const at::Tensor& down_scale) {
  const char* op = "int8_experts";
  TORCH_CHECK(gate.dim() == 3 && up.sizes() == gate.sizes() && down.dim() == 3 && down.size(0) == gate.size(0) &&
              down.size(1) == gate.size(2) && down.size(2) == gate.size(1), op,
              ": gate and up must be [E, I, D], down [E, D, I]");
  const int64_t E = gate.size(0), I = gate.size(1), D = gate.size(2);
  TORCH_CHECK(D % QK == 0 && I % QK == 0, op, ": hidden and expert sizes must be multiples of 32, got ", D, ", ", I);
  for (const at::Tensor* t : {&gate, &up, &down})
    TORCH_CHECK(t->scalar_type() == at::kChar && t->is_contiguous(), op, ": weights must be contiguous int8");
  const auto st = gate_scale.scalar_type();
  for (const at::Tensor* t : {&gate_scale, &up_scale, &down_scale})
    TORCH_CHECK(t->scalar_type() == st && (st == at::kFloat || st == at::kBFloat16) && t->is_contiguous() &&
                t->dim() == 2 && t->size(0) == E, op, ": scales must be contiguous [E, rows], all fp32 or all bf16");
  TORCH_CHECK(gate_scale.size(1) == I && up_scale.size(1) == I && down_scale.size(1) == D, op, ": scales' rows");
  const Routing r = routing(x, ids, weights, E, D, op);
  if (r.P == 0) return at::zeros({r.T, D}, x.options().dtype(at::kFloat));
  const int8_t *gw = gate.data_ptr<int8_t>(), *uw = up.data_ptr<int8_t>(), *dw = down.data_ptr<int8_t>();
  auto run = [&](auto* tag, const auto* gs, const auto* us, const auto* ds) {
    using T = std::remove_pointer_t<decltype(tag)>;
    auto prep = [](const at::Tensor& rows) { return quantize(rows, false); };
    return run_experts<T>(r, D, I, 1, prep,
        [&](const Quantized& a, const int64_t* tokens, const int64_t* pairs, int64_t M, int64_t e, int64_t n0,
            int64_t n1, T* out) {
          if (n0 < I)
            int8_rows(gw + e * I * D, gs + e * I, a.q, a.d, out, M, I, D, n0, std::min(n1, I), tokens, pairs, 2 * I);
          if (n1 > I)
            int8_rows(uw + e * I * D, us + e * I, a.q, a.d, out + I, M, I, D, std::max(n0, I) - I, n1 - I, tokens,
                      pairs, 2 * I);
        },
        [&](const Quantized& h, const int64_t* pairs, int64_t M, int64_t e, int64_t n0, int64_t n1, T* out) {
          int8_rows(dw + e * D * I, ds + e * D, h.q, h.d, out, M, D, I, n0, n1, pairs, pairs);
        });
  };
  return in_dtype(r.x, [&](auto* tag) {
    if (st == at::kFloat)
      return run(tag, gate_scale.data_ptr<float>(), up_scale.data_ptr<float>(), down_scale.data_ptr<float>());
    return run(tag, gate_scale.data_ptr<at::BFloat16>(), up_scale.data_ptr<at::BFloat16>(),
               down_scale.data_ptr<at::BFloat16>());
  });
}

// int4, in int4_dot's layout: gate_up [E, 2I, D/2] (gate's rows, then up's), down [E, D, I/2]; their scales and
// zeros [E, D/group, 2I, 2] and [E, I/group, D, 2] (bf16)
at::Tensor int4_experts(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights,
                        const at::Tensor& gate_up, const at::Tensor& gate_up_sz, const at::Tensor& down,
                        const at::Tensor& down_sz, int64_t group) {
  const char* op = "int4_experts";
  TORCH_CHECK(gate_up.dim() == 3 && down.dim() == 3 && down.size(0) == gate_up.size(0) &&
              gate_up.size(1) == 4 * down.size(2) && down.size(1) == 2 * gate_up.size(2), op,
              ": gate_up must be packed [E, 2I, D/2], down [E, D, I/2]");
  const int64_t E = gate_up.size(0), I = gate_up.size(1) / 2, D = down.size(1);
  TORCH_CHECK(D % 32 == 0 && I % 32 == 0, op, ": hidden and expert sizes must be multiples of 32, got ", D, ", ", I);
  TORCH_CHECK(group % QK == 0 && D % group == 0 && I % group == 0, op,
              ": the group size must be a multiple of 32 dividing ", D, " and ", I, ", got ", group);
  for (const at::Tensor* t : {&gate_up, &down})
    TORCH_CHECK(t->scalar_type() == at::kByte && t->is_contiguous(), op, ": packed weights must be contiguous uint8");
  TORCH_CHECK(gate_up_sz.scalar_type() == at::kBFloat16 && gate_up_sz.is_contiguous() &&
              gate_up_sz.sizes() == at::IntArrayRef({E, D / group, 2 * I, 2}) && down_sz.scalar_type() == at::kBFloat16 &&
              down_sz.is_contiguous() && down_sz.sizes() == at::IntArrayRef({E, I / group, D, 2}), op,
              ": scales_zeros must be contiguous bf16 [E, D/group, 2I, 2] and [E, I/group, D, 2]");
  const Routing r = routing(x, ids, weights, E, D, op);
  if (r.P == 0) return at::zeros({r.T, D}, x.options().dtype(at::kFloat));
  const uint8_t *gw = gate_up.data_ptr<uint8_t>(), *dw = down.data_ptr<uint8_t>();
  const at::BFloat16 *gz = gate_up_sz.data_ptr<at::BFloat16>(), *dz = down_sz.data_ptr<at::BFloat16>();
  return in_dtype(r.x, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    auto prep = [](const at::Tensor& rows) { return quantize(rows, true); };
    return run_experts<T>(r, D, I, 32, prep,
        [&](const Quantized& a, const int64_t* tokens, const int64_t* pairs, int64_t M, int64_t e, int64_t n0,
            int64_t n1, T* out) {
          int4_blocks(gw + e * 2 * I * D / 2, gz + e * 2 * I * D / group * 2, a.pairs, a.d, a.sum, a.qsum, out, M,
                      2 * I, D, group, n0 / 32, n1 / 32, tokens, pairs);
        },
        [&](const Quantized& h, const int64_t* pairs, int64_t M, int64_t e, int64_t n0, int64_t n1, T* out) {
          int4_blocks(dw + e * D * I / 2, dz + e * D * I / group * 2, h.pairs, h.d, h.sum, h.qsum, out, M, D, I, group,
                      n0 / 32, n1 / 32, pairs, pairs);
        });
  });
}

// bf16: gate and up [E, I, D] and down [E, D, I], each expert's rows contiguous (gate and up may be the two halves
// of one [E, 2I, D] tensor: any stride between experts)
at::Tensor bf16_experts(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights, const at::Tensor& gate,
                        const at::Tensor& up, const at::Tensor& down) {
  const char* op = "bf16_experts";
  TORCH_CHECK(gate.dim() == 3 && up.sizes() == gate.sizes() && down.dim() == 3 && down.size(0) == gate.size(0) &&
              down.size(1) == gate.size(2) && down.size(2) == gate.size(1), op,
              ": gate and up must be [E, I, D], down [E, D, I]");
  for (const at::Tensor* t : {&gate, &up, &down})
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->stride(2) == 1 && t->stride(1) == t->size(2), op,
                ": weights must be bf16 with each expert's rows contiguous");
  const int64_t E = gate.size(0), I = gate.size(1), D = gate.size(2);
  const Routing r = routing(x, ids, weights, E, D, op);
  if (r.P == 0) return at::zeros({r.T, D}, x.options().dtype(at::kFloat));
  const at::BFloat16 *gw = gate.data_ptr<at::BFloat16>(), *uw = up.data_ptr<at::BFloat16>(),
                     *dw = down.data_ptr<at::BFloat16>();
  const int64_t gs = gate.stride(0), us = up.stride(0), ds = down.stride(0);
  return in_dtype(r.x, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return run_experts<T>(r, D, I, 1, widened_rows,
        [&](const at::Tensor& a, const int64_t* tokens, const int64_t* pairs, int64_t M, int64_t e, int64_t n0,
            int64_t n1, T* out) {
          const float* xf = a.data_ptr<float>();
          if (n0 < I) bf16_rows(gw + e * gs, xf, out, M, I, D, n0, std::min(n1, I), a.stride(0), tokens, pairs, 2 * I);
          if (n1 > I)
            bf16_rows(uw + e * us, xf, out + I, M, I, D, std::max(n0, I) - I, n1 - I, a.stride(0), tokens, pairs, 2 * I);
        },
        [&](const at::Tensor& h, const int64_t* pairs, int64_t M, int64_t e, int64_t n0, int64_t n1, T* out) {
          bf16_rows(dw + e * ds, h.data_ptr<float>(), out, M, D, I, n0, n1, h.stride(0), pairs, pairs);
        });
  });
}

}  // namespace routed

TORCH_LIBRARY(routed, m) {
  m.def("int8_dot(Tensor x, Tensor w, Tensor scale) -> Tensor");
  m.def("int4_dot(Tensor x, Tensor packed, Tensor scales_zeros, int group) -> Tensor");
  m.def("bf16_dot(Tensor x, Tensor w) -> Tensor");
  m.def("int8_experts(Tensor x, Tensor ids, Tensor weights, Tensor gate, Tensor gate_scale, Tensor up, "
        "Tensor up_scale, Tensor down, Tensor down_scale) -> Tensor");
  m.def("int4_experts(Tensor x, Tensor ids, Tensor weights, Tensor gate_up, Tensor gate_up_sz, Tensor down, "
        "Tensor down_sz, int group) -> Tensor");
  m.def("bf16_experts(Tensor x, Tensor ids, Tensor weights, Tensor gate, Tensor up, Tensor down) -> Tensor");
}
TORCH_LIBRARY_IMPL(routed, CPU, m) {
  m.impl("int8_dot", &routed::int8_dot);
  m.impl("int4_dot", &routed::int4_dot);
  m.impl("bf16_dot", &routed::bf16_dot);
  m.impl("int8_experts", &routed::int8_experts);
  m.impl("int4_experts", &routed::int4_experts);
  m.impl("bf16_experts", &routed::bf16_experts);
}

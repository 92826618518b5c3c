// routed's native one-token decoder layer: a whole DeepSeek-V3 block (MLA in the absorbed form over the paged
// latent cache, then the dense MLP or the MoE: router, routed experts, shared expert) for one token of one
// sequence, in one call from Python. The weight products are routed's kernels (int_dot.cpp) called directly; the
// rest (norms, RoPE, the cache write, attention over the context, the router's top-k, SwiGLU, residuals) is plain
// C++ on a few thousand numbers. It replaces the compiled step's ~25 kernel launches, allocations and dispatcher
// calls per block, which cost ~7-9 ms of a 20-45 ms step on `small` (BENCHMARKS.md), by one call.
//
// Each step computes what the eager model computes (`Block.forward`, `Transformer` in routed/model/deepseek_v3.py,
// `absorbed_attention` in attention.py) with the same roundings to bf16 between steps; sums run in fp32 in another
// order. `routed.model.native` builds a layer from a loaded model and checks it can (bf16 activations, every
// product on routed's kernels); tests/test_native_decode.py holds it to the eager step.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <memory>
#include <numeric>
#include <string>
#include <tuple>
#include <vector>

#include "kernels.h"

namespace routed {
namespace {

using bf16 = at::BFloat16;
inline float f32(bf16 v) { return static_cast<float>(v); }
inline bf16 round16(float v) { return static_cast<bf16>(v); }

// sum_i a[i] b[i] in fp32
template <typename A, typename B>
float dot(const A* a, const B* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = s0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(load8(a + i), load8(b + i), s0);
    s1 = _mm256_fmadd_ps(load8(a + i + 8), load8(b + i + 8), s1);
  }
  float s = hsum(_mm256_add_ps(s0, s1));
  for (; i < n; ++i) s += static_cast<float>(a[i]) * static_cast<float>(b[i]);
  return s;
}

// acc[i] += a * x[i]
inline void axpy(float a, const bf16* x, float* acc, int64_t n) {
  const __m256 av = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(av, load8(x + i), _mm256_loadu_ps(acc + i)));
  for (; i < n; ++i) acc[i] += a * f32(x[i]);
}

// RMSNorm as the model's: statistic in fp32, x/rms rounded to bf16, then times the bf16 weight (rounded again)
void rms_norm(const bf16* x, const bf16* w, int64_t n, float eps, bf16* out) {
  float ss = 0.f;
  for (int64_t i = 0; i < n; ++i) ss += f32(x[i]) * f32(x[i]);
  const float r = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = round16(f32(w[i]) * f32(round16(f32(x[i]) * r)));
}

// adjacent pairs rotated (the checkpoints' interleaved layout), in fp32, rounded to bf16
void rope(const bf16* x, const float* cos, const float* sin, int64_t R, bf16* out) {
  for (int64_t p = 0; p < R / 2; ++p) {
    const float x1 = f32(x[2 * p]), x2 = f32(x[2 * p + 1]);
    out[2 * p] = round16(x1 * cos[p] - x2 * sin[p]);
    out[2 * p + 1] = round16(x2 * cos[p] + x1 * sin[p]);
  }
}

bf16* bf16_ptr(const at::Tensor& t) { return t.data_ptr<bf16>(); }

// a row of n bf16 weights asked for ahead of its use, one prefetch per cache line (kv_b_proj's rows in the
// attention: its 1 MB a layer on `small` read at ~9 GB/s without)
inline void prefetch_row(const bf16* row, int64_t n) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < n * 2; b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
}

// one linear without bias: 0 bf16 weight [N, K]; 1 int8 weight [N, K] and its scales [N]; 2 int4 packed and its
// scales_zeros (group `group`)
using LinearSpec = std::tuple<int64_t, at::Tensor, at::Tensor, int64_t>;
struct Linear {
  int64_t kind = -1;
  at::Tensor a, b;
  int64_t group = 0;
  bool defined() const { return kind >= 0; }
  at::Tensor operator()(const at::Tensor& x) const {
    if (kind == 0) return bf16_dot(x, a);
    if (kind == 1) return int8_dot(x, a, b);
    TORCH_CHECK(kind == 2, "native layer: a linear that was not given");
    return int4_dot(x, a, b, group);
  }
};

// a SwiGLU MLP (dense, or the shared experts): gate and up as two products, or as one (int4's merged gate_up)
struct MLP {
  Linear gate, up, gate_up, down;
  bool defined() const { return down.defined(); }
  at::Tensor operator()(const at::Tensor& x) const {
    at::Tensor g, u;
    int64_t I;
    if (gate_up.defined()) {
      const at::Tensor gu = gate_up(x).contiguous();
      I = gu.size(-1) / 2;
      g = gu.narrow(-1, 0, I), u = gu.narrow(-1, I, I);
    } else {
      g = gate(x).contiguous(), u = up(x).contiguous();
      I = g.size(-1);
    }
    at::Tensor act = at::empty({1, I}, x.options());
    const bf16 *gp = bf16_ptr(g), *up_ = bf16_ptr(u);
    bf16* o = bf16_ptr(act);
    for (int64_t i = 0; i < I; ++i) {  // silu(gate) rounded, times up, rounded: eager's two bf16 ops
      const float a = f32(gp[i]);
      o[i] = round16(f32(round16(a / (1.f + std::exp(-a)))) * f32(up_[i]));
    }
    return down(act);
  }
};

class DecodeLayer {
 public:
  DecodeLayer(const std::map<std::string, LinearSpec>& linears, const std::map<std::string, at::Tensor>& tensors,
              const std::map<std::string, double>& cfg, int64_t experts_kind, std::vector<at::Tensor> experts,
              int64_t experts_group)
      : experts_kind_(experts_kind), experts_(std::move(experts)), experts_group_(experts_group) {
    auto lin = [&](const char* name) {
      Linear l;
      if (auto it = linears.find(name); it != linears.end())
        l = {std::get<0>(it->second), std::get<1>(it->second), std::get<2>(it->second), std::get<3>(it->second)};
      return l;
    };
    auto ten = [&](const char* name) {
      auto it = tensors.find(name);
      return it == tensors.end() ? at::Tensor() : it->second.contiguous();
    };
    auto num = [&](const char* name) {
      auto it = cfg.find(name);
      TORCH_CHECK(it != cfg.end(), "native layer: config '", name, "' missing");
      return it->second;
    };
    q_proj_ = lin("q_proj"), q_a_ = lin("q_a_proj"), q_b_ = lin("q_b_proj"), kv_a_ = lin("kv_a_proj_with_mqa");
    o_proj_ = lin("o_proj");
    mlp_ = {lin("mlp.gate_proj"), lin("mlp.up_proj"), lin("mlp.gate_up_proj"), lin("mlp.down_proj")};
    shared_ = {lin("shared.gate_proj"), lin("shared.up_proj"), lin("shared.gate_up_proj"), lin("shared.down_proj")};
    input_norm_ = ten("input_layernorm"), post_norm_ = ten("post_attention_layernorm");
    q_a_norm_ = ten("q_a_layernorm"), kv_a_norm_ = ten("kv_a_layernorm"), kv_b_ = ten("kv_b_proj");
    router_ = ten("gate.weight"), bias_ = ten("gate.bias");
    H_ = num("num_heads"), N_ = num("nope_dim"), R_ = num("rope_dim"), V_ = num("v_dim"), L_ = num("kv_lora_rank");
    eps_ = num("eps"), scale_ = num("scale");
    TORCH_CHECK(o_proj_.defined() && kv_a_.defined() && (q_proj_.defined() || (q_a_.defined() && q_b_.defined())),
                "native layer: attention's projections missing");
    TORCH_CHECK(kv_b_.scalar_type() == at::kBFloat16 && kv_b_.numel() == H_ * (N_ + V_) * L_,
                "native layer: kv_b_proj must be bf16 [H (N + V), L]");
    moe_ = router_.defined();
    TORCH_CHECK(moe_ != mlp_.defined(), "native layer: a dense MLP or a router, one of the two");
    if (moe_) {
      TORCH_CHECK(router_.scalar_type() == at::kFloat && router_.dim() == 2, "native layer: the router is fp32 [E, D]");
      E_ = router_.size(0), K_ = num("top_k"), n_group_ = num("n_group"), topk_group_ = num("topk_group");
      sigmoid_ = num("sigmoid") != 0, method_ = num("topk_method"), norm_topk_ = num("norm_topk_prob") != 0;
      scaling_ = num("routed_scaling_factor"), candidates_ = num("candidates");
      TORCH_CHECK(experts_kind_ >= 0 && experts_kind_ <= 2 &&
                  experts_.size() == (experts_kind_ == 0 ? 3u : experts_kind_ == 1 ? 6u : 4u),
                  "native layer: the routed experts' tensors do not match their kind");
    }
  }

  // h [1, 1, D] bf16 -> the block's output; writes this token's latent to cache[layer, slot]. cos, sin: fp32 [R/2]
  // for the token's position; key_slots: the sequence's context (this token's slot last); counters: a router's
  // telemetry buffers (expert_counts, expert_weight, route_stats) or none
  at::Tensor forward(const at::Tensor& h, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& cache,
                     int64_t layer, int64_t slot, const at::Tensor& key_slots,
                     const std::vector<at::Tensor>& counters) const {
    TORCH_CHECK(h.scalar_type() == at::kBFloat16 && h.numel() == h.size(-1), "native layer: h is one bf16 row");
    check_cache(cache, key_slots);
    const at::Tensor cs = cos.to(at::kFloat).contiguous(), sn = sin.to(at::kFloat).contiguous();
    TORCH_CHECK(cs.numel() == R_ / 2 && sn.numel() == R_ / 2, "native layer: cos and sin must have rope_dim / 2 values");
    return step(h.reshape({1, h.size(-1)}).contiguous(), cs.data_ptr<float>(), sn.data_ptr<float>(), cache, layer,
                slot, key_slots.contiguous(), counters).view(h.sizes());
  }

  // forward's work on a contiguous [1, D] row, its arguments checked (`DecodeModel` checks them once per token)
  at::Tensor step(const at::Tensor& hx, const float* cos, const float* sin, const at::Tensor& cache, int64_t layer,
                  int64_t slot, const at::Tensor& key_slots, const std::vector<at::Tensor>& counters) const {
    const int64_t D = hx.size(-1);
    at::Tensor x = at::empty({1, D}, hx.options());
    rms_norm(bf16_ptr(hx), bf16_ptr(input_norm_), D, eps_, bf16_ptr(x));
    const at::Tensor attn = attention(x, cos, sin, cache, layer, slot, key_slots);
    at::Tensor h1 = at::empty({1, D}, hx.options());
    add(hx, attn, h1);
    rms_norm(bf16_ptr(h1), bf16_ptr(post_norm_), D, eps_, bf16_ptr(x));
    const at::Tensor y = moe_ ? moe(x, counters) : mlp_(x);
    at::Tensor out = at::empty_like(h1);
    add(h1, y, out);
    return out;
  }

  int64_t rope_dim() const { return R_; }

  void check_cache(const at::Tensor& cache, const at::Tensor& key_slots) const {
    TORCH_CHECK(cache.scalar_type() == at::kBFloat16 && cache.is_contiguous() && cache.dim() == 3 &&
                cache.size(2) == L_ + R_, "native layer: the cache must be contiguous bf16 [layers, slots, L + R]");
    TORCH_CHECK(key_slots.scalar_type() == at::kLong && key_slots.dim() == 1 && key_slots.size(0) >= 1,
                "native layer: key_slots must be int64 [S]");
  }

 private:
  static void add(const at::Tensor& a, const at::Tensor& b, at::Tensor& out) {
    const at::Tensor bc = b.contiguous();
    const bf16 *ap = bf16_ptr(a), *bp = bf16_ptr(bc);
    bf16* o = bf16_ptr(out);
    for (int64_t i = 0; i < out.numel(); ++i) o[i] = round16(f32(ap[i]) + f32(bp[i]));
  }

  at::Tensor attention(const at::Tensor& x, const float* cos, const float* sin, const at::Tensor& cache,
                       int64_t layer, int64_t slot, const at::Tensor& key_slots) const {
    const int64_t H = H_, N = N_, R = R_, V = V_, L = L_, C = L + R, P = cache.size(1);
    at::Tensor q;
    if (q_proj_.defined()) {
      q = q_proj_(x).contiguous();
    } else {
      const at::Tensor qa = q_a_(x).contiguous();
      at::Tensor qn = at::empty_like(qa);
      rms_norm(bf16_ptr(qa), bf16_ptr(q_a_norm_), qa.size(-1), eps_, bf16_ptr(qn));
      q = q_b_(qn).contiguous();
    }
    TORCH_CHECK(q.numel() == H * (N + R), "native layer: q has ", q.numel(), " values, not ", H * (N + R));
    const at::Tensor kv = kv_a_(x).contiguous();
    TORCH_CHECK(layer >= 0 && layer < cache.size(0) && slot >= 0 && slot < P, "native layer: cache slot out of range");
    bf16* base = bf16_ptr(cache) + layer * P * C;
    bf16* latent = base + slot * C;  // this token's: [c_KV normalised | k_R rotated]
    rms_norm(bf16_ptr(kv), bf16_ptr(kv_a_norm_), L, eps_, latent);
    rope(bf16_ptr(kv) + L, cos, sin, R, latent + L);

    const at::Tensor slots = key_slots.contiguous();
    const int64_t S = slots.size(0);
    const int64_t* sp = slots.data_ptr<int64_t>();
    std::vector<const bf16*> keys(S);
    for (int64_t s = 0; s < S; ++s) {
      TORCH_CHECK(sp[s] >= 0 && sp[s] < P, "native layer: key slot ", sp[s], " out of range");
      keys[s] = base + sp[s] * C;
    }
    at::Tensor o = at::empty({1, H * V}, x.options());
    const bf16 *qp = bf16_ptr(q), *wb = bf16_ptr(kv_b_);
    bf16* op = bf16_ptr(o);
    const float scale = scale_;
    at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
      std::vector<float> acc(L), scores(S);
      std::vector<bf16> qc(C), olat(L), qpe(R);
      for (int64_t h = h0; h < h1; ++h) {
        const bf16* qh = qp + h * (N + R);
        const bf16* w_uk = wb + h * (N + V) * L;  // [N, L]
        const bf16* w_uv = w_uk + N * L;           // [V, L]
        // W_UK into the query: q_lat = q_nope W_UK (fp32 sums, rounded), then [q_lat | rotated q_R]
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t n = 0; n < N; ++n) {
          prefetch_row(w_uk + (n + 2) * L, L);  // two rows ahead (past W_UK's end: W_UV's first rows)
          axpy(f32(qh[n]), w_uk + n * L, acc.data(), L);
        }
        for (int64_t l = 0; l < L; ++l) qc[l] = round16(acc[l]);
        rope(qh + N, cos, sin, R, qc.data() + L);
        // scores over the context in fp32, softmax, probability-weighted latents (rounded)
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t s = 0; s < S; ++s) {
          scores[s] = dot(qc.data(), keys[s], C) * scale;
          mx = std::max(mx, scores[s]);
        }
        float sum = 0.f;
        for (int64_t s = 0; s < S; ++s) sum += (scores[s] = std::exp(scores[s] - mx));
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t s = 0; s < S; ++s) axpy(scores[s] / sum, keys[s], acc.data(), L);
        for (int64_t l = 0; l < L; ++l) olat[l] = round16(acc[l]);
        // W_UV out of the latent: o = o_lat W_UVᵀ (fp32 sums, rounded)
        for (int64_t v = 0; v < V; ++v) {
          if (v + 2 < V) prefetch_row(w_uv + (v + 2) * L, L);
          op[h * V + v] = round16(dot(olat.data(), w_uv + v * L, L));
        }
      }
    });
    return o_proj_(o);
  }

  // the router (`Gate.forward`): fp32 scores, group-limited top-k on the biased scores, weights from the unbiased
  // ones; then the chosen experts in one kernel call and the shared experts
  at::Tensor moe(const at::Tensor& x, const std::vector<at::Tensor>& counters) const {
    const int64_t E = E_, D = x.size(-1), K = K_;
    const bf16* xp = bf16_ptr(x);
    const float* wr = router_.data_ptr<float>();
    std::vector<float> logits(E), scores(E), choice(E);
    std::vector<float> xf(D);
    for (int64_t d = 0; d < D; ++d) xf[d] = f32(xp[d]);
    at::parallel_for(0, E, 8, [&](int64_t e0, int64_t e1) {  // fp32 [E, D] (256 KB on `small`): both threads
      for (int64_t e = e0; e < e1; ++e) logits[e] = dot(xf.data(), wr + e * D, D);
    });
    if (sigmoid_) {
      for (int64_t e = 0; e < E; ++e) scores[e] = 1.f / (1.f + std::exp(-logits[e]));
    } else {
      const float mx = *std::max_element(logits.begin(), logits.end());
      float sum = 0.f;
      for (int64_t e = 0; e < E; ++e) sum += (scores[e] = std::exp(logits[e] - mx));
      for (int64_t e = 0; e < E; ++e) scores[e] /= sum;
    }
    const float* bias = bias_.defined() ? bias_.data_ptr<float>() : nullptr;
    for (int64_t e = 0; e < E; ++e) choice[e] = bias ? scores[e] + bias[e] : scores[e];
    auto by_value = [](const std::vector<float>& v) {  // descending, the lower index first among equals
      return [&v](int64_t a, int64_t b) { return v[a] > v[b] || (v[a] == v[b] && a < b); };
    };
    if (method_ != 0 && n_group_ > 1) {  // group-limited: keep the topk_group best groups
      const int64_t G = n_group_, per = E / G;
      std::vector<float> group_score(G);
      for (int64_t g = 0; g < G; ++g) {
        const float* c = choice.data() + g * per;
        if (method_ == 2) {  // noaux_tc: the sum of the group's two best
          std::vector<float> top(c, c + per);
          std::partial_sort(top.begin(), top.begin() + 2, top.end(), std::greater<float>());
          group_score[g] = top[0] + top[1];
        } else {
          group_score[g] = *std::max_element(c, c + per);
        }
      }
      std::vector<int64_t> groups(G);
      std::iota(groups.begin(), groups.end(), 0);
      std::partial_sort(groups.begin(), groups.begin() + topk_group_, groups.end(), by_value(group_score));
      std::vector<bool> keep(G, false);
      for (int64_t i = 0; i < topk_group_; ++i) keep[groups[i]] = true;
      for (int64_t e = 0; e < E; ++e)
        if (!keep[e / per]) choice[e] = -std::numeric_limits<float>::infinity();
    }
    const int64_t take = std::min<int64_t>(K + 1, candidates_);
    std::vector<int64_t> order(E);
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + take, order.end(), by_value(choice));
    at::Tensor ids = at::empty({1, K}, x.options().dtype(at::kLong));
    at::Tensor weights = at::empty({1, K}, x.options().dtype(at::kFloat));
    int64_t* ip = ids.data_ptr<int64_t>();
    float* wp = weights.data_ptr<float>();
    float raw_sum = 0.f;
    for (int64_t k = 0; k < K; ++k) raw_sum += scores[ip[k] = order[k]];
    const float scaling = scaling_;
    for (int64_t k = 0; k < K; ++k)
      wp[k] = (norm_topk_ ? scores[ip[k]] / (raw_sum + 1e-20f) : scores[ip[k]]) * scaling;
    if (!counters.empty()) count(counters, scores, choice, order, ip, wp, raw_sum, take);

    at::Tensor y;
    if (experts_kind_ == 0) {
      y = bf16_experts(x, ids, weights, experts_[0], experts_[1], experts_[2]);
    } else if (experts_kind_ == 1) {
      y = int8_experts(x, ids, weights, experts_[0], experts_[1], experts_[2], experts_[3], experts_[4], experts_[5]);
    } else {
      y = int4_experts(x, ids, weights, experts_[0], experts_[1], experts_[2], experts_[3], experts_group_);
    }
    y = y.to(at::kBFloat16);  // the experts' fp32 sum, rounded as `RoutedExperts` returns it
    if (!shared_.defined()) return y;
    at::Tensor out = at::empty_like(y);
    add(y, shared_(x), out);
    return out;
  }

  // `Gate._count`: tokens and weight per expert; route_stats += (1, margin, top-k share of the scores, non-finite)
  void count(const std::vector<at::Tensor>& counters, const std::vector<float>& scores,
             const std::vector<float>& choice, const std::vector<int64_t>& order, const int64_t* ids,
             const float* weights, float raw_sum, int64_t take) const {
    TORCH_CHECK(counters.size() == 3 && counters[0].scalar_type() == at::kLong &&
                counters[1].scalar_type() == at::kFloat && counters[2].scalar_type() == at::kFloat &&
                counters[0].is_contiguous() && counters[1].is_contiguous() && counters[2].is_contiguous() &&
                counters[0].numel() == E_ && counters[1].numel() == E_ && counters[2].numel() == 4,
                "native layer: telemetry counters must be int64 [E], fp32 [E], fp32 [4]");
    int64_t* counts = counters[0].data_ptr<int64_t>();
    float* weight_sum = counters[1].data_ptr<float>();
    float* stats = counters[2].data_ptr<float>();
    for (int64_t k = 0; k < K_; ++k) counts[ids[k]] += 1, weight_sum[ids[k]] += weights[k];
    float score_sum = 0.f;
    for (float s : scores) score_sum += s;
    const float mass = raw_sum / score_sum;
    const float margin = take > K_ ? choice[order[K_ - 1]] - choice[order[K_]] : 0.f;
    stats[0] += 1.f;
    if (!std::isnan(margin)) stats[1] += margin;
    if (!std::isnan(mass)) stats[2] += mass;
    stats[3] += std::isnan(mass) ? 1.f : 0.f;
  }

  Linear q_proj_, q_a_, q_b_, kv_a_, o_proj_;
  MLP mlp_, shared_;
  at::Tensor input_norm_, post_norm_, q_a_norm_, kv_a_norm_, kv_b_, router_, bias_;
  int64_t H_ = 0, N_ = 0, R_ = 0, V_ = 0, L_ = 0;
  float eps_ = 0.f, scale_ = 0.f;
  bool moe_ = false, sigmoid_ = true, norm_topk_ = true;
  int64_t E_ = 0, K_ = 0, n_group_ = 1, topk_group_ = 1, method_ = 0, candidates_ = 0;
  float scaling_ = 1.f;
  int64_t experts_kind_ = -1;
  std::vector<at::Tensor> experts_;
  int64_t experts_group_ = 0;
};

// the whole one-token step of a sequence (`Transformer.forward_hidden`, then `logits`): the token's embedding row,
// every block's `DecodeLayer`, the final norm and the lm_head — one call per token, not a Python loop over the
// blocks with the norm and the lm_head's module call around it, each step of which ran right after the weights
// streamed through the caches (decode 1.06x on `small`, BENCHMARKS.md). cos / sin of the position as `RotaryEmbedding` computes them (fp32
// angle, times the yarn factor; the math library's cos and sin, not PyTorch's vectorised ones: within an ulp).
class DecodeModel {
 public:
  DecodeModel(std::vector<std::shared_ptr<DecodeLayer>> layers, const at::Tensor& embed, const at::Tensor& norm,
              double eps, const LinearSpec& head, const at::Tensor& inv_freq, double factor)
      : layers_(std::move(layers)), embed_(embed.contiguous()), norm_(norm.contiguous()), eps_(eps),
        inv_freq_(inv_freq.to(at::kFloat).contiguous()), factor_(factor) {
    TORCH_CHECK(!layers_.empty(), "native model: no layers");
    TORCH_CHECK(embed_.scalar_type() == at::kBFloat16 && embed_.dim() == 2 && norm_.scalar_type() == at::kBFloat16 &&
                norm_.numel() == embed_.size(1), "native model: embedding [V, D] and final norm [D] must be bf16");
    TORCH_CHECK(inv_freq_.numel() == layers_[0]->rope_dim() / 2, "native model: inv_freq must have rope_dim / 2 values");
    if (std::get<0>(head) >= 0) head_ = {std::get<0>(head), std::get<1>(head), std::get<2>(head), std::get<3>(head)};
  }

  // the hidden state after the final norm, [1, 1, D] bf16; writes the token's latents at `slot` in every layer
  at::Tensor hidden(int64_t token, int64_t position, const at::Tensor& cache, int64_t slot,
                    const at::Tensor& key_slots, const std::vector<std::vector<at::Tensor>>& counters) const {
    TORCH_CHECK(token >= 0 && token < embed_.size(0), "native model: token id ", token, " out of range [0, ",
                embed_.size(0), ")");
    TORCH_CHECK(position >= 0, "native model: negative position");
    TORCH_CHECK(counters.empty() || counters.size() == layers_.size(), "native model: counters for ", counters.size(),
                " layers, the model has ", layers_.size());
    layers_[0]->check_cache(cache, key_slots);
    TORCH_CHECK(cache.size(0) >= static_cast<int64_t>(layers_.size()), "native model: the cache has too few layers");
    const at::Tensor keys = key_slots.contiguous();
    const int64_t D = embed_.size(1), P = inv_freq_.numel();
    std::vector<float> cos(P), sin(P);
    const float* f = inv_freq_.data_ptr<float>();
    for (int64_t p = 0; p < P; ++p) {
      const float angle = static_cast<float>(position) * f[p];
      cos[p] = std::cos(angle) * static_cast<float>(factor_), sin[p] = std::sin(angle) * static_cast<float>(factor_);
    }
    at::Tensor h = embed_.narrow(0, token, 1).clone();
    static const std::vector<at::Tensor> none;
    for (size_t i = 0; i < layers_.size(); ++i)
      h = layers_[i]->step(h, cos.data(), sin.data(), cache, static_cast<int64_t>(i), slot, keys,
                           counters.empty() ? none : counters[i]);
    at::Tensor out = at::empty({1, 1, D}, h.options());
    rms_norm(bf16_ptr(h), bf16_ptr(norm_), D, eps_, bf16_ptr(out));
    return out;
  }

  // the lm_head's logits of that hidden state, [1, V] fp32 (its bf16 products, as `Transformer.logits`)
  at::Tensor logits(int64_t token, int64_t position, const at::Tensor& cache, int64_t slot,
                    const at::Tensor& key_slots, const std::vector<std::vector<at::Tensor>>& counters) const {
    TORCH_CHECK(head_.defined(), "native model: built without the lm_head");
    const at::Tensor h = hidden(token, position, cache, slot, key_slots, counters);
    return head_(h.view({1, h.size(-1)})).to(at::kFloat);
  }

  bool has_head() const { return head_.defined(); }
  const std::vector<std::shared_ptr<DecodeLayer>>& layers() const { return layers_; }

 private:
  std::vector<std::shared_ptr<DecodeLayer>> layers_;
  at::Tensor embed_, norm_;
  float eps_;
  Linear head_;
  at::Tensor inv_freq_;
  double factor_;
};

}  // namespace
}  // namespace routed

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<routed::DecodeLayer, std::shared_ptr<routed::DecodeLayer>>(m, "DecodeLayer")
      .def(pybind11::init<const std::map<std::string, routed::LinearSpec>&, const std::map<std::string, at::Tensor>&,
                          const std::map<std::string, double>&, int64_t, std::vector<at::Tensor>, int64_t>())
      .def("forward", &routed::DecodeLayer::forward, pybind11::call_guard<pybind11::gil_scoped_release>());
  pybind11::class_<routed::DecodeModel>(m, "DecodeModel")
      .def(pybind11::init<std::vector<std::shared_ptr<routed::DecodeLayer>>, const at::Tensor&, const at::Tensor&,
                          double, const routed::LinearSpec&, const at::Tensor&, double>())
      .def("hidden", &routed::DecodeModel::hidden, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("logits", &routed::DecodeModel::logits, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def_property_readonly("has_head", &routed::DecodeModel::has_head)
      .def_property_readonly("layers", &routed::DecodeModel::layers);
}

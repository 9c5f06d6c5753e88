// One MemoryFormer block for one new token per sequence, fused into a single CPU operator (spec §3; issue 15).
//
//   a = RMSNorm(x);  q, k, v = Memory Layer(a) (one hash, tables [T_Q | T_K | T_V]);  rotary on q and k;
//   k, v written in place at position `length` of the KV cache;  o = softmax(q Kᵀ · scaling) V over length + 1 keys;
//   x = x + o;  x = x + ML2(LayerNorm(act(ML1(RMSNorm(x)))))
//
// Operator (namespace memoryformer):
//   memory_block_decode(hidden [batch, 1, d], cos, sin, key_cache, value_cache, length, <the block's weights>)
//       -> hidden'                                                                   inference only
//
// At decode a block is ~50 tiny torch ops whose dispatch, allocation and KV-cache concatenation cost several times
// the block's memory traffic (0.7 MB of table rows and the cache); here they are plain loops over registers and
// L1-resident vectors, and the cache is never copied. Activations are fp32; tables fp32, bf16 or fp16, accumulated
// in fp32 exactly as memory_lookup_cpu does (same hash, same gather code).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "lookup_math.h"

namespace memoryformer {
namespace {

// Keys × head dims one attention task should cover before a parallel region pays for itself (~2 µs of work per
// 32k multiply-adds; a fork costs a few µs on an idle machine): short caches stay on the calling thread.
constexpr int64_t kAttentionGrain = 1 << 16;

struct Lookup {
  const at::Tensor& tables;
  const at::Tensor& bias;
  int64_t tau;
};

// out [h] = Memory Layer(x [K·τ]) for one token (spec §1), through the same hash and gather as memory_lookup_cpu.
template <typename table_t>
void lookup_token(const Lookup& layer, const HashParams<float>& hp, const float* x, float* out) {
  std::vector<int64_t> rows(hp.num_chunks);
  std::vector<float> weights(hp.num_chunks), e(hp.num_chunks * hp.tau);
  hash_token(x, hp, rows.data(), weights.data(), e.data());
  gather_token(layer.tables.const_data_ptr<table_t>(), layer.tables.size(1), rows.data(), weights.data(),
               hp.num_chunks, layer.bias.const_data_ptr<float>(), out);
}

// out = scale ⊙ x / (rms(x) + eps), eps outside the root (the authors' RMSNorm, layers/norms.py).
void rms_norm(const float* x, const float* scale, double eps, int64_t d, float* out) {
  float sum_squares = 0;
  for (int64_t i = 0; i < d; ++i) sum_squares += x[i] * x[i];
  const float denominator = std::sqrt(sum_squares / static_cast<float>(d)) + static_cast<float>(eps);
  for (int64_t i = 0; i < d; ++i) out[i] = scale[i] * (x[i] / denominator);
}

// x = weight ⊙ (x − mean) / sqrt(var + eps) + bias in place (nn.LayerNorm, biased variance).
void layer_norm(float* x, const float* weight, const float* bias, double eps, int64_t n) {
  float mean = 0, var = 0;
  for (int64_t i = 0; i < n; ++i) mean += x[i];
  mean /= static_cast<float>(n);
  for (int64_t i = 0; i < n; ++i) var += (x[i] - mean) * (x[i] - mean);
  const float inv_std = 1.0f / std::sqrt(var / static_cast<float>(n) + static_cast<float>(eps));
  for (int64_t i = 0; i < n; ++i) x[i] = (x[i] - mean) * inv_std * weight[i] + bias[i];
}

// GPT-NeoX rotary on the first rotary_dims of one head: x·cos + rotate_half(x)·sin, rotate_half(x) = [−x₂, x₁].
void rotate(float* x, const float* cos, const float* sin, int64_t rotary_dims) {
  const int64_t half = rotary_dims / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = x[i], x2 = x[i + half];
    x[i] = x1 * cos[i] - x2 * sin[i];
    x[i + half] = x2 * cos[i + half] + x1 * sin[i + half];
  }
}

// scores[j] = <q, keys[j]> for j < num_keys, keys rows head_dim apart (head_dim a multiple of 8).
void key_scores(const float* q, const float* keys, int64_t num_keys, int64_t head_dim, float* scores) {
  int64_t j = 0;
#if defined(__AVX2__)
  // Eight keys at a time: eight independent FMA chains, then one transposing reduction (hadd tree) of the eight
  // partial vectors instead of eight serial 8-lane sums, which cost more than the dot products at head_dim 64.
  for (; j + 8 <= num_keys; j += 8) {
    __m256 acc[8];
    for (int r = 0; r < 8; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t i = 0; i < head_dim; i += kLanes) {
      const __m256 qi = _mm256_loadu_ps(q + i);
      for (int r = 0; r < 8; ++r) acc[r] = _mm256_fmadd_ps(qi, _mm256_loadu_ps(keys + (j + r) * head_dim + i), acc[r]);
    }
    const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
    const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
    _mm256_storeu_ps(scores + j, _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20),
                                               _mm256_permute2f128_ps(s0123, s4567, 0x31)));
  }
#endif
  for (; j < num_keys; ++j) scores[j] = dot_row(q, keys + j * head_dim, head_dim);
}

// o[0..kVecs·8) = Σ_j p_j · values[j][0..kVecs·8): the output slice stays in registers for the whole sweep.
template <int kVecs>
void weighted_values(const float* p, const float* values, int64_t num_keys, int64_t head_dim, float* o) {
  float8 acc[kVecs] = {};
  for (int64_t j = 0; j < num_keys; ++j) {
    const float8 weight = float8{} + p[j];
    for (int c = 0; c < kVecs; ++c) acc[c] += weight * load8(values + j * head_dim + c * kLanes);
  }
  for (int c = 0; c < kVecs; ++c) store8(o + c * kLanes, acc[c]);
}

// o [head_dim] = softmax(q · K[0..keys)ᵀ · scaling) V[0..keys) for one head; keys/values rows are head_dim apart.
// `scores` is scratch of num_keys floats.
void attend(const float* q, const float* keys, const float* values, int64_t num_keys, int64_t head_dim,
            float scaling, float* scores, float* o) {
  key_scores(q, keys, num_keys, head_dim, scores);
  float max_score = -INFINITY;
  for (int64_t j = 0; j < num_keys; ++j) max_score = std::max(max_score, scores[j]);
  float total = 0;
#pragma omp simd reduction(+ : total)
  for (int64_t j = 0; j < num_keys; ++j) {
    scores[j] = exp_nonpositive((scores[j] - max_score) * scaling);
    total += scores[j];
  }
  const float inverse = 1 / total;
#pragma omp simd
  for (int64_t j = 0; j < num_keys; ++j) scores[j] *= inverse;
  int64_t i = 0;
  for (; i + 8 * kLanes <= head_dim; i += 8 * kLanes) weighted_values<8>(scores, values + i, num_keys, head_dim, o + i);
  for (; i < head_dim; i += kLanes) weighted_values<1>(scores, values + i, num_keys, head_dim, o + i);
}

void check_cache(const at::Tensor& cache, const char* name, int64_t batch, int64_t num_heads, int64_t head_dim,
                 int64_t length) {
  TORCH_CHECK_VALUE(cache.device().is_cpu() && cache.scalar_type() == at::kFloat && cache.is_contiguous() &&
                        cache.dim() == 4 && cache.size(0) == batch && cache.size(1) == num_heads &&
                        cache.size(3) == head_dim,
                    "memory_block_decode: ", name, " must be a contiguous fp32 CPU tensor [batch=", batch,
                    ", heads=", num_heads, ", capacity, head_dim=", head_dim, "], got ", cache.sizes(), " ",
                    cache.scalar_type());
  TORCH_CHECK_VALUE(length >= 0 && length < cache.size(2), "memory_block_decode: no room at position ", length,
                    " of a ", name, " with capacity ", cache.size(2), "; reserve a slot first");
}

void check_vector(const at::Tensor& t, const char* name, int64_t size) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 1 &&
                        t.size(0) == size,
                    "memory_block_decode: ", name, " must be a contiguous fp32 CPU vector of ", size, " values, got ",
                    t.sizes(), " ", t.scalar_type());
}

at::Tensor memory_block_decode(const at::Tensor& hidden, const at::Tensor& cos, const at::Tensor& sin,
                               const at::Tensor& key_cache, const at::Tensor& value_cache, int64_t length,
                               const at::Tensor& attention_norm_scale, double rms_norm_eps,
                               const at::Tensor& qkv_tables, const at::Tensor& qkv_bias, int64_t tau,
                               int64_t num_heads, double scaling, const at::Tensor& memory_block_norm_scale,
                               const at::Tensor& ml1_tables, const at::Tensor& ml1_bias, bool gelu,
                               const at::Tensor& layer_norm_weight, const at::Tensor& layer_norm_bias,
                               double layer_norm_eps, const at::Tensor& ml2_tables, const at::Tensor& ml2_bias,
                               int64_t ml2_tau, c10::string_view score, double temperature) {
  TORCH_CHECK_VALUE(hidden.device().is_cpu() && hidden.scalar_type() == at::kFloat && hidden.dim() >= 2,
                    "memory_block_decode: hidden must be an fp32 CPU tensor [batch, ..., d] of one token per "
                    "sequence, got ", hidden.sizes(), " ", hidden.scalar_type());
  const at::Tensor x = hidden.contiguous();
  const int64_t d = x.size(-1), batch = x.numel() / d;
  TORCH_CHECK_VALUE(num_heads >= 1 && d % num_heads == 0, "memory_block_decode: num_heads=", num_heads,
                    " must divide d=", d);
  const int64_t head_dim = d / num_heads, hidden_ml = ml1_tables.size(1);
  TORCH_CHECK_VALUE(head_dim % kLanes == 0, "memory_block_decode: head_dim=", head_dim,
                    " must be a multiple of 8 (the vector width); decode such models on the module path");
  TORCH_CHECK_VALUE(tau >= 1 && d % tau == 0 && qkv_tables.size(0) == ((d / tau) << tau) &&
                        qkv_tables.size(1) == 3 * d,
                    "memory_block_decode: qkv tables must be [K·2^tau, 3d] for d=", d, ", tau=", tau, ", got ",
                    qkv_tables.sizes());
  TORCH_CHECK_VALUE(ml1_tables.size(0) == ((d / tau) << tau) && ml2_tau >= 1 && hidden_ml % ml2_tau == 0 &&
                        hidden_ml / ml2_tau == d / tau && ml2_tables.size(0) == ((d / tau) << ml2_tau) &&
                        ml2_tables.size(1) == d,
                    "memory_block_decode: Memory Block tables must be ML1 [K·2^tau, K·(tau+e)] and ML2 "
                    "[K·2^(tau+e), d], got ", ml1_tables.sizes(), " and ", ml2_tables.sizes());
  TORCH_CHECK_VALUE(qkv_tables.scalar_type() == ml1_tables.scalar_type() &&
                        qkv_tables.scalar_type() == ml2_tables.scalar_type() && qkv_tables.is_contiguous() &&
                        ml1_tables.is_contiguous() && ml2_tables.is_contiguous(),
                    "memory_block_decode: the block's three tables must be contiguous and of one dtype");
  const int64_t rotary_dims = cos.size(-1);
  TORCH_CHECK_VALUE(cos.sizes() == sin.sizes() && (cos.numel() == rotary_dims || cos.numel() == batch * rotary_dims) &&
                        rotary_dims % 2 == 0 && rotary_dims <= head_dim && cos.scalar_type() == at::kFloat &&
                        sin.scalar_type() == at::kFloat,
                    "memory_block_decode: cos and sin must be fp32 [..., rotary_dims] for one position or one per "
                    "sequence (batch=", batch, "), with even rotary_dims <= head_dim=", head_dim, "; got ",
                    cos.sizes());
  TORCH_CHECK_VALUE(score == "l1" || score == "paper", "memory_block_decode: score must be 'l1' or 'paper'");
  check_cache(key_cache, "key_cache", batch, num_heads, head_dim, length);
  check_cache(value_cache, "value_cache", batch, num_heads, head_dim, length);
  check_vector(attention_norm_scale, "attention_norm_scale", d);
  check_vector(memory_block_norm_scale, "memory_block_norm_scale", d);
  check_vector(qkv_bias, "qkv_bias", 3 * d);
  check_vector(ml1_bias, "ml1_bias", hidden_ml);
  check_vector(ml2_bias, "ml2_bias", d);
  check_vector(layer_norm_weight, "layer_norm_weight", hidden_ml);
  check_vector(layer_norm_bias, "layer_norm_bias", hidden_ml);

  const at::Tensor cos_c = cos.contiguous(), sin_c = sin.contiguous();
  const int64_t capacity = key_cache.size(2), num_keys = length + 1;
  const int64_t rotary_stride = cos.numel() == rotary_dims ? 0 : rotary_dims;  // one position shared by the batch
  const auto qkv_hash = hash_params<float>(d / tau, tau, score, temperature);
  const auto ml2_hash = hash_params<float>(d / tau, ml2_tau, score, temperature);
  float* keys = key_cache.mutable_data_ptr<float>();
  float* values = value_cache.mutable_data_ptr<float>();
  at::Tensor out = at::empty_like(x);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv_tables.scalar_type(), "memory_block_decode", [&] {
    using table_t = scalar_t;
    std::vector<float> normed(d), qkv(3 * d), attention(d), memory(hidden_ml), scores(num_keys * num_heads);
    for (int64_t b = 0; b < batch; ++b) {
      const float* x_b = x.const_data_ptr<float>() + b * d;
      float* out_b = out.mutable_data_ptr<float>() + b * d;
      // Attention: Q, K, V from one hash; K and V go straight into the cache slot.
      rms_norm(x_b, attention_norm_scale.const_data_ptr<float>(), rms_norm_eps, d, normed.data());
      lookup_token<table_t>({qkv_tables, qkv_bias, tau}, qkv_hash, normed.data(), qkv.data());
      const float* cos_b = cos_c.const_data_ptr<float>() + b * rotary_stride;
      const float* sin_b = sin_c.const_data_ptr<float>() + b * rotary_stride;
      for (int64_t head = 0; head < num_heads; ++head) {
        float* q = qkv.data() + head * head_dim;
        float* k = qkv.data() + d + head * head_dim;
        rotate(q, cos_b, sin_b, rotary_dims);
        rotate(k, cos_b, sin_b, rotary_dims);
        const int64_t slot = ((b * num_heads + head) * capacity + length) * head_dim;
        std::memcpy(keys + slot, k, head_dim * sizeof(float));
        std::memcpy(values + slot, qkv.data() + 2 * d + head * head_dim, head_dim * sizeof(float));
      }
      const int64_t grain = std::max<int64_t>(1, kAttentionGrain / (num_keys * head_dim));
      at::parallel_for(0, num_heads, grain, [&](int64_t begin, int64_t end) {
        for (int64_t head = begin; head < end; ++head) {
          const int64_t start = (b * num_heads + head) * capacity * head_dim;
          attend(qkv.data() + head * head_dim, keys + start, values + start, num_keys, head_dim,
                 static_cast<float>(scaling), scores.data() + head * num_keys, attention.data() + head * head_dim);
        }
      });
      for (int64_t i = 0; i < d; ++i) out_b[i] = x_b[i] + attention[i];
      // Memory Block: ML1 → (GELU) → LayerNorm → ML2, behind its pre-norm residual.
      rms_norm(out_b, memory_block_norm_scale.const_data_ptr<float>(), rms_norm_eps, d, normed.data());
      lookup_token<table_t>({ml1_tables, ml1_bias, tau}, qkv_hash, normed.data(), memory.data());
      if (gelu) {
        for (auto& u : memory) u = 0.5f * u * (1.0f + std::erf(u * static_cast<float>(M_SQRT1_2)));
      }
      layer_norm(memory.data(), layer_norm_weight.const_data_ptr<float>(), layer_norm_bias.const_data_ptr<float>(),
                 layer_norm_eps, hidden_ml);
      lookup_token<table_t>({ml2_tables, ml2_bias, ml2_tau}, ml2_hash, memory.data(), normed.data());
      for (int64_t i = 0; i < d; ++i) out_b[i] += normed[i];
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(memoryformer, m) {
  // The call's own inputs first, then the block's weights and shapes (MemoryFormerBlock.fused_decode_operands).
  m.def(
      "memory_block_decode(Tensor hidden, Tensor cos, Tensor sin, Tensor(a!) key_cache, Tensor(b!) value_cache, "
      "int length, Tensor attention_norm_scale, float rms_norm_eps, Tensor qkv_tables, Tensor qkv_bias, int tau, "
      "int num_heads, float scaling, Tensor memory_block_norm_scale, Tensor ml1_tables, Tensor ml1_bias, bool gelu, "
      "Tensor layer_norm_weight, Tensor layer_norm_bias, float layer_norm_eps, Tensor ml2_tables, Tensor ml2_bias, "
      "int ml2_tau, str score, float temperature) -> Tensor");
}

TORCH_LIBRARY_IMPL(memoryformer, CPU, m) {
  m.impl("memory_block_decode", &memory_block_decode);
}

}  // namespace memoryformer

// The fused CPU Memory Layer (spec §1): hash + score + gather + bias in one pass over the tokens, and its backward.
//
//   y[n] = Σ_k w_{n,k} · tables[r_{n,k}] + bias,   r_{n,k} = k·2^τ + code_{n,k}   (MSB-first sign bits, 1 for z ≥ 0)
//   w = ‖z‖₁ · Π_i σ(2|z_i|)  (score "l1")   or   w = Π_i σ(2|z_i|/t)  (score "paper")
//
// Operators (namespace memoryformer):
//   memory_lookup_cpu(x, tables, bias, tau, score, temperature) -> y             autograd implemented here in C++
//   memory_lookup_cpu_backward(grad_y, x, tables, tau, score, temperature, need_grad_x, need_grad_tables)
//       -> (grad_x, grad_tables)                                                  empty [0] tensors when not needed
//
// Accumulation is in fp32, or fp64 when x is fp64 (the reference's contract); tables may be fp32/fp64/bf16/fp16.
// Backward saves only x and tables and recomputes the hash, which costs ~1/10 of a gather.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace memoryformer {
namespace {

// ---------------------------------------------------------------------------------------------------------------
// Hash and score of one token (spec §1 steps 1–5)

// e^x for x ≤ 0 in fp32 (relative error ~1e-7): plain arithmetic, so loops calling it vectorise (AVX2: 8 lanes);
// std::exp stays a scalar libm call per input value, which would cost about as much as the gather itself.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);  // e^-87 is still a normal float; callers only use it beside 1
  const float shifter = 12582912.0f;  // 1.5·2^23: adding it rounds to the nearest integer
  const float n = (x * 1.44269504f + shifter) - shifter;  // round(x / ln 2)
  const float r = (x - n * 0.693145752f) - n * 1.42860677e-6f;  // x − n·ln 2 in two steps, |r| ≤ ln2/2
  float p = 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;  // e^r, Taylor to degree 6
  int32_t bits;
  std::memcpy(&bits, &p, sizeof bits);
  bits += static_cast<int32_t>(n) << 23;  // · 2^n
  std::memcpy(&p, &bits, sizeof bits);
  return p;
}

inline double exp_nonpositive(double x) {
  return std::exp(x);  // fp64 is the test path: exactness over speed
}

template <typename acc_t>
struct HashParams {
  int64_t num_chunks;  // K
  int64_t tau;         // bits per chunk
  acc_t scale;         // the s of σ(s·|z|): 2 for "l1", 2/t for "paper"
  bool l1;             // w = ‖z‖₁ · p (the authors' code) rather than p (the paper)
};

template <typename acc_t>
HashParams<acc_t> hash_params(int64_t num_chunks, int64_t tau, c10::string_view score, double temperature) {
  const bool l1 = score == "l1";
  return {num_chunks, tau, static_cast<acc_t>(l1 ? 2.0 : 2.0 / temperature), l1};
}

// Rows r_k and weights w_k of one token z [K·τ]. `e` [K·τ] receives e^{-s|z_i|}, which the backward reuses for
// σ(−s|z_i|) = e/(1+e); σ(s|z_i|) = 1/(1+e), so p = 1 / Π_i (1+e_i) costs one division per chunk.
template <typename acc_t>
inline void hash_token(const acc_t* z, const HashParams<acc_t>& hp, int64_t* rows, acc_t* weights, acc_t* e) {
  const int64_t d = hp.num_chunks * hp.tau;
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) {
    e[i] = exp_nonpositive(-hp.scale * std::abs(z[i]));
  }
  for (int64_t k = 0; k < hp.num_chunks; ++k) {
    const acc_t* zk = z + k * hp.tau;
    const acc_t* ek = e + k * hp.tau;
    int64_t code = 0;
    acc_t denominator = 1, norm = 0;
    for (int64_t i = 0; i < hp.tau; ++i) {
      code = (code << 1) | static_cast<int64_t>(zk[i] >= 0);  // MSB first; z = 0 (and −0) counts as bit 1
      denominator *= 1 + ek[i];
      norm += std::abs(zk[i]);
    }
    const acc_t p = 1 / denominator;
    rows[k] = (k << hp.tau) + code;
    weights[k] = hp.l1 ? norm * p : p;
  }
}

// ∂w_k/∂z_i for one token from the quantities hash_token produced (spec §1, Gradients), scaled by gw_k = ∂L/∂w_k:
//   l1:    sign(z_i) · p · (1 + 2‖z‖₁ σ(−2|z_i|))        paper: sign(z_i) · p · s · σ(−s|z_i|)
// sign(0) = 0, so the gradient is 0 at z = 0, as autograd of |z| gives.
template <typename acc_t>
inline void score_gradient(const acc_t* z, const acc_t* e, const acc_t* grad_weights, const HashParams<acc_t>& hp,
                           acc_t* grad_z) {
  for (int64_t k = 0; k < hp.num_chunks; ++k) {
    const acc_t* zk = z + k * hp.tau;
    const acc_t* ek = e + k * hp.tau;
    acc_t norm = 0, denominator = 1;
    for (int64_t i = 0; i < hp.tau; ++i) {
      norm += std::abs(zk[i]);
      denominator *= 1 + ek[i];
    }
    const acc_t p = 1 / denominator;
    const acc_t gp = grad_weights[k] * p;
    for (int64_t i = 0; i < hp.tau; ++i) {
      const acc_t sign = static_cast<acc_t>((zk[i] > 0) - (zk[i] < 0));
      const acc_t sigma_neg = ek[i] / (1 + ek[i]);
      const acc_t dw = hp.l1 ? 1 + hp.scale * norm * sigma_neg : hp.scale * sigma_neg;
      grad_z[k * hp.tau + i] = sign * gp * dw;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Row arithmetic: out = bias + Σ_k w_k · tables[rows[k]] (forward), <g, tables[row]> (backward)
//
// The fp32 path, which every production dtype takes, computes 8 lanes at a time with GCC/Clang vector extensions
// (AVX2 registers under -march=native, SSE or NEON elsewhere); fp64 (tests only) and ragged tails use plain loops.

typedef float float8 __attribute__((vector_size(32)));
typedef double double8 __attribute__((vector_size(64)));
typedef _Float16 half8 __attribute__((vector_size(16)));
typedef uint16_t uint16x8 __attribute__((vector_size(16)));
typedef uint32_t uint32x8 __attribute__((vector_size(32)));
constexpr int64_t kLanes = 8;

inline float8 load8(const float* p) {
  float8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline float8 load8(const double* p) {
  double8 v;
  std::memcpy(&v, p, sizeof v);
  return __builtin_convertvector(v, float8);
}

inline float8 load8(const c10::Half* p) {
  half8 v;
  std::memcpy(&v, p, sizeof v);
  return __builtin_convertvector(v, float8);
}

inline float8 load8(const c10::BFloat16* p) {  // bf16 is the top half of an fp32
#if defined(__AVX2__)
  // One widening load: the generic form below compiles to five instructions and made bf16 no faster than fp32.
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return reinterpret_cast<float8>(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16)));
#else
  uint16x8 bits;
  std::memcpy(&bits, p, sizeof bits);
  const uint32x8 wide = __builtin_convertvector(bits, uint32x8) << 16;
  float8 v;
  std::memcpy(&v, &wide, sizeof v);
  return v;
#endif
}

inline void store8(float* p, float8 v) {
  std::memcpy(p, &v, sizeof v);
}

// Rows one sweep accumulates: each sweep reads the output row once from L1 for kRowGroup table rows, and walks
// every table row front to back, which the hardware prefetcher follows (blocking columns in registers across all
// K rows instead measured 1.5-2x slower: K interleaved 256-byte streams defeat the prefetcher).
constexpr int64_t kRowGroup = 8;

// out[j] += Σ_{i<kRows} weights[i] · tables[rows[i], j] for all h columns, in fp32.
template <int64_t kRows, typename table_t>
inline void accumulate_rows(const table_t* tables, int64_t h, const int64_t* rows, const float* weights, float* out) {
  const table_t* row[kRows];
  float8 weight[kRows];  // broadcast once, in registers: `out` might alias `weights` as far as the compiler knows
  for (int64_t i = 0; i < kRows; ++i) {
    row[i] = tables + rows[i] * h;
    weight[i] = float8{} + weights[i];
  }
  int64_t j = 0;
  for (; j + kLanes <= h; j += kLanes) {
    float8 acc = load8(out + j);
    for (int64_t i = 0; i < kRows; ++i) {
      acc += weight[i] * load8(row[i] + j);
    }
    store8(out + j, acc);
  }
  for (; j < h; ++j) {
    for (int64_t i = 0; i < kRows; ++i) {
      out[j] += weights[i] * static_cast<float>(row[i][j]);
    }
  }
}

// Bytes at the start of each of the next group's rows requested ahead of use: enough to start the hardware
// prefetcher's stream on every row (measured ~10% faster for fp32 and up to ~40% for bf16 at N = 2048, which is
// then on par with F.embedding_bag; prefetching whole rows was slower for fp32).
constexpr int64_t kPrefetchBytes = 256;

template <typename table_t>
inline void prefetch_rows(const table_t* tables, int64_t h, const int64_t* rows, int64_t count) {
  const int64_t bytes = std::min<int64_t>(kPrefetchBytes, h * static_cast<int64_t>(sizeof(table_t)));
  for (int64_t i = 0; i < count; ++i) {
    const char* row = reinterpret_cast<const char*>(tables + rows[i] * h);
    for (int64_t offset = 0; offset < bytes; offset += 64) {
      __builtin_prefetch(row + offset);
    }
  }
}

// out = bias + Σ_k w_k · tables[rows[k]] for one token, h columns.
template <typename acc_t, typename table_t>
inline void gather_token(const table_t* tables, int64_t h, const int64_t* rows, const acc_t* weights,
                         int64_t num_chunks, const acc_t* bias, acc_t* out) {
  for (int64_t j = 0; j < h; ++j) {
    out[j] = bias != nullptr ? bias[j] : acc_t(0);
  }
  if constexpr (std::is_same_v<acc_t, float>) {
    int64_t k = 0;
    for (; k + kRowGroup <= num_chunks; k += kRowGroup) {
      prefetch_rows(tables, h, rows + k + kRowGroup, std::min(kRowGroup, num_chunks - k - kRowGroup));
      accumulate_rows<kRowGroup>(tables, h, rows + k, weights + k, out);
    }
    for (; k < num_chunks; ++k) {
      accumulate_rows<1>(tables, h, rows + k, weights + k, out);
    }
  } else {  // fp64: the test path
    for (int64_t k = 0; k < num_chunks; ++k) {
      const table_t* row = tables + rows[k] * h;
      for (int64_t j = 0; j < h; ++j) {
        out[j] += weights[k] * static_cast<acc_t>(row[j]);
      }
    }
  }
}

// <g, row> over h columns, accumulated in acc_t.
template <typename acc_t, typename table_t>
inline acc_t dot_row(const acc_t* g, const table_t* row, int64_t h) {
  acc_t sum = 0;
  int64_t j = 0;
  if constexpr (std::is_same_v<acc_t, float>) {
    float8 acc0{}, acc1{};  // two chains hide the FMA latency
    for (; j + 2 * kLanes <= h; j += 2 * kLanes) {
      acc0 += load8(g + j) * load8(row + j);
      acc1 += load8(g + j + kLanes) * load8(row + j + kLanes);
    }
    for (; j + kLanes <= h; j += kLanes) {
      acc0 += load8(g + j) * load8(row + j);
    }
    acc0 += acc1;
    for (int64_t lane = 0; lane < kLanes; ++lane) {
      sum += acc0[lane];
    }
  }
  for (; j < h; ++j) {
    sum += g[j] * static_cast<acc_t>(row[j]);
  }
  return sum;
}

// dst[j] = src[j] in the tables' dtype. bf16 rounds to nearest even with integer ops, which vectorise where
// c10::BFloat16's scalar conversion would not (this converts the whole dense gradient once per backward).
template <typename acc_t, typename table_t>
inline void convert_row(const acc_t* src, table_t* dst, int64_t n) {
  if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<table_t, c10::BFloat16>) {
    for (int64_t j = 0; j < n; ++j) {
      uint32_t bits;
      std::memcpy(&bits, src + j, sizeof bits);
      const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
      const uint16_t out = src[j] != src[j] ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);  // NaN stays NaN
      std::memcpy(dst + j, &out, sizeof out);
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      dst[j] = static_cast<table_t>(src[j]);
    }
  }
}

// Tokens per parallel task: enough multiply-adds (~32k) that an OpenMP fork pays for itself. A single token (decode)
// always runs inline: splitting its columns across 2 threads measured 15 ms per call instead of 25 µs on a busy
// machine (a parallel region waits for every thread to be scheduled), so decode never opens a parallel region.
int64_t token_grain(int64_t num_chunks, int64_t h) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, num_chunks * h));
}

// ---------------------------------------------------------------------------------------------------------------
// Kernels

template <typename acc_t, typename table_t>
void forward_kernel(const at::Tensor& x, const at::Tensor& tables, const at::Tensor& bias, const HashParams<acc_t>& hp,
                    at::Tensor& out) {
  const int64_t num_tokens = x.size(0), d = x.size(1), h = tables.size(1), num_chunks = hp.num_chunks;
  const acc_t* x_data = x.const_data_ptr<acc_t>();
  const table_t* table_data = tables.const_data_ptr<table_t>();
  const acc_t* bias_data = bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr;
  acc_t* out_data = out.mutable_data_ptr<acc_t>();
  at::parallel_for(0, num_tokens, token_grain(num_chunks, h), [&](int64_t begin, int64_t end) {
    std::vector<int64_t> rows(num_chunks);
    std::vector<acc_t> weights(num_chunks), e(d);
    for (int64_t n = begin; n < end; ++n) {
      hash_token(x_data + n * d, hp, rows.data(), weights.data(), e.data());
      gather_token(table_data, h, rows.data(), weights.data(), num_chunks, bias_data, out_data + n * h);
    }
  });
}

// Pass 1, parallel over tokens: hash again, keep (row, weight) per (n, k) for pass 2, and grad_x = ∂L/∂w · ∂w/∂z
// with ∂L/∂w_{n,k} = <g_n, tables[r_{n,k}]>.
template <typename acc_t, typename table_t>
void backward_tokens_kernel(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& tables,
                            const HashParams<acc_t>& hp, bool need_grad_x, int64_t* rows, acc_t* weights,
                            acc_t* grad_x) {
  const int64_t num_tokens = x.size(0), d = x.size(1), h = tables.size(1), num_chunks = hp.num_chunks;
  const acc_t* x_data = x.const_data_ptr<acc_t>();
  const acc_t* g_data = grad_y.const_data_ptr<acc_t>();
  const table_t* table_data = tables.const_data_ptr<table_t>();
  at::parallel_for(0, num_tokens, token_grain(num_chunks, h), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> e(d), grad_weights(num_chunks);
    for (int64_t n = begin; n < end; ++n) {
      const acc_t* z = x_data + n * d;
      int64_t* token_rows = rows + n * num_chunks;
      acc_t* token_weights = weights + n * num_chunks;
      hash_token(z, hp, token_rows, token_weights, e.data());
      if (!need_grad_x) {
        continue;
      }
      const acc_t* g = g_data + n * h;
      for (int64_t k = 0; k < num_chunks; ++k) {
        grad_weights[k] = dot_row(g, table_data + token_rows[k] * h, h);
      }
      score_gradient(z, e.data(), grad_weights.data(), hp, grad_x + n * d);
    }
  });
}

// Columns of grad_tables one task owns; with the chunk k this makes tasks whose output blocks are disjoint.
constexpr int64_t kGradColumns = 256;

// Pass 2: grad_tables[r] = Σ_{(n,k): r_{n,k} = r} w_{n,k} · g_n. Chunk k owns rows k·2^τ … k·2^τ+2^τ−1, so tasks
// over (chunk, column block) write disjoint blocks: race-free without atomics. Accumulates in acc_t, directly in
// the output when it has that dtype, else in a per-task scratch block converted once at the end.
template <typename acc_t, typename table_t>
void backward_tables_kernel(const at::Tensor& grad_y, const HashParams<acc_t>& hp, const int64_t* rows,
                            const acc_t* weights, at::Tensor& grad_tables) {
  const int64_t num_tokens = grad_y.size(0), h = grad_y.size(1), num_chunks = hp.num_chunks;
  const int64_t bucket_count = int64_t{1} << hp.tau;
  const int64_t column_blocks = (h + kGradColumns - 1) / kGradColumns;
  const acc_t* g_data = grad_y.const_data_ptr<acc_t>();
  table_t* out = grad_tables.mutable_data_ptr<table_t>();
  constexpr bool in_place = std::is_same_v<acc_t, table_t>;
  at::parallel_for(0, num_chunks * column_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(in_place ? 0 : bucket_count * std::min(h, kGradColumns));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t k = task / column_blocks;
      const int64_t column = (task % column_blocks) * kGradColumns;
      const int64_t width = std::min(kGradColumns, h - column);
      // acc[b·stride + j] is grad_tables[k·2^τ + b, column + j]
      acc_t* acc = in_place ? reinterpret_cast<acc_t*>(out) + (k * bucket_count) * h + column : scratch.data();
      const int64_t stride = in_place ? h : width;
      for (int64_t b = 0; b < bucket_count; ++b) {
        std::fill_n(acc + b * stride, width, acc_t(0));
      }
      for (int64_t n = 0; n < num_tokens; ++n) {
        const int64_t bucket = rows[n * num_chunks + k] - (k << hp.tau);
        const acc_t w = weights[n * num_chunks + k];
        const acc_t* g = g_data + n * h + column;
        acc_t* dst = acc + bucket * stride;
#pragma omp simd
        for (int64_t j = 0; j < width; ++j) {
          dst[j] += w * g[j];
        }
      }
      if constexpr (!in_place) {
        for (int64_t b = 0; b < bucket_count; ++b) {
          convert_row(acc + b * stride, out + (k * bucket_count + b) * h + column, width);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Operators

at::ScalarType accumulation_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Fail early with a message naming the problem and the fix; returns K.
int64_t check_inputs(const at::Tensor& x, const at::Tensor& tables, int64_t tau, c10::string_view score,
                     double temperature) {
  TORCH_CHECK_VALUE(x.device().is_cpu() && tables.device().is_cpu(),
                    "memory_lookup_cpu needs CPU tensors, got x on ", x.device(), " and tables on ", tables.device(),
                    "; use backend='triton' or 'embedding_bag' for other devices");
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "memory_lookup_cpu: x must be floating point, got ",
                   x.scalar_type());
  TORCH_CHECK_TYPE(at::isFloatingType(tables.scalar_type()),
                   "memory_lookup_cpu: tables must be floating point, got ", tables.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2, "memory_lookup_cpu: x must be [N, K·tau] (flatten leading dimensions first), "
                    "got shape ", x.sizes());
  TORCH_CHECK_VALUE(tau >= 1 && tau <= 30, "memory_lookup_cpu: tau must be in [1, 30] bits per chunk, got ", tau);
  TORCH_CHECK_VALUE(x.size(1) % tau == 0, "memory_lookup_cpu: x width ", x.size(1), " is not divisible by tau=",
                    tau, "; the input must be K chunks of tau values");
  const int64_t num_chunks = x.size(1) / tau;
  TORCH_CHECK_VALUE(tables.dim() == 2 && tables.size(0) == (num_chunks << tau),
                    "memory_lookup_cpu: tables must be [K·2^tau, h] = [", num_chunks << tau,
                    ", h] for K=", num_chunks, " chunks of tau=", tau, " bits, got shape ", tables.sizes());
  TORCH_CHECK_VALUE(score == "l1" || score == "paper", "memory_lookup_cpu: score must be 'l1' or 'paper', got '",
                    std::string(score), "'");
  TORCH_CHECK_VALUE(temperature > 0, "memory_lookup_cpu: temperature must be > 0, got ", temperature);
  return num_chunks;
}

#define MEMORYFORMER_DISPATCH(ACC, TABLES, NAME, ...)                                                        \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TABLES, NAME, [&] {                            \
    using table_t = scalar_t;                                                                               \
    if ((ACC) == at::kDouble) {                                                                             \
      using acc_t = double;                                                                                 \
      __VA_ARGS__();                                                                                        \
    } else {                                                                                                \
      using acc_t = float;                                                                                  \
      __VA_ARGS__();                                                                                        \
    }                                                                                                       \
  })

at::Tensor memory_lookup_cpu(const at::Tensor& x, const at::Tensor& tables, const std::optional<at::Tensor>& bias,
                             int64_t tau, c10::string_view score, double temperature) {
  const int64_t num_chunks = check_inputs(x, tables, tau, score, temperature);
  const int64_t h = tables.size(1);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK_VALUE(bias->device().is_cpu() && bias->dim() == 1 && bias->size(0) == h,
                      "memory_lookup_cpu: bias must be a CPU tensor of shape [", h, "] (tables' width), got ",
                      bias->sizes(), " on ", bias->device());
  }
  const auto acc = accumulation_dtype(x);
  const at::Tensor x_acc = x.to(acc).contiguous();  // no copies when already fp32/fp64 and contiguous
  const at::Tensor tables_c = tables.contiguous();
  const at::Tensor bias_acc = has_bias ? bias->to(acc).contiguous() : at::Tensor();
  at::Tensor out = at::empty({x.size(0), h}, x.options().dtype(acc));
  MEMORYFORMER_DISPATCH(acc, tables_c.scalar_type(), "memory_lookup_cpu", [&] {
    const auto hp = hash_params<acc_t>(num_chunks, tau, score, temperature);
    forward_kernel<acc_t, table_t>(x_acc, tables_c, bias_acc, hp, out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> memory_lookup_cpu_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                              const at::Tensor& tables, int64_t tau,
                                                              c10::string_view score, double temperature,
                                                              bool need_grad_x, bool need_grad_tables) {
  const int64_t num_chunks = check_inputs(x, tables, tau, score, temperature);
  const int64_t num_tokens = x.size(0), h = tables.size(1);
  TORCH_CHECK_VALUE(grad_y.dim() == 2 && grad_y.size(0) == num_tokens && grad_y.size(1) == h,
                    "memory_lookup_cpu_backward: grad_y must be [", num_tokens, ", ", h, "], got ", grad_y.sizes());
  const auto acc = accumulation_dtype(x);
  const at::Tensor x_acc = x.to(acc).contiguous();
  const at::Tensor g = grad_y.to(acc).contiguous();  // also materialises expanded gradients (e.g. of y.sum())
  const at::Tensor tables_c = tables.contiguous();
  at::Tensor grad_x = need_grad_x ? at::empty({num_tokens, x.size(1)}, x_acc.options()) : x.new_empty({0});
  at::Tensor grad_tables = need_grad_tables ? at::empty(tables.sizes(), tables.options()) : tables.new_empty({0});
  if (!need_grad_x && !need_grad_tables) {
    return {grad_x, grad_tables};
  }
  at::Tensor rows = at::empty({num_tokens, num_chunks}, x.options().dtype(at::kLong));
  at::Tensor weights = at::empty({num_tokens, num_chunks}, x_acc.options());
  MEMORYFORMER_DISPATCH(acc, tables_c.scalar_type(), "memory_lookup_cpu_backward", [&] {
    const auto hp = hash_params<acc_t>(num_chunks, tau, score, temperature);
    backward_tokens_kernel<acc_t, table_t>(g, x_acc, tables_c, hp, need_grad_x, rows.mutable_data_ptr<int64_t>(),
                                           weights.mutable_data_ptr<acc_t>(),
                                           need_grad_x ? grad_x.mutable_data_ptr<acc_t>() : nullptr);
    if (need_grad_tables) {
      backward_tables_kernel<acc_t, table_t>(g, hp, rows.const_data_ptr<int64_t>(), weights.const_data_ptr<acc_t>(),
                                             grad_tables);
    }
  });
  return {need_grad_x ? grad_x.to(x.scalar_type()) : grad_x, grad_tables};
}

// ---------------------------------------------------------------------------------------------------------------
// Autograd, in C++ so that a call costs one dispatch in every mode (decode at N = 1 is overhead-bound)

at::Tensor call_forward(const at::Tensor& x, const at::Tensor& tables, const std::optional<at::Tensor>& bias,
                        int64_t tau, c10::string_view score, double temperature) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("memoryformer::memory_lookup_cpu", "")
                             .typed<decltype(memory_lookup_cpu)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(x, tables, bias, tau, score, temperature);
}

class MemoryLookupFunction : public torch::autograd::Function<MemoryLookupFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& tables,
                            const std::optional<at::Tensor>& bias, int64_t tau, c10::string_view score,
                            double temperature) {
    ctx->save_for_backward({x, tables});
    ctx->saved_data["tau"] = tau;
    ctx->saved_data["score"] = std::string(score);
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return call_forward(x, tables, bias, tau, score, temperature);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("memoryformer::memory_lookup_cpu_backward", "")
                               .typed<decltype(memory_lookup_cpu_backward)>();
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& grad_y = grads[0];
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    // Edges exist for tensor inputs only: 0 = x, 1 = tables, 2 = bias (when given).
    const bool need_x = ctx->needs_input_grad(0), need_tables = ctx->needs_input_grad(1);
    auto [grad_x, grad_tables] =
        op.call(grad_y, saved[0], saved[1], ctx->saved_data["tau"].toInt(), ctx->saved_data["score"].toStringRef(),
                ctx->saved_data["temperature"].toDouble(), need_x, need_tables);
    const at::Tensor grad_bias = has_bias && ctx->needs_input_grad(2) ? grad_y.sum(0) : at::Tensor();
    return {need_x ? grad_x : at::Tensor(), need_tables ? grad_tables : at::Tensor(), grad_bias,
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor memory_lookup_cpu_autograd(const at::Tensor& x, const at::Tensor& tables,
                                      const std::optional<at::Tensor>& bias, int64_t tau, c10::string_view score,
                                      double temperature) {
  const bool bias_requires_grad = bias.has_value() && bias->defined() && bias->requires_grad();
  if (!at::GradMode::is_enabled() || !(x.requires_grad() || tables.requires_grad() || bias_requires_grad)) {
    return call_forward(x, tables, bias, tau, score, temperature);  // inference: no graph, no saved tensors
  }
  return MemoryLookupFunction::apply(x, tables, bias, tau, score, temperature);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(memoryformer, m) {
  m.def("memory_lookup_cpu(Tensor x, Tensor tables, Tensor? bias, int tau, str score, float temperature) -> Tensor");
  m.def(
      "memory_lookup_cpu_backward(Tensor grad_y, Tensor x, Tensor tables, int tau, str score, float temperature, "
      "bool need_grad_x, bool need_grad_tables) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(memoryformer, CPU, m) {
  m.impl("memory_lookup_cpu", &memory_lookup_cpu);
  m.impl("memory_lookup_cpu_backward", &memory_lookup_cpu_backward);
}

TORCH_LIBRARY_IMPL(memoryformer, Autograd, m) {
  m.impl("memory_lookup_cpu", &memory_lookup_cpu_autograd);
}

}  // namespace memoryformer

// Row arithmetic shared by the fused CPU operators (spec §1): the hash and score of one token, its gather, and
// the vector helpers both use. Included by memory_lookup.cpp (the Memory Layer operator and its backward) and
// block_decode.cpp (one MemoryFormer block at decode); every function is inline, so each operator compiles its own.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace memoryformer {

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

}  // namespace memoryformer

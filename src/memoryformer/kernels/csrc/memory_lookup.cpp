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

#include "lookup_math.h"

namespace memoryformer {
namespace {

// ---------------------------------------------------------------------------------------------------------------
// The backward's score gradient and table conversion, and the forward's parallel grain

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

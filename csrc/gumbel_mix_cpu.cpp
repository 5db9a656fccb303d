// CPU kernels of the ap_erase_fast ops. The op schema is in ops_schema.cpp (same library);
// the CUDA kernels register for the same ops from a separate library (gumbel_mix_cuda.cu).
//
// Determinism: every reduction has a fixed order that does not depend on the thread count
// (parallel loops split output elements, never a sum), so results are bit-reproducible.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <cmath>
#include <numeric>
#include <vector>

#include "philox.h"

namespace ap_erase_fast {
namespace {

using at::Tensor;

constexpr int64_t kColBlock = 1024;  // columns per backward tile (L1-resident)
constexpr int64_t kFwdColBlock = 8192;  // columns per forward accumulator tile (G * 32 KiB, L2)
constexpr int kLanes = 16;           // independent partial sums: vectorisable, fixed order

// AP_ERASE_POISON=1 (tests): outputs start as NaN (-1 for indices) so unwritten elements show.
bool poison_outputs() {
  static const bool on = [] {
    const char* v = std::getenv("AP_ERASE_POISON");
    return v != nullptr && v[0] == '1';
  }();
  return on;
}

Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  if (!poison_outputs()) return at::empty(sizes, opts);
  if (at::isFloatingType(opts.dtype().toScalarType())) return at::full(sizes, NAN, opts);
  return at::full(sizes, -1, opts);
}

void check_table(const Tensor& table, const char* op) {
  TORCH_CHECK(table.dim() == 2, op, ": table must be a 2-D [N, D] view, got ", table.dim(), "-D");
  TORCH_CHECK(table.size(1) <= 1 || table.stride(1) == 1, op,
              ": table rows must have unit column stride, got strides ", table.strides());
  TORCH_CHECK(table.scalar_type() == at::kFloat || table.scalar_type() == at::kBFloat16 ||
                  table.scalar_type() == at::kHalf || table.scalar_type() == at::kDouble,
              op, ": table dtype must be float32, bfloat16 or float16, got ", table.scalar_type());
}

void check_weights(const Tensor& w, int64_t n, const char* op, const char* name) {
  TORCH_CHECK(w.dim() == 2 && w.size(1) == n, op, ": ", name, " must be [G, ", n, "], got ",
              w.sizes());
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous(), op, ": ", name,
              " must be contiguous float32");
}


// ---------------------------------------------------------------- vectorisable hot loops
// Compiled once per ISA level (AVX-512, AVX2+FMA+F16C, baseline) and picked at load time, so a
// portable build still streams the table at full width. Conversions to float are written as bit
// operations (bf16) or _Float16 casts (fp16) so the vectoriser can handle them.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define AP_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define AP_MULTIVERSION
#endif

inline __attribute__((always_inline)) float load_f(const float* p, int64_t j) { return p[j]; }
inline __attribute__((always_inline)) double load_f(const double* p, int64_t j) { return p[j]; }
inline __attribute__((always_inline)) float load_f(const c10::BFloat16* p, int64_t j) {
  uint16_t b;
  std::memcpy(&b, p + j, 2);
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
#if defined(__FLT16_MAX__)
inline __attribute__((always_inline)) float load_f(const c10::Half* p, int64_t j) {
  return static_cast<float>(reinterpret_cast<const _Float16*>(p)[j]);
}
#else
inline __attribute__((always_inline)) float load_f(const c10::Half* p, int64_t j) { return static_cast<float>(p[j]); }
#endif

template <typename T, typename A>
inline __attribute__((always_inline)) void axpy_body(A* __restrict__ acc, A w, const T* __restrict__ row, int64_t len) {
  for (int64_t j = 0; j < len; ++j) acc[j] += w * static_cast<A>(load_f(row, j));
}

template <typename T, typename A>
inline __attribute__((always_inline)) void dot_lanes_body(A* __restrict__ lanes, const T* __restrict__ a,
                                                          const T* __restrict__ b, int64_t len) {
  const int64_t body = len - len % kLanes;
  for (int64_t j = 0; j < body; j += kLanes)
    for (int k = 0; k < kLanes; ++k) lanes[k] += static_cast<A>(load_f(a, j + k)) * static_cast<A>(load_f(b, j + k));
  for (int64_t j = body; j < len; ++j) lanes[j - body] += static_cast<A>(load_f(a, j)) * static_cast<A>(load_f(b, j));
}

template <typename T>
inline __attribute__((always_inline)) float sqdist_body(const T* __restrict__ row, const float* __restrict__ q, int64_t D) {
  float l[kLanes] = {0};
  const int64_t body = D - D % kLanes;
  for (int64_t j = 0; j < body; j += kLanes)
    for (int k = 0; k < kLanes; ++k) {
      const float d = load_f(row, j + k) - q[j + k];
      l[k] += d * d;
    }
  for (int64_t j = body; j < D; ++j) {
    const float d = load_f(row, j) - q[j];
    l[j - body] += d * d;
  }
  float s = 0.f;
  for (int k = 0; k < kLanes; ++k) s += l[k];
  return s;
}

#define AP_DEFINE_HOT(T, A)                                                                          \
  AP_MULTIVERSION void axpy(A* __restrict__ acc, A w, const T* __restrict__ row, int64_t len) {     \
    axpy_body<T, A>(acc, w, row, len);                                                               \
  }                                                                                                  \
  AP_MULTIVERSION void dot_lanes(A* __restrict__ lanes, const T* __restrict__ a, const T* __restrict__ b, \
                                 int64_t len) {                                                      \
    dot_lanes_body<T, A>(lanes, a, b, len);                                                          \
  }                                                                                                  \
  AP_MULTIVERSION float sqdist(const T* __restrict__ row, const float* __restrict__ q, int64_t D) {   \
    return sqdist_body<T>(row, q, D);                                                                \
  }
AP_DEFINE_HOT(float, float)
AP_DEFINE_HOT(c10::BFloat16, float)
AP_DEFINE_HOT(c10::Half, float)
AP_DEFINE_HOT(double, double)
#undef AP_DEFINE_HOT

// ---------------------------------------------------------------- weights (noise + softmax)
std::tuple<Tensor, Tensor> gumbel_weights_cpu(const Tensor& logits,
                                              const std::optional<Tensor>& gumbel, int64_t seed,
                                              double tau, int64_t topk) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.is_contiguous(),
              "gumbel_weights: logits must be contiguous float32 [G, N], got ",
              logits.scalar_type(), " ", logits.sizes());
  TORCH_CHECK(tau > 0, "gumbel_weights: tau must be > 0");
  TORCH_CHECK(seed >= 0, "gumbel_weights: seed must be >= 0");
  const int64_t G = logits.size(0), N = logits.size(1);
  TORCH_CHECK(N >= 1 && G * N < (int64_t(1) << 31), "gumbel_weights: need 1 <= N and G*N < 2^31");
  const float* gptr = nullptr;
  if (gumbel.has_value() && gumbel->defined()) {
    TORCH_CHECK(gumbel->sizes() == logits.sizes() && gumbel->scalar_type() == at::kFloat &&
                    gumbel->is_contiguous(),
                "gumbel_weights: gumbel must be contiguous float32 of the shape of logits");
    gptr = gumbel->data_ptr<float>();
  }
  auto w = new_output({G, N}, logits.options());
  auto index = new_output({G}, logits.options().dtype(at::kLong));
  const float* lp = logits.data_ptr<float>();
  float* wp = w.data_ptr<float>();
  int64_t* ip = index.data_ptr<int64_t>();
  const float tau_f = static_cast<float>(tau);
  const bool use_topk = topk > 0 && topk < N;

  at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) {
    std::vector<int64_t> order;
    for (int64_t g = g0; g < g1; ++g) {
      float* z = wp + g * N;  // scores are written in place, then turned into weights
      float m = -INFINITY;
      int64_t arg = 0;
      for (int64_t n = 0; n < N; ++n) {
        const int64_t off = g * N + n;
        const float noise = gptr ? gptr[off]
                                 : gumbel_from_uniform(philox_uniform(static_cast<uint64_t>(seed),
                                                                      static_cast<uint32_t>(off)));
        const float zn = (lp[off] + noise) / tau_f;
        z[n] = zn;
        if (zn > m) { m = zn; arg = n; }
      }
      ip[g] = arg;
      if (use_topk) {
        order.resize(N);
        std::iota(order.begin(), order.end(), int64_t(0));
        std::nth_element(order.begin(), order.begin() + (topk - 1), order.end(),
                         [z](int64_t a, int64_t b) { return z[a] > z[b] || (z[a] == z[b] && a < b); });
        float s = 0.f;
        for (int64_t i = 0; i < topk; ++i) s += std::exp(z[order[i]] - m);
        std::vector<float> kept(topk);
        for (int64_t i = 0; i < topk; ++i) kept[i] = std::exp(z[order[i]] - m) / s;
        std::fill(z, z + N, 0.f);
        for (int64_t i = 0; i < topk; ++i) z[order[i]] = kept[i];
      } else {
        float s = 0.f;
        for (int64_t n = 0; n < N; ++n) {
          z[n] = std::exp(z[n] - m);
          s += z[n];
        }
        const float inv = 1.f / s;
        for (int64_t n = 0; n < N; ++n) z[n] = z[n] * inv;
      }
    }
  });
  return {w, index};
}

// ---------------------------------------------------------------- forward mix: out = w @ T
template <typename scalar_t>
void mix_forward_kernel(const scalar_t* T, int64_t row_stride, const float* w, scalar_t* out,
                        int64_t G, int64_t N, int64_t D) {
  using acc_t = at::opmath_type<scalar_t>;
  // Split columns across threads: each output element's sum over n runs in one thread, in order.
  // Each thread takes one wide column range (not many narrow tiles), so every table row is read
  // as one long contiguous run: the pass streams at memory bandwidth instead of striding.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t block = std::max<int64_t>(kFwdColBlock, ((D + threads - 1) / threads + 63) / 64 * 64);
  at::parallel_for(0, D, block, [&](int64_t c0, int64_t c1) {
    std::vector<acc_t> acc(G * std::min(block, c1 - c0));
    for (int64_t d0 = c0; d0 < c1; d0 += block) {
      const int64_t len = std::min(block, c1 - d0);
      std::fill(acc.begin(), acc.begin() + G * len, acc_t(0));
      for (int64_t n = 0; n < N; ++n) {
        const scalar_t* row = T + n * row_stride + d0;
        for (int64_t g = 0; g < G; ++g) {
          const acc_t wv = static_cast<acc_t>(w[g * N + n]);
          axpy(acc.data() + g * len, wv, row, len);
        }
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t j = 0; j < len; ++j) out[g * D + d0 + j] = static_cast<scalar_t>(acc[g * len + j]);
    }
  });
}

Tensor mix_forward_cpu(const Tensor& table, const Tensor& weights) {
  check_table(table, "mix_forward");
  check_weights(weights, table.size(0), "mix_forward", "weights");
  const int64_t G = weights.size(0), N = table.size(0), D = table.size(1);
  auto out = new_output({G, D}, table.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, table.scalar_type(), "mix_forward", [&] {
    mix_forward_kernel<scalar_t>(table.const_data_ptr<scalar_t>(), table.stride(0),
                                 weights.const_data_ptr<float>(), out.mutable_data_ptr<scalar_t>(),
                                 G, N, D);
  });
  return out;
}

// ------------------------------------------------ backward: d weights, d table, softmax bwd
template <typename scalar_t>
void mix_backward_kernel(const scalar_t* T, int64_t row_stride, const scalar_t* go,
                         const float* table_w, float* gw, scalar_t* dT, int64_t G, int64_t N,
                         int64_t D) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
  // Split rows across threads; each row's dot products run in one thread in a fixed order.
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    std::vector<acc_t> lanes(G * kLanes);
    for (int64_t n = n0; n < n1; ++n) {
      const scalar_t* row = T + n * row_stride;
      if (gw != nullptr) {
        std::fill(lanes.begin(), lanes.end(), acc_t(0));
        for (int64_t d0 = 0; d0 < D; d0 += kColBlock) {
          const int64_t len = std::min(kColBlock, D - d0);
          for (int64_t g = 0; g < G; ++g)
            dot_lanes(lanes.data() + g * kLanes, row + d0, go + g * D + d0, len);
        }
        for (int64_t g = 0; g < G; ++g) {
          acc_t s = 0;
          for (int k = 0; k < kLanes; ++k) s += lanes[g * kLanes + k];
          gw[g * N + n] = static_cast<float>(s);
        }
      }
      if (dT != nullptr) {
        scalar_t* drow = dT + n * D;
        bool any = false;
        for (int64_t g = 0; g < G; ++g) any |= table_w[g * N + n] != 0.f;
        if (!any) {  // hard mode: all rows but the selected ones get a zero gradient
          std::fill(drow, drow + D, scalar_t(0));
          continue;
        }
        for (int64_t j = 0; j < D; ++j) {
          acc_t s = 0;
          for (int64_t g = 0; g < G; ++g)
            s += static_cast<acc_t>(table_w[g * N + n]) * static_cast<acc_t>(go[g * D + j]);
          drow[j] = static_cast<scalar_t>(s);
        }
      }
    }
  });
}

std::tuple<Tensor, Tensor> mix_backward_cpu(const Tensor& table, const Tensor& grad_out,
                                            const Tensor& weights, const Tensor& table_weights,
                                            double tau, bool need_logits, bool need_table) {
  check_table(table, "mix_backward");
  const int64_t N = table.size(0), D = table.size(1);
  check_weights(weights, N, "mix_backward", "weights");
  check_weights(table_weights, N, "mix_backward", "table_weights");
  const int64_t G = weights.size(0);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({G, D}) && grad_out.is_contiguous() &&
                  grad_out.scalar_type() == table.scalar_type(),
              "mix_backward: grad_out must be contiguous [G, D] in the table dtype, got ",
              grad_out.scalar_type(), " ", grad_out.sizes());
  Tensor gw = need_logits ? new_output({G, N}, weights.options()) : Tensor();
  Tensor dT = need_table ? new_output({N, D}, table.options())
                         : at::empty({0}, table.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, table.scalar_type(), "mix_backward", [&] {
    mix_backward_kernel<scalar_t>(table.const_data_ptr<scalar_t>(), table.stride(0),
                                  grad_out.const_data_ptr<scalar_t>(),
                                  table_weights.const_data_ptr<float>(),
                                  need_logits ? gw.mutable_data_ptr<float>() : nullptr,
                                  need_table ? dT.mutable_data_ptr<scalar_t>() : nullptr, G, N, D);
  });
  if (!need_logits) return {at::empty({0}, weights.options()), dT};
  // Softmax backward over the kept set: dz = w * (gw - <w, gw>), d logits = dz / tau.
  const float* wp = weights.const_data_ptr<float>();
  float* gp = gw.mutable_data_ptr<float>();
  const float inv_tau = static_cast<float>(1.0 / tau);
  for (int64_t g = 0; g < G; ++g) {
    float dot = 0.f;
    for (int64_t n = 0; n < N; ++n) dot += wp[g * N + n] * gp[g * N + n];
    for (int64_t n = 0; n < N; ++n) gp[g * N + n] = wp[g * N + n] * (gp[g * N + n] - dot) * inv_tau;
  }
  return {gw, dT};
}

// ---------------------------------------------------------------- L2 scan
template <typename scalar_t>
void l2_kernel(const scalar_t* T, int64_t row_stride, const float* q, float* out, int64_t N,
               int64_t D) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) out[n] = std::sqrt(sqdist(T + n * row_stride, q, D));
  });
}

Tensor l2_scores_cpu(const Tensor& query, const Tensor& table) {
  check_table(table, "l2_scores");
  TORCH_CHECK(query.dim() == 1 && query.size(0) == table.size(1), "l2_scores: query must be [D=",
              table.size(1), "], got ", query.sizes());
  auto q = query.to(at::kFloat).contiguous();
  auto out = new_output({table.size(0)}, table.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, table.scalar_type(), "l2_scores", [&] {
    l2_kernel<scalar_t>(table.const_data_ptr<scalar_t>(), table.stride(0), q.const_data_ptr<float>(),
                        out.mutable_data_ptr<float>(), table.size(0), table.size(1));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ap_erase_fast, CPU, m) {
  m.impl("gumbel_weights", &gumbel_weights_cpu);
  m.impl("mix_forward", &mix_forward_cpu);
  m.impl("mix_backward", &mix_backward_cpu);
  m.impl("l2_scores", &l2_scores_cpu);
}

}  // namespace ap_erase_fast

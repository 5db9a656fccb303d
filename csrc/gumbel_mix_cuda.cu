// CUDA kernels of the ap_erase_fast ops (same schema as gumbel_mix_cpu.cpp, CUDA dispatch key).
//
// Memory-bound design: the table is read once per pass for all G draws (G <= kMaxG per launch,
// larger G is chunked by the host code); reductions use fixed-order trees and split partials
// are summed with at::sum over a fixed dimension, so results are run-to-run deterministic.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cub/block/block_scan.cuh>
#include <torch/library.h>

#include "philox.h"

namespace ap_erase_fast {
namespace {

using at::Tensor;
constexpr int kMaxG = 8;
constexpr int kThreads = 256;
constexpr int kWeightThreads = 1024;

template <typename T>
__device__ __forceinline__ float to_f(T v) { return static_cast<float>(v); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// Fixed-order block sum; result valid in every thread. `shm` holds >= 32 floats.
__device__ float block_sum(float v, float* shm) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) shm[wid] = v;
  __syncthreads();
  float r = 0.f;
  if (wid == 0) {
    r = lane < nw ? shm[lane] : 0.f;
    r = warp_sum(r);
    if (lane == 0) shm[0] = r;
  }
  __syncthreads();
  return shm[0];
}

// Block max with first (lowest) index on ties.
__device__ void block_argmax(float& v, long& i, float* sv, long* si) {
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_down_sync(0xffffffffu, v, o);
    const long oi = __shfl_down_sync(0xffffffffu, i, o);
    if (ov > v || (ov == v && oi < i)) { v = ov; i = oi; }
  }
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  __syncthreads();
  if (lane == 0) { sv[wid] = v; si[wid] = i; }
  __syncthreads();
  if (wid == 0) {
    v = lane < nw ? sv[lane] : -INFINITY;
    i = lane < nw ? si[lane] : LONG_MAX;
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_down_sync(0xffffffffu, v, o);
      const long oi = __shfl_down_sync(0xffffffffu, i, o);
      if (ov > v || (ov == v && oi < i)) { v = ov; i = oi; }
    }
    if (lane == 0) { sv[0] = v; si[0] = i; }
  }
  __syncthreads();
  v = sv[0];
  i = si[0];
}

__device__ __forceinline__ long long sort_key(float z) {
  const int bits = __float_as_int(z);
  return static_cast<long long>(bits >= 0 ? bits : bits ^ 0x7FFFFFFF);
}

// --------------------------------------------------------------------------- weights
__global__ void weights_kernel(const float* __restrict__ L, const float* __restrict__ GN,
                               float* __restrict__ W, int64_t* __restrict__ IDX, int64_t N,
                               uint64_t seed, float tau, int64_t k, bool use_topk) {
  using Scan = cub::BlockScan<int, kWeightThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ float sv[32];
  __shared__ long si[32];
  __shared__ float sred[32];
  __shared__ int carry_sh;
  const int64_t g = blockIdx.x;
  float* w = W + g * N;
  float best = -INFINITY;
  long best_i = LONG_MAX;
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
    const int64_t off = g * N + n;
    const float noise = GN ? GN[off] : gumbel_from_uniform(philox_uniform(seed, static_cast<uint32_t>(off)));
    const float z = (L[off] + noise) / tau;
    w[n] = z;
    if (z > best) { best = z; best_i = n; }
  }
  block_argmax(best, best_i, sv, si);
  const float m = best;
  if (threadIdx.x == 0) IDX[g] = best_i;

  long long thr = 0;
  long long need_eq = 0;
  if (use_topk) {
    long long lo = -2147483648LL, hi = 2147483647LL;
    for (int it = 0; it < 32; ++it) {
      const long long mid = lo + (hi - lo + 1) / 2;
      float c = 0.f;
      for (int64_t n = threadIdx.x; n < N; n += blockDim.x) c += sort_key(w[n]) >= mid ? 1.f : 0.f;
      const float cnt = block_sum(c, sred);  // exact: counts < 2^24
      if (cnt >= static_cast<float>(k)) lo = mid; else hi = mid - 1;
    }
    thr = lo;
    float c = 0.f;
    for (int64_t n = threadIdx.x; n < N; n += blockDim.x) c += sort_key(w[n]) > thr ? 1.f : 0.f;
    need_eq = k - static_cast<long long>(block_sum(c, sred));
  }
  // keep(n): all of the (soft) support, or the top-k with ties broken by lower index
  float s = 0.f;
  int carry = 0;
  for (int64_t base = 0; base < N; base += blockDim.x) {
    const int64_t n = base + threadIdx.x;
    const float z = n < N ? w[n] : -INFINITY;
    bool keep = n < N;
    if (use_topk) {
      const long long key = sort_key(z);
      const int eq = (n < N && key == thr) ? 1 : 0;
      int rank, total;
      Scan(scan_tmp).ExclusiveSum(eq, rank, total);
      keep = n < N && (key > thr || (eq && carry + rank < need_eq));
      carry += total;
      __syncthreads();
    }
    s += keep ? __expf(z - m) : 0.f;
  }
  const float total_s = block_sum(s, sred);
  carry = 0;
  for (int64_t base = 0; base < N; base += blockDim.x) {
    const int64_t n = base + threadIdx.x;
    const float z = n < N ? w[n] : -INFINITY;
    bool keep = n < N;
    if (use_topk) {
      const long long key = sort_key(z);
      const int eq = (n < N && key == thr) ? 1 : 0;
      int rank, total;
      Scan(scan_tmp).ExclusiveSum(eq, rank, total);
      keep = n < N && (key > thr || (eq && carry + rank < need_eq));
      carry += total;
      __syncthreads();
    }
    if (n < N) w[n] = keep ? __expf(z - m) / total_s : 0.f;
  }
  (void)carry_sh;
}

// --------------------------------------------------------------------------- forward mix
template <typename scalar_t, typename out_t>
__global__ void mix_forward_kernel(const scalar_t* __restrict__ T, int64_t stride_n,
                                   const float* __restrict__ W, out_t* __restrict__ OUT, int G,
                                   int64_t N, int64_t D, int64_t rows_per_split) {
  constexpr int kRows = 32;
  __shared__ float ws[kMaxG][kRows];
  const int64_t d = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t s = blockIdx.y;
  const int64_t n0 = s * rows_per_split;
  const int64_t n1 = min(n0 + rows_per_split, N);
  float acc[kMaxG];
#pragma unroll
  for (int g = 0; g < kMaxG; ++g) acc[g] = 0.f;
  for (int64_t nb = n0; nb < n1; nb += kRows) {
    __syncthreads();
    for (int t = threadIdx.x; t < kMaxG * kRows; t += blockDim.x) {
      const int g = t / kRows, r = t % kRows;
      ws[g][r] = (g < G && nb + r < n1) ? W[g * N + nb + r] : 0.f;
    }
    __syncthreads();
    if (d < D) {
      const int rows = static_cast<int>(min<int64_t>(kRows, n1 - nb));
#pragma unroll 4
      for (int r = 0; r < rows; ++r) {
        const float t = to_f(T[(nb + r) * stride_n + d]);
#pragma unroll
        for (int g = 0; g < kMaxG; ++g) acc[g] += ws[g][r] * t;
      }
    }
  }
  if (d < D)
    for (int g = 0; g < G; ++g) OUT[(s * G + g) * D + d] = static_cast<out_t>(acc[g]);
}

// --------------------------------------------------------------------------- backward
template <typename scalar_t>
__global__ void mix_backward_kernel(const scalar_t* __restrict__ T, int64_t stride_n,
                                    const scalar_t* __restrict__ GO, const float* __restrict__ TW,
                                    float* __restrict__ GWP, scalar_t* __restrict__ DT, int G,
                                    int64_t N, int64_t D, int64_t cols_per_split) {
  __shared__ float sred[32];
  const int64_t n = blockIdx.x;
  const int64_t s = blockIdx.y;
  const int64_t d0 = s * cols_per_split;
  const int64_t d1 = min(d0 + cols_per_split, D);
  float acc[kMaxG];
  float tw[kMaxG];
#pragma unroll
  for (int g = 0; g < kMaxG; ++g) {
    acc[g] = 0.f;
    tw[g] = (DT != nullptr && g < G) ? TW[g * N + n] : 0.f;
  }
  const scalar_t* row = T + n * stride_n;
  for (int64_t d = d0 + threadIdx.x; d < d1; d += blockDim.x) {
    float go[kMaxG];
#pragma unroll
    for (int g = 0; g < kMaxG; ++g) go[g] = g < G ? to_f(GO[g * D + d]) : 0.f;
    if (GWP != nullptr) {
      const float t = to_f(row[d]);
#pragma unroll
      for (int g = 0; g < kMaxG; ++g) acc[g] += t * go[g];
    }
    if (DT != nullptr) {
      float v = 0.f;
#pragma unroll
      for (int g = 0; g < kMaxG; ++g) v += tw[g] * go[g];
      DT[n * D + d] = static_cast<scalar_t>(v);
    }
  }
  if (GWP != nullptr)
    for (int g = 0; g < G; ++g) {
      const float v = block_sum(acc[g], sred);
      if (threadIdx.x == 0) GWP[(s * G + g) * N + n] = v;
    }
}

__global__ void softmax_backward_kernel(const float* __restrict__ W, const float* __restrict__ GW,
                                        float* __restrict__ DL, int64_t N, float inv_tau) {
  __shared__ float sred[32];
  const int64_t g = blockIdx.x;
  float p = 0.f;
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) p += W[g * N + n] * GW[g * N + n];
  const float dot = block_sum(p, sred);
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x)
    DL[g * N + n] = W[g * N + n] * (GW[g * N + n] - dot) * inv_tau;
}

template <typename scalar_t>
__global__ void l2_kernel(const float* __restrict__ Q, const scalar_t* __restrict__ T,
                          int64_t stride_n, float* __restrict__ OUT, int64_t N, int64_t D,
                          int64_t cols_per_split) {
  __shared__ float sred[32];
  const int64_t n = blockIdx.x, s = blockIdx.y;
  const int64_t d0 = s * cols_per_split, d1 = min(d0 + cols_per_split, D);
  float acc = 0.f;
  for (int64_t d = d0 + threadIdx.x; d < d1; d += blockDim.x) {
    const float x = to_f(T[n * stride_n + d]) - Q[d];
    acc += x * x;
  }
  const float v = block_sum(acc, sred);
  if (threadIdx.x == 0) OUT[s * N + n] = v;
}

// --------------------------------------------------------------------------- host side
int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t target_blocks() {
  return 4 * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

void check_table(const Tensor& table, const char* op) {
  TORCH_CHECK(table.is_cuda(), op, ": table must be a CUDA tensor");
  TORCH_CHECK(table.dim() == 2, op, ": table must be a 2-D [N, D] view, got ", table.dim(), "-D");
  TORCH_CHECK(table.size(1) <= 1 || table.stride(1) == 1, op,
              ": table rows must have unit column stride, got strides ", table.strides());
}

void check_weights(const Tensor& w, int64_t n, const char* op) {
  TORCH_CHECK(w.is_cuda() && w.dim() == 2 && w.size(1) == n && w.scalar_type() == at::kFloat &&
                  w.is_contiguous(),
              op, ": weights must be contiguous float32 CUDA [G, ", n, "], got ", w.sizes());
}

std::tuple<Tensor, Tensor> gumbel_weights_cuda(const Tensor& logits, const std::optional<Tensor>& gumbel,
                                               int64_t seed, double tau, int64_t topk) {
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 2 && logits.scalar_type() == at::kFloat &&
                  logits.is_contiguous(),
              "gumbel_weights: logits must be contiguous float32 CUDA [G, N]");
  TORCH_CHECK(tau > 0 && seed >= 0, "gumbel_weights: need tau > 0 and seed >= 0");
  const int64_t G = logits.size(0), N = logits.size(1);
  TORCH_CHECK(N >= 1 && G * N < (int64_t(1) << 31) && N < (int64_t(1) << 24),
              "gumbel_weights: need 1 <= N < 2^24 and G*N < 2^31");
  const float* gp = nullptr;
  if (gumbel.has_value() && gumbel->defined()) {
    TORCH_CHECK(gumbel->sizes() == logits.sizes() && gumbel->scalar_type() == at::kFloat &&
                    gumbel->is_contiguous() && gumbel->is_cuda(),
                "gumbel_weights: gumbel must be contiguous float32 CUDA of the shape of logits");
    gp = gumbel->data_ptr<float>();
  }
  const c10::cuda::CUDAGuard guard(logits.device());
  auto w = at::empty({G, N}, logits.options());
  auto idx = at::empty({G}, logits.options().dtype(at::kLong));
  if (G == 0) return {w, idx};
  weights_kernel<<<G, kWeightThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      logits.data_ptr<float>(), gp, w.data_ptr<float>(), idx.data_ptr<int64_t>(), N,
      static_cast<uint64_t>(seed), static_cast<float>(tau), topk, topk > 0 && topk < N);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {w, idx};
}

Tensor mix_forward_cuda(const Tensor& table, const Tensor& weights) {
  check_table(table, "mix_forward");
  check_weights(weights, table.size(0), "mix_forward");
  const c10::cuda::CUDAGuard guard(table.device());
  const int64_t N = table.size(0), D = table.size(1), G = weights.size(0);
  if (G > kMaxG) {
    std::vector<Tensor> parts;
    for (int64_t g = 0; g < G; g += kMaxG) parts.push_back(mix_forward_cuda(table, weights.narrow(0, g, std::min<int64_t>(kMaxG, G - g)).contiguous()));
    return at::cat(parts, 0);
  }
  const int64_t d_blocks = cdiv(D, kThreads);
  int64_t split = std::max<int64_t>(1, std::min(cdiv(target_blocks(), d_blocks), cdiv(N, 256)));
  const int64_t rows = cdiv(N, split);
  split = cdiv(N, rows);
  auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(d_blocks, split);
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, table.scalar_type(), "mix_forward_cuda", [&] {
    if (split == 1) {
      out = at::empty({G, D}, table.options());
      mix_forward_kernel<scalar_t, scalar_t><<<grid, kThreads, 0, stream>>>(
          table.data_ptr<scalar_t>(), table.stride(0), weights.data_ptr<float>(), out.data_ptr<scalar_t>(),
          static_cast<int>(G), N, D, rows);
    } else {
      auto part = at::empty({split, G, D}, table.options().dtype(at::kFloat));
      mix_forward_kernel<scalar_t, float><<<grid, kThreads, 0, stream>>>(
          table.data_ptr<scalar_t>(), table.stride(0), weights.data_ptr<float>(), part.data_ptr<float>(),
          static_cast<int>(G), N, D, rows);
      out = part.sum(0).to(table.scalar_type());
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<Tensor, Tensor> mix_backward_cuda(const Tensor& table, const Tensor& grad_out, const Tensor& weights,
                                             const Tensor& table_weights, double tau, bool need_logits,
                                             bool need_table) {
  check_table(table, "mix_backward");
  const int64_t N = table.size(0), D = table.size(1), G = weights.size(0);
  check_weights(weights, N, "mix_backward");
  check_weights(table_weights, N, "mix_backward");
  TORCH_CHECK(grad_out.is_cuda() && grad_out.sizes() == at::IntArrayRef({G, D}) && grad_out.is_contiguous() &&
                  grad_out.scalar_type() == table.scalar_type(),
              "mix_backward: grad_out must be contiguous [G, D] CUDA in the table dtype");
  const c10::cuda::CUDAGuard guard(table.device());
  if (G > kMaxG) {
    Tensor dl_all = need_logits ? at::empty({G, N}, weights.options()) : at::empty({0}, weights.options());
    Tensor dt_all = need_table ? at::zeros({N, D}, table.options().dtype(at::kFloat)) : Tensor();
    for (int64_t g = 0; g < G; g += kMaxG) {
      const int64_t c = std::min<int64_t>(kMaxG, G - g);
      auto r = mix_backward_cuda(table, grad_out.narrow(0, g, c).contiguous(), weights.narrow(0, g, c).contiguous(),
                                 table_weights.narrow(0, g, c).contiguous(), tau, need_logits, need_table);
      if (need_logits) dl_all.narrow(0, g, c).copy_(std::get<0>(r));
      if (need_table) dt_all.add_(std::get<1>(r).to(at::kFloat));
    }
    return {dl_all, need_table ? dt_all.to(table.scalar_type()) : at::empty({0}, table.options())};
  }
  int64_t split = need_table ? 1 : std::max<int64_t>(1, std::min(cdiv(target_blocks(), N), cdiv(D, 4 * kThreads)));
  const int64_t cols = cdiv(D, split);
  split = cdiv(D, cols);
  Tensor gwp = need_logits ? at::empty({split, G, N}, weights.options()) : Tensor();
  Tensor dT = need_table ? at::empty({N, D}, table.options()) : at::empty({0}, table.options());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, table.scalar_type(), "mix_backward_cuda", [&] {
    mix_backward_kernel<scalar_t><<<dim3(N, split), kThreads, 0, stream>>>(
        table.data_ptr<scalar_t>(), table.stride(0), grad_out.data_ptr<scalar_t>(), table_weights.data_ptr<float>(),
        need_logits ? gwp.data_ptr<float>() : nullptr, need_table ? dT.data_ptr<scalar_t>() : nullptr,
        static_cast<int>(G), N, D, cols);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!need_logits) return {at::empty({0}, weights.options()), dT};
  auto gw = split == 1 ? gwp[0].contiguous() : gwp.sum(0);
  auto dl = at::empty({G, N}, weights.options());
  softmax_backward_kernel<<<G, 1024, 0, stream>>>(weights.data_ptr<float>(), gw.data_ptr<float>(),
                                                  dl.data_ptr<float>(), N, static_cast<float>(1.0 / tau));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dl, dT};
}

Tensor l2_scores_cuda(const Tensor& query, const Tensor& table) {
  check_table(table, "l2_scores");
  TORCH_CHECK(query.dim() == 1 && query.size(0) == table.size(1), "l2_scores: query must be [D]");
  const c10::cuda::CUDAGuard guard(table.device());
  const int64_t N = table.size(0), D = table.size(1);
  auto q = query.to(at::kFloat).contiguous();
  int64_t split = std::max<int64_t>(1, std::min(cdiv(target_blocks(), N), cdiv(D, 4 * kThreads)));
  const int64_t cols = cdiv(D, split);
  split = cdiv(D, cols);
  auto part = at::empty({split, N}, table.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, table.scalar_type(), "l2_scores_cuda", [&] {
    l2_kernel<scalar_t><<<dim3(N, split), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        q.data_ptr<float>(), table.data_ptr<scalar_t>(), table.stride(0), part.data_ptr<float>(), N, D, cols);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return part.sum(0).sqrt();
}

}  // namespace

TORCH_LIBRARY_IMPL(ap_erase_fast, CUDA, m) {
  m.impl("gumbel_weights", &gumbel_weights_cuda);
  m.impl("mix_forward", &mix_forward_cuda);
  m.impl("mix_backward", &mix_backward_cuda);
  m.impl("l2_scores", &l2_scores_cuda);
}

}  // namespace ap_erase_fast

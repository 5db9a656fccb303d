// CUDA kernels of the ap_erase_fast ops and their launchers (interface: gumbel_mix_cuda.h;
// tensor checks, planning and the op registration: gumbel_mix_cuda.cpp).
//
// Device code only, with CUDA headers only (no torch): it compiles with a bare nvcc, and
// tests/ops/test_gpu_build.py compiles it for sm_80/86/89/90 on every CI run. Never build it
// with --use_fast_math: the Gumbel noise needs the accurate logf (see philox.h), and the softmax
// uses expf, not __expf, so the weights agree with the other backends to fp32 rounding.
//
// Memory-bound design: the table is read once per pass for all G draws (G <= kMaxG per launch);
// the mix kernels are instantiated for G rounded up to a power of two, so G = 1 does one
// multiply-add per table element. Reductions use fixed-order trees: run-to-run deterministic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cub/block/block_scan.cuh>

#include <climits>
#include <cstdint>

#include "gumbel_mix_cuda.h"
#include "philox.h"

namespace ap_erase_fast {
namespace cuda {
namespace {

constexpr int kRows = 32;  // table rows per forward tile (their weights are staged in shared memory)
// block_sum / block_argmax keep one value per warp in 32-entry shared arrays and shuffle with a
// full mask: blocks must be whole warps, at most 32 of them.
static_assert(kThreads % 32 == 0 && kThreads <= 1024, "kThreads: whole warps, at most 1024 threads");
static_assert(kWeightThreads % 32 == 0 && kWeightThreads <= 1024, "kWeightThreads: whole warps, <= 1024");

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }

// Round to nearest even, as c10::BFloat16 / c10::Half do on the CPU.
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }

__device__ __forceinline__ int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// Fixed-order block sum; result valid in every thread. `shm` holds >= 32 floats.
__device__ float block_sum(float v, float* shm) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();  // shm may still be read by a previous call
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

// Block max with the first (lowest) index on ties; indices fit in int (N < 2^24).
__device__ void block_argmax(float& v, int& i, float* sv, int* si) {
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_down_sync(0xffffffffu, v, o);
    const int oi = __shfl_down_sync(0xffffffffu, i, o);
    if (ov > v || (ov == v && oi < i)) { v = ov; i = oi; }
  }
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  __syncthreads();
  if (lane == 0) { sv[wid] = v; si[wid] = i; }
  __syncthreads();
  if (wid == 0) {
    v = lane < nw ? sv[lane] : -INFINITY;
    i = lane < nw ? si[lane] : INT_MAX;
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_down_sync(0xffffffffu, v, o);
      const int oi = __shfl_down_sync(0xffffffffu, i, o);
      if (ov > v || (ov == v && oi < i)) { v = ov; i = oi; }
    }
    if (lane == 0) { sv[0] = v; si[0] = i; }
  }
  __syncthreads();
  v = sv[0];
  i = si[0];
}

// int key with the order of the float32 value (negative floats: flip the magnitude bits)
__device__ __forceinline__ long long sort_key(float z) {
  const int bits = __float_as_int(z);
  return static_cast<long long>(bits >= 0 ? bits : bits ^ 0x7FFFFFFF);
}

// --------------------------------------------------------------------------- weights
// One block per draw g. Every thread visits the same n (n = threadIdx.x + k * blockDim.x) in
// every pass, so the scores it keeps in W between passes are its own.
__global__ void __launch_bounds__(kWeightThreads)
weights_kernel(const float* __restrict__ L, const float* __restrict__ GN, float* __restrict__ W,
               int64_t* __restrict__ IDX, int64_t N, uint64_t seed, float tau, int64_t k, bool use_topk) {
  using Scan = cub::BlockScan<int, kWeightThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ float sv[32];
  __shared__ int si[32];
  __shared__ float sred[32];
  const int64_t g = blockIdx.x;
  float* w = W + g * N;
  float best = -INFINITY;
  int best_i = INT_MAX;
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
    const int64_t off = g * N + n;
    const float noise = GN ? GN[off] : gumbel_from_uniform(philox_uniform(seed, static_cast<uint32_t>(off)));
    const float z = (L[off] + noise) / tau;
    w[n] = z;
    if (z > best) { best = z; best_i = static_cast<int>(n); }
  }
  block_argmax(best, best_i, sv, si);
  const float m = best;
  if (threadIdx.x == 0) IDX[g] = best_i;

  long long thr = 0;
  long long need_eq = 0;
  if (use_topk) {
    // k-th largest key: the largest t with #{key >= t} >= k, by bisection over the int32 range
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
    need_eq = k - static_cast<long long>(block_sum(c, sred));  // ties at thr to keep, lowest n first
  }
  // keep(n): all of the (soft) support, or the top-k with ties broken by lower index. The
  // second loop recomputes keep() with the same scan, so both see the same kept set.
  float s = 0.f;
  for (int pass = 0; pass < 2; ++pass) {
    const float inv_total = pass == 1 ? 1.f / block_sum(s, sred) : 0.f;
    long long carry = 0;
    for (int64_t base = 0; base < N; base += blockDim.x) {  // uniform trip count: the scan is collective
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
        __syncthreads();  // scan_tmp is reused by the next iteration
      }
      const float e = keep ? expf(z - m) : 0.f;
      if (pass == 0) s += e;
      else if (n < N) w[n] = e * inv_total;
    }
  }
}

// --------------------------------------------------------------------------- forward mix
// out[g, d] = sum_n W[g, n] T[n, d]; grid (column blocks, row splits). One thread owns one
// column d and accumulates all kG draws; the weights of kRows rows are staged in shared memory.
// Bounds for 4 resident blocks per SM (<= 64 registers): with the plain bound ptxas spills the
// kG = 8 bf16/fp16 instantiations on sm_80 (nvcc 13).
template <typename scalar_t, typename out_t, int kG>
__global__ void __launch_bounds__(kThreads, 4)
mix_forward_kernel(const scalar_t* __restrict__ T, int64_t stride_n, const float* __restrict__ W,
                   out_t* __restrict__ OUT, int G, int64_t N, int64_t D, int64_t rows_per_split) {
  __shared__ float ws[kG][kRows];
  const int64_t d = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t s = blockIdx.y;
  const int64_t n0 = s * rows_per_split;
  const int64_t n1 = min_i64(n0 + rows_per_split, N);
  float acc[kG];
#pragma unroll
  for (int g = 0; g < kG; ++g) acc[g] = 0.f;
  for (int64_t nb = n0; nb < n1; nb += kRows) {
    __syncthreads();
    for (int t = threadIdx.x; t < kG * kRows; t += blockDim.x) {
      const int g = t / kRows, r = t % kRows;
      ws[g][r] = (g < G && nb + r < n1) ? W[g * N + nb + r] : 0.f;
    }
    __syncthreads();
    if (d < D) {
      const int rows = static_cast<int>(min_i64(kRows, n1 - nb));
#pragma unroll 4
      for (int r = 0; r < rows; ++r) {
        const float t = to_f(T[(nb + r) * stride_n + d]);
#pragma unroll
        for (int g = 0; g < kG; ++g) acc[g] += ws[g][r] * t;
      }
    }
  }
  if (d < D) {
#pragma unroll
    for (int g = 0; g < kG; ++g)
      if (g < G) OUT[(s * G + g) * D + d] = from_f<out_t>(acc[g]);
  }
}

// --------------------------------------------------------------------------- backward
// Grid (rows, column splits). One block per row n: GWP[s, g, n] = <T[n, cols of s], GO[g, ...]>
// and, when DT is given, DT[n, :] = sum_g TW[g, n] GO[g, :] from the same pass (G <= kG).
template <typename scalar_t, int kG>
__global__ void __launch_bounds__(kThreads)
mix_backward_kernel(const scalar_t* __restrict__ T, int64_t stride_n, const scalar_t* __restrict__ GO,
                    const float* __restrict__ TW, float* __restrict__ GWP, scalar_t* __restrict__ DT,
                    int G, int64_t N, int64_t D, int64_t cols_per_split) {
  __shared__ float sred[32];
  const int64_t n = blockIdx.x;
  const int64_t s = blockIdx.y;
  const int64_t d0 = s * cols_per_split;
  const int64_t d1 = min_i64(d0 + cols_per_split, D);
  float acc[kG];
  float tw[kG];
#pragma unroll
  for (int g = 0; g < kG; ++g) {
    acc[g] = 0.f;
    tw[g] = (DT != nullptr && g < G) ? TW[g * N + n] : 0.f;
  }
  const scalar_t* row = T + n * stride_n;
  for (int64_t d = d0 + threadIdx.x; d < d1; d += blockDim.x) {
    float go[kG];
#pragma unroll
    for (int g = 0; g < kG; ++g) go[g] = g < G ? to_f(GO[g * D + d]) : 0.f;
    if (GWP != nullptr) {
      const float t = to_f(row[d]);
#pragma unroll
      for (int g = 0; g < kG; ++g) acc[g] += t * go[g];
    }
    if (DT != nullptr) {
      float v = 0.f;
#pragma unroll
      for (int g = 0; g < kG; ++g) v += tw[g] * go[g];
      DT[n * D + d] = from_f<scalar_t>(v);
    }
  }
  if (GWP != nullptr) {
#pragma unroll
    for (int g = 0; g < kG; ++g) {  // unrolled: acc stays in registers; g < G is block-uniform
      if (g >= G) break;
      const float v = block_sum(acc[g], sred);
      if (threadIdx.x == 0) GWP[(s * G + g) * N + n] = v;
    }
  }
}

// DT[n, :] = sum_g TW[g, n] GO[g, :] for any number of draws (more than kMaxG: the host splits
// d w into chunks, d table comes from here in one pass, so it is rounded to its dtype once).
// Same summation order as mix_backward_kernel (g ascending, fp32).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
table_grad_kernel(const scalar_t* __restrict__ GO, const float* __restrict__ TW, scalar_t* __restrict__ DT,
                  int G, int64_t N, int64_t D) {
  const int64_t n = blockIdx.x;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float v = 0.f;
    for (int g = 0; g < G; ++g) v += TW[g * N + n] * to_f(GO[g * D + d]);
    DT[n * D + d] = from_f<scalar_t>(v);
  }
}

__global__ void __launch_bounds__(kWeightThreads)
softmax_backward_kernel(const float* __restrict__ W, const float* __restrict__ GW, float* __restrict__ DL,
                        int64_t N, float inv_tau) {
  __shared__ float sred[32];
  const int64_t g = blockIdx.x;
  float p = 0.f;
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) p += W[g * N + n] * GW[g * N + n];
  const float dot = block_sum(p, sred);
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x)
    DL[g * N + n] = W[g * N + n] * (GW[g * N + n] - dot) * inv_tau;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
l2_kernel(const float* __restrict__ Q, const scalar_t* __restrict__ T, int64_t stride_n,
          float* __restrict__ OUT, int64_t N, int64_t D, int64_t cols_per_split) {
  __shared__ float sred[32];
  const int64_t n = blockIdx.x, s = blockIdx.y;
  const int64_t d0 = s * cols_per_split, d1 = min_i64(d0 + cols_per_split, D);
  float acc = 0.f;
  for (int64_t d = d0 + threadIdx.x; d < d1; d += blockDim.x) {
    const float x = to_f(T[n * stride_n + d]) - Q[d];
    acc += x * x;
  }
  const float v = block_sum(acc, sred);
  if (threadIdx.x == 0) OUT[s * N + n] = v;
}

// --------------------------------------------------------------------------- launchers
// Calls f(tag<kG>) with kG = G rounded up to 1, 2, 4 or 8.
template <int kG> struct GTag { static constexpr int value = kG; };
template <typename F> void dispatch_g(int G, F&& f) {
  if (G <= 1) f(GTag<1>{});
  else if (G <= 2) f(GTag<2>{});
  else if (G <= 4) f(GTag<4>{});
  else f(GTag<8>{});
}

template <typename T> struct TypeTag { using type = T; };
template <typename F> void dispatch_table(TableType type, F&& f) {
  switch (type) {
    case TableType::kFloat32: f(TypeTag<float>{}); break;
    case TableType::kBFloat16: f(TypeTag<__nv_bfloat16>{}); break;
    case TableType::kFloat16: f(TypeTag<__half>{}); break;
  }
}

}  // namespace

cudaError_t launch_weights(const float* L, const float* GN, float* W, int64_t* IDX, int64_t G, int64_t N,
                           uint64_t seed, float tau, int64_t k, bool use_topk, cudaStream_t stream) {
  weights_kernel<<<static_cast<unsigned>(G), kWeightThreads, 0, stream>>>(L, GN, W, IDX, N, seed, tau, k, use_topk);
  return cudaGetLastError();
}

cudaError_t launch_mix_forward(TableType type, const void* T, int64_t stride_n, const float* W, void* OUT,
                               bool out_fp32, int G, int64_t N, int64_t D, int64_t rows_per_split,
                               int64_t split, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((D + kThreads - 1) / kThreads), static_cast<unsigned>(split));
  dispatch_table(type, [&](auto tt) {
    using scalar_t = typename decltype(tt)::type;
    dispatch_g(G, [&](auto gt) {
      constexpr int kG = decltype(gt)::value;
      const auto* t = static_cast<const scalar_t*>(T);
      if (out_fp32)
        mix_forward_kernel<scalar_t, float, kG><<<grid, kThreads, 0, stream>>>(
            t, stride_n, W, static_cast<float*>(OUT), G, N, D, rows_per_split);
      else
        mix_forward_kernel<scalar_t, scalar_t, kG><<<grid, kThreads, 0, stream>>>(
            t, stride_n, W, static_cast<scalar_t*>(OUT), G, N, D, rows_per_split);
    });
  });
  return cudaGetLastError();
}

cudaError_t launch_mix_backward(TableType type, const void* T, int64_t stride_n, const void* GO,
                                const float* TW, float* GWP, void* DT, int G, int64_t N, int64_t D,
                                int64_t cols_per_split, int64_t split, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(N), static_cast<unsigned>(split));
  dispatch_table(type, [&](auto tt) {
    using scalar_t = typename decltype(tt)::type;
    dispatch_g(G, [&](auto gt) {
      constexpr int kG = decltype(gt)::value;
      mix_backward_kernel<scalar_t, kG><<<grid, kThreads, 0, stream>>>(
          static_cast<const scalar_t*>(T), stride_n, static_cast<const scalar_t*>(GO), TW, GWP,
          static_cast<scalar_t*>(DT), G, N, D, cols_per_split);
    });
  });
  return cudaGetLastError();
}

cudaError_t launch_table_grad(TableType type, const void* GO, const float* TW, void* DT, int G, int64_t N,
                              int64_t D, cudaStream_t stream) {
  dispatch_table(type, [&](auto tt) {
    using scalar_t = typename decltype(tt)::type;
    table_grad_kernel<scalar_t><<<static_cast<unsigned>(N), kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(GO), TW, static_cast<scalar_t*>(DT), G, N, D);
  });
  return cudaGetLastError();
}

cudaError_t launch_softmax_backward(const float* W, const float* GW, float* DL, int64_t G, int64_t N,
                                    float inv_tau, cudaStream_t stream) {
  softmax_backward_kernel<<<static_cast<unsigned>(G), kWeightThreads, 0, stream>>>(W, GW, DL, N, inv_tau);
  return cudaGetLastError();
}

cudaError_t launch_l2(TableType type, const float* Q, const void* T, int64_t stride_n, float* OUT, int64_t N,
                      int64_t D, int64_t cols_per_split, int64_t split, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(N), static_cast<unsigned>(split));
  dispatch_table(type, [&](auto tt) {
    using scalar_t = typename decltype(tt)::type;
    l2_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(Q, static_cast<const scalar_t*>(T), stride_n, OUT, N, D,
                                                        cols_per_split);
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace ap_erase_fast

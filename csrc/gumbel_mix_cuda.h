// Interface between the CUDA kernels (gumbel_mix_cuda_kernels.cu: device code, CUDA headers
// only) and the ATen host side (gumbel_mix_cuda.cpp: checks, planning, TORCH_LIBRARY_IMPL).
// Keeping torch out of the .cu makes the device compilation small: nvcc parses no ATen
// headers, once per GPU architecture.
#pragma once
#include <cstdint>

#include <cuda_runtime_api.h>

namespace ap_erase_fast {
namespace cuda {

constexpr int kMaxG = 8;              // draws per launch; the host chunks larger G
constexpr int kThreads = 256;         // threads of the mix, backward and l2 blocks
constexpr int kWeightThreads = 1024;  // threads of the per-draw weights / softmax-backward blocks

// Table element types. The kernels read bf16 / fp16 as __nv_bfloat16 / __half, which have the
// layout of c10::BFloat16 / c10::Half.
enum class TableType { kFloat32, kBFloat16, kFloat16 };

// Each launcher enqueues its kernel on `stream` and returns cudaGetLastError().

// W[g, :] = scores (logits + noise) / tau turned into softmax (or top-k softmax) weights;
// IDX[g] = first argmax. GN: given noise or nullptr (Philox noise of `seed`).
cudaError_t launch_weights(const float* L, const float* GN, float* W, int64_t* IDX, int64_t G, int64_t N,
                           uint64_t seed, float tau, int64_t k, bool use_topk, cudaStream_t stream);

// OUT[s, g, d] = sum over the rows of split s of W[g, n] T[n, d], for G <= kMaxG; OUT has the
// table type when split == 1 (out_fp32 false), else fp32 partials [split, G, D].
cudaError_t launch_mix_forward(TableType type, const void* T, int64_t stride_n, const float* W, void* OUT,
                               bool out_fp32, int G, int64_t N, int64_t D, int64_t rows_per_split,
                               int64_t split, cudaStream_t stream);

// GWP[s, g, n] = <T[n, cols of split s], GO[g, ...]> (skipped when GWP is null) and
// DT[n, :] = sum_g TW[g, n] GO[g, :] (skipped when DT is null; needs split == 1), G <= kMaxG.
cudaError_t launch_mix_backward(TableType type, const void* T, int64_t stride_n, const void* GO,
                                const float* TW, float* GWP, void* DT, int G, int64_t N, int64_t D,
                                int64_t cols_per_split, int64_t split, cudaStream_t stream);

// DT[n, :] = sum_g TW[g, n] GO[g, :] for any G (the d table of more than kMaxG draws, in one pass).
cudaError_t launch_table_grad(TableType type, const void* GO, const float* TW, void* DT, int G, int64_t N,
                              int64_t D, cudaStream_t stream);

// DL[g, n] = W[g, n] (GW[g, n] - <W[g], GW[g]>) * inv_tau.
cudaError_t launch_softmax_backward(const float* W, const float* GW, float* DL, int64_t G, int64_t N,
                                    float inv_tau, cudaStream_t stream);

// OUT[s, n] = sum over the columns of split s of (T[n, d] - Q[d])^2.
cudaError_t launch_l2(TableType type, const float* Q, const void* T, int64_t stride_n, float* OUT, int64_t N,
                      int64_t D, int64_t cols_per_split, int64_t split, cudaStream_t stream);

}  // namespace cuda
}  // namespace ap_erase_fast

// Host side of the CUDA backend: tensor checks, launch planning and the CUDA kernels'
// registration for the ap_erase_fast ops (schema: ops_schema.cpp; kernels:
// gumbel_mix_cuda_kernels.cu). Built with gumbel_mix_cuda_kernels.cu into its own library,
// ap_erase_fast._C_cuda, so a CUDA build problem never takes the CPU kernels with it.
//
// Only ATen core and c10/cuda headers are used (ATen/cuda/CUDAContext.h would pull in the
// cuBLAS/cuSPARSE headers): the file compiles against a CPU torch wheel plus a bare CUDA
// toolkit, which is how CI checks it (tests/ops/test_gpu_build.py).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "gumbel_mix_cuda.h"

namespace ap_erase_fast {
namespace {

using at::Tensor;
using cuda::kMaxG;
using cuda::kThreads;

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks that keep every SM busy: 4 per SM of the current device.
int64_t target_blocks() {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  return 4 * static_cast<int64_t>(std::max(sms, 1));
}

cuda::TableType table_type(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::TableType::kFloat32;
    case at::kBFloat16: return cuda::TableType::kBFloat16;
    case at::kHalf: return cuda::TableType::kFloat16;
    default: TORCH_CHECK(false, "CUDA table dtype must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

void check_table(const Tensor& table, const char* op) {
  TORCH_CHECK(table.is_cuda(), op, ": table must be a CUDA tensor");
  TORCH_CHECK(table.dim() == 2, op, ": table must be a 2-D [N, D] view, got ", table.dim(), "-D");
  TORCH_CHECK(table.size(1) <= 1 || table.stride(1) == 1, op,
              ": table rows must have unit column stride, got strides ", table.strides());
  table_type(table);
}

void check_weights(const Tensor& w, const Tensor& table, const char* op, const char* name) {
  const int64_t n = table.size(0);
  TORCH_CHECK(w.is_cuda() && w.device() == table.device() && w.dim() == 2 && w.size(1) == n &&
                  w.scalar_type() == at::kFloat && w.is_contiguous(),
              op, ": ", name, " must be contiguous float32 [G, ", n, "] on ", table.device(), ", got ",
              w.scalar_type(), " ", w.sizes(), " on ", w.device());
}

std::tuple<Tensor, Tensor> gumbel_weights_cuda(const Tensor& logits, const std::optional<Tensor>& gumbel,
                                               int64_t seed, double tau, int64_t topk) {
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 2 && logits.scalar_type() == at::kFloat &&
                  logits.is_contiguous(),
              "gumbel_weights: logits must be contiguous float32 CUDA [G, N], got ", logits.scalar_type(),
              " ", logits.sizes());
  TORCH_CHECK(tau > 0, "gumbel_weights: tau must be > 0");
  TORCH_CHECK(seed >= 0, "gumbel_weights: seed must be >= 0");
  const int64_t G = logits.size(0), N = logits.size(1);
  TORCH_CHECK(N >= 1 && N < (int64_t(1) << 24) && G * N < (int64_t(1) << 31),
              "gumbel_weights: need 1 <= N < 2^24 and G*N < 2^31, got G=", G, " N=", N);
  const float* gp = nullptr;
  if (gumbel.has_value() && gumbel->defined()) {
    TORCH_CHECK(gumbel->sizes() == logits.sizes() && gumbel->scalar_type() == at::kFloat &&
                    gumbel->is_contiguous() && gumbel->device() == logits.device(),
                "gumbel_weights: gumbel must be contiguous float32 of the shape and device of logits");
    gp = gumbel->data_ptr<float>();
  }
  const c10::cuda::CUDAGuard guard(logits.device());
  auto w = at::empty({G, N}, logits.options());
  auto idx = at::empty({G}, logits.options().dtype(at::kLong));
  if (G == 0) return {w, idx};
  C10_CUDA_CHECK(cuda::launch_weights(logits.data_ptr<float>(), gp, w.data_ptr<float>(), idx.data_ptr<int64_t>(),
                                      G, N, static_cast<uint64_t>(seed), static_cast<float>(tau), topk,
                                      topk > 0 && topk < N, c10::cuda::getCurrentCUDAStream()));
  return {w, idx};
}

Tensor mix_forward_cuda(const Tensor& table, const Tensor& weights) {
  check_table(table, "mix_forward");
  check_weights(weights, table, "mix_forward", "weights");
  const c10::cuda::CUDAGuard guard(table.device());
  const int64_t N = table.size(0), D = table.size(1), G = weights.size(0);
  if (G == 0 || D == 0 || N == 0) return at::zeros({G, D}, table.options());
  if (G > kMaxG) {
    std::vector<Tensor> parts;
    for (int64_t g = 0; g < G; g += kMaxG)
      parts.push_back(mix_forward_cuda(table, weights.narrow(0, g, std::min<int64_t>(kMaxG, G - g)).contiguous()));
    return at::cat(parts, 0);
  }
  // split-N: row slices write fp32 partials [split, G, D], summed below in a fixed order
  const int64_t d_blocks = cdiv(D, kThreads);
  int64_t split = std::max<int64_t>(1, std::min(cdiv(target_blocks(), d_blocks), cdiv(N, 256)));
  const int64_t rows = cdiv(N, split);
  split = cdiv(N, rows);
  Tensor out = split == 1 ? at::empty({G, D}, table.options())
                          : at::empty({split, G, D}, table.options().dtype(at::kFloat));
  C10_CUDA_CHECK(cuda::launch_mix_forward(table_type(table), table.data_ptr(), table.stride(0),
                                          weights.data_ptr<float>(), out.data_ptr(), split > 1,
                                          static_cast<int>(G), N, D, rows, split,
                                          c10::cuda::getCurrentCUDAStream()));
  return split == 1 ? out : out.sum(0).to(table.scalar_type());
}

std::tuple<Tensor, Tensor> mix_backward_cuda(const Tensor& table, const Tensor& grad_out, const Tensor& weights,
                                             const Tensor& table_weights, double tau, bool need_logits,
                                             bool need_table) {
  check_table(table, "mix_backward");
  const int64_t N = table.size(0), D = table.size(1), G = weights.size(0);
  check_weights(weights, table, "mix_backward", "weights");
  check_weights(table_weights, table, "mix_backward", "table_weights");
  TORCH_CHECK(table_weights.size(0) == G, "mix_backward: table_weights must have G=", G, " rows");
  TORCH_CHECK(grad_out.device() == table.device() && grad_out.sizes() == at::IntArrayRef({G, D}) &&
                  grad_out.is_contiguous() && grad_out.scalar_type() == table.scalar_type(),
              "mix_backward: grad_out must be contiguous [G, D] on the table's device in the table dtype, got ",
              grad_out.scalar_type(), " ", grad_out.sizes());
  TORCH_CHECK(tau > 0, "mix_backward: tau must be > 0");
  const c10::cuda::CUDAGuard guard(table.device());
  const Tensor no_logits = at::empty({0}, weights.options());
  const Tensor no_table = at::empty({0}, table.options());
  if (G == 0 || N == 0 || D == 0)  // nothing to contract: both gradients are zero
    return {need_logits ? at::zeros({G, N}, weights.options()) : no_logits,
            need_table ? at::zeros({N, D}, table.options()) : no_table};
  if (G > kMaxG) {
    // d w per chunk of draws; d table in one launch over all draws (rounded to its dtype once)
    Tensor dl_all = need_logits ? at::empty({G, N}, weights.options()) : no_logits;
    for (int64_t g = 0; g < G && need_logits; g += kMaxG) {
      const int64_t c = std::min<int64_t>(kMaxG, G - g);
      auto r = mix_backward_cuda(table, grad_out.narrow(0, g, c).contiguous(), weights.narrow(0, g, c).contiguous(),
                                 table_weights.narrow(0, g, c).contiguous(), tau, true, false);
      dl_all.narrow(0, g, c).copy_(std::get<0>(r));
    }
    if (!need_table) return {dl_all, no_table};
    Tensor dT = at::empty({N, D}, table.options());
    C10_CUDA_CHECK(cuda::launch_table_grad(table_type(table), grad_out.data_ptr(), table_weights.data_ptr<float>(),
                                           dT.data_ptr(), static_cast<int>(G), N, D,
                                           c10::cuda::getCurrentCUDAStream()));
    return {dl_all, dT};
  }
  // split-D (only without d table: its tiles are written once, so a block then covers its row)
  int64_t split = need_table ? 1 : std::max<int64_t>(1, std::min(cdiv(target_blocks(), N), cdiv(D, 4 * kThreads)));
  const int64_t cols = cdiv(D, split);
  split = cdiv(D, cols);
  Tensor gwp = need_logits ? at::empty({split, G, N}, weights.options()) : Tensor();
  Tensor dT = need_table ? at::empty({N, D}, table.options()) : no_table;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(cuda::launch_mix_backward(table_type(table), table.data_ptr(), table.stride(0),
                                           grad_out.data_ptr(), table_weights.data_ptr<float>(),
                                           need_logits ? gwp.data_ptr<float>() : nullptr,
                                           need_table ? dT.data_ptr() : nullptr, static_cast<int>(G), N, D,
                                           cols, split, stream));
  if (!need_logits) return {no_logits, dT};
  auto gw = split == 1 ? gwp[0].contiguous() : gwp.sum(0);
  auto dl = at::empty({G, N}, weights.options());
  C10_CUDA_CHECK(cuda::launch_softmax_backward(weights.data_ptr<float>(), gw.data_ptr<float>(),
                                               dl.data_ptr<float>(), G, N, static_cast<float>(1.0 / tau), stream));
  return {dl, dT};
}

Tensor l2_scores_cuda(const Tensor& query, const Tensor& table) {
  check_table(table, "l2_scores");
  TORCH_CHECK(query.dim() == 1 && query.size(0) == table.size(1) && query.device() == table.device(),
              "l2_scores: query must be [D=", table.size(1), "] on ", table.device(), ", got ", query.sizes(),
              " on ", query.device());
  const c10::cuda::CUDAGuard guard(table.device());
  const int64_t N = table.size(0), D = table.size(1);
  if (N == 0 || D == 0) return at::zeros({N}, table.options().dtype(at::kFloat));
  auto q = query.to(at::kFloat).contiguous();
  int64_t split = std::max<int64_t>(1, std::min(cdiv(target_blocks(), N), cdiv(D, 4 * kThreads)));
  const int64_t cols = cdiv(D, split);
  split = cdiv(D, cols);
  auto part = at::empty({split, N}, table.options().dtype(at::kFloat));
  C10_CUDA_CHECK(cuda::launch_l2(table_type(table), q.data_ptr<float>(), table.data_ptr(), table.stride(0),
                                 part.data_ptr<float>(), N, D, cols, split, c10::cuda::getCurrentCUDAStream()));
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

// The schema of the ap_erase_fast ops: defined once, here, and built into the CPU library
// (ap_erase_fast._C), which is always loaded first. Each backend library only registers kernels
// for these ops (TORCH_LIBRARY_IMPL: CPU in gumbel_mix_cpu.cpp, CUDA in gumbel_mix_cuda.cu), so
// the CUDA library can be missing, or fail to build, without taking the CPU kernels with it.
// Python shape functions for torch.compile: ap_erase_fast/ops/_native.py (_register_fakes).
#include <torch/library.h>

TORCH_LIBRARY(ap_erase_fast, m) {
  m.def("gumbel_weights(Tensor logits, Tensor? gumbel, int seed, float tau, int topk) -> (Tensor, Tensor)");
  m.def("mix_forward(Tensor table, Tensor weights) -> Tensor");
  m.def("mix_backward(Tensor table, Tensor grad_out, Tensor weights, Tensor table_weights, float tau, "
        "bool need_logits, bool need_table) -> (Tensor, Tensor)");
  m.def("l2_scores(Tensor query, Tensor table) -> Tensor");
}

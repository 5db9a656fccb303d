// Counter-based Philox-4x32-10 and the Gumbel transform, shared by the CPU and CUDA kernels.
// Bit-compatible with Triton's tl.rand(seed, offset) (key = seed lo/hi words, counter =
// (offset, 0, 0, 0), first output word mapped to [0, 1) by uint_to_uniform_float), and with
// ap_erase_fast.ops.reference.philox_uniform.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define AP_HD __host__ __device__ __forceinline__
#else
#define AP_HD inline
#endif

namespace ap_erase_fast {

AP_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

AP_HD float philox_uniform(uint64_t seed, uint32_t offset) {
  uint32_t c0 = offset, c1 = 0, c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    const uint32_t p0 = c0, p2 = c2;
    c0 = mulhi32(0xCD9E8D57u, p2) ^ c1 ^ k0;
    c2 = mulhi32(0xD2511F53u, p0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * p2;
    c3 = 0xD2511F53u * p0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  int32_t x = static_cast<int32_t>(c0);
  if (x < 0) x = -x - 1;  // never overflows: -INT32_MIN - 1 == INT32_MAX
  return static_cast<float>(x) * 4.6566127342e-10f;
}

// g = -log(-log(u + 1e-10) + 1e-10)  (ALGORITHM.md section 3)
// The logarithms must be the accurate logf (about 1 ulp) that every backend uses. The hardware
// approximation (lg2.approx, what nvcc's --use_fast_math turns logf into, with no macro to
// detect it here) has an absolute, not a relative, error bound: where -log(u) is small (u near 1)
// the noise would differ from the other backends' far beyond fp32 rounding. The CUDA build flags
// (ap_erase_fast/ops/native_build.py) have no fast-math, and tests/ops/test_gpu_build.py checks
// the compiled PTX for lg2.approx.
AP_HD float gumbel_from_uniform(float u) {
  return -logf(-logf(u + 1e-10f) + 1e-10f);
}

}  // namespace ap_erase_fast

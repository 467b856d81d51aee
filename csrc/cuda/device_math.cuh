// Device math shared by the CUDA kernels. The build uses --use_fast_math, which turns
// tanhf and x / y into approximate instructions; what needs fp32 accuracy lives here.
#pragma once

#include <cuda_runtime.h>

namespace safeattn {
namespace cuda {

constexpr float kLog2e = 1.4426950408889634f;

// tanh to a few ulp: tanh.approx (~1e-3 relative error) is too coarse for
// softcap * tanh(s / softcap) in fp32.
__device__ __forceinline__ float tanh_acc(float x) {
  const float ax = fabsf(x);
  if (ax >= 0.4f) {
    const float e = exp2f(2.f * kLog2e * ax);  // inf for large |x| -> result 1
    const float r = 1.f - __fdiv_rn(2.f, e + 1.f);
    return copysignf(r, x);
  }
  // Taylor series to x^15; the first omitted term is < 1e-10 for |x| < 0.4.
  const float x2 = x * x;
  float p = -929569.f / 638512875.f;
  p = fmaf(p, x2, 21844.f / 6081075.f);
  p = fmaf(p, x2, -1382.f / 155925.f);
  p = fmaf(p, x2, 62.f / 2835.f);
  p = fmaf(p, x2, -17.f / 315.f);
  p = fmaf(p, x2, 2.f / 15.f);
  p = fmaf(p, x2, -1.f / 3.f);
  return fmaf(x * x2, p, x);
}

}  // namespace cuda
}  // namespace safeattn

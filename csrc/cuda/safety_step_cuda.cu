// CUDA backend of safeattn::safety_step: one fused launch for the whole batch (DESIGN §3).
// Block b scores row b (p = sigmoid(h·w + bias), fp32 dot; NaN if the logit is not finite),
// runs the state machine of safeattn.reference.safety_step (a hit is logit >= the logit of
// theta, in double) and writes the next probe's intervals. No host sync.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

#include "checks.h"

namespace safeattn {
namespace {

constexpr int kStepThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kStepThreads)
    safety_step_kernel(const T* __restrict__ h, int64_t h_s0, int64_t h_s1,
                       const T* __restrict__ w, const T* __restrict__ bias, int64_t D,
                       int32_t* mode, int32_t* consec, int32_t* s_t, int32_t* step,
                       bool* refused, const bool* active, const int32_t* q_span,
                       const int32_t* resp_start, double at_logit, int64_t tau, int64_t r1,
                       int64_t r2, int64_t r3, float* p_out, int32_t* iv_out) {
  __shared__ float partial[kStepThreads / 32];
  const int64_t b = blockIdx.x;
  const T* hb = h + b * h_s0;
  float acc = 0.f;
  for (int64_t i = threadIdx.x; i < D; i += kStepThreads)
    acc = fmaf(static_cast<float>(hb[i * h_s1]), static_cast<float>(w[i]), acc);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = acc;
  __syncthreads();
  if (threadIdx.x != 0) return;

  float logit = static_cast<float>(bias[0]);
#pragma unroll
  for (int i = 0; i < kStepThreads / 32; ++i) logit += partial[i];
  // A non-finite logit gives p = NaN (fail closed), as in the reference. The sigmoid runs
  // in double (untouched by --use_fast_math) and is rounded once to fp32.
  const bool finite = (__float_as_uint(logit) & 0x7f800000u) != 0x7f800000u;
  const float p = finite ? static_cast<float>(1.0 / (1.0 + exp(-static_cast<double>(logit))))
                         : __int_as_float(0x7fc00000u);
  p_out[b] = p;

  int32_t md = mode[b], cs = consec[b], st = s_t[b];
  const int32_t n = step[b];
  bool ref = refused[b];
  if (active[b] && !ref) {
    const bool hit = !finite || static_cast<double>(logit) >= at_logit;
    if (n == 0) {  // prefill: the [CLS] row decides at once
      if (hit) {
        md = kMalicious; cs = 1; st = 0; ref = true;
      } else {
        md = kBenign; cs = 0; st = -1;
      }
    } else if (hit) {
      cs += 1;
      if (cs == 1) { md = kTransition; st = n - 1; }
      if (!finite || cs >= tau) ref = true;  // non-finite p fails closed
    } else {
      md = kBenign; cs = 0; st = -1;
    }
    mode[b] = md; consec[b] = cs; s_t[b] = st; refused[b] = ref;
  }
  const int64_t nn = static_cast<int64_t>(n) + 1;
  step[b] = static_cast<int32_t>(nn);

  auto mn = [](int64_t x, int64_t y) { return x < y ? x : y; };
  auto mx = [](int64_t x, int64_t y) { return x > y ? x : y; };
  int64_t lo, hi;
  if (md == kMalicious) {  // Rule 1: the first r1 generated tokens
    lo = 0; hi = mn(r1, nn);
  } else if (md == kTransition) {  // Rule 3: [S_t - r2, S_t + r3] around the first alarm
    lo = mx(0, st - r2); hi = mn(nn, static_cast<int64_t>(st) + r3 + 1);
  } else {  // Rule 2: the most recent r2 tokens
    lo = mx(0, nn - r2); hi = nn;
  }
  const int64_t rs = resp_start[b];
  iv_out[b * 4 + 0] = q_span[b * 2 + 0];
  iv_out[b * 4 + 1] = q_span[b * 2 + 1];
  iv_out[b * 4 + 2] = static_cast<int32_t>(rs + lo);
  iv_out[b * 4 + 3] = static_cast<int32_t>(rs + mx(lo, hi));
}

std::tuple<at::Tensor, at::Tensor> safety_step_cuda(
    const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias, at::Tensor& mode,
    at::Tensor& consec, at::Tensor& s_t, at::Tensor& step, at::Tensor& refused,
    const at::Tensor& active, const at::Tensor& q_span, const at::Tensor& resp_start,
    double theta, int64_t tau, int64_t r1, int64_t r2, int64_t r3) {
  const StepDims dims = check_safety_step(h, weight, bias, mode, consec, s_t, step, refused,
                                          active, q_span, resp_start);
  TORCH_CHECK(h.is_cuda(), "safety_step (CUDA): h must be on a CUDA device");
  TORCH_CHECK(dims.B <= INT32_MAX, "safety_step (CUDA): too many rows, B=", dims.B);
  const double at_logit = logit_threshold(theta);
  c10::cuda::CUDAGuard guard(h.device());
  auto p = at::empty({dims.B}, h.options().dtype(at::kFloat));
  auto out = at::empty({dims.B, 2, 2}, h.options().dtype(at::kInt));
  if (dims.B == 0) return {p, out};
  const auto w = weight.reshape(-1).contiguous();
  const auto bs = bias.reshape(-1).contiguous();
  const auto qs = q_span.contiguous();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "safety_step_cuda",
                                  [&] {
    safety_step_kernel<scalar_t><<<static_cast<unsigned>(dims.B), kStepThreads, 0, stream>>>(
        h.data_ptr<scalar_t>(), h.stride(0), h.stride(1), w.data_ptr<scalar_t>(),
        bs.data_ptr<scalar_t>(), dims.D, mode.data_ptr<int32_t>(), consec.data_ptr<int32_t>(),
        s_t.data_ptr<int32_t>(), step.data_ptr<int32_t>(), refused.data_ptr<bool>(),
        active.data_ptr<bool>(), qs.data_ptr<int32_t>(), resp_start.data_ptr<int32_t>(),
        at_logit, tau, r1, r2, r3, p.data_ptr<float>(), out.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {p, out};
}

}  // namespace

TORCH_LIBRARY_IMPL(safeattn, CUDA, m) { m.impl("safety_step", &safety_step_cuda); }

}  // namespace safeattn

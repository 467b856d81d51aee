// CUDA backend of safeattn::paged_interval_attention: interval attention whose keys and
// values are read in place from a paged cache (semantics in ops.cpp and reference.py).
//
// Made for decode-sized work (a probe row per request seeing ~100 columns), not prefill: one
// warp per query row walks that row's visible columns with an online softmax; each lane holds
// D/32 channels. The Python wrapper rejects out-of-range slots, offsets and ranges (no sync
// here); the kernel clamps them, so that the raw op never reads out of bounds.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "checks.h"
#include "device_math.cuh"

namespace safeattn {
namespace {

constexpr int kMaxD = 256;
constexpr int kLanes = 32;
constexpr int kRowsPerBlock = 4;

struct PagedParams {
  int64_t q_sb, q_sh, q_st, n_sb, n_sh, n_st;
  int64_t S, P, Tc, nslot;
  int B, Hq, Hkv, G, Tq, Tk, D, NI;
  float scale, softcap;  // softcap 0: none
};

__device__ __forceinline__ int64_t clamp(int64_t x, int64_t n) {
  return min(max(x, int64_t{0}), n - 1);
}

template <typename T>
__global__ void paged_kernel(const T* __restrict__ q, const T* __restrict__ cache,
                             const int64_t* __restrict__ slots,
                             const int64_t* __restrict__ koff, const int64_t* __restrict__ voff,
                             const T* __restrict__ k_new, const T* __restrict__ v_new,
                             const int32_t* __restrict__ iv, T* __restrict__ out,
                             PagedParams p) {
  const int lane = threadIdx.x % kLanes;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kLanes;
  if (row >= static_cast<int64_t>(p.B) * p.Hq * p.Tq) return;
  const int t = row % p.Tq, hq = (row / p.Tq) % p.Hq, b = row / (static_cast<int64_t>(p.Tq) * p.Hq);
  const int h = hq / p.G;
  constexpr int kPer = kMaxD / kLanes;

  float qv[kPer], acc[kPer];
  const T* qr = q + b * p.q_sb + hq * p.q_sh + t * p.q_st;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int d = lane + i * kLanes;
    qv[i] = d < p.D ? static_cast<float>(qr[d]) * p.scale : 0.f;
    acc[i] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  const int32_t* rg = iv + (static_cast<int64_t>(b) * p.Tq + t) * p.NI * 2;
  for (int r = 0; r < p.NI; ++r) {
    const int lo = max(rg[2 * r], 0), hi = min(rg[2 * r + 1], p.Tk);
    for (int j = lo; j < hi; ++j) {
      bool seen = false;  // a column in an earlier range counts once
      for (int e = 0; e < r && !seen; ++e) seen = rg[2 * e] <= j && j < rg[2 * e + 1];
      if (seen) continue;
      const T *kp, *vp;
      const int64_t *ko = nullptr, *vo = nullptr;
      if (j < p.Tc) {
        const int64_t slot = min(max(slots[b * p.Tc + j], int64_t{0}), p.nslot - 1);
        const int64_t tok = slot % p.P;
        kp = vp = cache + ((slot / p.P) * p.Hkv + h) * p.S;
        ko = koff + tok * p.D;
        vo = voff + tok * p.D;
      } else {
        const int64_t off = b * p.n_sb + h * p.n_sh + (j - p.Tc) * p.n_st;
        kp = k_new + off;
        vp = v_new + off;
      }
      float s = 0.f;
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        const int d = lane + i * kLanes;
        if (d < p.D) s += qv[i] * static_cast<float>(kp[ko ? clamp(ko[d], p.S) : d]);
      }
#pragma unroll
      for (int w = kLanes / 2; w > 0; w /= 2) s += __shfl_xor_sync(0xffffffff, s, w);
      if (p.softcap > 0.f) s = p.softcap * cuda::tanh_acc(__fdiv_rn(s, p.softcap));
      const float mnew = fmaxf(m, s);
      const float alpha = m == -INFINITY ? 0.f : __expf(m - mnew);
      const float w = __expf(s - mnew);
      l = l * alpha + w;
      m = mnew;
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        const int d = lane + i * kLanes;
        if (d < p.D)
          acc[i] = acc[i] * alpha + w * static_cast<float>(vp[vo ? clamp(vo[d], p.S) : d]);
      }
    }
  }
  const float inv = l > 0.f ? 1.f / l : 0.f;
  T* o = out + row * p.D;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int d = lane + i * kLanes;
    if (d < p.D) o[d] = static_cast<T>(acc[i] * inv);
  }
}

at::Tensor paged_interval_attention_cuda(const at::Tensor& q_in, const at::Tensor& cache,
                                         const at::Tensor& slots, const at::Tensor& key_offsets,
                                         const at::Tensor& value_offsets,
                                         const at::Tensor& k_new_in, const at::Tensor& v_new_in,
                                         const at::Tensor& intervals,
                                         std::optional<double> scale,
                                         std::optional<double> softcap) {
  const AttnDims d = check_paged_interval_attention(q_in, cache, slots, key_offsets,
                                                    value_offsets, k_new_in, v_new_in,
                                                    intervals);
  const auto dtype = q_in.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat,
              "paged_interval_attention (CUDA): q must be float16, bfloat16 or float32, got ",
              dtype);
  TORCH_CHECK(q_in.is_cuda(), "paged_interval_attention (CUDA): tensors must be on a CUDA device");
  TORCH_CHECK(d.D <= kMaxD, "paged_interval_attention (CUDA): head dim D=", d.D,
              " is not supported (at most ", kMaxD, ")");
  TORCH_CHECK(!softcap.has_value() || *softcap > 0,
              "paged_interval_attention: softcap must be > 0");
  TORCH_CHECK(d.Tk < INT32_MAX && d.NI < INT32_MAX && d.B * d.Hq * d.Tq < INT32_MAX,
              "paged_interval_attention (CUDA): Tk, NI and B*Hq*Tq must fit in int32");

  c10::cuda::CUDAGuard guard(q_in.device());
  auto out = at::empty({d.B, d.Hq, d.Tq, d.D}, q_in.options());
  if (out.numel() == 0) return out;
  if (d.Tk == 0 || d.NI == 0) return out.zero_();  // no row sees any key
  auto last_contig = [](const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); };
  const at::Tensor q = last_contig(q_in), k_new = k_new_in.contiguous(),
                   v_new = v_new_in.contiguous(), sl = slots.contiguous(),
                   ko = key_offsets.contiguous(), vo = value_offsets.contiguous(),
                   iv = intervals.contiguous();

  PagedParams p{};
  p.q_sb = q.stride(0); p.q_sh = q.stride(1); p.q_st = q.stride(2);
  p.n_sb = k_new.stride(0); p.n_sh = k_new.stride(1); p.n_st = k_new.stride(2);
  p.S = cache.size(2); p.P = ko.size(0); p.Tc = sl.size(1); p.nslot = cache.size(0) * p.P;
  p.B = d.B; p.Hq = d.Hq; p.Hkv = d.Hkv; p.G = d.Hq / d.Hkv; p.Tq = d.Tq;
  p.Tk = d.Tk; p.D = d.D; p.NI = d.NI;
  p.scale = scale.has_value() ? static_cast<float>(*scale)
                              : static_cast<float>(1.0 / std::sqrt(static_cast<double>(d.D)));
  p.softcap = softcap.has_value() ? static_cast<float>(*softcap) : 0.f;

  const int64_t rows = static_cast<int64_t>(d.B) * d.Hq * d.Tq;
  const dim3 grid((rows + kRowsPerBlock - 1) / kRowsPerBlock), block(kRowsPerBlock * kLanes);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "paged_interval_attention", [&] {
    paged_kernel<scalar_t><<<grid, block, 0, stream>>>(
        q.data_ptr<scalar_t>(), cache.data_ptr<scalar_t>(), sl.data_ptr<int64_t>(),
        ko.data_ptr<int64_t>(), vo.data_ptr<int64_t>(), k_new.data_ptr<scalar_t>(),
        v_new.data_ptr<scalar_t>(), iv.data_ptr<int32_t>(), out.data_ptr<scalar_t>(), p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(safeattn, CUDA, m) {
  m.impl("paged_interval_attention", &paged_interval_attention_cuda);
}

}  // namespace safeattn

// CUDA backend of safeattn::interval_attention and interval_attention_fwd (which also returns
// the row log-sum-exp): argument handling, split heuristic, dispatch.
// The kernels live in attention_kernels.cuh (instanced per dtype in attention_cuda_*.cu).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include "attention_cuda.h"
#include "checks.h"

namespace safeattn {
namespace {

// 16-byte vector loads need an aligned base, row strides in whole 16-byte chunks and D a
// multiple of the chunk.
bool vec_ok(const at::Tensor& t, int64_t D) {
  const int64_t ch = 16 / t.element_size();
  if (D % ch != 0) return false;
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int i = 0; i < 3; ++i)
    if (t.size(i) > 1 && t.stride(i) % ch != 0) return false;
  return true;
}

// Returns out [B,Hq,Tq,D] and, when want_lse, the row log-sum-exp [B,Hq,Tq] fp32 of the
// scaled (soft-capped) scores over visible keys (-inf for rows that see nothing).
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q_in, const at::Tensor& k_in,
                                           const at::Tensor& v_in, const at::Tensor& intervals,
                                           std::optional<double> scale,
                                           std::optional<double> softcap, bool want_lse) {
  const AttnDims d = check_interval_attention(q_in, k_in, v_in, intervals);
  const auto dtype = q_in.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat,
              "interval_attention (CUDA): q must be float16, bfloat16 or float32, got ", dtype);
  TORCH_CHECK(q_in.is_cuda(), "interval_attention (CUDA): tensors must be on a CUDA device");
  TORCH_CHECK(d.D <= 256, "interval_attention (CUDA): head dim D=", d.D,
              " is not supported (at most 256)");
  TORCH_CHECK(!softcap.has_value() || *softcap > 0, "interval_attention: softcap must be > 0");
  TORCH_CHECK(d.B <= 65535 && d.Hq <= 65535, "interval_attention (CUDA): B=", d.B, " and Hq=",
              d.Hq, " must be at most 65535");
  TORCH_CHECK(d.Tq < INT32_MAX && d.Tk < INT32_MAX && d.NI < INT32_MAX,
              "interval_attention (CUDA): Tq, Tk and NI must fit in int32");

  c10::cuda::CUDAGuard guard(q_in.device());
  auto out = at::empty({d.B, d.Hq, d.Tq, d.D}, q_in.options());
  auto lse = at::empty({want_lse ? d.B : 0, d.Hq, d.Tq}, q_in.options().dtype(at::kFloat));
  const float ninf = -std::numeric_limits<float>::infinity();
  if (out.numel() == 0) return {out, lse.fill_(ninf)};
  if (d.Tk == 0 || d.NI == 0) return {out.zero_(), lse.fill_(ninf)};  // no row sees any key

  auto last_contig = [](const at::Tensor& t) {
    return (t.stride(3) == 1 || t.size(3) == 1) ? t : t.contiguous();
  };
  const at::Tensor q = last_contig(q_in), k = last_contig(k_in), v = last_contig(v_in);
  const at::Tensor iv = intervals.contiguous();

  cuda::AttnParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.iv = iv.data_ptr<int32_t>();
  p.out = out.data_ptr();
  p.lse = want_lse ? lse.data_ptr<float>() : nullptr;
  p.q_sb = q.stride(0); p.q_sh = q.stride(1); p.q_st = q.stride(2);
  p.k_sb = k.stride(0); p.k_sh = k.stride(1); p.k_st = k.stride(2);
  p.v_sb = v.stride(0); p.v_sh = v.stride(1); p.v_st = v.stride(2);
  p.B = d.B; p.Hq = d.Hq; p.Hkv = d.Hkv; p.G = d.Hq / d.Hkv;
  p.Tq = d.Tq; p.Tk = d.Tk; p.D = d.D; p.NI = d.NI;
  p.scale = scale.has_value() ? static_cast<float>(*scale)
                              : static_cast<float>(1.0 / std::sqrt(static_cast<double>(d.D)));
  p.softcap = softcap.has_value() ? static_cast<float>(*softcap) : 0.f;
  p.q_vec = vec_ok(q, d.D);
  p.k_vec = vec_ok(k, d.D);
  p.v_vec = vec_ok(v, d.D);

  // Decode (the G*Tq rows of a kv group fit one 16-row tile): split the keys so that the
  // grid fills the GPU, then merge the partial softmax states.
  const bool decode = static_cast<int64_t>(p.G) * p.Tq <= cuda::kDecodeRows;
  at::Tensor part_o, part_m, part_l;
  p.nsplit = 1;
  if (decode) {
    const bool f32 = dtype == at::kFloat;
    const int64_t kt = cuda::decode_block_keys(f32, cuda::padded_head_dim(p.D));
    const int64_t ntiles = (d.Tk + kt - 1) / kt;
    const int64_t groups = d.B * d.Hkv;
    const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    int64_t nsplit = std::min<int64_t>({ntiles, std::max<int64_t>(1, (2 * sms + groups - 1) / groups), 256});
    const int64_t tiles_per = (ntiles + nsplit - 1) / nsplit;
    nsplit = (ntiles + tiles_per - 1) / tiles_per;
    p.nsplit = static_cast<int>(nsplit);
    p.split_keys = static_cast<int>(std::min<int64_t>(tiles_per * kt, INT32_MAX / 2));
    if (nsplit > 1) {
      const int64_t rows = d.B * d.Hq * d.Tq;
      auto fopt = q.options().dtype(at::kFloat);
      part_o = at::empty({rows * nsplit * d.D}, fopt);
      part_m = at::empty({rows * nsplit}, fopt);
      part_l = at::empty({rows * nsplit}, fopt);
      p.part_o = part_o.data_ptr<float>();
      p.part_m = part_m.data_ptr<float>();
      p.part_l = part_l.data_ptr<float>();
    }
  }

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  switch (dtype) {
    case at::kHalf:
      cuda::launch_attention_f16(p, decode, stream);
      break;
    case at::kBFloat16:
      cuda::launch_attention_bf16(p, decode, stream);
      break;
    default:
      cuda::launch_attention_f32(p, decode, stream);
      break;
  }
  return {out, lse};
}

at::Tensor interval_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& intervals, std::optional<double> scale,
                                   std::optional<double> softcap) {
  return std::get<0>(forward(q, k, v, intervals, scale, softcap, false));
}

std::tuple<at::Tensor, at::Tensor> interval_attention_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& intervals,
    std::optional<double> scale, std::optional<double> softcap) {
  return forward(q, k, v, intervals, scale, softcap, true);
}

}  // namespace

TORCH_LIBRARY_IMPL(safeattn, CUDA, m) {
  m.impl("interval_attention", &interval_attention_cuda);
  m.impl("interval_attention_fwd", &interval_attention_fwd_cuda);
}

}  // namespace safeattn

// CUDA backend of safeattn::interval_attention_bwd: argument handling, row-split heuristic,
// dispatch. The kernels live in attention_bwd_cuda.cu.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>

#include "attention_cuda.h"
#include "checks.h"

namespace safeattn {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> interval_attention_bwd_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in,
    const at::Tensor& intervals, std::optional<double> scale, std::optional<double> softcap) {
  const AttnDims d = check_interval_attention_bwd(grad_out_in, q_in, k_in, v_in, out_in, lse_in,
                                                 intervals, softcap);
  const auto dtype = q_in.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat,
              "interval_attention_bwd (CUDA): q must be float16, bfloat16 or float32, got ", dtype);
  TORCH_CHECK(q_in.is_cuda(), "interval_attention_bwd (CUDA): tensors must be on a CUDA device");
  TORCH_CHECK(d.D <= 256, "interval_attention_bwd (CUDA): head dim D=", d.D,
              " is not supported (at most 256)");
  TORCH_CHECK(d.B <= 65535 && d.Hkv <= 65535, "interval_attention_bwd (CUDA): B=", d.B,
              " and Hkv=", d.Hkv, " must be at most 65535");
  TORCH_CHECK(d.Hq * d.Tq < INT32_MAX && d.Tk < INT32_MAX && d.NI < INT32_MAX,
              "interval_attention_bwd (CUDA): Hq*Tq, Tk and NI must fit in int32");

  c10::cuda::CUDAGuard guard(q_in.device());
  auto fopt = q_in.options().dtype(at::kFloat);
  if (d.B == 0 || d.Hq == 0 || d.Tq == 0 || d.Tk == 0 || d.D == 0)
    return {at::zeros({d.B, d.Hq, d.Tq, d.D}, q_in.options()),
            at::zeros({d.B, d.Hkv, d.Tk, d.D}, q_in.options()),
            at::zeros({d.B, d.Hkv, d.Tk, d.D}, q_in.options())};

  auto last_contig = [](const at::Tensor& t) {
    return (t.stride(3) == 1 || t.size(3) == 1) ? t : t.contiguous();
  };
  const at::Tensor q = last_contig(q_in), k = last_contig(k_in), v = last_contig(v_in);
  const at::Tensor go = last_contig(grad_out_in), o = last_contig(out_in);
  const at::Tensor lse = lse_in.contiguous(), iv = intervals.contiguous();

  // Rows of a kv group split over several blocks per key tile only when the tiles alone
  // leave the GPU idle (short Tk); then dK/dV accumulate with atomics too.
  const int DP = cuda::padded_head_dim(static_cast<int>(d.D));
  const int64_t G = d.Hq / d.Hkv;
  const int64_t ntiles = (d.Tk + cuda::bwd_keys(DP) - 1) / cuda::bwd_keys(DP);
  const int64_t nchunks = (G * d.Tq + cuda::bwd_rows(DP) - 1) / cuda::bwd_rows(DP);
  const int64_t blocks = ntiles * d.B * d.Hkv;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t rsplit = 1;
  if (blocks < 2 * sms)
    rsplit = std::max<int64_t>(1, std::min((2 * sms + blocks - 1) / blocks, nchunks / 4));
  const int64_t per = (nchunks + rsplit - 1) / rsplit;
  rsplit = (nchunks + per - 1) / per;
  TORCH_CHECK(ntiles * rsplit < INT32_MAX, "interval_attention_bwd (CUDA): Tk=", d.Tk,
              " gives too many key tiles");

  auto dq = at::zeros({d.B, d.Hq, d.Tq, d.D}, fopt);
  auto dk = rsplit > 1 ? at::zeros({d.B, d.Hkv, d.Tk, d.D}, fopt)
                       : at::empty({d.B, d.Hkv, d.Tk, d.D}, fopt);
  auto dv = rsplit > 1 ? at::zeros_like(dk) : at::empty_like(dk);
  auto delta = at::empty({d.B, d.Hq, d.Tq}, fopt);

  cuda::BwdParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = o.data_ptr();
  p.dout = go.data_ptr();
  p.iv = iv.data_ptr<int32_t>();
  p.lse = lse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr<float>();
  p.dk = dk.data_ptr<float>();
  p.dv = dv.data_ptr<float>();
  p.q_sb = q.stride(0); p.q_sh = q.stride(1); p.q_st = q.stride(2);
  p.k_sb = k.stride(0); p.k_sh = k.stride(1); p.k_st = k.stride(2);
  p.v_sb = v.stride(0); p.v_sh = v.stride(1); p.v_st = v.stride(2);
  p.o_sb = o.stride(0); p.o_sh = o.stride(1); p.o_st = o.stride(2);
  p.do_sb = go.stride(0); p.do_sh = go.stride(1); p.do_st = go.stride(2);
  p.B = d.B; p.Hq = d.Hq; p.Hkv = d.Hkv; p.G = G;
  p.Tq = d.Tq; p.Tk = d.Tk; p.D = d.D; p.NI = d.NI;
  p.scale = scale.has_value() ? static_cast<float>(*scale)
                              : static_cast<float>(1.0 / std::sqrt(static_cast<double>(d.D)));
  p.softcap = softcap.has_value() ? static_cast<float>(*softcap) : 0.f;
  p.rsplit = static_cast<int>(rsplit);
  p.chunks_per_split = static_cast<int>(per);

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  switch (dtype) {
    case at::kHalf:
      cuda::launch_attention_bwd_f16(p, stream);
      break;
    case at::kBFloat16:
      cuda::launch_attention_bwd_bf16(p, stream);
      break;
    default:
      cuda::launch_attention_bwd_f32(p, stream);
      break;
  }
  if (dtype == at::kFloat) return {dq, dk, dv};
  return {dq.to(dtype), dk.to(dtype), dv.to(dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(safeattn, CUDA, m) {
  m.impl("interval_attention_bwd", &interval_attention_bwd_cuda);
}

}  // namespace safeattn

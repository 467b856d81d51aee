// Argument checks shared by the CPU and CUDA backends. Messages name the argument.
#pragma once
#include <torch/library.h>
#include <ATen/ATen.h>

#include <cmath>
#include <limits>

namespace safeattn {

// Modes of the strategic-decoding state machine (DESIGN §3).
enum Mode : int32_t { kBenign = 0, kMalicious = 1, kTransition = 2 };

struct AttnDims {
  int64_t B, Hq, Hkv, Tq, Tk, D, NI;
};

inline AttnDims check_interval_attention(const at::Tensor& q, const at::Tensor& k,
                                         const at::Tensor& v, const at::Tensor& intervals) {
  TORCH_CHECK(q.dim() == 4, "interval_attention: q must be 4-D [B,Hq,Tq,D], got ", q.dim(), "-D");
  TORCH_CHECK(k.dim() == 4, "interval_attention: k must be 4-D [B,Hkv,Tk,D], got ", k.dim(), "-D");
  TORCH_CHECK(v.dim() == 4, "interval_attention: v must be 4-D [B,Hkv,Tk,D], got ", v.dim(), "-D");
  TORCH_CHECK(intervals.dim() == 4 && intervals.size(3) == 2,
              "interval_attention: intervals must be [B,Tq,NI,2], got ", intervals.sizes());
  TORCH_CHECK(intervals.scalar_type() == at::kInt,
              "interval_attention: intervals must be int32, got ", intervals.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "interval_attention: q, k, v must share a dtype, got q=", q.scalar_type(),
              " k=", k.scalar_type(), " v=", v.scalar_type());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device() &&
                  intervals.device() == q.device(),
              "interval_attention: q, k, v, intervals must be on one device, got q=", q.device(),
              " k=", k.device(), " v=", v.device(), " intervals=", intervals.device());
  AttnDims d{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), intervals.size(2)};
  TORCH_CHECK(k.size(0) == d.B && v.size(0) == d.B && intervals.size(0) == d.B,
              "interval_attention: batch sizes differ: q=", d.B, " k=", k.size(0), " v=",
              v.size(0), " intervals=", intervals.size(0));
  TORCH_CHECK(v.size(1) == d.Hkv, "interval_attention: k and v head counts differ: ", d.Hkv,
              " vs ", v.size(1));
  TORCH_CHECK(d.Hkv > 0 && d.Hq % d.Hkv == 0, "interval_attention: q heads (", d.Hq,
              ") must be a multiple of k/v heads (", d.Hkv, ")");
  TORCH_CHECK(v.size(2) == d.Tk, "interval_attention: k and v lengths differ: ", d.Tk, " vs ",
              v.size(2));
  TORCH_CHECK(k.size(3) == d.D && v.size(3) == d.D, "interval_attention: head dims differ: q=",
              d.D, " k=", k.size(3), " v=", v.size(3));
  TORCH_CHECK(intervals.size(1) == d.Tq, "interval_attention: intervals has ", intervals.size(1),
              " rows, q has Tq=", d.Tq);
  return d;
}

// paged_interval_attention: q [B,Hq,Tq,D], cache [N,Hkv,S] (N pages), slots [B,Tc] int64,
// key_offsets / value_offsets [P,D] int64, k_new / v_new [B,Hkv,Tn,D], intervals over the
// Tc + Tn key columns. Slot and offset ranges are checked by each backend.
inline AttnDims check_paged_interval_attention(const at::Tensor& q, const at::Tensor& cache,
                                               const at::Tensor& slots,
                                               const at::Tensor& key_offsets,
                                               const at::Tensor& value_offsets,
                                               const at::Tensor& k_new, const at::Tensor& v_new,
                                               const at::Tensor& intervals) {
  constexpr const char* op = "paged_interval_attention";
  TORCH_CHECK(q.dim() == 4, op, ": q must be 4-D [B,Hq,Tq,D], got ", q.sizes());
  const int64_t B = q.size(0), D = q.size(3);
  TORCH_CHECK(cache.dim() == 3, op, ": cache must be 3-D [pages,Hkv,S], got ", cache.sizes());
  TORCH_CHECK(cache.is_contiguous(), op, ": cache must be contiguous");
  TORCH_CHECK(slots.dim() == 2 && slots.size(0) == B, op, ": slots must be [B=", B,
              ",Tc], got ", slots.sizes());
  TORCH_CHECK(slots.size(1) == 0 || cache.numel() > 0, op, ": slots name ", slots.size(1),
              " columns of an empty cache ", cache.sizes());
  TORCH_CHECK(key_offsets.dim() == 2 && key_offsets.size(0) > 0 && key_offsets.size(1) == D,
              op, ": key_offsets must be [P,D=", D, "] with P >= 1, got ", key_offsets.sizes());
  TORCH_CHECK(value_offsets.sizes() == key_offsets.sizes(), op, ": value_offsets must be ",
              key_offsets.sizes(), " like key_offsets, got ", value_offsets.sizes());
  const std::pair<const char*, const at::Tensor*> index[] = {
      {"slots", &slots}, {"key_offsets", &key_offsets}, {"value_offsets", &value_offsets}};
  for (const auto& [name, t] : index) {
    TORCH_CHECK(t->scalar_type() == at::kLong, op, ": ", name, " must be int64, got ",
                t->scalar_type());
    TORCH_CHECK(t->device() == q.device(), op, ": ", name, " is on ", t->device(), ", q on ",
                q.device());
  }
  const std::pair<const char*, const at::Tensor*> data[] = {
      {"cache", &cache}, {"k_new", &k_new}, {"v_new", &v_new}};
  for (const auto& [name, t] : data)
    TORCH_CHECK(t->scalar_type() == q.scalar_type() && t->device() == q.device(), op, ": ",
                name, " must be ", q.scalar_type(), " on ", q.device(), " like q, got ",
                t->scalar_type(), " on ", t->device());
  TORCH_CHECK(k_new.dim() == 4 && k_new.size(0) == B && k_new.size(1) == cache.size(1) &&
                  k_new.size(3) == D,
              op, ": k_new must be [B=", B, ",Hkv=", cache.size(1), ",Tn,D=", D, "], got ",
              k_new.sizes());
  TORCH_CHECK(v_new.sizes() == k_new.sizes(), op, ": v_new must be ", k_new.sizes(),
              " like k_new, got ", v_new.sizes());
  AttnDims d = check_interval_attention(q, k_new, v_new, intervals);
  d.Tk += slots.size(1);
  return d;
}

// interval_attention_bwd: the forward's checks plus grad_out/out/lse against q.
inline AttnDims check_interval_attention_bwd(const at::Tensor& grad_out, const at::Tensor& q,
                                             const at::Tensor& k, const at::Tensor& v,
                                             const at::Tensor& out, const at::Tensor& lse,
                                             const at::Tensor& intervals,
                                             std::optional<double> softcap) {
  const AttnDims d = check_interval_attention(q, k, v, intervals);
  const auto dt = q.scalar_type();
  TORCH_CHECK(grad_out.sizes() == q.sizes(), "interval_attention_bwd: grad_out must be ",
              q.sizes(), " like q, got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == dt, "interval_attention_bwd: grad_out must be ", dt,
              " like q, got ", grad_out.scalar_type());
  TORCH_CHECK(out.sizes() == q.sizes(), "interval_attention_bwd: out must be ", q.sizes(),
              " like q, got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == dt, "interval_attention_bwd: out must be ", dt,
              " like q, got ", out.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == d.B && lse.size(1) == d.Hq && lse.size(2) == d.Tq,
              "interval_attention_bwd: lse must be [B,Hq,Tq]=[", d.B, ",", d.Hq, ",", d.Tq,
              "], got ", lse.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "interval_attention_bwd: lse must be float32, got ",
              lse.scalar_type());
  TORCH_CHECK(grad_out.device() == q.device() && out.device() == q.device() &&
                  lse.device() == q.device(),
              "interval_attention_bwd: grad_out, out, lse must be on q's device ", q.device(),
              ", got grad_out=", grad_out.device(), " out=", out.device(), " lse=", lse.device());
  TORCH_CHECK(!softcap.has_value() || *softcap > 0,
              "interval_attention_bwd: softcap must be > 0, got ", softcap.value_or(0.0));
  return d;
}

// "p >= theta" as a logit, in double (safeattn.reference.logit_threshold): a check is decided
// on its fp32 logit, since fp32 p rounds every logit above about 16.6 to 1.0.
inline double logit_threshold(double theta) {
  TORCH_CHECK(!std::isnan(theta), "safety_step: theta must be a number, got nan");
  if (theta >= 1.0) return std::numeric_limits<double>::infinity();
  if (theta <= 0.0) return -std::numeric_limits<double>::infinity();
  return std::log(theta) - std::log1p(-theta);
}

struct StepDims {
  int64_t B, D;
};

inline StepDims check_safety_step(const at::Tensor& h, const at::Tensor& weight,
                                  const at::Tensor& bias, const at::Tensor& mode,
                                  const at::Tensor& consec, const at::Tensor& s_t,
                                  const at::Tensor& step, const at::Tensor& refused,
                                  const at::Tensor& active, const at::Tensor& q_span,
                                  const at::Tensor& resp_start) {
  TORCH_CHECK(h.dim() == 2, "safety_step: h must be [B,D], got ", h.sizes());
  const int64_t B = h.size(0), D = h.size(1);
  TORCH_CHECK(at::isFloatingType(h.scalar_type()), "safety_step: h must be floating, got ",
              h.scalar_type());
  TORCH_CHECK(weight.numel() == D, "safety_step: weight must have D=", D, " elements, got ",
              weight.sizes());
  TORCH_CHECK(bias.numel() == 1, "safety_step: bias must have 1 element, got ", bias.sizes());
  TORCH_CHECK(weight.scalar_type() == h.scalar_type() && bias.scalar_type() == h.scalar_type(),
              "safety_step: weight and bias must match h's dtype ", h.scalar_type());
  auto state = [&](const at::Tensor& t, const char* name, at::ScalarType dt) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == B, "safety_step: ", name, " must be [B=", B,
                "], got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == dt, "safety_step: ", name, " must be ", dt, ", got ",
                t.scalar_type());
    TORCH_CHECK(t.device() == h.device(), "safety_step: ", name, " is on ", t.device(),
                ", h on ", h.device());
    TORCH_CHECK(t.is_contiguous(), "safety_step: ", name, " must be contiguous");
  };
  state(mode, "mode", at::kInt);
  state(consec, "consec", at::kInt);
  state(s_t, "s_t", at::kInt);
  state(step, "step", at::kInt);
  state(refused, "refused", at::kBool);
  state(active, "active", at::kBool);
  state(resp_start, "resp_start", at::kInt);
  TORCH_CHECK(q_span.dim() == 2 && q_span.size(0) == B && q_span.size(1) == 2,
              "safety_step: q_span must be [B=", B, ",2], got ", q_span.sizes());
  TORCH_CHECK(q_span.scalar_type() == at::kInt, "safety_step: q_span must be int32, got ",
              q_span.scalar_type());
  TORCH_CHECK(q_span.device() == h.device() && weight.device() == h.device() &&
                  bias.device() == h.device(),
              "safety_step: weight, bias, q_span must be on h's device ", h.device());
  return {B, D};
}

}  // namespace safeattn

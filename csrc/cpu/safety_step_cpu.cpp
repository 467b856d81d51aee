// Fused strategic-decoding step on CPU: head, state machine, next probe window.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "checks.h"

namespace safeattn {
namespace {

std::tuple<at::Tensor, at::Tensor> safety_step_cpu(
    const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias, at::Tensor& mode,
    at::Tensor& consec, at::Tensor& s_t, at::Tensor& step, at::Tensor& refused,
    const at::Tensor& active, const at::Tensor& q_span, const at::Tensor& resp_start,
    double theta, int64_t tau, int64_t r1, int64_t r2, int64_t r3) {
  const auto dims = check_safety_step(h, weight, bias, mode, consec, s_t, step, refused, active,
                                      q_span, resp_start);
  const int64_t B = dims.B, D = dims.D;
  auto hc = h.contiguous().to(at::kFloat);
  auto wc = weight.contiguous().to(at::kFloat);
  const float bv = bias.to(at::kFloat).item<float>();
  const double at_logit = logit_threshold(theta);
  auto qs = q_span.contiguous();
  auto p = at::empty({B}, h.options().dtype(at::kFloat));
  auto out = at::empty({B, 2, 2}, h.options().dtype(at::kInt));

  const float* hp = hc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  int32_t* md = mode.data_ptr<int32_t>();
  int32_t* cs = consec.data_ptr<int32_t>();
  int32_t* st = s_t.data_ptr<int32_t>();
  int32_t* sp = step.data_ptr<int32_t>();
  bool* rf = refused.data_ptr<bool>();
  const bool* ac = active.data_ptr<bool>();
  const int32_t* qsp = qs.data_ptr<int32_t>();
  const int32_t* rs = resp_start.data_ptr<int32_t>();
  float* pp = p.data_ptr<float>();
  int32_t* op = out.data_ptr<int32_t>();

  for (int64_t b = 0; b < B; ++b) {
    double acc = bv;
    for (int64_t d = 0; d < D; ++d) acc += double(hp[b * D + d]) * wp[d];
    const float pb = float(1.0 / (1.0 + std::exp(-acc)));
    // The logit is an fp32 value, as in the reference and the CUDA kernel: past fp32's range
    // it is non-finite there, so the row fails closed here too.
    const bool finite_logit =
        std::isfinite(acc) && std::fabs(acc) <= double(std::numeric_limits<float>::max());
    pp[b] = finite_logit ? pb : std::numeric_limits<float>::quiet_NaN();
    const bool finite = std::isfinite(pp[b]);
    if (ac[b] && !rf[b]) {
      const int32_t n = sp[b];
      const bool hit = !finite || double(float(acc)) >= at_logit;
      if (n == 0) {
        if (hit) {
          md[b] = kMalicious; cs[b] = 1; st[b] = 0; rf[b] = true;
        } else {
          md[b] = kBenign; cs[b] = 0; st[b] = -1;
        }
      } else if (hit) {
        cs[b] += 1;
        if (cs[b] == 1) { md[b] = kTransition; st[b] = n - 1; }
        if (!finite || cs[b] >= tau) rf[b] = true;
      } else {
        md[b] = kBenign; cs[b] = 0; st[b] = -1;
      }
    }
    const int32_t n = ++sp[b];
    int64_t lo, hi;
    if (md[b] == kMalicious) {
      lo = 0; hi = std::min<int64_t>(r1, n);
    } else if (md[b] == kTransition) {
      lo = std::max<int64_t>(0, st[b] - r2); hi = std::min<int64_t>(n, int64_t(st[b]) + r3 + 1);
    } else {
      lo = std::max<int64_t>(0, n - r2); hi = n;
    }
    op[b * 4 + 0] = qsp[b * 2 + 0];
    op[b * 4 + 1] = qsp[b * 2 + 1];
    op[b * 4 + 2] = rs[b] + int32_t(lo);
    op[b * 4 + 3] = rs[b] + int32_t(std::max(lo, hi));
  }
  return {p, out};
}

}  // namespace

TORCH_LIBRARY_IMPL(safeattn, CPU, m) { m.impl("safety_step", &safety_step_cpu); }

}  // namespace safeattn

// Backward of interval-masked attention on CPU, flash-attention-2 style.
//
// Never builds the Tq x Tk mask or probability matrix. From the saved row log-sum-exp, each
// (query block, key tile) pair recomputes
//   S = scale * Q K^T  (soft-capped: S_c = c * tanh(S / c)),   P = exp(S_c - lse)  on visible keys,
//   dP = dO V^T,   dS = P o (dP - Delta)  with Delta = rowsum(dO o O),
//   dS_raw = dS o (1 - (S_c / c)^2)  (softcap only),
// and accumulates dV += P^T dO, dK += scale * dS_raw^T Q, dQ += scale * dS_raw K in fp32.
// Visibility per row is the union of its merged half-open ranges, exactly as in the forward.
//
// Work split (no two threads ever write the same element):
//   split mode  pass 1 over (batch, kv head, key tile): the tile's complete dK/dV, iterating
//               the query blocks whose range union meets the tile; pass 2 over (batch, kv
//               head, query block): the block's complete dQ over the tiles of its union.
//               Both passes recompute P, so S and dP are computed twice (7 GEMMs per pair).
//   fused mode  one pass over (batch, kv head): per query block, per tile of its union, all
//               five GEMMs; dK/dV accumulate in an fp32 [Tk, D] buffer owned by the unit.
//               Chosen when there are enough (batch, kv head) units to keep threads busy.
// GQA: the G query heads of a kv head are stacked into one row block (no K/V copies), so
// dK/dV of a kv head sum over its G query heads inside the GEMMs.
// Environment (read per call, for tests and tuning): SAFEATTN_BWD_FUSED=0/1 forces a mode;
// SAFEATTN_BWD_ROWS / SAFEATTN_BWD_BK set the tile (default 128 stacked rows x 64 keys);
// SAFEATTN_NO_BLAS (read once) uses the portable loops instead of sgemm_.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <vector>

#include "checks.h"
#include "cpu/common.h"

namespace safeattn {
namespace {

using namespace cpu;

struct Params {
  int64_t B, Hq, Hkv, G, Tq, Tk, D, NI, BQ, BK, nblk, ntile;
  float scale;
  bool softcap;
  float cap;
};

// Scratch of one thread. Sizes for R <= BQ*G rows and n <= BK columns.
struct Scratch {
  std::vector<float> buf;
  float *qs, *dO, *delta, *lse, *p, *ds, *fac, *kb, *vb, *vis, *acc1, *acc2;
  void size(const Params& prm) {
    const int64_t R = prm.BQ * prm.G, BK = prm.BK, D = prm.D;
    buf.resize(2 * R * D + 2 * R + 3 * R * BK + 2 * BK * D + BK + 2 * std::max(R, BK) * D);
    float* x = buf.data();
    auto take = [&](int64_t n) { float* r = x; x += n; return r; };
    qs = take(R * D); dO = take(R * D); delta = take(R); lse = take(R);
    p = take(R * BK); ds = take(R * BK); fac = take(R * BK);
    kb = take(BK * D); vb = take(BK * D); vis = take(BK);
    acc1 = take(std::max(R, BK) * D); acc2 = take(std::max(R, BK) * D);
  }
};

template <typename T>
class Bwd {
 public:
  Bwd(const Params& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
      const at::Tensor& dout, const float* lse, const float* delta,
      const std::vector<int32_t>& rows, const std::vector<int32_t>& nrows,
      const std::vector<int32_t>& uni, const std::vector<int32_t>& nuni)
      : p_(p), q_(q), k_(k), v_(v), do_(dout), lse_(lse), delta_(delta), rows_(rows),
        nrows_(nrows), uni_(uni), nuni_(nuni) {}

  // Pass 1: the complete dK/dV of key tile `tile` of (b, h), written to dk/dv (dtype T).
  void key_tile(int64_t b, int64_t h, int64_t tile, T* dk, T* dv, Scratch& w) const {
    const int64_t D = p_.D, c0 = tile * p_.BK, c1 = std::min(p_.Tk, c0 + p_.BK), n = c1 - c0;
    const float *kt, *vt;
    int64_t ldk, ldv;
    load_kv(b, h, c0, c1, w, kt, ldk, vt, ldv);
    float* dkt = w.acc1;
    float* dvt = w.acc2;
    std::fill(dkt, dkt + n * D, 0.f);
    std::fill(dvt, dvt + n * D, 0.f);
    Cover kind[256];
    for (int64_t blk = 0; blk < p_.nblk; ++blk) {
      const int64_t ub = b * p_.nblk + blk;
      if (cover(uni_.data() + ub * p_.NI * p_.BQ * 2, nuni_[ub], c0, c1) == kNone) continue;
      const int64_t t0 = blk * p_.BQ, t1 = std::min(p_.Tq, t0 + p_.BQ);
      int64_t dlo, dhi;
      if (!classify(b, t0, t1, c0, c1, kind, dlo, dhi)) continue;
      pack_rows(b, h, dlo, dhi, w);  // packed rows start at row block row 0 = (dlo, g=0)
      const int64_t R = (dhi - dlo) * p_.G;
      probs(b, dlo, dhi, c0, c1, kind + (dlo - t0), w.qs, w.dO, w.lse, w.delta, kt, ldk, vt, ldv,
            w);
      gemm_atb(w.p, p_.BK, w.dO, D, dvt, D, R, n, D);
      gemm_atb(w.ds, p_.BK, w.qs, D, dkt, D, R, n, D);
    }
    const int64_t base = ((b * p_.Hkv + h) * p_.Tk + c0) * D;
    from_float(dkt, dk + base, n * D);
    from_float(dvt, dv + base, n * D);
  }

  // Pass 2 (dkacc/dvacc null) or fused pass: query block `blk` of (b, h). Writes the block's
  // complete dQ; in fused mode also adds its dK/dV contributions to the unit's fp32
  // accumulators dkacc/dvacc [Tk, D].
  void query_block(int64_t b, int64_t h, int64_t blk, T* dq, float* dkacc, float* dvacc,
                   Scratch& w) const {
    const int64_t D = p_.D, G = p_.G;
    const int64_t t0 = blk * p_.BQ, t1 = std::min(p_.Tq, t0 + p_.BQ);
    pack_rows(b, h, t0, t1, w);
    float* dqb = w.acc1;
    std::fill(dqb, dqb + (t1 - t0) * G * D, 0.f);
    const int64_t ub = b * p_.nblk + blk;
    const int32_t* U = uni_.data() + ub * p_.NI * p_.BQ * 2;
    Cover kind[256];
    for (int32_t i = 0; i < nuni_[ub]; ++i) {
      for (int64_t c0 = U[2 * i]; c0 < U[2 * i + 1]; c0 += p_.BK) {
        const int64_t c1 = std::min<int64_t>(U[2 * i + 1], c0 + p_.BK), n = c1 - c0;
        int64_t dlo, dhi;
        if (!classify(b, t0, t1, c0, c1, kind, dlo, dhi)) continue;
        const float *kt, *vt;
        int64_t ldk, ldv;
        load_kv(b, h, c0, c1, w, kt, ldk, vt, ldv);
        const int64_t r0 = (dlo - t0) * G, R = (dhi - dlo) * G;
        probs(b, dlo, dhi, c0, c1, kind + (dlo - t0), w.qs + r0 * D, w.dO + r0 * D, w.lse + r0,
              w.delta + r0, kt, ldk, vt, ldv, w);
        gemm_ab(w.ds, p_.BK, kt, ldk, dqb + r0 * D, D, R, n, D, p_.scale);
        if (dkacc != nullptr) {
          gemm_atb(w.p, p_.BK, w.dO + r0 * D, D, dvacc + c0 * D, D, R, n, D);
          gemm_atb(w.ds, p_.BK, w.qs + r0 * D, D, dkacc + c0 * D, D, R, n, D);
        }
      }
    }
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t g = 0; g < G; ++g) {
        const int64_t row = (b * p_.Hq + h * G + g) * p_.Tq + t;
        from_float(dqb + ((t - t0) * G + g) * D, dq + row * D, D);
      }
  }

 private:
  // Per row t in [t0, t1): its coverage of [c0, c1). [dlo, dhi) spans the rows that see some
  // of it; false when none does.
  bool classify(int64_t b, int64_t t0, int64_t t1, int64_t c0, int64_t c1, Cover* kind,
                int64_t& dlo, int64_t& dhi) const {
    dlo = dhi = -1;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bt = b * p_.Tq + t;
      const Cover cv = cover(rows_.data() + bt * p_.NI * 2, nrows_[bt], c0, c1);
      kind[t - t0] = cv;
      if (cv != kNone) {
        if (dlo < 0) dlo = t;
        dhi = t + 1;
      }
    }
    return dlo >= 0;
  }

  // Packs rows t in [t0, t1) x the G heads of kv head h (row (t - t0) * G + g): Q * scale and
  // dO in fp32, plus lse and Delta.
  void pack_rows(int64_t b, int64_t h, int64_t t0, int64_t t1, Scratch& w) const {
    const int64_t D = p_.D, G = p_.G;
    const T* qd = q_.data_ptr<T>();
    const T* dd = do_.data_ptr<T>();
    const float sc = p_.scale;
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t g = 0; g < G; ++g) {
        const int64_t r = (t - t0) * G + g, hq = h * G + g;
        float* qr = w.qs + r * D;
        to_float(qd + b * q_.stride(0) + hq * q_.stride(1) + t * q_.stride(2), qr, D);
        at::vec::map([sc](Vec x) { return x * Vec(sc); }, qr, qr, D);
        to_float(dd + b * do_.stride(0) + hq * do_.stride(1) + t * do_.stride(2), w.dO + r * D, D);
        const int64_t row = (b * p_.Hq + hq) * p_.Tq + t;
        w.lse[r] = lse_[row];
        w.delta[r] = delta_[row];
      }
  }

  void load_kv(int64_t b, int64_t h, int64_t c0, int64_t c1, Scratch& w, const float*& kt,
               int64_t& ldk, const float*& vt, int64_t& ldv) const {
    const T* kd = k_.data_ptr<T>() + b * k_.stride(0) + h * k_.stride(1);
    const T* vd = v_.data_ptr<T>() + b * v_.stride(0) + h * v_.stride(1);
    if constexpr (std::is_same_v<T, float>) {
      kt = kd + c0 * k_.stride(2);
      vt = vd + c0 * v_.stride(2);
      ldk = k_.stride(2);
      ldv = v_.stride(2);
    } else {
      const int64_t D = p_.D;
      for (int64_t c = c0; c < c1; ++c) {
        to_float(kd + c * k_.stride(2), w.kb + (c - c0) * D, D);
        to_float(vd + c * v_.stride(2), w.vb + (c - c0) * D, D);
      }
      kt = w.kb;
      vt = w.vb;
      ldk = ldv = D;
    }
  }

  // Rows [dlo, dhi) x G (packed at qs/dO/lse/delta) against columns [c0, c1): leaves P in
  // w.p and dS (w.r.t. the scaled, pre-softcap scores) in w.ds, both [R x n] with ld BK.
  // Invisible entries, and rows with lse = -inf, are exactly zero.
  void probs(int64_t b, int64_t dlo, int64_t dhi, int64_t c0, int64_t c1, const Cover* kind,
             const float* qs, const float* dO, const float* lse, const float* delta,
             const float* kt, int64_t ldk, const float* vt, int64_t ldv, Scratch& w) const {
    const int64_t G = p_.G, D = p_.D, n = c1 - c0, ld = p_.BK, R = (dhi - dlo) * G;
    gemm_abt(qs, D, kt, ldk, w.p, ld, R, n, D);
    gemm_abt(dO, D, vt, ldv, w.ds, ld, R, n, D);
    const float cap = p_.cap, inv_cap = p_.softcap ? 1.f / p_.cap : 0.f;
    for (int64_t t = dlo; t < dhi; ++t) {
      const Cover cv = kind[t - dlo];
      if (cv == kPartial) {
        std::fill(w.vis, w.vis + n, 0.f);
        const int64_t bt = b * p_.Tq + t;
        const int32_t* rg = rows_.data() + bt * p_.NI * 2;
        for (int32_t i = 0; i < nrows_[bt]; ++i) {
          const int64_t a = std::max<int64_t>(rg[2 * i], c0);
          const int64_t z = std::min<int64_t>(rg[2 * i + 1], c1);
          for (int64_t c = a; c < z; ++c) w.vis[c - c0] = 1.f;
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        const int64_t r = (t - dlo) * G + g;
        float* pr = w.p + r * ld;
        float* dr = w.ds + r * ld;
        const float l = lse[r];
        if (cv == kNone || l == kNegInf) {
          std::fill(pr, pr + n, 0.f);
          std::fill(dr, dr + n, 0.f);
          continue;
        }
        float* fr = w.fac + r * ld;
        if (p_.softcap) {
          at::vec::map([inv_cap](Vec x) { return (x * Vec(inv_cap)).tanh(); }, pr, pr, n);
          at::vec::map([](Vec th) { return Vec(1.f) - th * th; }, fr, pr, n);
          at::vec::map([cap](Vec th) { return th * Vec(cap); }, pr, pr, n);
        }
        if (cv == kPartial)
          for (int64_t c = 0; c < n; ++c)
            if (w.vis[c] == 0.f) pr[c] = kNegInf;
        at::vec::map([l](Vec x) { return (x - Vec(l)).exp(); }, pr, pr, n);
        const float dl = delta[r];
        at::vec::map2([dl](Vec pp, Vec dp) { return pp * (dp - Vec(dl)); }, dr, pr, dr, n);
        if (cv == kPartial)  // dP may be anything where P = 0; make dS exactly 0 there
          for (int64_t c = 0; c < n; ++c)
            if (w.vis[c] == 0.f) dr[c] = 0.f;
        if (p_.softcap) at::vec::map2([](Vec x, Vec f) { return x * f; }, dr, dr, fr, n);
      }
    }
  }

  const Params& p_;
  const at::Tensor &q_, &k_, &v_, &do_;
  const float* lse_;
  const float* delta_;
  const std::vector<int32_t>&rows_, &nrows_, &uni_, &nuni_;
};


std::tuple<at::Tensor, at::Tensor, at::Tensor> interval_attention_bwd_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in,
    const at::Tensor& intervals, std::optional<double> scale, std::optional<double> softcap) {
  const AttnDims d = check_interval_attention_bwd(grad_out_in, q_in, k_in, v_in, out_in, lse_in,
                                                 intervals, softcap);
  const auto dt = q_in.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "interval_attention_bwd (CPU): q must be float32, bfloat16 or float16, got ", dt);

  auto dq = at::zeros({d.B, d.Hq, d.Tq, d.D}, q_in.options());
  auto dk = at::zeros({d.B, d.Hkv, d.Tk, d.D}, q_in.options());
  auto dv = at::zeros({d.B, d.Hkv, d.Tk, d.D}, q_in.options());
  if (d.B == 0 || d.Hq == 0 || d.Tq == 0 || d.Tk == 0 || d.D == 0) return {dq, dk, dv};

  const at::Tensor q = last_contig(q_in), k = last_contig(k_in), v = last_contig(v_in);
  const at::Tensor go = last_contig(grad_out_in);
  const at::Tensor o = out_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();

  std::vector<int32_t> rows, nrows;
  merged_rows(intervals, d.Tk, "interval_attention_bwd", rows, nrows);

  Params p{};
  p.B = d.B; p.Hq = d.Hq; p.Hkv = d.Hkv; p.G = d.Hq / d.Hkv; p.Tq = d.Tq; p.Tk = d.Tk;
  p.D = d.D; p.NI = d.NI;
  p.scale = scale.has_value() ? float(*scale) : 1.f / std::sqrt(float(d.D));
  p.softcap = softcap.has_value();
  p.cap = softcap.has_value() ? float(*softcap) : 0.f;
  // Tile sizes: SAFEATTN_BWD_ROWS stacked query rows (query block x G heads) by
  // SAFEATTN_BWD_BK key columns.
  const char* rows_env = std::getenv("SAFEATTN_BWD_ROWS");
  const char* bk_env = std::getenv("SAFEATTN_BWD_BK");
  p.BQ = std::clamp<int64_t>((rows_env ? std::atoi(rows_env) : 128) / p.G, 1, 256);
  p.BK = std::clamp<int64_t>(bk_env ? std::atoi(bk_env) : 64, 8, 1024);
  p.nblk = (d.Tq + p.BQ - 1) / p.BQ;
  p.ntile = (d.Tk + p.BK - 1) / p.BK;

  // Per (batch, row block): the union of its rows' ranges.
  const int64_t nub = d.B * p.nblk;
  std::vector<int32_t> uni(nub * d.NI * p.BQ * 2), nuni(nub);
  std::vector<int64_t> ucols(nub);
  at::parallel_for(0, nub, 1, [&](int64_t a, int64_t z) {
    for (int64_t ub = a; ub < z; ++ub) {
      const int64_t b = ub / p.nblk, t0 = (ub % p.nblk) * p.BQ, t1 = std::min(d.Tq, t0 + p.BQ);
      int32_t* dst = uni.data() + ub * d.NI * p.BQ * 2;
      int32_t n = 0;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t bt = b * d.Tq + t;
        std::copy_n(rows.data() + bt * d.NI * 2, nrows[bt] * 2, dst + 2 * n);
        n += nrows[bt];
      }
      nuni[ub] = merge(dst, n);
      int64_t c = 0;
      for (int32_t i = 0; i < nuni[ub]; ++i) c += dst[2 * i + 1] - dst[2 * i];
      ucols[ub] = c * (t1 - t0);
    }
  });

  // Delta = rowsum(dO o O) in fp32.
  std::vector<float> delta(d.B * d.Hq * d.Tq);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "interval_attention_bwd_delta", [&] {
    const scalar_t* gp = go.data_ptr<scalar_t>();
    const scalar_t* op = o.data_ptr<scalar_t>();
    at::parallel_for(0, d.B * d.Hq * d.Tq, 16, [&](int64_t a, int64_t z) {
      std::vector<float> x(d.D), y(d.D);
      for (int64_t r = a; r < z; ++r) {
        const int64_t t = r % d.Tq, h = (r / d.Tq) % d.Hq, b = r / (d.Tq * d.Hq);
        to_float(gp + b * go.stride(0) + h * go.stride(1) + t * go.stride(2), x.data(), d.D);
        to_float(op + r * d.D, y.data(), d.D);
        delta[r] = dot(x.data(), y.data(), d.D);
      }
    });
  });

  // Mode: fused (one pass per (b, kv head), 5 GEMMs per pair) when those units alone keep
  // the threads about as busy as the finer split passes (7 GEMMs per pair) would.
  const int64_t nth = at::get_num_threads();
  const int64_t U = d.B * d.Hkv;
  bool fused = 5 * ((U + nth - 1) / nth) * nth < 7 * U;
  if (const char* env = std::getenv("SAFEATTN_BWD_FUSED")) {
    if (env[0] == '0') fused = false;
    if (env[0] == '1') fused = true;
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "interval_attention_bwd_cpu", [&] {
    Bwd<scalar_t> ker(p, q, k, v, go, lse.data_ptr<float>(), delta.data(), rows, nrows, uni,
                      nuni);
    scalar_t* dqp = dq.data_ptr<scalar_t>();
    scalar_t* dkp = dk.data_ptr<scalar_t>();
    scalar_t* dvp = dv.data_ptr<scalar_t>();

    if (fused) {
      // fp32 outputs accumulate in place; others through an fp32 [Tk, D] buffer per unit.
      constexpr bool f32 = std::is_same_v<scalar_t, float>;
      std::atomic<int64_t> next{0};
      at::parallel_for(0, std::min(nth, U), 1, [&](int64_t, int64_t) {
        Scratch w;
        w.size(p);
        std::vector<float> acc(f32 ? 0 : 2 * d.Tk * d.D);
        for (int64_t u; (u = next.fetch_add(1)) < U;) {
          const int64_t b = u / d.Hkv, h = u % d.Hkv;
          const int64_t base = (b * d.Hkv + h) * d.Tk * d.D;
          float *dka, *dva;
          if constexpr (f32) {
            dka = reinterpret_cast<float*>(dkp) + base;
            dva = reinterpret_cast<float*>(dvp) + base;
          } else {
            std::fill(acc.begin(), acc.end(), 0.f);
            dka = acc.data();
            dva = acc.data() + d.Tk * d.D;
          }
          for (int64_t blk = 0; blk < p.nblk; ++blk) ker.query_block(b, h, blk, dqp, dka, dva, w);
          if constexpr (!f32) {
            from_float(dka, dkp + base, d.Tk * d.D);
            from_float(dva, dvp + base, d.Tk * d.D);
          }
        }
      });
      return;
    }

    // Pass 1: dK/dV per (b, kv head, key tile); cost = rows of the blocks that meet the tile.
    struct Unit {
      int64_t b, h, idx, cost;
    };
    std::vector<int64_t> tcost(d.B * p.ntile, 0);
    for (int64_t ub = 0; ub < nub; ++ub) {
      const int64_t b = ub / p.nblk, blk = ub % p.nblk;
      const int64_t rowsn = std::min(d.Tq, (blk + 1) * p.BQ) - blk * p.BQ;
      const int32_t* U_ = uni.data() + ub * d.NI * p.BQ * 2;
      int64_t last = -1;
      for (int32_t i = 0; i < nuni[ub]; ++i)
        for (int64_t tl = std::max<int64_t>(last + 1, U_[2 * i] / p.BK);
             tl <= (U_[2 * i + 1] - 1) / p.BK; ++tl) {
          tcost[b * p.ntile + tl] += rowsn;
          last = tl;
        }
    }
    std::vector<Unit> units;
    for (int64_t b = 0; b < d.B; ++b)
      for (int64_t h = 0; h < d.Hkv; ++h)
        for (int64_t tl = 0; tl < p.ntile; ++tl)
          if (tcost[b * p.ntile + tl] > 0) units.push_back({b, h, tl, tcost[b * p.ntile + tl]});
    auto run = [&](bool keys) {
      std::stable_sort(units.begin(), units.end(),
                       [](const Unit& x, const Unit& y) { return x.cost > y.cost; });
      std::atomic<int64_t> next{0};
      const int64_t nu = units.size();
      at::parallel_for(0, std::min(nth, nu), 1, [&](int64_t, int64_t) {
        Scratch w;
        w.size(p);
        for (int64_t i; (i = next.fetch_add(1)) < nu;) {
          const Unit& u = units[i];
          if (keys)
            ker.key_tile(u.b, u.h, u.idx, dkp, dvp, w);
          else
            ker.query_block(u.b, u.h, u.idx, dqp, nullptr, nullptr, w);
        }
      });
    };
    run(true);
    // Pass 2: dQ per (b, kv head, query block).
    units.clear();
    for (int64_t b = 0; b < d.B; ++b)
      for (int64_t h = 0; h < d.Hkv; ++h)
        for (int64_t blk = 0; blk < p.nblk; ++blk)
          if (ucols[b * p.nblk + blk] > 0) units.push_back({b, h, blk, ucols[b * p.nblk + blk]});
    run(false);
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(safeattn, CPU, m) {
  m.impl("interval_attention_bwd", &interval_attention_bwd_cpu);
}

}  // namespace safeattn

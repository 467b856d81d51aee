// Interval-masked attention on CPU: flash-style online softmax over KV tiles.
//
// Work unit = (batch, kv head, block of query rows, KV split). The G query heads that share a
// kv head are stacked into one row block, so each K/V tile is read once per group (GQA
// without repeat_kv). Tiles are cut only from the union of the block's ranges, so key
// columns that no row sees are never touched. Decode (few rows) splits the KV across threads
// and merges the partial softmax states afterwards.
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

int64_t env_int(const char* name, int64_t dflt, int64_t lo, int64_t hi) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return dflt;
  const int64_t x = std::atoll(v);
  TORCH_CHECK(lo <= x && x <= hi, name, " must be in [", lo, ", ", hi, "], got '", v, "'");
  return x;
}

// Sorted, merged, non-empty ranges of one query row.
struct Ranges {
  const int32_t* r;  // pairs
  int32_t n;
};

struct Unit {
  int64_t b, h, blk, split;
  int64_t cost;
};

struct Params {
  int64_t B, Hq, Hkv, G, Tq, Tk, D, NI, BQ, BK, nblk, nsplit;
  float scale;
  bool softcap;
  float cap;
};

// Where key/value column c of (batch b, kv head h) lives. Dense: k/v [B,Hkv,Tk,D] tensors,
// whose fp32 rows the GEMMs read in place.
template <typename T>
struct DenseKV {
  static constexpr bool kInPlace = std::is_same_v<T, float>;
  const T *k, *v;
  int64_t ks0, ks1, ks2, vs0, vs1, vs2;

  DenseKV(const at::Tensor& kt, const at::Tensor& vt)
      : k(kt.data_ptr<T>()), v(vt.data_ptr<T>()), ks0(kt.stride(0)), ks1(kt.stride(1)),
        ks2(kt.stride(2)), vs0(vt.stride(0)), vs1(vt.stride(1)), vs2(vt.stride(2)) {}
  const T* key(int64_t b, int64_t h, int64_t c) const { return k + b * ks0 + h * ks1 + c * ks2; }
  const T* value(int64_t b, int64_t h, int64_t c) const {
    return v + b * vs0 + h * vs1 + c * vs2;
  }
  void load(int64_t b, int64_t h, int64_t c, float* kd, float* vd, int64_t D) const {
    to_float(key(b, h, c), kd, D);
    to_float(value(b, h, c), vd, D);
  }
};

// Paged: columns [0, Tc) are cache slots (page = slot / P, token slot % P of the page, whose
// channel d sits at key_offsets[token][d] / value_offsets[token][d] within cache[page][h]);
// columns [Tc, Tc + Tn) are k_new / v_new [B,Hkv,Tn,D].
template <typename T>
struct PagedKV {
  static constexpr bool kInPlace = false;
  const T* cache;
  int64_t Hkv, S, P, Tc;
  const int64_t *slots, *koff, *voff;
  DenseKV<T> fresh;

  PagedKV(const at::Tensor& c, const at::Tensor& sl, const at::Tensor& ko, const at::Tensor& vo,
          const at::Tensor& kn, const at::Tensor& vn)
      : cache(c.data_ptr<T>()), Hkv(c.size(1)), S(c.size(2)), P(ko.size(0)), Tc(sl.size(1)),
        slots(sl.data_ptr<int64_t>()), koff(ko.data_ptr<int64_t>()),
        voff(vo.data_ptr<int64_t>()), fresh(kn, vn) {}
  void load(int64_t b, int64_t h, int64_t c, float* kd, float* vd, int64_t D) const {
    if (c >= Tc) return fresh.load(b, h, c - Tc, kd, vd, D);
    const int64_t slot = slots[b * Tc + c], tok = slot % P;
    const T* page = cache + ((slot / P) * Hkv + h) * S;
    const int64_t *ko = koff + tok * D, *vo = voff + tok * D;
    for (int64_t d = 0; d < D; ++d) {
      kd[d] = static_cast<float>(page[ko[d]]);
      vd[d] = static_cast<float>(page[vo[d]]);
    }
  }
};

template <typename T, typename KV>
class Kernel {
 public:
  Kernel(const Params& p, const at::Tensor& q, const KV& kv, const std::vector<int32_t>& rows,
         const std::vector<int32_t>& nrows, const std::vector<int32_t>& uni,
         const std::vector<int32_t>& nuni)
      : p_(p), q_(q), kv_(kv), rows_(rows), nrows_(nrows), uni_(uni), nuni_(nuni) {}

  // Runs one unit; writes (acc, m, l) for its rows (acc un-normalised).
  void run(const Unit& u, float* acc, float* m, float* l, std::vector<float>& scratch) const {
    const int64_t G = p_.G, D = p_.D, BK = p_.BK;
    const int64_t t0 = u.blk * p_.BQ, t1 = std::min(p_.Tq, t0 + p_.BQ);
    const int64_t R = (t1 - t0) * G;
    scratch.resize(R * D + R * BK + 2 * BK * D + BK);
    float* qp = scratch.data();
    float* s = qp + R * D;
    float* kb = s + R * BK;
    float* vb = kb + BK * D;
    float* vis = vb + BK * D;

    const T* qd = q_.data_ptr<T>();
    const int64_t qs0 = q_.stride(0), qs1 = q_.stride(1), qs2 = q_.stride(2);
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t g = 0; g < G; ++g) {
        float* dst = qp + ((t - t0) * G + g) * D;
        to_float(qd + u.b * qs0 + (u.h * G + g) * qs1 + t * qs2, dst, D);
        const float sc = p_.scale;
        at::vec::map([sc](Vec x) { return x * Vec(sc); }, dst, dst, D);
      }
    std::fill(acc, acc + R * D, 0.f);
    std::fill(m, m + R, kNegInf);
    std::fill(l, l + R, 0.f);

    const int64_t ub = (u.b * p_.nblk + u.blk);
    const int32_t* U = uni_.data() + ub * p_.NI * p_.BQ * 2;
    const int32_t nU = nuni_[ub];
    int64_t total = 0;
    for (int32_t i = 0; i < nU; ++i) total += U[2 * i + 1] - U[2 * i];
    const int64_t lo = total * u.split / p_.nsplit, hi = total * (u.split + 1) / p_.nsplit;

    int64_t seen = 0;
    for (int32_t i = 0; i < nU && seen < hi; ++i) {
      const int64_t s0 = U[2 * i], len = U[2 * i + 1] - s0;
      const int64_t a = std::max<int64_t>(lo - seen, 0), z = std::min<int64_t>(hi - seen, len);
      seen += len;
      for (int64_t c0 = s0 + a; c0 < s0 + z; c0 += BK) {
        const int64_t c1 = std::min<int64_t>(s0 + z, c0 + BK);
        tile(u, t0, t1, c0, c1, qp, s, kb, vb, vis, acc, m, l);
      }
    }
  }

 private:
  // One online-softmax update of row r with the scores sr[0..n) (-inf = masked).
  void update(float* sr, int64_t n, int64_t r, float* acc, float* m, float* l) const {
    const float mx = at::vec::reduce_all<float>(
        [](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, sr, n);
    if (mx == kNegInf) {
      std::fill(sr, sr + n, 0.f);
      return;
    }
    const float mnew = std::max(m[r], mx);
    const float alpha = m[r] == kNegInf ? 0.f : std::exp(m[r] - mnew);
    at::vec::map([mnew](Vec x) { return (x - Vec(mnew)).exp_u20(); }, sr, sr, n);
    const float sum = at::vec::reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, sr, n);
    if (alpha != 1.f) {
      float* ar = acc + r * p_.D;
      at::vec::map([alpha](Vec x) { return x * Vec(alpha); }, ar, ar, p_.D);
    }
    l[r] = l[r] * alpha + sum;
    m[r] = mnew;
  }

  void softcap(float* sr, int64_t n) const {
    if (!p_.softcap) return;
    const float cap = p_.cap;
    for (int64_t c = 0; c < n; ++c) sr[c] = cap * std::tanh(sr[c] / cap);
  }

  // Query rows of block [t0, t1) against key columns [c0, c1). Rows that see most of the
  // tile go through two GEMMs; rows that see little of it (a probe row, say) only touch
  // their visible columns, so a probe costs O(|visible|) while sharing the K/V reads.
  void tile(const Unit& u, int64_t t0, int64_t t1, int64_t c0, int64_t c1, const float* qp,
            float* s, float* kb, float* vb, float* vis, float* acc, float* m, float* l) const {
    const int64_t G = p_.G, D = p_.D, n = c1 - c0, lds = p_.BK;
    enum Kind : uint8_t { kSkip, kDense, kMasked, kSparse };
    Kind kind[256];  // BQ <= 256 (see block sizes)
    int64_t dlo = -1, dhi = -1;
    bool any_sparse = false;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bt = u.b * p_.Tq + t;
      const Ranges rg{rows_.data() + bt * p_.NI * 2, nrows_[bt]};
      const Cover cv = cover(rg.r, rg.n, c0, c1);
      Kind k = cv == kNone ? kSkip : cv == kFull ? kDense : kMasked;
      if (k == kMasked) {
        int64_t nv = 0;
        for (int32_t i = 0; i < rg.n; ++i)
          nv += std::max<int64_t>(0, std::min<int64_t>(rg.r[2 * i + 1], c1) -
                                         std::max<int64_t>(rg.r[2 * i], c0));
        if (4 * nv < n) k = kSparse;
      }
      kind[t - t0] = k;
      any_sparse |= k == kSparse;
      if (k == kDense || k == kMasked) {
        if (dlo < 0) dlo = t;
        dhi = t + 1;
      }
    }
    if (dlo < 0 && !any_sparse) return;

    const float* kt;
    const float* vt;
    int64_t ldk, ldv;
    if constexpr (KV::kInPlace) {
      kt = kv_.key(u.b, u.h, c0);
      vt = kv_.value(u.b, u.h, c0);
      ldk = kv_.ks2;
      ldv = kv_.vs2;
    } else {
      for (int64_t c = 0; c < n; ++c) kv_.load(u.b, u.h, c0 + c, kb + c * D, vb + c * D, D);
      kt = kb;
      vt = vb;
      ldk = ldv = D;
    }

    if (dlo >= 0) {
      const int64_t r0 = (dlo - t0) * G, R = (dhi - dlo) * G;
      gemm_abt(qp + r0 * D, D, kt, ldk, s, lds, R, n, D);
      for (int64_t t = dlo; t < dhi; ++t) {
        const Kind k = kind[t - t0];
        if (k == kMasked) {
          std::fill(vis, vis + n, 0.f);
          const int64_t bt = u.b * p_.Tq + t;
          const int32_t* rg = rows_.data() + bt * p_.NI * 2;
          for (int32_t i = 0; i < nrows_[bt]; ++i) {
            const int64_t a = std::max<int64_t>(rg[2 * i], c0);
            const int64_t z = std::min<int64_t>(rg[2 * i + 1], c1);
            for (int64_t c = a; c < z; ++c) vis[c - c0] = 1.f;
          }
        }
        for (int64_t g = 0; g < G; ++g) {
          const int64_t r = (t - t0) * G + g;
          float* sr = s + (r - r0) * lds;
          if (k == kSkip || k == kSparse) {
            std::fill(sr, sr + n, 0.f);
            continue;
          }
          softcap(sr, n);
          if (k == kMasked)
            for (int64_t c = 0; c < n; ++c) sr[c] = vis[c] != 0.f ? sr[c] : kNegInf;
          update(sr, n, r, acc, m, l);
        }
      }
      gemm_ab(s, lds, vt, ldv, acc + r0 * D, D, R, n, D, 1.f);
    }
    if (!any_sparse) return;
    for (int64_t t = t0; t < t1; ++t) {
      if (kind[t - t0] != kSparse) continue;
      const int64_t bt = u.b * p_.Tq + t;
      const int32_t* rg = rows_.data() + bt * p_.NI * 2;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t r = (t - t0) * G + g;
        float* sr = s;  // scratch row: scores of the visible columns, packed
        int64_t j = 0;
        for (int32_t i = 0; i < nrows_[bt]; ++i)
          for (int64_t c = std::max<int64_t>(rg[2 * i], c0); c < std::min<int64_t>(rg[2 * i + 1], c1); ++c)
            sr[j++] = dot(qp + r * D, kt + (c - c0) * ldk, D);
        softcap(sr, j);
        update(sr, j, r, acc, m, l);
        float* ar = acc + r * D;
        j = 0;
        for (int32_t i = 0; i < nrows_[bt]; ++i)
          for (int64_t c = std::max<int64_t>(rg[2 * i], c0); c < std::min<int64_t>(rg[2 * i + 1], c1); ++c) {
            const float w = sr[j++];
            at::vec::map2([w](Vec x, Vec y) { return at::vec::fmadd(Vec(w), y, x); }, ar, ar,
                          vt + (c - c0) * ldv, D);
          }
      }
    }
  }

  const Params& p_;
  const at::Tensor& q_;
  const KV& kv_;
  const std::vector<int32_t>&rows_, &nrows_, &uni_, &nuni_;
};

template <typename T>
void write_row(T* dst, const float* src, float inv, int64_t D) {
  for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(src[d] * inv);
}

// Every slot must name a cache page, and every offset a place within cache[page][h].
void check_paged_ranges(const at::Tensor& cache, const at::Tensor& slots,
                        const at::Tensor& key_offsets, const at::Tensor& value_offsets) {
  const int64_t S = cache.size(2), nslot = cache.size(0) * key_offsets.size(0);
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < slots.numel(); ++i)
    TORCH_CHECK(0 <= sp[i] && sp[i] < nslot, "paged_interval_attention: slots[",
                i / slots.size(1), "][", i % slots.size(1), "] = ", sp[i],
                " is out of range: need 0 <= slot < pages * P = ", nslot);
  for (const auto& [name, t] : {std::pair<const char*, at::Tensor>{"key_offsets", key_offsets},
                                {"value_offsets", value_offsets}}) {
    const int64_t* op = t.data_ptr<int64_t>();
    for (int64_t i = 0; i < t.numel(); ++i)
      TORCH_CHECK(0 <= op[i] && op[i] < S, "paged_interval_attention: ", name, "[",
                  i / t.size(1), "][", i % t.size(1), "] = ", op[i],
                  " is out of range: need 0 <= offset < S = ", S);
  }
}

void check_cpu_dtype(const at::Tensor& q, std::optional<double> softcap, const char* op) {
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16 ||
                  q.scalar_type() == at::kHalf,
              op, " (CPU): q must be float32, bfloat16 or float16, got ", q.scalar_type());
  TORCH_CHECK(!softcap.has_value() || *softcap > 0, op, ": softcap must be > 0");
}

// Returns out [B,Hq,Tq,D] and, when want_lse, the row log-sum-exp [B,Hq,Tq] fp32 of the
// scaled (soft-capped) scores over visible keys (-inf for rows that see nothing). The key
// columns come from make_kv(scalar_t{}) (DenseKV or PagedKV).
template <typename MakeKV>
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const AttnDims& d,
                                           const at::Tensor& intervals,
                                           std::optional<double> scale,
                                           std::optional<double> softcap, bool want_lse,
                                           const char* op, MakeKV make_kv) {
  auto out = at::empty({d.B, d.Hq, d.Tq, d.D}, q.options());
  auto lse = at::empty({want_lse ? d.B : 0, d.Hq, d.Tq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse.fill_(kNegInf)};
  float* lsep = want_lse ? lse.data_ptr<float>() : nullptr;

  std::vector<int32_t> rows, nrows;
  merged_rows(intervals, d.Tk, op, rows, nrows);

  Params p{};
  p.B = d.B; p.Hq = d.Hq; p.Hkv = d.Hkv; p.G = d.Hq / d.Hkv; p.Tq = d.Tq; p.Tk = d.Tk;
  p.D = d.D; p.NI = d.NI;
  p.scale = scale.has_value() ? float(*scale) : 1.f / std::sqrt(float(d.D));
  p.softcap = softcap.has_value();
  p.cap = softcap.has_value() ? float(*softcap) : 0.f;
  // Rows per block (query rows x GQA heads) and keys per tile; env vars are tuning knobs.
  static const int64_t rows_cfg = env_int("SAFEATTN_ROWS", 64, 1, 4096);
  static const int64_t bk_cfg = env_int("SAFEATTN_BK", 128, 16, 4096);
  p.BQ = std::clamp<int64_t>(rows_cfg / p.G, 1, 256);
  p.BK = bk_cfg;
  p.nblk = (d.Tq + p.BQ - 1) / p.BQ;

  // Per (batch, row block): the union of its rows' ranges, and its size.
  const int64_t nub = d.B * p.nblk;
  std::vector<int32_t> uni(nub * d.NI * p.BQ * 2), nuni(nub);
  std::vector<int64_t> ucols(nub);
  at::parallel_for(0, nub, 1, [&](int64_t a, int64_t z) {
    for (int64_t ub = a; ub < z; ++ub) {
      const int64_t b = ub / p.nblk, t0 = (ub % p.nblk) * p.BQ,
                    t1 = std::min(d.Tq, t0 + p.BQ);
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
      ucols[ub] = c;
    }
  });

  // Split the KV only when there are too few units to keep every thread busy (decode).
  const int64_t nth = at::get_num_threads();
  const int64_t base = d.B * d.Hkv * p.nblk;
  int64_t maxcols = 0;
  for (auto c : ucols) maxcols = std::max(maxcols, c);
  p.nsplit = 1;
  if (base < 4 * nth) {
    p.nsplit = std::max<int64_t>(1, std::min<int64_t>((4 * nth + base - 1) / base, maxcols / 256));
  }

  std::vector<Unit> units;
  units.reserve(base * p.nsplit);
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t h = 0; h < d.Hkv; ++h)
      for (int64_t blk = 0; blk < p.nblk; ++blk)
        for (int64_t sp = 0; sp < p.nsplit; ++sp) {
          const int64_t rowsn = std::min(d.Tq, (blk + 1) * p.BQ) - blk * p.BQ;
          units.push_back({b, h, blk, sp, rowsn * ucols[b * p.nblk + blk]});
        }
  // Largest first, taken dynamically: balances causal prefill across threads.
  std::stable_sort(units.begin(), units.end(),
                   [](const Unit& x, const Unit& y) { return x.cost > y.cost; });

  const int64_t RB = p.BQ * p.G;  // rows per unit (max)
  const bool split = p.nsplit > 1;
  std::vector<float> part;
  if (split) part.resize(units.size() * RB * (d.D + 2));
  // Index of a unit's partial slot: by its identity, not its place in the sorted order.
  auto slot = [&](const Unit& u) {
    return ((u.b * d.Hkv + u.h) * p.nblk + u.blk) * p.nsplit + u.split;
  };

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "interval_attention_cpu", [&] {
    const auto kv = make_kv(scalar_t{});
    Kernel<scalar_t, std::decay_t<decltype(kv)>> ker(p, q, kv, rows, nrows, uni, nuni);
    scalar_t* od = out.data_ptr<scalar_t>();
    std::atomic<int64_t> next{0};
    at::parallel_for(0, nth, 1, [&](int64_t, int64_t) {
      std::vector<float> scratch, own(RB * (d.D + 2));
      for (int64_t i; (i = next.fetch_add(1)) < int64_t(units.size());) {
        const Unit& u = units[i];
        float* base_ptr = split ? part.data() + slot(u) * RB * (d.D + 2) : own.data();
        float* acc = base_ptr;
        float* m = acc + RB * d.D;
        float* l = m + RB;
        ker.run(u, acc, m, l, scratch);
        if (split) continue;
        const int64_t t0 = u.blk * p.BQ, t1 = std::min(d.Tq, t0 + p.BQ);
        for (int64_t t = t0; t < t1; ++t)
          for (int64_t g = 0; g < p.G; ++g) {
            const int64_t r = (t - t0) * p.G + g;
            const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
            const int64_t row = (u.b * d.Hq + u.h * p.G + g) * d.Tq + t;
            write_row(od + row * d.D, acc + r * d.D, inv, d.D);
            if (lsep) lsep[row] = l[r] > 0.f ? m[r] + std::log(l[r]) : kNegInf;
          }
      }
    });
    if (!split) return;
    // Merge the KV splits: rescale each partial (acc, l) to the common max.
    at::parallel_for(0, base, 1, [&](int64_t a, int64_t z) {
      std::vector<float> o(d.D);
      for (int64_t ub = a; ub < z; ++ub) {
        const int64_t blk = ub % p.nblk, h = (ub / p.nblk) % d.Hkv, b = ub / (p.nblk * d.Hkv);
        const int64_t t0 = blk * p.BQ, t1 = std::min(d.Tq, t0 + p.BQ);
        for (int64_t t = t0; t < t1; ++t)
          for (int64_t g = 0; g < p.G; ++g) {
            const int64_t r = (t - t0) * p.G + g;
            // std::max drops a NaN score from a split's max, not from its sum: a split that
            // saw one (even all-NaN, max -inf) has l = NaN and makes the row NaN.
            float mx = kNegInf;
            bool nan_row = false;
            for (int64_t sp = 0; sp < p.nsplit; ++sp) {
              const float* pp = part.data() + (ub * p.nsplit + sp) * RB * (d.D + 2);
              mx = std::max(mx, pp[RB * d.D + r]);
              nan_row |= std::isnan(pp[RB * d.D + RB + r]);
            }
            const float nan = std::numeric_limits<float>::quiet_NaN();
            std::fill(o.begin(), o.end(), nan_row ? nan : 0.f);
            float lsum = 0.f;
            if (mx != kNegInf && !nan_row) {
              for (int64_t sp = 0; sp < p.nsplit; ++sp) {
                const float* pp = part.data() + (ub * p.nsplit + sp) * RB * (d.D + 2);
                const float ms = pp[RB * d.D + r];
                if (ms == kNegInf) continue;
                const float w = std::exp(ms - mx);
                lsum += w * pp[RB * d.D + RB + r];
                const float* ar = pp + r * d.D;
                at::vec::map2([w](Vec x, Vec y) { return at::vec::fmadd(Vec(w), y, x); },
                              o.data(), o.data(), ar, d.D);
              }
            }
            const float inv = nan_row ? 1.f : lsum > 0.f ? 1.f / lsum : 0.f;
            const int64_t row = (b * d.Hq + h * p.G + g) * d.Tq + t;
            write_row(od + row * d.D, o.data(), inv, d.D);
            if (lsep) lsep[row] = lsum > 0.f ? mx + std::log(lsum) : kNegInf;
          }
      }
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> dense(const at::Tensor& q_in, const at::Tensor& k_in,
                                         const at::Tensor& v_in, const at::Tensor& intervals,
                                         std::optional<double> scale,
                                         std::optional<double> softcap, bool want_lse) {
  const AttnDims d = check_interval_attention(q_in, k_in, v_in, intervals);
  check_cpu_dtype(q_in, softcap, "interval_attention");
  const at::Tensor q = last_contig(q_in), k = last_contig(k_in), v = last_contig(v_in);
  return forward(q, d, intervals, scale, softcap, want_lse, "interval_attention",
                 [&](auto t) { return DenseKV<decltype(t)>(k, v); });
}

at::Tensor interval_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& intervals, std::optional<double> scale,
                                  std::optional<double> softcap) {
  return std::get<0>(dense(q, k, v, intervals, scale, softcap, false));
}

std::tuple<at::Tensor, at::Tensor> interval_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& intervals,
    std::optional<double> scale, std::optional<double> softcap) {
  return dense(q, k, v, intervals, scale, softcap, true);
}

at::Tensor paged_interval_attention_cpu(const at::Tensor& q_in, const at::Tensor& cache,
                                        const at::Tensor& slots, const at::Tensor& key_offsets,
                                        const at::Tensor& value_offsets, const at::Tensor& k_new,
                                        const at::Tensor& v_new, const at::Tensor& intervals,
                                        std::optional<double> scale,
                                        std::optional<double> softcap) {
  const AttnDims d = check_paged_interval_attention(q_in, cache, slots, key_offsets,
                                                    value_offsets, k_new, v_new, intervals);
  check_cpu_dtype(q_in, softcap, "paged_interval_attention");
  const at::Tensor sl = slots.contiguous(), ko = key_offsets.contiguous(),
                   vo = value_offsets.contiguous();
  check_paged_ranges(cache, sl, ko, vo);
  const at::Tensor q = last_contig(q_in), kn = last_contig(k_new), vn = last_contig(v_new);
  return std::get<0>(forward(q, d, intervals, scale, softcap, false, "paged_interval_attention",
                             [&](auto t) {
                               return PagedKV<decltype(t)>(cache, sl, ko, vo, kn, vn);
                             }));
}

}  // namespace

TORCH_LIBRARY_IMPL(safeattn, CPU, m) {
  m.impl("interval_attention", &interval_attention_cpu);
  m.impl("interval_attention_fwd", &interval_attention_fwd_cpu);
  m.impl("paged_interval_attention", &paged_interval_attention_cpu);
}

}  // namespace safeattn

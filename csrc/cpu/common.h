// Helpers shared by the CPU forward and backward kernels of interval attention.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <utility>
#include <vector>

// MKL/OpenBLAS inside libtorch exports the Fortran sgemm; weak so that a torch built without
// it still loads, and the portable loops take over (also with SAFEATTN_NO_BLAS set).
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc) __attribute__((weak));

namespace safeattn::cpu {

using Vec = at::vec::Vectorized<float>;
inline constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline bool use_blas() {
  static const bool on = sgemm_ != nullptr && std::getenv("SAFEATTN_NO_BLAS") == nullptr;
  return on;
}

inline float dot(const float* a, const float* b, int64_t n) {
  Vec acc(0.f);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size())
    acc = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), acc);
  float s = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float w, const float* x, float* y, int64_t n) {
  at::vec::map2([w](Vec a, Vec b) { return at::vec::fmadd(Vec(w), b, a); }, y, y, x, n);
}

// All matrices row-major. BLAS sees them as their column-major transposes.

// C[R x N] = A[R x D] B[N x D]^T   (overwrites C)
inline void gemm_abt(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
              int64_t R, int64_t N, int64_t D) {
  if (R == 0 || N == 0) return;
  if (use_blas()) {
    const int m = N, n = R, kk = D, la = ldb, lb = lda, lc = ldc;
    const float one = 1.f, zero = 0.f;
    sgemm_("T", "N", &m, &n, &kk, &one, b, &la, a, &lb, &zero, c, &lc);
    return;
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < N; ++j) c[r * ldc + j] = dot(a + r * lda, b + j * ldb, D);
}

// C[R x D] += alpha * A[R x N] B[N x D]
inline void gemm_ab(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
             int64_t R, int64_t N, int64_t D, float alpha) {
  if (R == 0 || N == 0) return;
  if (use_blas()) {
    const int m = D, n = R, kk = N, la = ldb, lb = lda, lc = ldc;
    const float one = 1.f;
    sgemm_("N", "N", &m, &n, &kk, &alpha, b, &la, a, &lb, &one, c, &lc);
    return;
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < N; ++j) {
      const float w = alpha * a[r * lda + j];
      if (w != 0.f) axpy(w, b + j * ldb, c + r * ldc, D);
    }
}

// C[N x D] += A[R x N]^T B[R x D]
inline void gemm_atb(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
              int64_t R, int64_t N, int64_t D) {
  if (R == 0 || N == 0) return;
  if (use_blas()) {
    const int m = D, n = N, kk = R, la = ldb, lb = lda, lc = ldc;
    const float one = 1.f;
    sgemm_("N", "T", &m, &n, &kk, &one, b, &la, a, &lb, &one, c, &lc);
    return;
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < N; ++j) {
      const float w = a[r * lda + j];
      if (w != 0.f) axpy(w, b + r * ldb, c + j * ldc, D);
    }
}

enum Cover : uint8_t { kNone, kPartial, kFull };

// Coverage of [c0, c1) by sorted, merged, non-empty ranges.
inline Cover cover(const int32_t* r, int32_t n, int64_t c0, int64_t c1) {
  for (int32_t i = 0; i < n; ++i) {
    const int64_t s = r[2 * i], e = r[2 * i + 1];
    if (e <= c0) continue;
    if (s >= c1) return kNone;
    return (s <= c0 && e >= c1) ? kFull : kPartial;
  }
  return kNone;
}

// Sort + merge pairs in place, dropping empty ones; returns the number kept.
inline int32_t merge(int32_t* pr, int32_t n) {
  std::vector<std::pair<int32_t, int32_t>> v;
  v.reserve(n);
  for (int32_t i = 0; i < n; ++i)
    if (pr[2 * i] < pr[2 * i + 1]) v.emplace_back(pr[2 * i], pr[2 * i + 1]);
  std::sort(v.begin(), v.end());
  int32_t m = 0;
  for (auto& x : v) {
    if (m > 0 && x.first <= pr[2 * m - 1]) {
      pr[2 * m - 1] = std::max(pr[2 * m - 1], x.second);
    } else {
      pr[2 * m] = x.first;
      pr[2 * m + 1] = x.second;
      ++m;
    }
  }
  return m;
}

template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    std::copy(src, src + n, dst);
  } else {
    at::vec::convert(src, dst, n);
  }
}

template <typename T>
inline void from_float(const float* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    std::copy(src, src + n, dst);
  } else {
    at::vec::convert(src, dst, n);
  }
}

inline at::Tensor last_contig(const at::Tensor& t) {
  // Rows must be unit-stride vectors at least D apart (BLAS leading dimension); expanded
  // (e.g. the grad of .sum()) or oddly strided tensors are copied.
  return t.stride(3) == 1 && t.stride(2) >= t.size(3) ? t : t.clone(at::MemoryFormat::Contiguous);
}

// Checks intervals [B,Tq,NI,2] against Tk (errors name `op`), then sorts and merges each
// row's ranges once: rows holds B*Tq*NI pairs, the first nrows[r] of row r valid.
inline void merged_rows(const at::Tensor& intervals, int64_t Tk, const char* op,
                        std::vector<int32_t>& rows, std::vector<int32_t>& nrows) {
  const auto iv = intervals.contiguous();
  const int64_t Tq = iv.size(1), NI = iv.size(2), nrow = iv.size(0) * Tq;
  const int32_t* ip = iv.data_ptr<int32_t>();
  rows.assign(ip, ip + nrow * NI * 2);
  nrows.assign(nrow, 0);
  for (int64_t i = 0; i < nrow * NI; ++i) {
    const int32_t s = rows[2 * i], e = rows[2 * i + 1];
    TORCH_CHECK(0 <= s && s <= e && e <= Tk, op, ": intervals[", i / (Tq * NI), "][",
                (i / NI) % Tq, "][", i % NI, "] = [", s, ", ", e,
                ") is out of range: need 0 <= start <= end <= Tk=", Tk);
  }
  at::parallel_for(0, nrow, 64, [&](int64_t a, int64_t z) {
    for (int64_t r = a; r < z; ++r) nrows[r] = merge(rows.data() + r * NI * 2, NI);
  });
}

}  // namespace safeattn::cpu

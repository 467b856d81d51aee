// Interval-masked flash attention kernels (DESIGN §2). Included once per dtype by
// attention_cuda_{f16,bf16,f32}.cu so that the instances compile in parallel.
//
// Layout of the work:
//   * A warp owns 16 query rows and one warp tile of BK keys at a time, holding the scores
//     and the output accumulator in registers in the m16n8 mma accumulator layout: lane
//     (g = lane/4, t = lane%4) holds rows g and g+8, columns 8j + 2t + {0,1}.
//   * fp16/bf16 on sm_80+: QK^T and PV on tensor cores (mma.sync m16n8k16, fp32 accumulate;
//     P is rounded to the input dtype for PV, as FlashAttention does).
//     fp32 (and 16-bit types on older GPUs): the same register layout on the CUDA cores in
//     plain fp32 FMA (no TF32).
//   * Prefill kernel: block = (b, q head, 64 query rows), 4 warps x 16 rows share each K/V
//     tile of BK keys in shared memory.
//   * Decode kernel (G*Tq <= 16): block = (b, kv head, KV split) holds all G*Tq rows of the
//     group (K/V read once per group); its 4 warps take 4 consecutive warp tiles of one
//     block tile, are merged in shared memory at the end, and either write the output
//     (one split) or a partial (m, l, acc) that combine_kernel merges.
//   * Key tiles outside the union of the block's ranges are never loaded; tiles inside it
//     that no row of the block sees are skipped (block vote), and a warp skips the math of
//     tiles none of its rows sees. Per-row visibility is a 64-bit mask per warp tile, built
//     from the row's ranges clipped to [0, Tk) (so bad ranges cannot read out of bounds).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <climits>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "attention_cuda.h"
#include "device_math.cuh"

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
#define SAFEATTN_HAS_MMA 1
#else
#define SAFEATTN_HAS_MMA 0
#endif

namespace safeattn {
namespace cuda {
namespace detail {

constexpr int kThreads = kWarps * 32;

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000u); }
__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000u); }

// ---------------------------------------------------------------------------------------
// Element helpers.

template <typename T>
__device__ __forceinline__ float2 load2(const T* p);  // two consecutive elements as float
template <>
__device__ __forceinline__ float2 load2<float>(const float* p) {
  return *reinterpret_cast<const float2*>(p);
}
template <>
__device__ __forceinline__ float2 load2<__half>(const __half* p) {
  return __half22float2(*reinterpret_cast<const __half2*>(p));
}
template <>
__device__ __forceinline__ float2 load2<__nv_bfloat16>(const __nv_bfloat16* p) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
}

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<float>(float, float) { return 0; }  // unused

// D = A(16x16, row) * B(16x8, col) + D; fp32 accumulate.
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__half>(float (&d)[4], uint32_t a0, uint32_t a1,
                                                 uint32_t a2, uint32_t a3, uint32_t b0,
                                                 uint32_t b1) {
#if SAFEATTN_HAS_MMA
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], uint32_t a0, uint32_t a1,
                                                        uint32_t a2, uint32_t a3, uint32_t b0,
                                                        uint32_t b1) {
#if SAFEATTN_HAS_MMA
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}
template <>
__device__ __forceinline__ void mma16816<float>(float (&)[4], uint32_t, uint32_t, uint32_t,
                                                uint32_t, uint32_t, uint32_t) {}  // unused

// Four 8x8 b16 matrices, transposed: the B operands of two n8 tiles of P*V.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
#if SAFEATTN_HAS_MMA
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#else
  r[0] = r[1] = r[2] = r[3] = 0;
#endif
}

// 16-byte global -> shared copy; asynchronous (cp.async, sm_80+) unless the GPU lacks it.
// valid=false zero-fills. cp_async_wait_all() waits for this thread's copies; a barrier
// after it makes them visible to the block.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
#if SAFEATTN_HAS_MMA
  const uint32_t saddr = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(saddr), "l"(src),
               "r"(valid ? 16 : 0));
#else
  *reinterpret_cast<uint4*>(dst) =
      valid ? *reinterpret_cast<const uint4*>(src) : make_uint4(0u, 0u, 0u, 0u);
#endif
}
__device__ __forceinline__ void cp_async_wait_all() {
#if SAFEATTN_HAS_MMA
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// Copy nrows rows of D elements into shared memory (row stride DP + CH), zero-filling
// padding columns and rows whose pointer is null. With vec (16-byte aligned rows, D a
// multiple of the chunk) the copies are asynchronous; otherwise element by element.
template <typename T, int DP, typename RowPtr>
__device__ __forceinline__ void load_rows(T* dst, int nrows, RowPtr rowptr, const T* any_ptr,
                                          int D, bool vec, int tid) {
  constexpr int CH = 16 / sizeof(T);
  constexpr int CPR = DP / CH;
  constexpr int LD = DP + CH;
  using R = typename std::conditional<sizeof(T) == 2, uint16_t, uint32_t>::type;
  for (int i = tid; i < nrows * CPR; i += kThreads) {
    const int r = i / CPR;
    const int c = (i - r * CPR) * CH;
    const T* src = c < D ? rowptr(r) : nullptr;
    T* d = dst + r * LD + c;
    if (vec) {
      cp_async16(d, src != nullptr ? src + c : any_ptr, src != nullptr);
    } else {
      uint4 val = make_uint4(0u, 0u, 0u, 0u);
      if (src != nullptr) {
        R tmp[CH];
        const R* s = reinterpret_cast<const R*>(src) + c;
#pragma unroll
        for (int e = 0; e < CH; ++e) tmp[e] = (c + e < D) ? s[e] : R(0);
        memcpy(&val, tmp, sizeof(val));
      }
      *reinterpret_cast<uint4*>(d) = val;
    }
  }
}

// Bits [a, b) of a 64-bit mask, 0 <= a < b <= 64.
__device__ __forceinline__ uint64_t bit_range(int a, int b) {
  const uint64_t hi = b >= 64 ? ~0ull : ((1ull << b) - 1ull);
  return hi & ~((1ull << a) - 1ull);
}

// Which keys of [kw0, kw0 + BK) a row sees: its ranges clipped to [kb, ke).
template <int BK>
__device__ __forceinline__ uint64_t row_mask(const int32_t* iv, int NI, int kw0, int kb,
                                             int ke) {
  if (iv == nullptr) return 0ull;
  const int lo = max(kw0, kb), hi = min(kw0 + BK, ke);
  uint64_t m = 0ull;
  for (int i = 0; i < NI; ++i) {
    const int s = max(__ldg(iv + 2 * i), lo);
    const int e = min(__ldg(iv + 2 * i + 1), hi);
    if (s < e) m |= bit_range(s - kw0, e - kw0);
  }
  return m;
}

__device__ __forceinline__ int warp_min(int x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = min(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ int warp_max(int x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = max(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ uint64_t warp_or(uint64_t x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x |= __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// The two b16 halves of a P*V B-operand register that hold V rows c and c + 1: all ones
// where the warp sees that key, zero where it does not.
__device__ __forceinline__ uint32_t seen_halves(uint64_t seen, int c) {
  return (((seen >> c) & 1ull) ? 0x0000ffffu : 0u) |
         (((seen >> (c + 1)) & 1ull) ? 0xffff0000u : 0u);
}

// ---------------------------------------------------------------------------------------
// The attention kernel. DECODE=false: prefill blocks; DECODE=true: split-KV blocks.
template <typename T, int DP, int BK, bool DECODE>
__global__ void __launch_bounds__(kThreads) attn_kernel(const AttnParams p) {
  constexpr int ROWS = DECODE ? kDecodeRows : 16 * kWarps;  // query rows per block
  constexpr int KT = DECODE ? kWarps * BK : BK;              // keys per block tile
  constexpr int CH = 16 / sizeof(T);
  constexpr int LD = DP + CH;  // shared row stride in elements (16 B pad: no bank conflicts)
  constexpr int NJ = BK / 8;   // n8 tiles of scores per warp tile
  constexpr int NN = DP / 8;   // n8 tiles of the output row
  constexpr bool kMma = SAFEATTN_HAS_MMA && !std::is_same<T, float>::value;
  constexpr uint64_t kFull = BK >= 64 ? ~0ull : ((1ull << BK) - 1ull);
  static_assert(BK % 16 == 0 || std::is_same<T, float>::value, "mma path needs BK % 16 == 0");
  static_assert(BK % 8 == 0 && BK <= 64, "BK must be a multiple of 8, at most 64");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* Qs = reinterpret_cast<T*>(smem_raw);
  T* Ks = Qs + ROWS * LD;
  T* Vs = Ks + KT * LD;
  __shared__ int s_lo, s_hi;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, tig = lane & 3;
  const int b = blockIdx.z;
  const int D = p.D;

  int hq0, kvh, q0, kb, ke, nrows;
  if constexpr (DECODE) {
    kvh = blockIdx.y;
    hq0 = kvh * p.G;
    q0 = 0;
    kb = blockIdx.x * p.split_keys;
    ke = min(p.Tk, kb + p.split_keys);
    nrows = p.G * p.Tq;
  } else {
    hq0 = blockIdx.y;
    kvh = hq0 / p.G;
    q0 = (gridDim.x - 1 - blockIdx.x) * ROWS;  // heaviest (causal) row blocks first
    kb = 0;
    ke = p.Tk;
    nrows = min(ROWS, p.Tq - q0);
  }
  // Row r of the block -> (q head, query position).
  auto row_head = [&](int r) { return DECODE ? hq0 + r / p.Tq : hq0; };
  auto row_t = [&](int r) { return DECODE ? r % p.Tq : q0 + r; };
  const int32_t* iv_b = p.iv + (int64_t)b * p.Tq * p.NI * 2;

  // Q rows -> shared.
  {
    const T* qb = static_cast<const T*>(p.q) + (int64_t)b * p.q_sb;
    load_rows<T, DP>(
        Qs, ROWS,
        [&](int r) -> const T* {
          return r < nrows ? qb + (int64_t)row_head(r) * p.q_sh + (int64_t)row_t(r) * p.q_st
                           : nullptr;
        },
        static_cast<const T*>(p.q), D, p.q_vec, tid);
    cp_async_wait_all();  // published by the barriers below
  }

  // Union bounds [lo, hi) of every range of the block's rows, clipped to [kb, ke).
  if (tid == 0) {
    s_lo = INT_MAX;
    s_hi = INT_MIN;
  }
  __syncthreads();
  {
    const int nt = DECODE ? p.Tq : nrows;  // distinct query positions of the block
    int lo = INT_MAX, hi = INT_MIN;
    for (int i = tid; i < nt * p.NI; i += kThreads) {
      const int t = (DECODE ? 0 : q0) + i / p.NI;
      const int32_t* iv = iv_b + ((int64_t)t * p.NI + i % p.NI) * 2;
      const int s = max(__ldg(iv), kb), e = min(__ldg(iv + 1), ke);
      if (s < e) {
        lo = min(lo, s);
        hi = max(hi, e);
      }
    }
    lo = warp_min(lo);
    hi = warp_max(hi);
    if (lane == 0 && lo < hi) {
      atomicMin(&s_lo, lo);
      atomicMax(&s_hi, hi);
    }
  }
  __syncthreads();
  const int lo = s_lo, hi = s_hi;

  // This thread's two rows and their ranges.
  const int wrow0 = DECODE ? 0 : warp * 16;
  const int rA = wrow0 + g, rB = rA + 8;
  const int32_t* ivA = rA < nrows ? iv_b + (int64_t)row_t(rA) * p.NI * 2 : nullptr;
  const int32_t* ivB = rB < nrows ? iv_b + (int64_t)row_t(rB) * p.NI * 2 : nullptr;
  const int kl = DECODE ? warp * BK : 0;  // this warp's tile within the block tile

  float m_i[2] = {neg_inf(), neg_inf()};  // running row max (rows g, g+8)
  float l_i[2] = {0.f, 0.f};              // running row sum, this thread's columns only
  float o[NN][4];
#pragma unroll
  for (int n = 0; n < NN; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;

  const T* kg = static_cast<const T*>(p.k) + (int64_t)b * p.k_sb + (int64_t)kvh * p.k_sh;
  const T* vg = static_cast<const T*>(p.v) + (int64_t)b * p.v_sb + (int64_t)kvh * p.v_sh;
  const float scale = p.scale, cap = p.softcap;

  // Pipeline over the key tiles that some row of the block sees (FlashAttention-2 style,
  // one buffer each for K and V): V(cur) loads while S = QK^T runs, K(next) while PV runs.
  // The block votes (__syncthreads_or) on each candidate tile, skipping unseen ones.
  auto load_k = [&](int kt0) {
    const int nk = min(KT, ke - kt0);
    load_rows<T, DP>(
        Ks, KT,
        [&](int r) -> const T* { return r < nk ? kg + (int64_t)(kt0 + r) * p.k_st : nullptr; },
        kg, D, p.k_vec, tid);
  };
  auto load_v = [&](int kt0) {
    const int nk = min(KT, ke - kt0);
    load_rows<T, DP>(
        Vs, KT,
        [&](int r) -> const T* { return r < nk ? vg + (int64_t)(kt0 + r) * p.v_st : nullptr; },
        vg, D, p.v_vec, tid);
  };
  // Advances t to the first tile at or after t that some row sees (false: none). Each call
  // with t < hi passes at least one block barrier.
  uint64_t mA = 0ull, mB = 0ull;  // this thread's rows' visibility in the current tile
  auto find_tile = [&](int& t) {
    for (; t < hi; t += KT) {
      mA = row_mask<BK>(ivA, p.NI, t + kl, kb, ke);
      mB = row_mask<BK>(ivB, p.NI, t + kl, kb, ke);
      if (__syncthreads_or((mA | mB) != 0ull)) return true;
    }
    return false;
  };

  int cur = lo < hi ? kb + ((lo - kb) / KT) * KT : hi;
  bool have = find_tile(cur);
  if (have) load_k(cur);
  while (have) {
    cp_async_wait_all();
    __syncthreads();  // K(cur) visible; every warp is done with V(prev)
    load_v(cur);
    const bool warp_on = __any_sync(0xffffffffu, (mA | mB) != 0ull);
    const uint64_t cA = mA, cB = mB;
    // Keys of the tile that no row of the warp sees. Their P is 0, but an uninitialised
    // cache slot may hold nan or inf in V, and 0 * nan is nan: P*V leaves them out.
    uint64_t seen = kFull;

    float s[NJ][4];
    if (warp_on) {
#pragma unroll
      for (int j = 0; j < NJ; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
      if constexpr (kMma) {
        const uint32_t* Q32 = reinterpret_cast<const uint32_t*>(Qs);
        const uint32_t* K32 = reinterpret_cast<const uint32_t*>(Ks);
#pragma unroll
        for (int kk = 0; kk < DP; kk += 16) {
          if (kk >= D) break;  // zero padding
          const uint32_t a0 = Q32[(rA * LD + kk + 2 * tig) >> 1];
          const uint32_t a1 = Q32[(rB * LD + kk + 2 * tig) >> 1];
          const uint32_t a2 = Q32[(rA * LD + kk + 8 + 2 * tig) >> 1];
          const uint32_t a3 = Q32[(rB * LD + kk + 8 + 2 * tig) >> 1];
#pragma unroll
          for (int j = 0; j < NJ; ++j) {
            const int kr = (kl + 8 * j + g) * LD + kk + 2 * tig;
            mma16816<T>(s[j], a0, a1, a2, a3, K32[kr >> 1], K32[(kr + 8) >> 1]);
          }
        }
      } else {
        const int dlim = min(DP, (D + 1) & ~1);
#pragma unroll 4
        for (int kk = 0; kk < dlim; kk += 2) {
          const float2 qa = load2<T>(Qs + rA * LD + kk);
          const float2 qb = load2<T>(Qs + rB * LD + kk);
#pragma unroll
          for (int j = 0; j < NJ; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const float2 kv = load2<T>(Ks + (kl + 8 * j + 2 * tig + e) * LD + kk);
              s[j][e] = fmaf(qa.y, kv.y, fmaf(qa.x, kv.x, s[j][e]));
              s[j][2 + e] = fmaf(qb.y, kv.y, fmaf(qb.x, kv.x, s[j][2 + e]));
            }
          }
        }
      }

      // Scale, softcap, mask.
      const bool full = __all_sync(0xffffffffu, cA == kFull && cB == kFull);
      if (!full) seen = warp_or(cA | cB);
#pragma unroll
      for (int j = 0; j < NJ; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float x = s[j][e] * scale;
          if (cap > 0.f) x = tanh_acc(__fdiv_rn(x, cap)) * cap;
          if (!full) {
            const int col = 8 * j + 2 * tig + (e & 1);
            const uint64_t m = e < 2 ? cA : cB;
            if (!((m >> col) & 1ull)) x = neg_inf();
          }
          s[j][e] = x;
        }
      }

      // Online softmax update.
      float mx[2] = {neg_inf(), neg_inf()};
#pragma unroll
      for (int j = 0; j < NJ; ++j) {
        mx[0] = fmaxf(mx[0], fmaxf(s[j][0], s[j][1]));
        mx[1] = fmaxf(mx[1], fmaxf(s[j][2], s[j][3]));
      }
      float alpha[2], mu[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
        const float mn = fmaxf(m_i[h], mx[h]);
        mu[h] = mn == neg_inf() ? 0.f : mn;  // avoids (-inf) - (-inf)
        alpha[h] = exp2f((m_i[h] - mu[h]) * kLog2e);
        m_i[h] = mn;
      }
      float ls[2] = {0.f, 0.f};
#pragma unroll
      for (int j = 0; j < NJ; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int h = e >> 1;
          s[j][e] = exp2f((s[j][e] - mu[h]) * kLog2e);
          ls[h] += s[j][e];
        }
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) l_i[h] = l_i[h] * alpha[h] + ls[h];
#pragma unroll
      for (int n = 0; n < NN; ++n) {
        o[n][0] *= alpha[0];
        o[n][1] *= alpha[0];
        o[n][2] *= alpha[1];
        o[n][3] *= alpha[1];
      }
    }

    // V(cur) in place; start K(next) (the first vote below is the barrier that frees K).
    cp_async_wait_all();
    int nxt = cur + KT;
    const bool more = nxt < hi ? find_tile(nxt) : (__syncthreads(), false);
    if (more) load_k(nxt);

    // O += P V.
    if (warp_on) {
      if constexpr (kMma) {
#pragma unroll
        for (int ks = 0; ks < BK / 16; ++ks) {
          const uint32_t a0 = pack2<T>(s[2 * ks][0], s[2 * ks][1]);
          const uint32_t a1 = pack2<T>(s[2 * ks][2], s[2 * ks][3]);
          const uint32_t a2 = pack2<T>(s[2 * ks + 1][0], s[2 * ks + 1][1]);
          const uint32_t a3 = pack2<T>(s[2 * ks + 1][2], s[2 * ks + 1][3]);
          const T* vrow = Vs + (kl + 16 * ks + (lane & 15)) * LD + (lane >> 4) * 8;
          // This thread's registers hold V rows 16ks + 2tig + {0, 1} (bv[0], bv[2]) and
          // 16ks + 8 + 2tig + {0, 1} (bv[1], bv[3]).
          const uint32_t keep0 = seen_halves(seen, 16 * ks + 2 * tig);
          const uint32_t keep1 = seen_halves(seen, 16 * ks + 8 + 2 * tig);
#pragma unroll
          for (int np = 0; np < DP / 16; ++np) {
            if (np * 16 >= D) break;  // zero padding
            uint32_t bv[4];
            ldmatrix_x4_trans(bv, vrow + np * 16);
            bv[0] &= keep0;
            bv[1] &= keep1;
            bv[2] &= keep0;
            bv[3] &= keep1;
            mma16816<T>(o[2 * np], a0, a1, a2, a3, bv[0], bv[1]);
            mma16816<T>(o[2 * np + 1], a0, a1, a2, a3, bv[2], bv[3]);
          }
        }
      } else {
        const int src0 = lane & ~3;
#pragma unroll
        for (int c = 0; c < BK; ++c) {
          if (!((seen >> c) & 1ull)) continue;  // warp-uniform
          // P[row][c] lives in lane (g, (c/2)%4), register s[c/8][c%2] (+2 for row g+8).
          const int src = src0 | ((c >> 1) & 3);
          const float pa = __shfl_sync(0xffffffffu, s[c >> 3][c & 1], src);
          const float pb = __shfl_sync(0xffffffffu, s[c >> 3][2 + (c & 1)], src);
          const T* vrow = Vs + (kl + c) * LD + 2 * tig;
#pragma unroll
          for (int n = 0; n < NN; ++n) {
            if (8 * n >= D) break;  // zero padding
            const float2 vv = load2<T>(vrow + 8 * n);
            o[n][0] = fmaf(pa, vv.x, o[n][0]);
            o[n][1] = fmaf(pa, vv.y, o[n][1]);
            o[n][2] = fmaf(pb, vv.x, o[n][2]);
            o[n][3] = fmaf(pb, vv.y, o[n][3]);
          }
        }
      }
    }
    cur = nxt;
    have = more;
  }

  // Full row sums (the 4 lanes of a row group each hold a quarter of the columns).
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l_i[h] += __shfl_xor_sync(0xffffffffu, l_i[h], 1);
    l_i[h] += __shfl_xor_sync(0xffffffffu, l_i[h], 2);
  }

  if constexpr (!DECODE) {
    T* ob = static_cast<T*>(p.out) + (((int64_t)b * p.Hq + hq0) * p.Tq + q0) * D;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = h == 0 ? rA : rB;
      if (r >= nrows) continue;
      const float inv = l_i[h] > 0.f ? 1.f / l_i[h] : 0.f;
      if (p.lse != nullptr && tig == 0)
        p.lse[((int64_t)b * p.Hq + hq0) * p.Tq + q0 + r] =
            l_i[h] > 0.f ? m_i[h] + logf(l_i[h]) : neg_inf();
      T* orow = ob + (int64_t)r * D;
#pragma unroll
      for (int n = 0; n < NN; ++n) {
        const int d = 8 * n + 2 * tig;
        if (d < D) orow[d] = from_float<T>(o[n][2 * h] * inv);
        if (d + 1 < D) orow[d + 1] = from_float<T>(o[n][2 * h + 1] * inv);
      }
    }
  } else {
    // Merge the warps (same rows, different keys) in shared memory, reusing the K/V tile.
    constexpr int LDO = DP + 4;
    float* red_o = reinterpret_cast<float*>(Ks);  // [kWarps][16][LDO]
    float* red_m = red_o + kWarps * 16 * LDO;     // [kWarps][16]
    float* red_l = red_m + kWarps * 16;           // [kWarps][16]
    __syncthreads();
    if (tig == 0) {
      red_m[warp * 16 + g] = m_i[0];
      red_m[warp * 16 + g + 8] = m_i[1];
      red_l[warp * 16 + g] = l_i[0];
      red_l[warp * 16 + g + 8] = l_i[1];
    }
#pragma unroll
    for (int n = 0; n < NN; ++n) {
      const int d = 8 * n + 2 * tig;
      *reinterpret_cast<float2*>(red_o + (warp * 16 + g) * LDO + d) = make_float2(o[n][0], o[n][1]);
      *reinterpret_cast<float2*>(red_o + (warp * 16 + g + 8) * LDO + d) =
          make_float2(o[n][2], o[n][3]);
    }
    __syncthreads();
    const int split = blockIdx.x;
    for (int i = tid; i < nrows * D; i += kThreads) {
      const int r = i / D, d = i - r * D;
      float M = neg_inf();
#pragma unroll
      for (int w = 0; w < kWarps; ++w) M = fmaxf(M, red_m[w * 16 + r]);
      // fmaxf drops a NaN score from the max, but not from the sum: a warp whose keys hold
      // one has l = NaN, and the row must come out NaN (fail closed), even if M is -inf.
      bool nan_row = false;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) nan_row |= isnan(red_l[w * 16 + r]);
      float L = 0.f, acc = 0.f;
      if (M != neg_inf()) {
#pragma unroll
        for (int w = 0; w < kWarps; ++w) {
          const float mw = red_m[w * 16 + r];
          const float wt = mw == neg_inf() ? 0.f : exp2f((mw - M) * kLog2e);
          L = fmaf(wt, red_l[w * 16 + r], L);
          acc = fmaf(wt, red_o[(w * 16 + r) * LDO + d], acc);
        }
      }
      const int64_t row = ((int64_t)b * p.Hq + row_head(r)) * p.Tq + row_t(r);
      if (p.nsplit == 1) {
        static_cast<T*>(p.out)[row * D + d] =
            from_float<T>(nan_row ? quiet_nan() : L > 0.f ? acc / L : 0.f);
        if (d == 0 && p.lse != nullptr) p.lse[row] = L > 0.f ? M + logf(L) : neg_inf();
      } else {
        const int64_t ps = row * p.nsplit + split;
        p.part_o[ps * D + d] = nan_row ? quiet_nan() : acc;
        if (d == 0) {
          p.part_m[ps] = M;
          p.part_l[ps] = nan_row ? quiet_nan() : L;
        }
      }
    }
  }
}

// Weight slots of combine_kernel: nvcc reads the weights four at a time (LDS.128), the loop
// tail too, so the buffer is padded to whole float4s (compute-sanitizer flagged the over-read).
__host__ __device__ constexpr int combine_slots(int nsplit) { return (nsplit + 3) & ~3; }

// Merge the split-KV partials of one output row per block.
template <typename T>
__global__ void __launch_bounds__(128) combine_kernel(const AttnParams p) {
  extern __shared__ float wts[];  // [combine_slots(nsplit)]
  const int64_t row = blockIdx.x;
  const int S = p.nsplit, D = p.D;
  const float* pm = p.part_m + row * S;
  const float* pl = p.part_l + row * S;
  float M = neg_inf();
  for (int s = 0; s < S; ++s) M = fmaxf(M, pm[s]);
  for (int s = threadIdx.x; s < combine_slots(S); s += blockDim.x)
    wts[s] = (s >= S || M == neg_inf() || pm[s] == neg_inf()) ? 0.f
                                                              : exp2f((pm[s] - M) * kLog2e);
  __syncthreads();
  float L = 0.f;
  bool nan_row = false;  // a split that saw a NaN score (its l is NaN) makes the row NaN
  for (int s = 0; s < S; ++s) {
    L = fmaf(wts[s], pl[s], L);
    nan_row |= isnan(pl[s]);
  }
  if (p.lse != nullptr && threadIdx.x == 0) p.lse[row] = L > 0.f ? M + logf(L) : neg_inf();
  const float* po = p.part_o + row * S * D;
  T* out = static_cast<T*>(p.out) + row * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.f;
    for (int s = 0; s < S; ++s) acc = fmaf(wts[s], po[(int64_t)s * D + d], acc);
    out[d] = from_float<T>(nan_row ? quiet_nan() : L > 0.f ? acc / L : 0.f);
  }
}

// ---------------------------------------------------------------------------------------
// Host launchers.

// Opt in to more than 48 KiB of dynamic shared memory, once per kernel and device (one
// instantiation, with its own flags, per kernel: params type, T, DP, variant).
template <typename T, int DP, int VARIANT, typename Params>
void prepare_smem(void (*kernel)(Params), size_t smem, const char* op) {
  constexpr int kMaxDevices = 64;
  static std::atomic<bool> ready[kMaxDevices];
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev < kMaxDevices && ready[dev].load(std::memory_order_acquire)) return;
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  TORCH_CHECK(smem <= static_cast<size_t>(optin), op, " (CUDA): needs ", smem,
              " bytes of shared memory per block, the device allows ", optin);
  if (smem > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  if (dev < kMaxDevices) ready[dev].store(true, std::memory_order_release);
}

template <typename T, int DP>
void launch_dp(const AttnParams& p, bool decode, cudaStream_t stream) {
  constexpr bool kF32 = std::is_same<T, float>::value;
  constexpr int LD = DP + 16 / sizeof(T);
  if (decode) {
    constexpr int BK = decode_bk(kF32, DP);
    constexpr int KT = kWarps * BK;
    const size_t kv = 2 * KT * LD * sizeof(T);
    const size_t red = (kWarps * 16 * (DP + 4) + 2 * kWarps * 16) * sizeof(float);
    const size_t smem = kDecodeRows * LD * sizeof(T) + (kv > red ? kv : red);
    auto kernel = attn_kernel<T, DP, BK, true>;
    prepare_smem<T, DP, true>(kernel, smem, "interval_attention");
    kernel<<<dim3(p.nsplit, p.Hkv, p.B), kThreads, smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (p.nsplit > 1) {
      const int64_t rows = (int64_t)p.B * p.Hq * p.Tq;
      const size_t smem = combine_slots(p.nsplit) * sizeof(float);
      combine_kernel<T><<<static_cast<unsigned>(rows), 128, smem, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  } else {
    constexpr int BK = prefill_bk(kF32, DP);
    const size_t smem = (16 * kWarps + 2 * BK) * LD * sizeof(T);
    auto kernel = attn_kernel<T, DP, BK, false>;
    prepare_smem<T, DP, false>(kernel, smem, "interval_attention");
    const unsigned qblocks = static_cast<unsigned>((p.Tq + 16 * kWarps - 1) / (16 * kWarps));
    kernel<<<dim3(qblocks, p.Hq, p.B), kThreads, smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T>
void launch_attention(const AttnParams& p, bool decode, cudaStream_t stream) {
  switch (padded_head_dim(p.D)) {
    case 64:
      launch_dp<T, 64>(p, decode, stream);
      break;
    case 128:
      launch_dp<T, 128>(p, decode, stream);
      break;
    default:
      launch_dp<T, 256>(p, decode, stream);
      break;
  }
}

}  // namespace detail
}  // namespace cuda
}  // namespace safeattn

// Backward of interval-masked attention on CUDA, flash-attention-2 style (DESIGN §2).
//
// From the saved row log-sum-exp, each (key tile, chunk of query rows) pair recomputes
//   S = scale * Q K^T  (soft-capped: S_c = c * tanh(S / c)),  P = exp(S_c - lse) on visible keys,
//   dP = dO V^T,  dS = P o (dP - Delta) o (1 - (S_c / c)^2)  with Delta = rowsum(dO o O),
// and accumulates dV += P^T dO, dK += scale * dS^T Q, dQ += scale * dS K, all in fp32. The
// Tq x Tk mask is never built: each row's visibility in a key tile is a 64-bit mask from its
// ranges clipped to the tile (row_mask, as in the forward), so bad ranges cannot read out of
// bounds.
//
// Work: block = (key tile of BN keys [x row split], kv head, batch). Its K/V tile stays in
// shared memory while it walks the G*Tq query rows of the kv group in chunks of BM (row
// t * G + g is query position t of q head kvh * G + g), skipping chunks that see nothing of
// the tile. GQA sums over the G heads inside the block, so dK/dV are plain stores unless
// the rows are split over several blocks (few tiles: rsplit > 1, fp32 atomics). dQ is added
// with fp32 atomics into a zeroed buffer. Math is fp32 FMA on the CUDA cores (P and dS stay
// fp32, unlike FlashAttention's rounding to the input dtype).
#include "attention_kernels.cuh"

namespace safeattn {
namespace cuda {
namespace detail {

// Delta = rowsum(dO o O) in fp32; one warp per row.
template <typename T>
__global__ void __launch_bounds__(kBwdThreads) bwd_delta_kernel(const BwdParams p) {
  constexpr int kRows = kBwdThreads / 32;
  const int64_t row = (int64_t)blockIdx.x * kRows + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= (int64_t)p.B * p.Hq * p.Tq) return;
  const int64_t t = row % p.Tq, h = (row / p.Tq) % p.Hq, b = row / ((int64_t)p.Tq * p.Hq);
  const T* o = static_cast<const T*>(p.out) + b * p.o_sb + h * p.o_sh + t * p.o_st;
  const T* g = static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh + t * p.do_st;
  float acc = 0.f;
  for (int d = lane; d < p.D; d += 32) acc = fmaf(to_float<T>(o[d]), to_float<T>(g[d]), acc);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) p.delta[row] = acc;
}

// Thread layout (256 threads = 16 x 16, tr = tid / 16, tc = tid % 16), all tiles fp32 in
// shared memory with odd row strides (no bank conflicts on column walks):
//   S/dP/P/dS [BM x BN]: thread holds rows tr + 16i, keys tc + 16j;
//   dK/dV     [BN x DP]: keys tr + 16j, dims tc + 16e (registers for the whole block);
//   dQ        [BM x DP]: rows tr + 16i, dims tc + 16e (the same rows as its S entries).
template <typename T, int DP>
__global__ void __launch_bounds__(kBwdThreads) bwd_kernel(const BwdParams p) {
  constexpr int BN = bwd_keys(DP), BM = bwd_rows(DP);
  constexpr int LD = DP + 1, LDP = BN + 1;
  constexpr int RM = BM / 16, RN = BN / 16, RD = DP / 16;
  static_assert(kBwdThreads == 256 && BN <= 64 && BM % 16 == 0 && BN % 16 == 0,
                "tile layout assumes 16 x 16 threads and at most 64 keys");

  extern __shared__ __align__(16) unsigned char bwd_smem[];
  float* Ks = reinterpret_cast<float*>(bwd_smem);
  float* Vs = Ks + BN * LD;
  float* Qs = Vs + BN * LD;
  float* dOs = Qs + BM * LD;
  float* Ps = dOs + BM * LD;
  float* dSs = Ps + BM * LDP;
  __shared__ uint64_t s_mask[BM], s_seen;
  __shared__ float s_lse[BM], s_delta[BM];

  const int tid = threadIdx.x, tr = tid >> 4, tc = tid & 15;
  const int tile = blockIdx.x / p.rsplit, split = blockIdx.x - tile * p.rsplit;
  const int kvh = blockIdx.y, b = blockIdx.z;
  const int D = p.D, G = p.G;
  const int kb = tile * BN, ke = min(p.Tk, kb + BN), nk = ke - kb;
  const int nrows = G * p.Tq;
  const int nchunks = (nrows + BM - 1) / BM;
  const int ch0 = split * p.chunks_per_split, ch1 = min(nchunks, ch0 + p.chunks_per_split);
  const float scale = p.scale, cap = p.softcap;

  // K/V tile -> shared (fp32), zero outside [kb, ke) x [0, D).
  {
    const T* kg = static_cast<const T*>(p.k) + (int64_t)b * p.k_sb + (int64_t)kvh * p.k_sh;
    const T* vg = static_cast<const T*>(p.v) + (int64_t)b * p.v_sb + (int64_t)kvh * p.v_sh;
    for (int i = tid; i < BN * DP; i += kBwdThreads) {
      const int c = i / DP, d = i - c * DP;
      const bool ok = c < nk && d < D;
      Ks[c * LD + d] = ok ? to_float<T>(kg[(int64_t)(kb + c) * p.k_st + d]) : 0.f;
      Vs[c * LD + d] = ok ? to_float<T>(vg[(int64_t)(kb + c) * p.v_st + d]) : 0.f;
    }
  }

  const int32_t* iv_b = p.iv + (int64_t)b * p.Tq * p.NI * 2;
  const T* qb = static_cast<const T*>(p.q) + (int64_t)b * p.q_sb;
  const T* db = static_cast<const T*>(p.dout) + (int64_t)b * p.do_sb;
  // Stacked row -> (q head, position) and its [B, Hq, Tq] index.
  auto row_index = [&](int rho, int& hq, int& t) {
    t = rho / G;
    hq = kvh * G + (rho - t * G);
    return ((int64_t)b * p.Hq + hq) * p.Tq + t;
  };

  float ak[RN][RD], av[RN][RD];
#pragma unroll
  for (int j = 0; j < RN; ++j)
#pragma unroll
    for (int e = 0; e < RD; ++e) ak[j][e] = av[j][e] = 0.f;

  for (int ch = ch0; ch < ch1; ++ch) {
    const int r0 = ch * BM;
    // Row masks, lse and Delta of the chunk; a row with lse = -inf sees nothing.
    uint64_t m = 0ull;
    if (tid < BM) {
      float l = neg_inf(), dl = 0.f;
      if (r0 + tid < nrows) {
        int hq, t;
        const int64_t row = row_index(r0 + tid, hq, t);
        l = p.lse[row];
        dl = p.delta[row];
        if (l != neg_inf()) m = row_mask<BN>(iv_b + (int64_t)t * p.NI * 2, p.NI, kb, kb, ke);
      }
      s_mask[tid] = m;
      s_lse[tid] = l;
      s_delta[tid] = dl;
    }
    // Also the barrier that ends the previous chunk's reads of Qs/dOs/Ps/dSs.
    if (!__syncthreads_or(m != 0ull)) continue;
    if (tid == 0) {  // the keys some row of the chunk sees (published by the barrier below)
      uint64_t seen = 0ull;
      for (int r = 0; r < BM; ++r) seen |= s_mask[r];
      s_seen = seen;
    }

    // Q and dO rows -> shared (fp32); rows that see nothing of the tile stay zero.
    for (int i = tid; i < BM * DP; i += kBwdThreads) {
      const int r = i / DP, d = i - r * DP;
      float qv = 0.f, gv = 0.f;
      if (d < D && s_mask[r] != 0ull) {
        int hq, t;
        row_index(r0 + r, hq, t);
        qv = to_float<T>(qb[(int64_t)hq * p.q_sh + (int64_t)t * p.q_st + d]);
        gv = to_float<T>(db[(int64_t)hq * p.do_sh + (int64_t)t * p.do_st + d]);
      }
      Qs[r * LD + d] = qv;
      dOs[r * LD + d] = gv;
    }
    __syncthreads();

    // S = Q K^T and dP = dO V^T for this thread's entries, then P and dS -> shared.
    float s[RM][RN], dp[RM][RN];
#pragma unroll
    for (int i = 0; i < RM; ++i)
#pragma unroll
      for (int j = 0; j < RN; ++j) s[i][j] = dp[i][j] = 0.f;
#pragma unroll 4
    for (int d = 0; d < D; ++d) {
      float qa[RM], ga[RM];
#pragma unroll
      for (int i = 0; i < RM; ++i) {
        qa[i] = Qs[(tr + 16 * i) * LD + d];
        ga[i] = dOs[(tr + 16 * i) * LD + d];
      }
#pragma unroll
      for (int j = 0; j < RN; ++j) {
        const float kv = Ks[(tc + 16 * j) * LD + d];
        const float vv = Vs[(tc + 16 * j) * LD + d];
#pragma unroll
        for (int i = 0; i < RM; ++i) {
          s[i][j] = fmaf(qa[i], kv, s[i][j]);
          dp[i][j] = fmaf(ga[i], vv, dp[i][j]);
        }
      }
    }
    bool row_on[RM];
#pragma unroll
    for (int i = 0; i < RM; ++i) {
      const int r = tr + 16 * i;
      const uint64_t mr = s_mask[r];
      const float lr = s_lse[r], dl = s_delta[r];
      row_on[i] = mr != 0ull;
#pragma unroll
      for (int j = 0; j < RN; ++j) {
        const int c = tc + 16 * j;
        float pv = 0.f, ds = 0.f;
        if ((mr >> c) & 1ull) {
          float x = s[i][j] * scale, fac = 1.f;
          if (cap > 0.f) {
            const float th = tanh_acc(__fdiv_rn(x, cap));
            x = th * cap;
            fac = 1.f - th * th;
          }
          pv = exp2f((x - lr) * kLog2e);
          ds = pv * (dp[i][j] - dl) * fac;
        }
        Ps[r * LDP + c] = pv;
        dSs[r * LDP + c] = ds;
      }
    }
    __syncthreads();

    // dV += P^T dO, dK += dS^T Q (scale applied at the end).
#pragma unroll 2
    for (int r = 0; r < BM; ++r) {
      float pr[RN], sr[RN];
#pragma unroll
      for (int j = 0; j < RN; ++j) {
        pr[j] = Ps[r * LDP + tr + 16 * j];
        sr[j] = dSs[r * LDP + tr + 16 * j];
      }
#pragma unroll
      for (int e = 0; e < RD; ++e) {
        const float qv = Qs[r * LD + tc + 16 * e];
        const float gv = dOs[r * LD + tc + 16 * e];
#pragma unroll
        for (int j = 0; j < RN; ++j) {
          av[j][e] = fmaf(pr[j], gv, av[j][e]);
          ak[j][e] = fmaf(sr[j], qv, ak[j][e]);
        }
      }
    }

    // dQ += scale * dS K for this thread's rows.
    float aq[RM][RD];
#pragma unroll
    for (int i = 0; i < RM; ++i)
#pragma unroll
      for (int e = 0; e < RD; ++e) aq[i][e] = 0.f;
    const uint64_t seen = s_seen;
    for (int c = 0; c < nk; ++c) {
      // dS is 0 there, but an uninitialised cache slot may hold nan in K: 0 * nan is nan.
      if (!((seen >> c) & 1ull)) continue;
      float sv[RM];
#pragma unroll
      for (int i = 0; i < RM; ++i) sv[i] = dSs[(tr + 16 * i) * LDP + c];
#pragma unroll
      for (int e = 0; e < RD; ++e) {
        const float kv = Ks[c * LD + tc + 16 * e];
#pragma unroll
        for (int i = 0; i < RM; ++i) aq[i][e] = fmaf(sv[i], kv, aq[i][e]);
      }
    }
#pragma unroll
    for (int i = 0; i < RM; ++i) {
      if (!row_on[i]) continue;
      int hq, t;
      float* dqr = p.dq + row_index(r0 + tr + 16 * i, hq, t) * D;
#pragma unroll
      for (int e = 0; e < RD; ++e) {
        const int d = tc + 16 * e;
        if (d < D) atomicAdd(dqr + d, aq[i][e] * scale);
      }
    }
  }

  // This block's dK/dV rows (every key of the tile, zeros where no row sees it).
#pragma unroll
  for (int j = 0; j < RN; ++j) {
    const int c = tr + 16 * j;
    if (c >= nk) continue;
    const int64_t off = (((int64_t)b * p.Hkv + kvh) * p.Tk + kb + c) * D;
#pragma unroll
    for (int e = 0; e < RD; ++e) {
      const int d = tc + 16 * e;
      if (d >= D) continue;
      if (p.rsplit > 1) {
        atomicAdd(p.dk + off + d, ak[j][e] * scale);
        atomicAdd(p.dv + off + d, av[j][e]);
      } else {
        p.dk[off + d] = ak[j][e] * scale;
        p.dv[off + d] = av[j][e];
      }
    }
  }
}

template <typename T, int DP>
void launch_bwd_dp(const BwdParams& p, cudaStream_t stream) {
  constexpr int BN = bwd_keys(DP), BM = bwd_rows(DP);
  const size_t smem = ((2 * BN + 2 * BM) * (DP + 1) + 2 * BM * (BN + 1)) * sizeof(float);
  auto kernel = bwd_kernel<T, DP>;
  prepare_smem<T, DP, 0>(kernel, smem, "interval_attention_bwd");
  const unsigned ntiles = static_cast<unsigned>((p.Tk + BN - 1) / BN);
  kernel<<<dim3(ntiles * p.rsplit, p.Hkv, p.B), kBwdThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_attention_bwd(const BwdParams& p, cudaStream_t stream) {
  const int64_t rows = (int64_t)p.B * p.Hq * p.Tq;
  constexpr int kRows = kBwdThreads / 32;
  bwd_delta_kernel<T><<<static_cast<unsigned>((rows + kRows - 1) / kRows), kBwdThreads, 0,
                        stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  switch (padded_head_dim(p.D)) {
    case 64:
      launch_bwd_dp<T, 64>(p, stream);
      break;
    case 128:
      launch_bwd_dp<T, 128>(p, stream);
      break;
    default:
      launch_bwd_dp<T, 256>(p, stream);
      break;
  }
}

}  // namespace detail

void launch_attention_bwd_f16(const BwdParams& p, cudaStream_t stream) {
  detail::launch_attention_bwd<__half>(p, stream);
}
void launch_attention_bwd_bf16(const BwdParams& p, cudaStream_t stream) {
  detail::launch_attention_bwd<__nv_bfloat16>(p, stream);
}
void launch_attention_bwd_f32(const BwdParams& p, cudaStream_t stream) {
  detail::launch_attention_bwd<float>(p, stream);
}

}  // namespace cuda
}  // namespace safeattn

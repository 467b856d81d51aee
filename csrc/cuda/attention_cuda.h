// Shared between the CUDA attention host code and the per-dtype kernel files.
// Plain C++ (no torch headers) so that the kernel translation units stay light.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace safeattn {
namespace cuda {

// Everything a kernel launch needs. Strides are in elements; the last dim is contiguous.
struct AttnParams {
  const void* q;
  const void* k;
  const void* v;
  const int32_t* iv;  // [B, Tq, NI, 2], contiguous
  void* out;          // [B, Hq, Tq, D], contiguous, q's dtype
  float* lse;         // [B, Hq, Tq] row log-sum-exp (-inf: no visible key), or null
  float* part_o;      // split-KV workspace: [B*Hq*Tq, nsplit, D]
  float* part_m;      // [B*Hq*Tq, nsplit]
  float* part_l;      // [B*Hq*Tq, nsplit]
  int64_t q_sb, q_sh, q_st;
  int64_t k_sb, k_sh, k_st;
  int64_t v_sb, v_sh, v_st;
  int B, Hq, Hkv, G, Tq, Tk, D, NI;
  float scale;
  float softcap;  // 0: none
  int nsplit;     // decode path: KV splits per (b, kv head)
  int split_keys; // decode path: keys per split (multiple of the block's key tile)
  bool q_vec, k_vec, v_vec;  // 16-byte vector loads allowed
};

// Padded head dim that a kernel instance handles: 64, 128 or 256.
inline int padded_head_dim(int D) { return D <= 64 ? 64 : (D <= 128 ? 128 : 256); }

// Rows of one decode block: the G*Tq query rows of one (b, kv head) group.
constexpr int kDecodeRows = 16;
constexpr int kWarps = 4;

// Keys per warp tile. 16-bit types use tensor cores (multiple of 16), fp32 runs on the
// CUDA cores (multiple of 8). Smaller tiles for wide heads keep shared memory and registers
// in budget.
constexpr int prefill_bk(bool is_fp32, int DP) {
  return is_fp32 ? (DP == 64 ? 64 : 32) : (DP == 256 ? 32 : 64);
}
constexpr int decode_bk(bool is_fp32, int DP) {
  return is_fp32 ? (DP == 64 ? 32 : (DP == 128 ? 16 : 8)) : (DP == 256 ? 16 : 32);
}
// Keys per block tile on the decode path (each warp takes one warp tile of it).
constexpr int decode_block_keys(bool is_fp32, int DP) { return kWarps * decode_bk(is_fp32, DP); }

// Per-dtype entry points (defined in attention_cuda_{f16,bf16,f32}.cu).
void launch_attention_f16(const AttnParams& p, bool decode, cudaStream_t stream);
void launch_attention_bf16(const AttnParams& p, bool decode, cudaStream_t stream);
void launch_attention_f32(const AttnParams& p, bool decode, cudaStream_t stream);

// Backward (attention_bwd_cuda.cu). One block owns a key tile of one (b, kv head) and walks
// the G*Tq stacked query rows of its group (row = t * G + g), so dK/dV need no atomics
// unless the rows are split over rsplit blocks; dQ accumulates with fp32 atomics.
struct BwdParams {
  const void* q;
  const void* k;
  const void* v;
  const void* out;
  const void* dout;
  const int32_t* iv;  // [B, Tq, NI, 2], contiguous
  const float* lse;   // [B, Hq, Tq], contiguous
  float* delta;       // [B, Hq, Tq] workspace: rowsum(dO * O)
  float* dq;          // [B, Hq, Tq, D] fp32, zero-filled (atomics)
  float* dk;          // [B, Hkv, Tk, D] fp32; zero-filled when rsplit > 1 (atomics)
  float* dv;
  int64_t q_sb, q_sh, q_st;
  int64_t k_sb, k_sh, k_st;
  int64_t v_sb, v_sh, v_st;
  int64_t o_sb, o_sh, o_st;
  int64_t do_sb, do_sh, do_st;
  int B, Hq, Hkv, G, Tq, Tk, D, NI;
  float scale;
  float softcap;  // 0: none
  int rsplit;     // blocks per key tile, each taking chunks_per_split row chunks
  int chunks_per_split;
};

constexpr int kBwdThreads = 256;
// Keys per block and stacked query rows per chunk: fp32 tiles within ~100 KiB of shared memory.
constexpr int bwd_keys(int DP) { return DP == 256 ? 32 : 64; }
constexpr int bwd_rows(int DP) { return DP == 64 ? 32 : 16; }

void launch_attention_bwd_f16(const BwdParams& p, cudaStream_t stream);
void launch_attention_bwd_bf16(const BwdParams& p, cudaStream_t stream);
void launch_attention_bwd_f32(const BwdParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace safeattn

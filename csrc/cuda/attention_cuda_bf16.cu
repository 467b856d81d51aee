// Attention kernel instances for one dtype (split per dtype so that they compile in parallel).
#include "attention_kernels.cuh"

namespace safeattn {
namespace cuda {

void launch_attention_bf16(const AttnParams& p, bool decode, cudaStream_t stream) {
  detail::launch_attention<__nv_bfloat16>(p, decode, stream);
}

}  // namespace cuda
}  // namespace safeattn

// Attention kernel instances for one dtype (split per dtype so that they compile in parallel).
#include "attention_kernels.cuh"

namespace safeattn {
namespace cuda {

void launch_attention_f16(const AttnParams& p, bool decode, cudaStream_t stream) {
  detail::launch_attention<__half>(p, decode, stream);
}

}  // namespace cuda
}  // namespace safeattn

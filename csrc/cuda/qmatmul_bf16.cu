// qmatmul decode-path kernels for bf16 activations: one translation unit per activation
// dtype so the variants compile in parallel. The kernels live in qmatmul_kernels.cuh and qmatmul_mma.cuh.
#include "qmatmul_dispatch.cuh"

namespace lqlora::cuda {
template cudaError_t qmatmul_small<__nv_bfloat16>(const __nv_bfloat16*, int, const PackedView&,
                                                  const LoraView*, __nv_bfloat16*, cudaStream_t);
}  // namespace lqlora::cuda

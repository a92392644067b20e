// qmatmul decode-path kernels for fp32 activations: one translation unit per activation
// dtype so the variants compile in parallel. The kernels live in qmatmul_kernels.cuh and qmatmul_mma.cuh.
#include "qmatmul_dispatch.cuh"

namespace lqlora::cuda {
template cudaError_t qmatmul_small<float>(const float*, int, const PackedView&, const LoraView*,
                                          float*, cudaStream_t);
}  // namespace lqlora::cuda

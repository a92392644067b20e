// Decoding of double-quantized scales on the CPU, shared by every CPU kernel.
#pragma once
#include <ATen/core/Tensor.h>

#include <vector>

#include "lqlora/format.h"

namespace lqlora::cpu {

// fp32 first-level scales [nblocks]: ŝ[j] = (qs[j] * c[g]) / L + offset (docs/format.md).
std::vector<float> decode_scales(const at::Tensor& qscales, const at::Tensor& scale2,
                                 const at::Tensor& offset, int64_t nblocks, int scale_bits,
                                 int64_t scale_block_size);

// Rows [r0, r1) of the dense weight, fp32, written to out[(r - r0) * cols + c].
void dequantize_rows(const NFLayout& L, const uint32_t* qcodes, const float* scales,
                     const float* levels, int64_t r0, int64_t r1, float* out);

}  // namespace lqlora::cpu

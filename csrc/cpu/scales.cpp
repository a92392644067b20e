// CPU decoding shared by dequantize, qmatmul and qmatmul_t.
#include "scales.h"

#include <ATen/Parallel.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "lqlora/switch.h"

namespace lqlora::cpu {

std::vector<float> decode_scales(const at::Tensor& qscales, const at::Tensor& scale2,
                                 const at::Tensor& offset, int64_t nblocks, int scale_bits,
                                 int64_t scale_block_size) {
  auto c = scale2.to(at::kFloat).contiguous();
  const float* cp = c.data_ptr<float>();
  const auto* qs = reinterpret_cast<const uint32_t*>(qscales.data_ptr<int32_t>());
  const float o = offset.data_ptr<float>()[0];
  const float L = static_cast<float>((1 << scale_bits) - 1);
  std::vector<float> out(nblocks);
  // Parallel: every qmatmul call decodes all scales (262k for a 4096x4096 NF4 weight).
  at::parallel_for(0, nblocks, 4096, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      const float q = static_cast<float>(code_at(qs, scale_bits, j));
      out[j] = (q * cp[j / scale_block_size]) / L + o;
    }
  });
  return out;
}

namespace {

// Serial decode of flat codes [begin, end) into out[0 .. end-begin). Full, aligned
// 32-code groups take the unrolled template path; ragged edges the generic one.
template <int Bits>
__attribute__((target_clones("avx2", "default"))) void decode_range(
    const uint32_t* qcodes, const float* scales, const float* levels, int64_t block_size,
    int64_t begin, int64_t end, float* out) {
  int64_t idx = begin;
  for (; idx < end && (idx & 31) != 0; ++idx)
    out[idx - begin] = levels[code_at(qcodes, Bits, idx)] * scales[idx / block_size];
  for (; idx + 32 <= end; idx += 32) {
    const uint32_t* w = qcodes + (idx >> 5) * Bits;
    float* o = out + (idx - begin);
    if (block_size >= 32) {  // the whole group lies in one block (B0 is a multiple of 32)
      const float s = scales[idx / block_size];
#pragma GCC unroll 32
      for (int i = 0; i < 32; ++i) o[i] = levels[unpack_code<Bits>(w, i)] * s;
    } else {  // B0 == 16: two blocks per group
      const float s0 = scales[idx / block_size], s1 = scales[idx / block_size + 1];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) o[i] = levels[unpack_code<Bits>(w, i)] * s0;
#pragma GCC unroll 16
      for (int i = 16; i < 32; ++i) o[i] = levels[unpack_code<Bits>(w, i)] * s1;
    }
  }
  for (; idx < end; ++idx)
    out[idx - begin] = levels[code_at(qcodes, Bits, idx)] * scales[idx / block_size];
}

}  // namespace

void dequantize_rows(const NFLayout& L, const uint32_t* qcodes, const float* scales,
                     const float* levels, int64_t r0, int64_t r1, float* out) {
  LQ_BITS_SWITCH(L.bits, [&] {
    decode_range<kBits>(qcodes, scales, levels, L.block_size, r0 * L.cols, r1 * L.cols, out);
  });
}

}  // namespace lqlora::cpu

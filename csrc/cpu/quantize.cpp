// CPU kernels: quantize (dense -> packed), unpack_scales, dequantize (packed -> dense).
// Numerics follow docs/format.md exactly; lqlora_ext/ops/reference.py is the oracle.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "lqlora/format.h"
#include "lqlora/switch.h"
#include "scales.h"

namespace lqlora::cpu {
namespace {

float round_to_dtype(float v, at::ScalarType dt) {
  switch (dt) {
    case at::kBFloat16: return static_cast<float>(c10::BFloat16(v));  // RNE
    case at::kHalf: return static_cast<float>(c10::Half(v));          // RNE
    case at::kFloat: return v;
    default:
      TORCH_CHECK_VALUE(false, "lqlora: scale_dtype must be float32, float16 or bfloat16, got ",
                        dt);
  }
}


// Weight codes of 32-code groups [g0, g1): x = w / ŝ (exact division, as the reference;
// x = 0 where ŝ = 0), code = #{m : mid[m] < x}, packed to Bits-bit codes. `mids` holds the
// 2^Bits - 1 midpoints padded with +inf. One block lookup per group (B0 >= 32) or per half
// group (B0 = 16): an integer division per element would cost more than everything else.
template <int Bits>
void encode_groups(const float* wp, int64_t n, const float* shat, int64_t block_size,
                   const float* mids, int64_t g0, int64_t g1, uint32_t* qc) {
  constexpr int kLevels = 1 << Bits;
  alignas(64) float x[32];
  alignas(64) uint8_t codes[32];
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t base = g * 32;
    if (base + 32 <= n) {
      const float* w = wp + base;
      const float s0 = shat[base / block_size];
      const float s1 = block_size >= 32 ? s0 : shat[base / block_size + 1];
      for (int i = 0; i < 32; ++i) {
        const float s = i < 16 ? s0 : s1;
        x[i] = (s == 0.f) ? 0.f : w[i] / s;
      }
    } else {  // the ragged last group
      for (int i = 0; i < 32; ++i) {
        const int64_t idx = base + i;
        const float s = idx < n ? shat[idx / block_size] : 0.f;
        x[i] = (s == 0.f) ? 0.f : wp[idx] / s;
      }
    }
    if constexpr (Bits <= 4) {
      // Few levels: count midpoints below x with compares over all 32 lanes (vectorizes).
      int32_t cnt[32] = {0};
      for (int m = 0; m + 1 < kLevels; ++m) {
        const float mid = mids[m];
        for (int i = 0; i < 32; ++i) cnt[i] += (x[i] > mid) ? 1 : 0;
      }
      for (int i = 0; i < 32; ++i) codes[i] = static_cast<uint8_t>(cnt[i]);
    } else {  // branchless binary search, Bits steps
      for (int i = 0; i < 32; ++i) {
        int pos = 0;
#pragma GCC unroll 8
        for (int k = Bits - 1; k >= 0; --k)
          pos += (mids[pos + (1 << k) - 1] < x[i]) ? (1 << k) : 0;
        codes[i] = static_cast<uint8_t>(pos);
      }
    }
    for (int64_t i = std::max<int64_t>(0, n - base); i < 32; ++i) codes[i] = 0;  // zero pad
    pack_group(codes, Bits, qc + g * Bits);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize_cpu(
    const at::Tensor& w, const at::Tensor& levels, int64_t bits, int64_t block_size,
    int64_t scale_bits, int64_t scale_block_size, at::ScalarType scale_dtype) {
  TORCH_CHECK_TYPE(at::isFloatingType(w.scalar_type()),
                   "lqlora.quantize: weight must be a floating tensor, got ", w.scalar_type());
  TORCH_CHECK_VALUE(w.dim() == 2, "lqlora.quantize: weight must be 2-D, got ", w.dim(), "-D");
  const NFLayout L =
      make_layout(w.size(0), w.size(1), bits, block_size, scale_bits, scale_block_size);
  check_levels(levels, bits, w.device());
  round_to_dtype(0.f, scale_dtype);  // validates the dtype before any work

  const at::Tensor wf = w.to(at::kFloat).contiguous();
  const float* wp = wf.data_ptr<float>();
  const int64_t n = L.numel, nb = L.nblocks(), ng = L.ngroups();

  // First non-finite element (smallest flat index), found in parallel.
  std::vector<int64_t> first_bad(at::get_num_threads(), std::numeric_limits<int64_t>::max());
  at::parallel_for(0, n, 1 << 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      if (!std::isfinite(wp[i])) {
        auto& slot = first_bad[at::get_thread_num()];
        slot = std::min(slot, i);
        break;
      }
  });
  const int64_t bad = *std::min_element(first_bad.begin(), first_bad.end());
  TORCH_CHECK_VALUE(bad == std::numeric_limits<int64_t>::max(),
                    "lqlora.quantize: weight contains NaN/Inf; first at [", bad / L.cols, ", ",
                    bad % L.cols, "] (value ", wp[bad == std::numeric_limits<int64_t>::max() ? 0 : bad], ")");

  // 1. absmax per block.
  std::vector<float> s1(nb);
  at::parallel_for(0, nb, 256, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      float m = 0.f;
      const int64_t hi = std::min(n, (j + 1) * block_size);
      for (int64_t i = j * block_size; i < hi; ++i) m = std::max(m, std::fabs(wp[i]));
      s1[j] = m;
    }
  });
  // 2.-5. offset, second-level scales, scale codes, decoded scales.
  const float offset = *std::min_element(s1.begin(), s1.end());
  const float Lq = static_cast<float>((1 << scale_bits) - 1);
  std::vector<float> c(ng, 0.f), shat(nb);
  std::vector<uint8_t> qs(((nb + 31) / 32) * 32, 0);
  for (int64_t j = 0; j < nb; ++j) c[j / scale_block_size] = std::max(c[j / scale_block_size], s1[j] - offset);
  for (auto& v : c) {
    v = round_to_dtype(v, scale_dtype);
    TORCH_CHECK_VALUE(std::isfinite(v), "lqlora.quantize: a second-level scale overflows ",
                      scale_dtype, " (block absmax spread ", offset + 0.f,
                      " .. beyond the dtype's range); use bfloat16 or float32 scales");
  }
  for (int64_t j = 0; j < nb; ++j) {
    const float cg = c[j / scale_block_size];
    float q = 0.f;
    if (cg != 0.f) q = std::min(std::max(std::nearbyint(((s1[j] - offset) * Lq) / cg), 0.f), Lq);
    qs[j] = static_cast<uint8_t>(q);
    shat[j] = (q * cg) / Lq + offset;
  }
  // 6. weight codes: nearest level with midpoint boundaries, ties to the lower level.
  // Midpoints padded with +inf to 2^bits entries (encode_groups' binary search).
  const int nlev = 1 << bits;
  std::vector<float> mids(nlev, std::numeric_limits<float>::infinity());
  const float* lv = levels.data_ptr<float>();
  for (int m = 0; m + 1 < nlev; ++m) mids[m] = (lv[m] + lv[m + 1]) / 2.f;
  const float* mp = mids.data();

  at::Tensor qcodes = at::empty({L.code_words()}, w.options().dtype(at::kInt));
  auto* qc = reinterpret_cast<uint32_t*>(qcodes.data_ptr<int32_t>());
  const int64_t groups = (n + 31) / 32;
  LQ_BITS_SWITCH(bits, [&] {
    at::parallel_for(0, groups, 256, [&](int64_t b, int64_t e) {
      encode_groups<kBits>(wp, n, shat.data(), block_size, mp, b, e, qc);
    });
  });

  at::Tensor qscales = at::empty({L.scale_words()}, w.options().dtype(at::kInt));
  auto* qsp = reinterpret_cast<uint32_t*>(qscales.data_ptr<int32_t>());
  for (int64_t g = 0; g < (nb + 31) / 32; ++g)
    pack_group(qs.data() + g * 32, static_cast<int>(scale_bits), qsp + g * scale_bits);

  at::Tensor scale2 = at::from_blob(c.data(), {ng}, at::kFloat).to(scale_dtype).clone();
  at::Tensor off = at::full({1}, offset, w.options().dtype(at::kFloat));
  return {qcodes, qscales, scale2, off};
}

at::Tensor unpack_scales_cpu(const at::Tensor& qscales, const at::Tensor& scale2,
                             const at::Tensor& offset, int64_t nblocks, int64_t scale_bits,
                             int64_t scale_block_size) {
  check_scale_args(qscales, scale2, offset, nblocks, scale_bits, scale_block_size);
  auto v = decode_scales(qscales.contiguous(), scale2, offset.contiguous(), nblocks,
                         static_cast<int>(scale_bits), scale_block_size);
  return at::from_blob(v.data(), {nblocks}, at::kFloat).clone();
}

at::Tensor dequantize_cpu(const at::Tensor& qcodes, const at::Tensor& qscales,
                          const at::Tensor& scale2, const at::Tensor& offset,
                          const at::Tensor& levels, int64_t rows, int64_t cols, int64_t bits,
                          int64_t block_size, int64_t scale_bits, int64_t scale_block_size,
                          at::ScalarType dtype) {
  const NFLayout L = make_layout(rows, cols, bits, block_size, scale_bits, scale_block_size);
  check_packed(L, qcodes, qscales, scale2, offset, levels);
  TORCH_CHECK_TYPE(at::isFloatingType(dtype), "lqlora.dequantize: dtype must be floating, got ",
                   dtype);
  auto scales = decode_scales(qscales, scale2, offset, L.nblocks(), L.scale_bits,
                              L.scale_block_size);
  at::Tensor out = at::empty({rows, cols}, qcodes.options().dtype(at::kFloat));
  const auto* qc = reinterpret_cast<const uint32_t*>(qcodes.data_ptr<int32_t>());
  float* op = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / cols);
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    dequantize_rows(L, qc, scales.data(), levels.data_ptr<float>(), r0, r1, op + r0 * cols);
  });
  return dtype == at::kFloat ? out : out.to(dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(lqlora, CPU, m) {
  m.impl("quantize", &quantize_cpu);
  m.impl("unpack_scales", &unpack_scales_cpu);
  m.impl("dequantize", &dequantize_cpu);
}

}  // namespace lqlora::cpu

// CPU kernels: qmatmul (x @ W^T, optional LoRA term) and qmatmul_t (g @ W) on packed weights.
//
// Small M (decode, M <= kFusedMaxM): fused decode + FMA (gemv_avx2.cpp) when K % 32 == 0
// and the CPU has AVX2; otherwise each thread decodes one weight row at a time into an
// L1-resident fp32 buffer and dots it with every row of x. Either way each packed byte is
// read once and the dense weight never exists. Larger M: rows are dequantized chunk by chunk
// (parallel) and multiplied by the BLAS GEMM through at::mm, which wins once the decode
// cost is shared by many rows of x.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "gemv_avx2.h"
#include "lqlora/format.h"
#include "lqlora/guards.h"
#include "scales.h"

namespace lqlora::cpu {
namespace {

constexpr int64_t kFusedMaxM = 16;
constexpr int64_t kChunkElems = int64_t(1) << 22;  // 16 MiB of fp32 weight per chunk

// Dot product with 16 independent accumulators so the compiler vectorizes it without
// reassociating (no -ffast-math needed).
__attribute__((target_clones("avx2", "default"))) float dot(const float* a, const float* b,
                                                              int64_t n) {
  float acc[16] = {0.f};
  int64_t k = 0;
  for (; k + 16 <= n; k += 16)
    for (int j = 0; j < 16; ++j) acc[j] += a[k + j] * b[k + j];
  float s = 0.f;
  for (; k < n; ++k) s += a[k] * b[k];
  for (int j = 0; j < 16; ++j) s += acc[j];
  return s;
}

struct Packed {
  NFLayout L;
  const uint32_t* qcodes;
  std::vector<float> scales;
  const float* levels;
};

Packed unpack_args(const at::Tensor& qcodes, const at::Tensor& qscales, const at::Tensor& scale2,
                   const at::Tensor& offset, const at::Tensor& levels, int64_t rows, int64_t cols,
                   int64_t bits, int64_t block_size, int64_t scale_bits,
                   int64_t scale_block_size, const char* op) {
  const NFLayout L = checked_layout(qcodes, qscales, scale2, offset, levels, rows, cols, bits,
                                    block_size, scale_bits, scale_block_size, op);
  return Packed{L, reinterpret_cast<const uint32_t*>(qcodes.data_ptr<int32_t>()),
                decode_scales(qscales, scale2, offset, L.nblocks(), L.scale_bits,
                              L.scale_block_size),
                levels.data_ptr<float>()};
}


// Dense fp32 rows [r0, r1) of W, dequantized in parallel.
at::Tensor dequant_chunk(const Packed& P, int64_t r0, int64_t r1) {
  at::Tensor buf = at::empty({r1 - r0, P.L.cols}, at::kFloat);
  float* bp = buf.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / P.L.cols);
  at::parallel_for(r0, r1, grain, [&](int64_t a, int64_t b) {
    dequantize_rows(P.L, P.qcodes, P.scales.data(), P.levels, a, b, bp + (a - r0) * P.L.cols);
  });
  return buf;
}

at::Tensor qmatmul_cpu(const at::Tensor& x, const at::Tensor& qcodes, const at::Tensor& qscales,
                       const at::Tensor& scale2, const at::Tensor& offset,
                       const at::Tensor& levels, int64_t rows, int64_t bits, int64_t block_size,
                       int64_t scale_bits, int64_t scale_block_size,
                       const std::optional<at::Tensor>& lora_a,
                       const std::optional<at::Tensor>& lora_b, double lora_scale) {
  const NoAutocast no_autocast;
  check_activation(x, qcodes, "x", "qmatmul");
  const int64_t M = x.size(0), K = x.size(1), N = rows;
  const Packed P = unpack_args(qcodes, qscales, scale2, offset, levels, rows, K, bits,
                               block_size, scale_bits, scale_block_size, "qmatmul");
  TORCH_CHECK_VALUE(lora_a.has_value() == lora_b.has_value(),
                    "lqlora.qmatmul: lora_a and lora_b must be given together");
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({M, N}, xf.options());
  if (M == 0) return out.to(x.scalar_type());

  if (M <= kFusedMaxM && K % 32 == 0 && bits <= 4 && have_avx2_fma()) {
    const float* xp = xf.data_ptr<float>();
    float* op = out.data_ptr<float>();
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      fused_gemv_avx2(P.L.bits, P.qcodes, P.scales.data(), P.levels, P.L.block_size, xp, M, K,
                      N, n0, n1, op);
    });
  } else if (M <= kFusedMaxM) {  // generic: ragged K, > 4 bits or no AVX2
    const float* xp = xf.data_ptr<float>();
    float* op = out.data_ptr<float>();
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      std::vector<float> wrow(K);
      for (int64_t n = n0; n < n1; ++n) {
        dequantize_rows(P.L, P.qcodes, P.scales.data(), P.levels, n, n + 1, wrow.data());
        for (int64_t m = 0; m < M; ++m) op[m * N + n] = dot(wrow.data(), xp + m * K, K);
      }
    });
  } else {
    const int64_t chunk = std::max<int64_t>(1, kChunkElems / K);
    for (int64_t r0 = 0; r0 < N; r0 += chunk) {
      const int64_t r1 = std::min(N, r0 + chunk);
      at::Tensor w = dequant_chunk(P, r0, r1);
      if (r1 - r0 == N) at::mm_out(out, xf, w.t());
      else out.narrow(1, r0, r1 - r0).copy_(at::mm(xf, w.t()));
    }
  }
  if (lora_a.has_value()) {
    const at::Tensor& a = *lora_a;
    const at::Tensor& b = *lora_b;
    check_activation(a, qcodes, "lora_a", "qmatmul");
    check_activation(b, qcodes, "lora_b", "qmatmul");
    TORCH_CHECK_VALUE(a.size(1) == K && b.size(0) == N && b.size(1) == a.size(0),
                      "lqlora.qmatmul: LoRA shapes must be lora_a [r, ", K, "] and lora_b [", N,
                      ", r], got ", a.sizes(), " and ", b.sizes());
    const at::Tensor t = at::mm(xf, a.to(at::kFloat).t());
    out.addmm_(t, b.to(at::kFloat).t(), 1.0, lora_scale);
  }
  return out.to(x.scalar_type());
}

at::Tensor qmatmul_t_cpu(const at::Tensor& g, const at::Tensor& qcodes, const at::Tensor& qscales,
                         const at::Tensor& scale2, const at::Tensor& offset,
                         const at::Tensor& levels, int64_t cols, int64_t bits, int64_t block_size,
                         int64_t scale_bits, int64_t scale_block_size) {
  const NoAutocast no_autocast;
  check_activation(g, qcodes, "g", "qmatmul_t");
  const int64_t M = g.size(0), N = g.size(1), K = cols;
  const Packed P = unpack_args(qcodes, qscales, scale2, offset, levels, N, K, bits, block_size,
                               scale_bits, scale_block_size, "qmatmul_t");
  const at::Tensor gf = g.to(at::kFloat).contiguous();
  at::Tensor out = at::zeros({M, K}, gf.options());
  if (M == 0) return out.to(g.scalar_type());
  const int64_t chunk = std::max<int64_t>(1, kChunkElems / K);
  for (int64_t r0 = 0; r0 < N; r0 += chunk) {
    const int64_t r1 = std::min(N, r0 + chunk);
    out.addmm_(gf.narrow(1, r0, r1 - r0), dequant_chunk(P, r0, r1));
  }
  return out.to(g.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(lqlora, CPU, m) {
  m.impl("qmatmul", &qmatmul_cpu);
  m.impl("qmatmul_t", &qmatmul_t_cpu);
}

}  // namespace lqlora::cpu

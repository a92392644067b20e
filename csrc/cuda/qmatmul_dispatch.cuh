// Picks the fused qmatmul kernel for (x dtype, bits, M, K) and launches it, the LoRA term
// in the same launch (lora.cuh) when K % 32 == 0:
//   16-bit x, K % 32 == 0, kMmaMinM < M <= kMmaMaxM (or M >= 2 for tall NF2-NF4 matrices,
//   qmatmul_use_mma): tensor cores (qmatmul_mma.cuh);
//   M <= kSmallM otherwise: CUDA cores, the decode kernel (K % 32 == 0) or the generic one.
// Included once per activation dtype by qmatmul_{fp32,bf16,fp16}.cu (explicit
// instantiation), so the kernel variants compile in parallel translation units.
#pragma once
#include <type_traits>

#include "qmatmul_kernels.cuh"
#include "qmatmul_mma.cuh"

namespace lqlora::cuda {

template <typename XT>
cudaError_t qmatmul_small(const XT* x, int M, const PackedView& w, const LoraView* lora, XT* out,
                          cudaStream_t stream) {
  constexpr bool kMma = !std::is_same_v<XT, float>;  // tensor cores take 16-bit operands
  const int N = static_cast<int>(w.rows), K = static_cast<int>(w.cols);
  const ScaleArgs sa =
      make_scale_args(w.qscales, w.scale2, w.scale2_dtype, w.scale_bits, w.scale_block_size);
  const int log2_b0 = ilog2(w.block_size);
  const int nblocks = static_cast<int>(ceil_div<int64_t>(w.rows * w.cols, w.block_size));
  if (K % 32 != 0) {
    // Rows start mid-group: the generic kernel, with a separate down-projection launch.
    LoraArgs la{nullptr, nullptr, DType::kFloat32, 0, 0.f};
    if (lora != nullptr) {
      const dim3 down_grid(lora->rank, ceil_div(M, kSmallM));
      LQ_LAUNCH(down_grid, 256, 0, stream, lora_down_kernel<XT>)(x, M, K, lora->a,
                                                                 lora->a_dtype, lora->rank,
                                                                 lora->t);
      cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
      la = LoraArgs{lora->t, lora->b, lora->b_dtype, lora->rank, lora->scale};
    }
    LQ_LAUNCH(ceil_div(N, 4), 128, 0, stream, qmatmul_generic_kernel<XT>)(
        x, M, K, N, w.qcodes, w.bits, sa, w.offset, w.levels, log2_b0, la, out);
    return cudaGetLastError();
  }
  // The LoRA term in the same launch (lora.cuh): producer blocks first, a zeroed counter.
  LoraFused lf{nullptr, DType::kFloat32, nullptr, DType::kFloat32, 0, 0.f, nullptr, nullptr,
               0, 1, 0};
  if (lora != nullptr) {
    lf = lora_fused(*lora, M, K);
    cudaError_t err = cudaMemsetAsync(lora->ready, 0, sizeof(int) * lora_ready_ints(M, lf.rank),
                                      stream);
    if (err != cudaSuccess) return err;
  }
  if (kMma && qmatmul_use_mma(M, w.rows, w.cols, w.bits)) {
    if constexpr (kMma) return launch_qmatmul_mma<XT>(x, M, w, lf, out, stream);
  }
  const int G = K / 32;
  const int WK = G >= 32 * kQmmMaxWarps ? kQmmMaxWarps : (G >= 64 ? 2 : 1);
  const dim3 block(32, WK);
  return LQ_CUDA_BITS_SWITCH(w.bits, [&] {
    // Tile shapes (MT accumulators per row, R rows per block) per M range: R = 4 shares
    // each activation load among 4 rows; at M > 4 the accumulators (MT * R) bound R to 2.
    const int P = lf.producers;
    if (M == 1) {
      LQ_LAUNCH(P + ceil_div(N, 4), block, 0, stream, qmatmul_fast_kernel<kBits, XT, 1, 4>)(
          x, M, K, N, w.qcodes, sa, w.offset, w.levels, log2_b0, nblocks, lf, out);
    } else if (M <= 4) {
      LQ_LAUNCH(P + ceil_div(N, 4), block, 0, stream, qmatmul_fast_kernel<kBits, XT, 4, 4>)(
          x, M, K, N, w.qcodes, sa, w.offset, w.levels, log2_b0, nblocks, lf, out);
    } else {
      LQ_LAUNCH(P + ceil_div(N, 2), block, 0, stream,
                qmatmul_fast_kernel<kBits, XT, kSmallM, 2>)(
          x, M, K, N, w.qcodes, sa, w.offset, w.levels, log2_b0, nblocks, lf, out);
    }
    return cudaGetLastError();
  });
}

}  // namespace lqlora::cuda

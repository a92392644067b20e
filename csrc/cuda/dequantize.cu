// CUDA kernels: unpack_scales (double-quantized scales -> fp32) and dequantize (packed ->
// dense). Bit-exact with csrc/cpu/quantize.cpp + scales.cpp (docs/format.md numerics).
#include "common.cuh"

namespace lqlora::cuda {
namespace {

// out[j] = ŝ[j], j in [0, nblocks). One thread per scale.
//   sa     : packed scale codes + second-level scales (ScaleArgs)
//   offset : fp32 [1]
//   out    : fp32 [nblocks]
__global__ void unpack_scales_kernel(ScaleArgs sa, const float* __restrict__ offset,
                                     int64_t nblocks, float* __restrict__ out) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j < nblocks) out[j] = decode_scale(sa, offset[0], j);
}

constexpr int kDqWarps = 8;  // warps per block; each warp decodes 32 groups = 1024 codes

// Dense weight, flat elements [e_begin, e_end) -> out[e - e_begin], OutT in {float, __half,
// __nv_bfloat16}.
//   qcodes : uint32 [ceil(n/32) * Bits], 16-byte aligned; n = rows*cols
//   sa     : scale codes (ScaleArgs); offset fp32 [1]; levels fp32 [2^Bits]
//   log2_b0: log2(block_size); nblocks = ceil(n / block_size)
// Each lane decodes one whole 32-code group with compile-time shifts (one or two vector
// loads), scales it (one ŝ per group, two when B0 = 16), and the warp transposes its 32x32
// tile through shared memory so that every store instruction writes 32 consecutive
// elements (coalesced) instead of 32 strided 128-byte rows.
template <int Bits, typename OutT>
__global__ void __launch_bounds__(kDqWarps * 32)
    dequantize_kernel(const uint32_t* __restrict__ qcodes, ScaleArgs sa,
                      const float* __restrict__ offset, const float* __restrict__ levels,
                      int64_t n, int log2_b0, int64_t nblocks, int64_t e_begin, int64_t e_end,
                      OutT* __restrict__ out) {
  constexpr int kLevels = 1 << Bits;
  __shared__ float lut[kLevels];
  __shared__ float tile[kDqWarps][32 * 33];  // +1 column: conflict-free transpose
  for (int i = threadIdx.x; i < kLevels; i += blockDim.x) lut[i] = levels[i];
  __syncthreads();

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t g_begin = e_begin >> 5;
  const int64_t g0 = g_begin + (static_cast<int64_t>(blockIdx.x) * kDqWarps + warp) * 32;
  const int64_t g = g0 + lane;
  const int64_t ngroups = ceil_div<int64_t>(n, 32);
  float* t = tile[warp];
  if (g < ngroups && g * 32 < e_end) {
    uint32_t w[Bits];
    load_group<Bits>(qcodes + g * Bits, w);
    const float o = offset[0];
    const int64_t j0 = (g * 32) >> log2_b0;
    const float s0 = decode_scale(sa, o, j0);
    // B0 = 16: the group's second half has its own scale (absent past the last block).
    const float s1 = (log2_b0 == 4 && j0 + 1 < nblocks) ? decode_scale(sa, o, j0 + 1) : s0;
#pragma unroll
    for (int i = 0; i < 32; ++i)
      t[lane * 33 + i] = __fmul_rn(lut[unpack_code<Bits>(w, i)], i < 16 ? s0 : s1);
  }
  __syncwarp();
#pragma unroll 4
  for (int i = 0; i < 32; ++i) {
    const int64_t e = (g0 + i) * 32 + lane;
    if (e >= e_begin && e < e_end) out[e - e_begin] = from_float<OutT>(t[i * 33 + lane]);
  }
}

}  // namespace

cudaError_t launch_unpack_scales(const uint32_t* qscales, const void* scale2, DType scale2_dtype,
                                 const float* offset, int64_t nblocks, int scale_bits,
                                 int scale_block_size, float* out, cudaStream_t stream) {
  if (nblocks <= 0) return cudaSuccess;
  const ScaleArgs sa =
      make_scale_args(qscales, scale2, scale2_dtype, scale_bits, scale_block_size);
  const int threads = 256;
  const unsigned grid = static_cast<unsigned>(ceil_div<int64_t>(nblocks, threads));
  LQ_LAUNCH(grid, threads, 0, stream, unpack_scales_kernel)(sa, offset, nblocks, out);
  return cudaGetLastError();
}

cudaError_t launch_dequantize(const PackedView& w, int64_t e_begin, int64_t e_end, void* out,
                              DType out_dtype, cudaStream_t stream) {
  if (e_end <= e_begin) return cudaSuccess;
  const int64_t n = w.rows * w.cols;
  const ScaleArgs sa =
      make_scale_args(w.qscales, w.scale2, w.scale2_dtype, w.scale_bits, w.scale_block_size);
  const int64_t nblocks = ceil_div<int64_t>(n, w.block_size);
  const int64_t groups = ceil_div<int64_t>(e_end, 32) - (e_begin >> 5);
  const unsigned grid = static_cast<unsigned>(ceil_div<int64_t>(groups, 32 * kDqWarps));
  const int log2_b0 = ilog2(w.block_size);
  return LQ_CUDA_BITS_SWITCH(w.bits, [&] {
    return LQ_CUDA_DTYPE_SWITCH(out_dtype, OutT, [&] {
      LQ_LAUNCH(grid, kDqWarps * 32, 0, stream, dequantize_kernel<kBits, OutT>)(
          w.qcodes, sa, w.offset, w.levels, n, log2_b0, nblocks, e_begin, e_end,
          static_cast<OutT*>(out));
      return cudaGetLastError();
    });
  });
}

}  // namespace lqlora::cuda

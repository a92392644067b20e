// qmatmul dispatcher (activation dtype -> the per-dtype translation units) and the small-M
// qmatmul_t kernel: partial[s, M, K] = g[M, rows of split s] @ W[rows of split s, K].
#include <algorithm>

#include "common.cuh"

namespace lqlora::cuda {

// Defined (explicitly instantiated) in qmatmul_{fp32,bf16,fp16}.cu.
template <typename XT>
cudaError_t qmatmul_small(const XT* x, int M, const PackedView& w, const LoraView* lora, XT* out,
                          cudaStream_t stream);

cudaError_t launch_qmatmul_small(const void* x, DType x_dtype, int M, const PackedView& w,
                                 const LoraView* lora, void* out, cudaStream_t stream) {
  if (M <= 0 || M > kSmallM) return cudaErrorInvalidValue;
  return LQ_CUDA_DTYPE_SWITCH(x_dtype, XT, [&] {
    return qmatmul_small<XT>(static_cast<const XT*>(x), M, w, lora, static_cast<XT*>(out),
                             stream);
  });
}

namespace {

constexpr int kTThreads = 256;  // threads per block; each owns 8 consecutive columns
constexpr int kTMTile = 4;      // rows of g per pass (accumulators: kTMTile x 8)

// Codes of flat elements [idx0, idx0 + 8), idx0 % 8 == 0: they lie in one 32-code group at
// positions p..p+7 (p % 8 == 0), i.e. bits [p*bits, p*bits + 8*bits) of the group's
// little-endian 32*bits-bit integer, which span at most 3 of its words.
__device__ __forceinline__ void codes8(const uint32_t* __restrict__ qcodes, int bits,
                                       int64_t idx0, uint32_t (&code)[8]) {
  const uint32_t* gw = qcodes + (idx0 >> 5) * bits;
  const int bit0 = static_cast<int>(idx0 & 31) * bits;
  const int w0 = bit0 >> 5;
  unsigned __int128 win = 0;
#pragma unroll
  for (int q = 0; q < 3; ++q)
    if (w0 + q < bits) win |= static_cast<unsigned __int128>(gw[w0 + q]) << (32 * q);
  const uint32_t mask = (1u << bits) - 1u;
  win >>= (bit0 & 31);
#pragma unroll
  for (int i = 0; i < 8; ++i) code[i] = static_cast<uint32_t>(win >> (i * bits)) & mask;
}

// partial[s, m, k] = sum over rows n of split s of g[m, n] * W[n, k], fp32.
//   g      : GT [M, N] contiguous
//   qcodes : uint32 packed codes of W [N, K]; levels fp32 [2^bits]
//   scales : fp32 [nblocks] decoded first-level scales (launch_unpack_scales)
//   partial: fp32 [splits, M, K]; every element is written (0 for empty splits)
// Grid: (ceil(K / (8 * kTThreads)), splits). Thread owns columns [k0, k0 + 8) and walks the
// split's rows, decoding 8 weights per row and accumulating kTMTile rows of g at a time.
// Deterministic (no atomics): the glue sums the splits.
template <typename GT>
__global__ void __launch_bounds__(kTThreads)
    qmatmul_t_kernel(const GT* __restrict__ g, int M, int N, int K,
                     const uint32_t* __restrict__ qcodes, int bits,
                     const float* __restrict__ scales, const float* __restrict__ levels,
                     int log2_b0, int rows_per_split, float* __restrict__ partial) {
  __shared__ float lut[256];
  for (int i = threadIdx.x; i < (1 << bits); i += blockDim.x) lut[i] = levels[i];
  __syncthreads();
  const int64_t k0 = (static_cast<int64_t>(blockIdx.x) * kTThreads + threadIdx.x) * 8;
  if (k0 >= K) return;
  const int split = blockIdx.y;
  const int n_begin = split * rows_per_split;
  const int n_end = min(N, n_begin + rows_per_split);
  const bool aligned8 = (K % 8) == 0;  // then the 8 columns sit in one group and one block
  for (int m0 = 0; m0 < M; m0 += kTMTile) {
    float acc[kTMTile][8];
#pragma unroll
    for (int mm = 0; mm < kTMTile; ++mm)
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[mm][i] = 0.f;
    for (int n = n_begin; n < n_end; ++n) {
      const int64_t idx0 = static_cast<int64_t>(n) * K + k0;
      float wv[8];
      if (aligned8) {
        uint32_t code[8];
        codes8(qcodes, bits, idx0, code);
        const float s = scales[idx0 >> log2_b0];
#pragma unroll
        for (int i = 0; i < 8; ++i) wv[i] = __fmul_rn(lut[code[i]], s);
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i)
          wv[i] = k0 + i < K ? __fmul_rn(lut[code_at(qcodes, bits, idx0 + i)],
                                         scales[(idx0 + i) >> log2_b0])
                             : 0.f;
      }
#pragma unroll
      for (int mm = 0; mm < kTMTile; ++mm) {
        if (m0 + mm >= M) break;
        const float gv = to_float(g[static_cast<int64_t>(m0 + mm) * N + n]);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[mm][i] = fmaf(gv, wv[i], acc[mm][i]);
      }
    }
#pragma unroll
    for (int mm = 0; mm < kTMTile; ++mm) {
      if (m0 + mm >= M) break;
      float* dst = partial + (static_cast<int64_t>(split) * M + m0 + mm) * K + k0;
#pragma unroll
      for (int i = 0; i < 8; ++i)
        if (k0 + i < K) dst[i] = acc[mm][i];
    }
  }
}

int column_blocks(int64_t cols) { return static_cast<int>(ceil_div<int64_t>(cols, 8 * kTThreads)); }

}  // namespace

int qmatmul_t_splits(int64_t rows, int64_t cols, int M) {
  (void)M;
  int dev = 0, sms = 132;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
    cudaGetLastError();  // clear; fall back to an H100-sized guess
    sms = 132;
  }
  // Enough blocks for two per SM, at most 32 splits (bounds the partial buffer to 32 * M * K
  // floats) and at least 16 rows per split.
  const int want = ceil_div(2 * sms, column_blocks(cols));
  const int64_t max_by_rows = std::max<int64_t>(1, rows / 16);
  return static_cast<int>(std::clamp<int64_t>(want, 1, std::min<int64_t>(32, max_by_rows)));
}

cudaError_t launch_qmatmul_t_small(const void* g, DType g_dtype, int M, const PackedView& w,
                                   const float* scales, int splits, float* partial,
                                   cudaStream_t stream) {
  if (M <= 0) return cudaSuccess;
  const int N = static_cast<int>(w.rows), K = static_cast<int>(w.cols);
  const int rows_per_split = static_cast<int>(ceil_div<int64_t>(N, splits));
  const dim3 grid(column_blocks(K), splits);
  return LQ_CUDA_DTYPE_SWITCH(g_dtype, GT, [&] {
    LQ_LAUNCH(grid, kTThreads, 0, stream, qmatmul_t_kernel<GT>)(
        static_cast<const GT*>(g), M, N, K, w.qcodes, w.bits, scales, w.levels,
        ilog2(w.block_size), rows_per_split, partial);
    return cudaGetLastError();
  });
}

}  // namespace lqlora::cuda

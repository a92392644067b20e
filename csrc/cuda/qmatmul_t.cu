// qmatmul dispatcher (activation dtype -> the per-dtype translation units) and the small-M
// qmatmul_t kernels: partial[s, M, K] = g[M, rows of split s] @ W[rows of split s, K], then
// out = sum over s in order, in g's dtype.
#include <algorithm>

#include "common.cuh"

namespace lqlora::cuda {

// Defined (explicitly instantiated) in qmatmul_{fp32,bf16,fp16}.cu.
template <typename XT>
cudaError_t qmatmul_small(const XT* x, int M, const PackedView& w, const LoraView* lora, XT* out,
                          cudaStream_t stream);

cudaError_t launch_qmatmul_small(const void* x, DType x_dtype, int M, const PackedView& w,
                                 const LoraView* lora, void* out, cudaStream_t stream) {
  if (M <= 0 || M > qmatmul_fused_max_m(x_dtype, w.cols)) return cudaErrorInvalidValue;
  return LQ_CUDA_DTYPE_SWITCH(x_dtype, XT, [&] {
    return qmatmul_small<XT>(static_cast<const XT*>(x), M, w, lora, static_cast<XT*>(out),
                             stream);
  });
}

namespace {

constexpr int kTThreads = 128;  // threads per block; each owns 8 consecutive columns
constexpr int kTUnroll = 4;     // rows whose loads are in flight together (MT <= 4)

// Codes of flat elements [idx0, idx0 + 8), idx0 % 8 == 0: they lie in one 32-code group at
// positions p..p+7 (p % 8 == 0), i.e. bits [p*bits, p*bits + 8*bits) of the group's
// little-endian 32*bits-bit integer, which span at most 3 of its words.
template <int Bits>
__device__ __forceinline__ void codes8(const uint32_t* __restrict__ qcodes, int64_t idx0,
                                       uint32_t (&code)[8]) {
  const uint32_t* gw = qcodes + (idx0 >> 5) * Bits;
  const int p = static_cast<int>(idx0 & 31);  // 0, 8, 16 or 24
  if constexpr (Bits == 2 || Bits == 4 || Bits == 8) {
    // The 8 codes fill whole words (Bits == 8: two) or half of one (Bits == 2): load them
    // once, extract at compile-time positions.
    constexpr int kWords = Bits == 8 ? 2 : 1;
    const int bit0 = p * Bits;
    uint32_t wv[kWords];
#pragma unroll
    for (int q = 0; q < kWords; ++q) wv[q] = gw[(bit0 >> 5) + q];
    const int sh = bit0 & 31;  // 0 except Bits == 2 (0 or 16)
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int b = i * Bits;
      code[i] = ((Bits == 2 ? wv[0] >> sh : wv[b >> 5]) >> (b & 31)) & ((1u << Bits) - 1u);
    }
  } else {
    const int bit0 = p * Bits, w0 = bit0 >> 5;
    unsigned __int128 win = 0;
#pragma unroll
    for (int q = 0; q < 3; ++q)
      if (w0 + q < Bits) win |= static_cast<unsigned __int128>(gw[w0 + q]) << (32 * q);
    win >>= (bit0 & 31);
#pragma unroll
    for (int i = 0; i < 8; ++i)
      code[i] = static_cast<uint32_t>(win >> (i * Bits)) & ((1u << Bits) - 1u);
  }
}

// partial[s, m, k] = sum over rows n of split s of g[m, n] * W[n, k], fp32.
//   g      : GT [M, N] contiguous, M <= MT
//   qcodes : uint32 packed codes of W [N, K]; levels fp32 [2^Bits]
//   scales : fp32 [nblocks] decoded first-level scales (launch_unpack_scales)
//   partial: fp32 [splits, M, K]; every element is written (0 for an empty split)
// Grid (ceil(K / (8 * kTThreads)), splits). A thread owns columns [k0, k0 + 8) and walks its
// split's rows U at a time, issuing every load of those rows (codes, scale, g) before
// the arithmetic, so the loads overlap instead of forming one dependent chain per row. Each
// weight costs one LUT load and one FMA per row of g: the scale multiplies g[m, n] once per
// row (level * (g * ŝ)). Deterministic (no atomics): qmatmul_t_reduce sums the splits.
template <int Bits, typename GT, int MT>
__global__ void __launch_bounds__(kTThreads)
    qmatmul_t_kernel(const GT* __restrict__ g, int M, int N, int K,
                     const uint32_t* __restrict__ qcodes, const float* __restrict__ scales,
                     const float* __restrict__ levels, int log2_b0, int rows_per_split,
                     float* __restrict__ partial) {
  static_assert(MT >= 1 && MT <= kSmallM, "qmatmul_t: up to kSmallM rows of g");
  __shared__ float lut[1 << Bits];
  for (int i = threadIdx.x; i < (1 << Bits); i += blockDim.x) lut[i] = levels[i];
  __syncthreads();
  const int64_t k0 = (static_cast<int64_t>(blockIdx.x) * kTThreads + threadIdx.x) * 8;
  if (k0 >= K) return;
  const int split = blockIdx.y;
  const int n_begin = split * rows_per_split;
  const int n_end = min(N, n_begin + rows_per_split);
  const bool aligned8 = (K % 8) == 0;  // then the 8 columns sit in one group and one block
  // Rows in flight: MT = 16 holds 128 accumulators, so 4 rows of codes and g values would
  // not fit in 255 registers (local-memory spills in the hot loop); 2 rows do.
  constexpr int U = MT > 4 ? 2 : kTUnroll;
  float acc[MT][8];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[m][i] = 0.f;
  for (int nb = n_begin; nb < n_end; nb += U) {
    uint32_t code[U][8];
    float sc[U];
    float gv[U][MT];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int n = min(nb + u, n_end - 1);  // past the split: a valid row, weight 0 below
      const int64_t idx0 = static_cast<int64_t>(n) * K + k0;
      if (aligned8) {
        codes8<Bits>(qcodes, idx0, code[u]);
        sc[u] = nb + u < n_end ? scales[idx0 >> log2_b0] : 0.f;
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i)
          code[u][i] = k0 + i < K ? code_at(qcodes, Bits, idx0 + i) : 0u;
        sc[u] = nb + u < n_end ? 1.f : 0.f;  // per-element scales below
      }
#pragma unroll
      for (int m = 0; m < MT; ++m)
        gv[u][m] = m < M ? to_float(g[static_cast<int64_t>(m) * N + n]) : 0.f;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t idx0 = static_cast<int64_t>(min(nb + u, n_end - 1)) * K + k0;
      float w[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        w[i] = lut[code[u][i]];
        if (!aligned8)  // ragged K: each element's own block scale (or 0 past K / the split)
          w[i] = __fmul_rn(w[i], k0 + i < K ? __fmul_rn(sc[u], scales[(idx0 + i) >> log2_b0])
                                            : 0.f);
      }
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        const float gs = aligned8 ? __fmul_rn(gv[u][m], sc[u]) : gv[u][m];
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[m][i] = fmaf(w[i], gs, acc[m][i]);
      }
    }
  }
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    if (m >= M) break;
    float* dst = partial + (static_cast<int64_t>(split) * M + m) * K + k0;
#pragma unroll
    for (int i = 0; i < 8; ++i)
      if (k0 + i < K) dst[i] = acc[m][i];
  }
}

// out[m, k] = sum_s partial[s, m, k] in split order (fp32, __fadd_rn), cast to GT: the same
// bits on every device and schedule. One thread per output element.
template <typename GT>
__global__ void __launch_bounds__(256)
    qmatmul_t_reduce_kernel(const float* __restrict__ partial, int splits, int64_t mk,
                            GT* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= mk) return;
  float v = partial[i];
  for (int s = 1; s < splits; ++s) v = __fadd_rn(v, partial[s * mk + i]);
  out[i] = from_float<GT>(v);
}

int column_blocks(int64_t cols) {
  return static_cast<int>(ceil_div<int64_t>(cols, 8 * kTThreads));
}

}  // namespace

int qmatmul_t_splits(int64_t rows, int64_t cols, int M) {
  (void)M;
  const int sms = device_sm_count();
  // Four blocks per SM, at most 64 splits (bounds the partial buffer to 64 * M * K floats)
  // and at least 32 rows per split (so each thread has a few unrolled row batches).
  const int want = ceil_div(4 * sms, column_blocks(cols));
  const int64_t max_by_rows = std::max<int64_t>(1, rows / 32);
  return static_cast<int>(std::clamp<int64_t>(want, 1, std::min<int64_t>(64, max_by_rows)));
}

cudaError_t launch_qmatmul_t_small(const void* g, DType g_dtype, int M, const PackedView& w,
                                   const float* scales, int splits, float* partial, void* out,
                                   cudaStream_t stream) {
  if (M <= 0) return cudaSuccess;
  if (M > kSmallM) return cudaErrorInvalidValue;
  const int N = static_cast<int>(w.rows), K = static_cast<int>(w.cols);
  const int rows_per_split = static_cast<int>(ceil_div<int64_t>(N, splits));
  const dim3 grid(column_blocks(K), splits);
  const int log2_b0 = ilog2(w.block_size);
  const int64_t mk = static_cast<int64_t>(M) * K;
  return LQ_CUDA_DTYPE_SWITCH(g_dtype, GT, [&] {
    cudaError_t err = LQ_CUDA_BITS_SWITCH(w.bits, [&] {
      const GT* gp = static_cast<const GT*>(g);
      if (M == 1)
        LQ_LAUNCH(grid, kTThreads, 0, stream, qmatmul_t_kernel<kBits, GT, 1>)(
            gp, M, N, K, w.qcodes, scales, w.levels, log2_b0, rows_per_split, partial);
      else if (M <= 4)
        LQ_LAUNCH(grid, kTThreads, 0, stream, qmatmul_t_kernel<kBits, GT, 4>)(
            gp, M, N, K, w.qcodes, scales, w.levels, log2_b0, rows_per_split, partial);
      else
        LQ_LAUNCH(grid, kTThreads, 0, stream, qmatmul_t_kernel<kBits, GT, kSmallM>)(
            gp, M, N, K, w.qcodes, scales, w.levels, log2_b0, rows_per_split, partial);
      return cudaGetLastError();
    });
    if (err != cudaSuccess) return err;
    const unsigned rgrid = static_cast<unsigned>(ceil_div<int64_t>(mk, 256));
    LQ_LAUNCH(rgrid, 256, 0, stream, qmatmul_t_reduce_kernel<GT>)(partial, splits, mk,
                                                                  static_cast<GT*>(out));
    return cudaGetLastError();
  });
}

}  // namespace lqlora::cuda

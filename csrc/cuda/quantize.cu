// CUDA quantizer: dense fp32 -> packed NFTensor, bit-exact with csrc/cpu/quantize.cpp
// (docs/format.md). Five small launches on one stream (the first on its own, so that the glue
// can check its output for NaN/Inf); quantization is an offline step, so the kernels favour
// obvious correctness over the last microsecond:
//   1. absmax_kernel      s1[j] = max |w| over block j                (one thread per element)
//   2. offset_kernel      offset = min_j s1[j]                         (one block)
//   3. group_kernel       c[g] = rnd_d1(max (s1 - offset) over group) (one thread per group)
//   4. scale_code_kernel  qs[j], ŝ[j], qscales packed                 (one thread per scale)
//   5. code_kernel        codes, qcodes packed                        (one thread per element)
// Packing (4, 5): one warp = one 32-code group; each word is a warp-wide OR reduction.
#include <cfloat>

#include "common.cuh"

namespace lqlora::cuda {
namespace {

constexpr int kThreads = 256;

// s1[j] = max |w[i]| over block j = [j*B0, min((j+1)*B0, n)).
//   w: fp32 [n]; s1: fp32 [nblocks]; B0 = 1 << log2_b0 (16..256, divides kThreads).
// A thread block covers kThreads consecutive elements = kThreads/B0 whole blocks; max is
// exact, so the reduction order cannot change the result. NaN propagates (nan_max), so the
// glue finds any NaN/Inf of w in s1, at 1/B0 of the bytes.
__device__ __forceinline__ float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

__global__ void __launch_bounds__(kThreads)
    absmax_kernel(const float* __restrict__ w, int64_t n, int log2_b0, float* __restrict__ s1) {
  __shared__ float warp_max[kThreads / 32];
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  float v = i < n ? fabsf(w[i]) : 0.f;
  const int b0 = 1 << log2_b0;
  const int seg = b0 < 32 ? b0 : 32;
  for (int o = seg >> 1; o > 0; o >>= 1) v = nan_max(v, __shfl_xor_sync(kFullMask, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (b0 <= 32) {
    if ((lane & (seg - 1)) == 0 && i < n) s1[i >> log2_b0] = v;
    return;
  }
  if (lane == 0) warp_max[warp] = v;
  __syncthreads();
  const int warps_per_block = b0 >> 5;
  if (static_cast<int>(threadIdx.x) < kThreads / b0) {
    float m = 0.f;
    for (int k = 0; k < warps_per_block; ++k)
      m = nan_max(m, warp_max[threadIdx.x * warps_per_block + k]);
    const int64_t j = (static_cast<int64_t>(blockIdx.x) * kThreads >> log2_b0) + threadIdx.x;
    if (j * b0 < n) s1[j] = m;
  }
}

// offset[0] = min_j s1[j]. One block of 1024 threads (min is exact: order-free).
__global__ void __launch_bounds__(1024)
    offset_kernel(const float* __restrict__ s1, int64_t nblocks, float* __restrict__ offset) {
  __shared__ float part[32];
  float m = FLT_MAX;
  for (int64_t j = threadIdx.x; j < nblocks; j += blockDim.x) m = fminf(m, s1[j]);
  for (int o = 16; o > 0; o >>= 1) m = fminf(m, __shfl_xor_sync(kFullMask, m, o));
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = m;
  __syncthreads();
  if (threadIdx.x < 32) {
    m = part[threadIdx.x];
    for (int o = 16; o > 0; o >>= 1) m = fminf(m, __shfl_xor_sync(kFullMask, m, o));
    if (threadIdx.x == 0) offset[0] = m;
  }
}

template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return to_float(from_float<T>(v));  // RNE, same as c10::BFloat16 / c10::Half
}

// c[g] = max(s1[j] - offset) over group g, rounded to ScaleT; written as ScaleT (scale2) and
// as the rounded fp32 value (c32, read back by scale_code_kernel).
template <typename ScaleT>
__global__ void __launch_bounds__(kThreads)
    group_kernel(const float* __restrict__ s1, int64_t nblocks, int log2_b1,
                 const float* __restrict__ offset, int64_t ngroups, ScaleT* __restrict__ scale2,
                 float* __restrict__ c32) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= ngroups) return;
  const float o = offset[0];
  const int64_t j1 = min(nblocks, (g + 1) << log2_b1);
  float c = 0.f;
  for (int64_t j = g << log2_b1; j < j1; ++j) {
    const float v = __fsub_rn(s1[j], o);
    c = (c < v) ? v : c;  // std::max(c, v)
  }
  const float cr = round_to<ScaleT>(c);
  scale2[g] = from_float<ScaleT>(cr);
  c32[g] = cr;
}

// qs[j] = clamp(rint(((s1[j] - o) * L) / c[g]), 0, L) (0 when c[g] == 0), packed into qscales
// (scale_bits-wide codes); shat[j] = (qs * c[g]) / L + o. Threads cover ceil(nblocks/32)*32
// scales so every warp owns one whole 32-code group (padding codes are 0).
__global__ void __launch_bounds__(kThreads)
    scale_code_kernel(const float* __restrict__ s1, int64_t nblocks, int log2_b1,
                      const float* __restrict__ offset, const float* __restrict__ c32,
                      int scale_bits, uint32_t* __restrict__ qscales, float* __restrict__ shat) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int lane = threadIdx.x & 31;
  const float Lq = static_cast<float>((1 << scale_bits) - 1);
  uint32_t code = 0;
  if (j < nblocks) {
    const float o = offset[0];
    const float cg = c32[j >> log2_b1];
    float q = 0.f;
    if (cg != 0.f) {
      q = rintf(__fdiv_rn(__fmul_rn(__fsub_rn(s1[j], o), Lq), cg));  // nearbyint: RNE
      q = (q < 0.f) ? 0.f : q;                                          // std::max(q, 0.f)
      q = (Lq < q) ? Lq : q;                                            // std::min(q, Lq)
    }
    code = static_cast<uint32_t>(q);
    shat[j] = __fadd_rn(__fdiv_rn(__fmul_rn(q, cg), Lq), o);
  }
  const uint32_t word = warp_pack(code, scale_bits, lane);
  if (lane < scale_bits && (j >> 5) < ceil_div<int64_t>(nblocks, 32))
    qscales[(j >> 5) * scale_bits + lane] = word;
}

// code[i] = #{m : mid[m] < w[i] / shat[i / B0]} (x = 0 when shat == 0), computed with the
// exact steps of std::lower_bound over mid[m] = (level[m] + level[m+1]) / 2, packed into
// qcodes. Threads cover ceil(n/32)*32 elements (one warp per 32-code group, padding = 0).
__global__ void __launch_bounds__(kThreads)
    code_kernel(const float* __restrict__ w, int64_t n, int log2_b0,
                const float* __restrict__ shat, const float* __restrict__ levels, int bits,
                uint32_t* __restrict__ qcodes) {
  __shared__ float mids[255];
  const int nmid = (1 << bits) - 1;
  for (int m = threadIdx.x; m < nmid; m += blockDim.x)
    mids[m] = __fdiv_rn(__fadd_rn(levels[m], levels[m + 1]), 2.f);
  __syncthreads();
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int lane = threadIdx.x & 31;
  uint32_t code = 0;
  if (i < n) {
    const float s = shat[i >> log2_b0];
    const float x = s == 0.f ? 0.f : __fdiv_rn(w[i], s);
    int first = 0, len = nmid;  // libstdc++ __lower_bound, step for step
    while (len > 0) {
      const int half = len >> 1, mid = first + half;
      if (mids[mid] < x) {
        first = mid + 1;
        len = len - half - 1;
      } else {
        len = half;
      }
    }
    code = static_cast<uint32_t>(first);
  }
  const uint32_t word = warp_pack(code, bits, lane);
  if (lane < bits && (i >> 5) < ceil_div<int64_t>(n, 32)) qcodes[(i >> 5) * bits + lane] = word;
}

unsigned blocks_for(int64_t threads) {
  return static_cast<unsigned>(ceil_div<int64_t>(threads, kThreads));
}

}  // namespace

cudaError_t launch_quantize_absmax(const float* w, int64_t n, int block_size, float* ws_s1,
                                   cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  LQ_LAUNCH(blocks_for(n), kThreads, 0, stream, absmax_kernel)(w, n, ilog2(block_size), ws_s1);
  return cudaGetLastError();
}

cudaError_t launch_quantize(const float* w, int64_t rows, int64_t cols, const float* levels,
                            int bits, int block_size, int scale_bits, int scale_block_size,
                            DType scale_dtype, uint32_t* qcodes, uint32_t* qscales, void* scale2,
                            float* offset, const float* ws_s1, float* ws_c, float* ws_shat,
                            cudaStream_t stream) {
  const int64_t n = rows * cols;
  if (n <= 0) return cudaSuccess;
  const int log2_b0 = ilog2(block_size), log2_b1 = ilog2(scale_block_size);
  const int64_t nblocks = ceil_div<int64_t>(n, block_size);
  const int64_t ngroups = ceil_div<int64_t>(nblocks, scale_block_size);

  LQ_LAUNCH(1, 1024, 0, stream, offset_kernel)(ws_s1, nblocks, offset);
  cudaError_t err = LQ_CUDA_DTYPE_SWITCH(scale_dtype, ScaleT, [&] {
    LQ_LAUNCH(blocks_for(ngroups), kThreads, 0, stream, group_kernel<ScaleT>)(
        ws_s1, nblocks, log2_b1, offset, ngroups, static_cast<ScaleT*>(scale2), ws_c);
    return cudaGetLastError();
  });
  if (err != cudaSuccess) return err;
  const unsigned scale_grid = blocks_for(ceil_div<int64_t>(nblocks, 32) * 32);
  const unsigned code_grid = blocks_for(ceil_div<int64_t>(n, 32) * 32);
  LQ_LAUNCH(scale_grid, kThreads, 0, stream, scale_code_kernel)(
      ws_s1, nblocks, log2_b1, offset, ws_c, scale_bits, qscales, ws_shat);
  LQ_LAUNCH(code_grid, kThreads, 0, stream, code_kernel)(
      w, n, log2_b0, ws_shat, levels, bits, qcodes);
  return cudaGetLastError();
}

}  // namespace lqlora::cuda

// The LoRA term of the fused qmatmul kernels, computed in the same launch as the base product:
//     out[m, n] += scale * sum_j t[m, j] * b[n, j],   t = x @ a^T  (fp32 [M, rank]).
// t needs all of K, so no block computing a few output rows can make it alone. The first
// `producers` blocks of the grid compute t (each kLoraJ columns of one 16-row M tile) and
// release a counter; the other blocks do the base product and, only in their epilogue, acquire
// the counter and add the term for their rows. The producers are the lowest block indices, so
// the hardware dispatches them first and the consumers' wait (after all their weight work) is
// short or nothing; the counter is zeroed on the stream before the launch (one memset node
// in a CUDA graph), which keeps the launch capturable and free of host synchronization.
// Replaces a separate down-projection launch (64 blocks with a serial k-loop) and a serial
// per-output epilogue: the up-projection is lane-parallel (CUDA cores) or an MMA (tensor
// cores).
#pragma once
#include "common.cuh"
#include "ptx.cuh"

namespace lqlora::cuda {

constexpr int kLoraJ = 4;  // columns of t per producer block

struct LoraFused {
  const void* a;    // [rank, K], a_dtype, contiguous
  DType a_dtype;
  const void* b;    // [N, rank], b_dtype, contiguous
  DType b_dtype;
  int rank;
  float scale;
  float* t;         // workspace fp32 [M, rank]
  int* ready;       // workspace int [1]: producer blocks done; zero at launch
  int producers;    // blocks [0, producers) compute t; 0 = no LoRA term
};

inline int lora_producers(int rank, int M) {
  return ceil_div(rank, kLoraJ) * ceil_div(M, kSmallM);
}

// Producer block `pb`: t[m, j] for its 16 rows of x and kLoraJ columns, one warp per column
// (lanes over k, fp32), then the release. Every thread of the block calls it.
template <typename XT>
__device__ __forceinline__ void lora_produce(const LoraFused& l, const XT* __restrict__ x, int M,
                                             int K, int pb) {
  const int jt = ceil_div(l.rank, kLoraJ);
  const int j0 = (pb % jt) * kLoraJ, m0 = (pb / jt) * kSmallM;
  const int Mt = min(kSmallM, M - m0);
  const int tid = static_cast<int>(threadIdx.x + blockDim.x * threadIdx.y);
  const int lane = tid & 31, warp = tid >> 5, warps = static_cast<int>(blockDim.x * blockDim.y) >> 5;
  for (int jj = warp; jj < kLoraJ; jj += warps) {
    const int j = j0 + jj;
    if (j >= l.rank) break;  // warp-uniform
    float acc[kSmallM];
#pragma unroll
    for (int m = 0; m < kSmallM; ++m) acc[m] = 0.f;
    for (int k = lane; k < K; k += 32) {
      const float av = load_as_float(l.a, l.a_dtype, static_cast<int64_t>(j) * K + k);
#pragma unroll
      for (int m = 0; m < kSmallM; ++m)
        if (m < Mt) acc[m] = fmaf(av, to_float(x[static_cast<int64_t>(m0 + m) * K + k]), acc[m]);
    }
#pragma unroll
    for (int m = 0; m < kSmallM; ++m) {
      const float v = warp_sum(acc[m]);
      if (lane == 0 && m < Mt) l.t[(m0 + m) * l.rank + j] = v;
    }
  }
  __syncthreads();
  if (tid == 0) {
    __threadfence();
    ptx::red_add_release_gpu(l.ready, 1);
  }
}

// Waits until every producer block has released. One thread calls it; the block (or warp)
// synchronizes after, and reads t through L2 (__ldcg).
__device__ __forceinline__ void lora_wait(const LoraFused& l) {
  while (ptx::ld_acquire_gpu(l.ready) < l.producers) __nanosleep(64);
}

// sum_j t[m, j] * b[n, j] with the 32 lanes of a warp over j and a shuffle tree: the same
// value in every lane. All lanes call it.
__device__ __forceinline__ float lora_dot(const LoraFused& l, int m, int64_t n) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  float s = 0.f;
  for (int j = lane; j < l.rank; j += 32)
    s = fmaf(__ldcg(l.t + m * l.rank + j), load_as_float(l.b, l.b_dtype, n * l.rank + j), s);
  return warp_sum(s);
}

}  // namespace lqlora::cuda

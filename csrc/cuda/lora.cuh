// The LoRA term of the fused qmatmul kernels, computed in the same launch as the base product:
//     out[m, n] += scale * sum_j t[m, j] * b[n, j],   t = x @ a^T  (fp32 [M, rank]).
// t needs all of K, so no block computing a few output rows can make it alone. The first
// `producers` blocks of the grid compute t and release a counter; the other blocks do the
// base product and, only in their epilogue, acquire the counter and add the term for their
// rows. The producers are the lowest block indices, so the hardware dispatches them first and
// the consumers' wait (after all their weight work) is short or nothing; the counters are
// zeroed on the stream before the launch (one memset node in a CUDA graph), which keeps the
// launch capturable and free of host synchronization.
//
// A tile of t (kLoraJ columns of one 16-row M tile) is split over K into `kslices` producer
// blocks: one block walking all of K with dependent loads would take longer than the whole
// base product (the latency of K / 32 load round trips per warp). Each slice writes its
// partial sums to its own workspace plane; the slice that finishes last (a ticket per tile)
// adds the planes in slice order - the same bits whichever block is last - into t and
// releases the tile. Replaces a separate down-projection launch and a serial per-output
// epilogue: the up-projection is lane-parallel (CUDA cores) or an MMA (tensor cores).
#pragma once
#include "common.cuh"
#include "ptx.cuh"

namespace lqlora::cuda {

static_assert(kLoraTileM == kSmallM, "a LoRA tile is one 16-row M tile");

struct LoraFused {
  const void* a;    // [rank, K], a_dtype, contiguous
  DType a_dtype;
  const void* b;    // [N, rank], b_dtype, contiguous
  DType b_dtype;
  int rank;
  float scale;
  float* t;         // workspace fp32 [1 + kslices, M, rank]: t, then one plane per K slice
  int* ready;       // workspace int [1 + tiles]: tiles released, then each tile's ticket; zero
  int tiles;        // lora_tiles(rank, M)
  int kslices;      // lora_k_slices(K)
  int producers;    // blocks [0, producers) = tiles * kslices compute t; 0 = no LoRA term
};

inline LoraFused lora_fused(const LoraView& v, int M, int K) {
  const int tiles = lora_tiles(v.rank, M), slices = lora_k_slices(K);
  return LoraFused{v.a, v.a_dtype, v.b, v.b_dtype, v.rank, v.scale, v.t, v.ready,
                   tiles, slices, tiles * slices};
}

// Producer block `pb`: the partial t[m, j] over its K slice for the 16 rows of x and kLoraJ
// columns of its tile, one warp per column (lanes over k, 4 independent loads in flight per
// lane and step, fp32); then the tile's ticket, and the last slice's ordered sum and release.
// Every thread of the block calls it.
template <typename XT>
__device__ __forceinline__ void lora_produce(const LoraFused& l, const XT* __restrict__ x, int M,
                                             int K, int pb) {
  constexpr int kU = 4;
  const int tile = pb % l.tiles, slice = pb / l.tiles;
  const int jt = ceil_div(l.rank, kLoraJ);
  const int j0 = (tile % jt) * kLoraJ, m0 = (tile / jt) * kSmallM;
  const int Mt = min(kSmallM, M - m0);
  const int chunk = ceil_div(ceil_div(K, l.kslices), 32) * 32;
  const int k_begin = min(K, slice * chunk), k_end = min(K, k_begin + chunk);
  const int64_t plane = static_cast<int64_t>(M) * l.rank;
  float* part = l.kslices == 1 ? l.t : l.t + (1 + slice) * plane;
  const int tid = static_cast<int>(threadIdx.x + blockDim.x * threadIdx.y);
  const int nthreads = static_cast<int>(blockDim.x * blockDim.y);
  const int lane = tid & 31, warp = tid >> 5, warps = nthreads >> 5;
  for (int jj = warp; jj < kLoraJ; jj += warps) {
    const int j = j0 + jj;
    if (j >= l.rank) break;  // warp-uniform
    const int64_t arow = static_cast<int64_t>(j) * K;
    float acc[kSmallM];
#pragma unroll
    for (int m = 0; m < kSmallM; ++m) acc[m] = 0.f;
    for (int k = k_begin + lane; k < k_end; k += kU * 32) {
      float av[kU];
#pragma unroll
      for (int u = 0; u < kU; ++u)
        av[u] = k + 32 * u < k_end ? load_as_float(l.a, l.a_dtype, arow + k + 32 * u) : 0.f;
#pragma unroll
      for (int m = 0; m < kSmallM; ++m) {
        if (m >= Mt) break;
        const XT* xr = x + static_cast<int64_t>(m0 + m) * K + k;
#pragma unroll
        for (int u = 0; u < kU; ++u)
          if (k + 32 * u < k_end) acc[m] = fmaf(av[u], to_float(xr[32 * u]), acc[m]);
      }
    }
#pragma unroll
    for (int m = 0; m < kSmallM; ++m) {
      const float v = warp_sum(acc[m]);
      if (lane == 0 && m < Mt) part[(m0 + m) * l.rank + j] = v;
    }
  }
  if (l.kslices > 1) {
    __syncthreads();
    int last = 0;
    if (tid == 0) {
      __threadfence();  // this slice's plane before its ticket
      last = atomicAdd(l.ready + 1 + tile, 1) == l.kslices - 1;
    }
    if (!__syncthreads_or(last)) return;
    __threadfence();  // every other slice's plane (their fence preceded their ticket)
    for (int idx = tid; idx < Mt * kLoraJ; idx += nthreads) {
      const int m = m0 + idx / kLoraJ, j = j0 + idx % kLoraJ;
      if (j >= l.rank) continue;
      float v = 0.f;
      for (int s = 0; s < l.kslices; ++s)  // slice order: the same sum whichever block is last
        v = __fadd_rn(v, __ldcg(l.t + (1 + s) * plane + m * l.rank + j));
      l.t[m * l.rank + j] = v;
    }
  }
  __syncthreads();
  if (tid == 0) {
    __threadfence();
    ptx::red_add_release_gpu(l.ready, 1);
  }
}

// Waits until every tile of t has been released. One thread calls it; the block (or warp)
// synchronizes after, and reads t through L2 (__ldcg).
__device__ __forceinline__ void lora_wait(const LoraFused& l) {
  while (ptx::ld_acquire_gpu(l.ready) < l.tiles) __nanosleep(64);
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

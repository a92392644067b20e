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

// One column j of a tile over one K slice: part[m, j] for rows [m0, m0 + Mt) of x, in
// groups of RG rows (a runtime loop over groups, so the registers the producer path needs
// - RG accumulators, kU a values, RG * kU x values - stay below the weight path's and the
// kernel keeps its occupancy); lanes over k with kU independent loads in flight per lane.
// All lanes of the warp call it.
template <typename XT, typename AT, int RG>
__device__ __forceinline__ void lora_column(const AT* __restrict__ arow, const XT* __restrict__ x,
                                            int K, int m0, int Mt, int k_begin, int k_end,
                                            float* part, int rank, int j, int lane) {
  constexpr int kU = 4;
  for (int mg = 0; mg < Mt; mg += RG) {
    float acc[RG];
#pragma unroll
    for (int r = 0; r < RG; ++r) acc[r] = 0.f;
    for (int k = k_begin + lane; k < k_end; k += kU * 32) {
      float av[kU];
#pragma unroll
      for (int u = 0; u < kU; ++u) av[u] = k + 32 * u < k_end ? to_float(arow[k + 32 * u]) : 0.f;
#pragma unroll
      for (int r = 0; r < RG; ++r) {
        if (mg + r >= Mt) break;  // warp-uniform
        const XT* xr = x + static_cast<int64_t>(m0 + mg + r) * K + k;
#pragma unroll
        for (int u = 0; u < kU; ++u)
          if (k + 32 * u < k_end) acc[r] = fmaf(av[u], to_float(xr[32 * u]), acc[r]);
      }
    }
#pragma unroll
    for (int r = 0; r < RG; ++r) {
      const float v = warp_sum(acc[r]);
      if (lane == 0 && mg + r < Mt) part[(m0 + mg + r) * rank + j] = v;
    }
  }
}

// Producer block `pb`: the partial t[m, j] over its K slice for the (at most MR <= 16) rows
// of x of its tile and its kLoraJ columns, one warp per column (lora_column, fp32); then the
// tile's ticket, and the last slice's ordered sum and release. MR is the kernel's bound on
// M (1 for the M = 1 decode kernel): fewer registers for the path it never takes. Every
// thread of the block calls it.
template <int MR, typename XT>
__device__ __forceinline__ void lora_produce(const LoraFused& l, const XT* __restrict__ x, int M,
                                             int K, int pb) {
  static_assert(MR >= 1 && MR <= kSmallM, "rows per LoRA tile");
  constexpr int RG = MR < 4 ? MR : 4;
  const int tile = pb % l.tiles, slice = pb / l.tiles;
  const int jt = ceil_div(l.rank, kLoraJ);
  const int j0 = (tile % jt) * kLoraJ, m0 = (tile / jt) * kSmallM;
  const int Mt = min(MR, M - m0);
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
    switch (l.a_dtype) {  // uniform: the loads typed once, outside the k-loop
      case DType::kFloat16:
        lora_column<XT, __half, RG>(static_cast<const __half*>(l.a) + arow, x, K, m0, Mt,
                                    k_begin, k_end, part, l.rank, j, lane);
        break;
      case DType::kBFloat16:
        lora_column<XT, __nv_bfloat16, RG>(static_cast<const __nv_bfloat16*>(l.a) + arow, x, K,
                                           m0, Mt, k_begin, k_end, part, l.rank, j, lane);
        break;
      default:
        lora_column<XT, float, RG>(static_cast<const float*>(l.a) + arow, x, K, m0, Mt,
                                   k_begin, k_end, part, l.rank, j, lane);
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

// qmatmul on tensor cores, 16-bit activations, 1 <= M <= kMmaMaxM: out[M, N] = x[M, K] @ W^T,
// W [N, K] packed (docs/format.md), K % 32 == 0. Each weight is decoded once per block into
// the B fragment of mma.sync.m16n8k16 (fp32 accumulation) and multiplied with every M tile, so
// the decode cost no longer scales with M as it does in the CUDA-core kernel (~40 instructions
// per weight and lane at M = 16 there, ~3.5 here).
//
// The k permutation. A dot product does not care in which order its k terms are summed, so
// the 16 k-slots of each MMA may hold any 16 k indices, as long as A and B agree. Lane
// (g = lane/4, t = lane%4) owns the 32-code group gq(t) = 4c + t of its chunk c (128 k per
// chunk) for row n = 8j + g of n-tile j: one vector load per group, as in the decode kernel,
// and the quad's 4 groups are 4*Bits*4 contiguous bytes of the row. MMA step s (0..7) of the
// chunk maps
//     slots 2t, 2t+1    -> k = 32*gq(t) + 4s + {0, 1}
//     slots 2t+8, 2t+9  -> k = 32*gq(t) + 4s + {2, 3}
// so that lane t's B registers are codes 4s..4s+3 of its own group (compile-time positions for
// every bit width) and its A registers are x[m][32*gq(t) + 4s .. +3], 8 contiguous bytes, for
// rows m = g and g + 8 of each 16-row M tile (two 16-byte loads cover two steps).
//
// Numerics: a B element is from_float<XT>(level[code] * ŝ) in fp32, i.e. exactly what
// dequantize(dtype = x.dtype) produces, and the MMA accumulates in fp32: the result is x @
// dequantize(W, x.dtype)^T with fp32 accumulation, the same numbers the large-M path (dequantize
// + cuBLAS) computes, up to summation order.
//
// Tiling: MT16 M tiles of 16 rows (M <= 16 * MT16), NT n-tiles of 8 rows per warp (register
// budget: NT * MT16 * 4 accumulators), WK warps per block splitting K (their partial sums meet
// in shared memory once per block).
#pragma once
#include <type_traits>

#include "common.cuh"
#include "ptx.cuh"
#include "lora.cuh"
#include "qmatmul_kernels.cuh"

namespace lqlora::cuda {

constexpr int kMmaWarps = 4;  // warps per block along K (kMmaMinM, kMmaMaxM: launch.h)

template <int MT16>
struct MmaTraits {
  static_assert(MT16 == 1 || MT16 == 2 || MT16 == 4 || MT16 == 8, "M tiles: 1, 2, 4 or 8");
  static constexpr int NT = MT16 <= 2 ? 4 : (MT16 == 4 ? 2 : 1);  // n-tiles per warp
  static constexpr int kRowsPerBlock = 8 * NT;
  // Most warps per block along K (mma_warps): 8 for one M tile. With more M tiles ptxas
  // spills under the 8-warp launch bound and the cost model has M = 64 slower.
  static constexpr int kMaxWarps = MT16 == 1 ? 2 * kMmaWarps : kMmaWarps;
};

// Blocks of MmaTraits::kMaxWarps warps per SM that the register budget must allow
// (__launch_bounds__' second argument). Left alone, ptxas gives most instances 210-250
// registers, i.e. 2 blocks per SM. One M tile, NF2-NF5: 2 blocks of 8 warps (128
// registers). Two M tiles: 3 blocks of 4 warps (168) up to NF6. Four: 4 blocks (128) up to
// NF4, 3 above. Wider codes unpack more bits and keep the default. Under these budgets a
// few instances keep a handful of spilled words in the chunk loop (NF4 with four M tiles:
// 7 local accesses per chunk); the SASS cost model counts them, and the occupancy is worth
// more (`bench/sass_cost_model.py --check-spills` lists them).
template <int Bits, int MT16>
inline constexpr int kMmaMinBlocks = MT16 == 1   ? (Bits <= 5 ? 2 : 1)
                                     : MT16 == 2 ? (Bits <= 6 ? 3 : 1)
                                                 : (Bits <= 4 ? 4 : 3);

// Two XT values -> one 32-bit MMA operand register (lower k in the low half).
template <typename XT>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t ua, ub;
  if constexpr (std::is_same_v<XT, __nv_bfloat16>) {
    ua = __bfloat16_as_ushort(__float2bfloat16_rn(lo));
    ub = __bfloat16_as_ushort(__float2bfloat16_rn(hi));
  } else {
    ua = __half_as_ushort(__float2half_rn(lo));
    ub = __half_as_ushort(__float2half_rn(hi));
  }
  return ua | (ub << 16);
}

//   x      : XT [M, K] contiguous, 16-byte aligned     out: XT [M, N]
//   qcodes : uint32 [N*K/32 * Bits], 16-byte aligned  (group of (n, q) = n*K/32 + q)
//   sa, offset, levels, log2_b0: as qmatmul_fast_kernel
//   lora   : the fused LoRA term (lora.cuh); its up-projection is a second, small MMA
// Grid: lora.producers + ceil(N / (8*NT)) blocks of (32, WK) threads.
template <int Bits, typename XT, int MT16>
__global__ void __launch_bounds__(32 * MmaTraits<MT16>::kMaxWarps, kMmaMinBlocks<Bits, MT16>)
    qmatmul_mma_kernel(const XT* __restrict__ x, int M, int K, int N,
                       const uint32_t* __restrict__ qcodes, ScaleArgs sa,
                       const float* __restrict__ offset, const float* __restrict__ levels,
                       int log2_b0, LoraFused lora, XT* __restrict__ out) {
  using Tr = MmaTraits<MT16>;
  constexpr int NT = Tr::NT;
  constexpr int kLevels = 1 << Bits;
  __shared__ __align__(kLutAlign<Bits>) float lut[kLevels];
  __shared__ float red[Tr::kMaxWarps - 1][NT][MT16][32][4];

  const int lane = threadIdx.x, wk = threadIdx.y, WK = blockDim.y;
  const int g = lane >> 2, t = lane & 3;
  for (int i = wk * 32 + lane; i < kLevels; i += 32 * WK) lut[i] = levels[i];
  __syncthreads();
  const int bid = static_cast<int>(blockIdx.x);
  if (bid < lora.producers) {  // the LoRA down-projection (lora.cuh)
    lora_produce<kSmallM>(lora, x, M, K, bid);
    return;
  }

  const int G = K >> 5;                                    // groups per row
  const int chunks = ceil_div(G, 4);                       // 4 groups (128 k) per chunk
  const int per_warp = ceil_div(chunks, WK);
  const int c_begin = wk * per_warp, c_end = min(chunks, c_begin + per_warp);
  const int n0 = (bid - lora.producers) * Tr::kRowsPerBlock;
  const float o = offset[0];

  int row_group[NT];  // first group of row n0 + 8j + g (rows past N clamp: never stored)
#pragma unroll
  for (int j = 0; j < NT; ++j) row_group[j] = min(n0 + 8 * j + g, N - 1) * G;

  float acc[NT][MT16][4];
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int i = 0; i < MT16; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[j][i][e] = 0.f;

  // x rows of the lane's A fragments: rows m = 16i + g + 8r, clamped to M - 1. A row of A
  // only reaches the same row of the accumulator, and rows >= M are never stored, so the
  // clamped rows need no zeroing (and no branch per load).
  const XT* xrow[MT16][2];
#pragma unroll
  for (int i = 0; i < MT16; ++i)
#pragma unroll
    for (int r = 0; r < 2; ++r)
      xrow[i][r] = x + static_cast<int64_t>(min(16 * i + g + 8 * r, M - 1)) * K;

  // Software pipeline, one chunk deep: the packed words and raw scale codes of chunk c + 1
  // are loaded before chunk c is decoded and multiplied, so their DRAM/L2 latency hides
  // behind a chunk's ~1000 instructions instead of stalling every chunk; the scales are
  // finished (the arithmetic of decode_scale) once the next chunk's loads are in flight.
  // Lanes past the row's last group (a chunk of < 4 groups, K % 128 != 0) load the row's
  // last group, a valid address, and get scale 0 and zero activations.
  uint32_t w[NT][Bits], wn[NT][Bits];
  ScaleRaw raw_lo[NT], raw_hi[NT];
  const bool split = log2_b0 == 4;  // B0 = 16: a group's second half has its own scale
  // Pairs: with B0 >= 64 and an even group count per row, lanes t and t^1 (groups 4c + t
  // of one row, an even first index) always fall in the same scale block, so each lane of
  // the pair decodes the scales of half the n-tiles (j = 2i + (t & 1)) and takes the other
  // half from its partner with one shuffle: half the scale loads and arithmetic, which at
  // M = 16 are a sixth of the chunk loop. Warp-uniform.
  const bool pair = log2_b0 >= 6 && (G & 1) == 0;
  const bool odd = (t & 1) != 0;
  int pair_group[NT / 2];  // the row of n-tile 2i + (t & 1)
#pragma unroll
  for (int i = 0; i < NT / 2; ++i) pair_group[i] = odd ? row_group[2 * i + 1] : row_group[2 * i];
  auto fetch = [&](int c, uint32_t (&wd)[NT][Bits]) {
    const int qc = min(4 * c + t, G - 1);
#pragma unroll
    for (int j = 0; j < NT; ++j)
      load_group<Bits>(qcodes + static_cast<int64_t>(row_group[j] + qc) * Bits, wd[j]);
    if (pair) {
#pragma unroll
      for (int i = 0; i < NT / 2; ++i)
        raw_lo[i] = load_scale_raw(sa, static_cast<uint32_t>(pair_group[i] + qc) * 32u >> log2_b0);
    } else {
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const uint32_t j0 = static_cast<uint32_t>(row_group[j] + qc) * 32u >> log2_b0;
        raw_lo[j] = load_scale_raw(sa, j0);
        if (split) raw_hi[j] = load_scale_raw(sa, j0 + 1);  // groups are full: it exists
      }
    }
  };
  // Scales of inactive lanes are computed from a valid (clamped) group and then zeroed by a
  // select, not skipped by a branch. The pair shuffles run in every mode, outside the
  // mode's branches, so that they stay plain warp-wide shuffles.
  float s_lo[NT], s_hi[NT];
  auto finish = [&](int c) {
    const bool active = 4 * c + t < G;
    float v[NT], vh[NT];
#pragma unroll
    for (int j = 0; j < NT / 2; ++j) v[j] = finish_scale(sa, raw_lo[j], o);
    if (!pair) {
#pragma unroll
      for (int j = NT / 2; j < NT; ++j) v[j] = finish_scale(sa, raw_lo[j], o);
    }
#pragma unroll
    for (int j = 0; j < NT; ++j) vh[j] = v[j];
    if (split) {
#pragma unroll
      for (int j = 0; j < NT; ++j) vh[j] = finish_scale(sa, raw_hi[j], o);
    }
#pragma unroll
    for (int i = 0; i < NT / 2; ++i) {
      const float other = __shfl_xor_sync(kFullMask, v[i], 1);
      const float even = pair ? (odd ? other : v[i]) : v[2 * i];
      const float odd_j = pair ? (odd ? v[i] : other) : v[2 * i + 1];
      // Non-pair mode reads v[2i], v[2i + 1] directly, pair mode only v[0 .. NT/2).
      s_lo[2 * i] = active ? even : 0.f;
      s_lo[2 * i + 1] = active ? odd_j : 0.f;
      s_hi[2 * i] = active ? (pair ? even : vh[2 * i]) : 0.f;
      s_hi[2 * i + 1] = active ? (pair ? odd_j : vh[2 * i + 1]) : 0.f;
    }
  };
  if (c_begin < c_end) {
    fetch(c_begin, w);
    finish(c_begin);
  }
  for (int c = c_begin; c < c_end; ++c) {
    const bool active = 4 * c + t < G;
    const int64_t k0 = static_cast<int64_t>(min(4 * c + t, G - 1)) * 32;
    const bool more = c + 1 < c_end;  // warp-uniform
    if (more) fetch(c + 1, wn);
#pragma unroll
    for (int h = 0; h < 4; ++h) {  // quarter-groups: 8 codes = MMA steps 2h, 2h+1
      // A: x[m][k0 + 8h .. +7] for the lane's two rows of every M tile (zero past G).
      uint4 xa[MT16][2];
#pragma unroll
      for (int i = 0; i < MT16; ++i)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const uint4 v = *reinterpret_cast<const uint4*>(xrow[i][r] + k0 + 8 * h);
          xa[i][r] = active ? v : make_uint4(0u, 0u, 0u, 0u);
        }
      // B: levels of codes 8h..8h+7 of each n-tile's group, scaled, as XT pairs.
      uint32_t b[NT][4];
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        float lv[8];
        lookup8<Bits>(lut, w[j], h, lv);
        const float s = h < 2 ? s_lo[j] : s_hi[j];
#pragma unroll
        for (int e = 0; e < 4; ++e)
          b[j][e] = pack2<XT>(__fmul_rn(lv[2 * e], s), __fmul_rn(lv[2 * e + 1], s));
      }
#pragma unroll
      for (int st = 0; st < 2; ++st) {  // step 2h + st: codes 8h + 4st .. +3
#pragma unroll
        for (int i = 0; i < MT16; ++i) {
          // a[0], a[2]: row g, k-slots (2t, 2t+1) and (2t+8, 2t+9); a[1], a[3]: row g + 8.
          const uint32_t a[4] = {st ? xa[i][0].z : xa[i][0].x, st ? xa[i][1].z : xa[i][1].x,
                                 st ? xa[i][0].w : xa[i][0].y, st ? xa[i][1].w : xa[i][1].y};
#pragma unroll
          for (int j = 0; j < NT; ++j) {
            const uint32_t bb[2] = {b[j][2 * st], b[j][2 * st + 1]};
            ptx::mma_16816<XT>(acc[j][i], a, bb);
          }
        }
      }
    }
    if (more) {
      finish(c + 1);
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int v = 0; v < Bits; ++v) w[j][v] = wn[j][v];
    }
  }

  // Warps 1..WK-1 hand their partial sums to warp 0 (fixed order: deterministic).
  if (wk > 0) {
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int i = 0; i < MT16; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) red[wk - 1][j][i][lane][e] = acc[j][i][e];
  }
  __syncthreads();
  if (wk != 0) return;
  for (int k = 1; k < WK; ++k)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int i = 0; i < MT16; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          acc[j][i][e] = __fadd_rn(acc[j][i][e], red[k - 1][j][i][lane][e]);

  if (lora.producers > 0) {  // acc += scale * t @ b^T, on tensor cores (t rounded to XT)
    if (lane == 0) lora_wait(lora);
    __syncwarp();
    float la[NT][MT16][4];
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int i = 0; i < MT16; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) la[j][i][e] = 0.f;
    auto tv = [&](int m, int jj) {
      return m < M && jj < lora.rank ? __ldcg(lora.t + m * lora.rank + jj) : 0.f;
    };
    auto bv = [&](int n, int jj) {
      return jj < lora.rank
                 ? load_as_float(lora.b, lora.b_dtype, static_cast<int64_t>(n) * lora.rank + jj)
                 : 0.f;
    };
    for (int s0 = 0; s0 < lora.rank; s0 += 16) {  // standard k order: slots 2t.. = s0 + 2t..
      const int c0 = s0 + 2 * t, c8 = c0 + 8;
      uint32_t b[NT][2];
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const int n = min(n0 + 8 * j + g, N - 1);
        b[j][0] = pack2<XT>(bv(n, c0), bv(n, c0 + 1));
        b[j][1] = pack2<XT>(bv(n, c8), bv(n, c8 + 1));
      }
#pragma unroll
      for (int i = 0; i < MT16; ++i) {
        const int m = 16 * i + g;
        const uint32_t a[4] = {pack2<XT>(tv(m, c0), tv(m, c0 + 1)),
                               pack2<XT>(tv(m + 8, c0), tv(m + 8, c0 + 1)),
                               pack2<XT>(tv(m, c8), tv(m, c8 + 1)),
                               pack2<XT>(tv(m + 8, c8), tv(m + 8, c8 + 1))};
#pragma unroll
        for (int j = 0; j < NT; ++j) ptx::mma_16816<XT>(la[j][i], a, b[j]);
      }
    }
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int i = 0; i < MT16; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          acc[j][i][e] = __fadd_rn(acc[j][i][e], __fmul_rn(lora.scale, la[j][i][e]));
  }

#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int i = 0; i < MT16; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int m = 16 * i + g + 8 * (e >> 1), n = n0 + 8 * j + 2 * t + (e & 1);
        if (m >= M || n >= N) continue;
        out[static_cast<int64_t>(m) * N + n] = from_float<XT>(acc[j][i][e]);
      }
}

// The M-tile count for M rows, as a template argument.
#define LQ_MMA_MT16_SWITCH(M, ...)                              \
  [&]() -> cudaError_t {                                        \
    if ((M) <= 16) { constexpr int kMT16 = 1; return __VA_ARGS__(); } \
    if ((M) <= 32) { constexpr int kMT16 = 2; return __VA_ARGS__(); } \
    static_assert(kMmaMaxM == 64, "M tiles up to 4");           \
    constexpr int kMT16 = 4;                                    \
    return __VA_ARGS__();                                       \
  }()

// Warps per block along K for `chunks` 128-k chunks and `blocks` row blocks, at most
// max_warps = MmaTraits::kMaxWarps. kMmaWarps (4) while the grid is big enough; max_warps
// (8) where 4-warp blocks would leave an SM under 8 warps, or under 16 with 8+ chunks per
// warp: the chunk loop is latency-bound there (M = 16, 8192^2 has 256
// blocks; the SASS cost model: 1.51x -> 2.12x on an H100), while with many blocks the
// extra cross-warp sums only cost (N = 11008, K = 4096: -5-12%). At most 4 with the fused
// LoRA term: 8-warp blocks halve the resident blocks, and the consumers would wait for
// the producers' slots.
inline int mma_warps(int chunks, int blocks, bool lora, int sms, int max_warps) {
  if (chunks < 8) return 1;
  if (chunks < 16) return 2;
  const int warps = kMmaWarps * blocks;
  const bool few = warps < 8 * sms || (chunks >= 8 * max_warps && warps < 16 * sms);
  return max_warps > kMmaWarps && chunks >= 4 * max_warps && !lora && few ? max_warps
                                                                         : kMmaWarps;
}

template <typename XT>
cudaError_t launch_qmatmul_mma(const XT* x, int M, const PackedView& w, const LoraFused& la,
                               XT* out, cudaStream_t stream) {
  const int N = static_cast<int>(w.rows), K = static_cast<int>(w.cols);
  const ScaleArgs sa =
      make_scale_args(w.qscales, w.scale2, w.scale2_dtype, w.scale_bits, w.scale_block_size);
  const int chunks = ceil_div(K / 32, 4);
  const int sms = device_sm_count();
  return LQ_CUDA_BITS_SWITCH(w.bits, [&] {
    return LQ_MMA_MT16_SWITCH(M, [&] {
      const int blocks = ceil_div(N, MmaTraits<kMT16>::kRowsPerBlock);
      const dim3 block(32, mma_warps(chunks, blocks, la.producers > 0, sms,
                                     MmaTraits<kMT16>::kMaxWarps));
      const int grid = la.producers + blocks;
      LQ_LAUNCH(grid, block, 0, stream, qmatmul_mma_kernel<kBits, XT, kMT16>)(
          x, M, K, N, w.qcodes, sa, w.offset, w.levels, ilog2(w.block_size), la, out);
      return cudaGetLastError();
    });
  });
}

}  // namespace lqlora::cuda

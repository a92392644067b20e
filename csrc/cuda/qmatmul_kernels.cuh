// qmatmul on CUDA cores (1 <= M <= kSmallM): out[M, N] = x[M, K] @ W^T (+ LoRA), W [N, K]
// packed (docs/format.md), fp32 accumulation, out in x's dtype; the LoRA down-projection.
// qmatmul_dispatch.cuh picks among these and the tensor-core kernel (qmatmul_mma.cuh).
//
// Speed model (H100 SXM, NF4 B0=64 8192x8192, M = 1; estimated from the sm_90a SASS, not
// yet measured): the floor is the weight stream, 32 MiB of codes + 1 MiB of scale codes at
// ~3 TB/s = ~11 us. The inner loop is 481 instructions per 4-row step of 128 weights (per
// weight: 1 byte-permute + 1 shared-memory LUT load + 1 FMA + half a shift/mask, plus the
// bf16 activation widening shared by 4 rows) and the scales add ~1 more per 4 weights, so
// ~4.5 instructions per weight: at 132 SMs x 4 issue slots ~10 us at 1.75 GHz. The LUT
// loads hit distinct banks (16 levels), one 128-byte wavefront per 32 weights: ~9 us of
// shared-memory bandwidth. Both sit just under the memory floor; every choice below exists
// to keep them there:
//  - one lane owns one 32-code group: one 16-byte `ld.global.cs` for NF4, a warp reads
//    512 contiguous bytes per row per step (coalesced), evict-first so x stays in L1;
//  - all weight loads of a step are issued before the first wait (scale loads after them);
//  - each block works on R rows at once, so every activation load/convert is shared by R
//    rows (x traffic through L1 = 2 bytes * M / R per weight for bf16);
//  - NF4 codes are pulled out four at a time with one shift+mask per word half and one
//    byte-permute per code (1.5 integer ops/code instead of 2), the LUT base folds into the
//    load's immediate;
//  - the scale multiplies a 16-weight partial sum (not each weight), and scales are decoded
//    once per 32-scale window per warp (see qmatmul_fast_kernel);
//  - warps of a block split K (blockDim.y = WK), so N = 4096 still puts ~16 warps per SM in
//    flight (80 registers/thread -> up to 24 warps/SM); the cross-warp sum goes through
//    shared memory once per block.
#pragma once
#include <type_traits>

#include "common.cuh"
#include "lora.cuh"
#include "ptx.cuh"

namespace lqlora::cuda {

constexpr int kQmmMaxWarps = 4;  // warps per block along K (blockDim = 32 x WK, WK <= 4)

// The low-rank epilogue: out[m, n] += scale * sum_j t[m, j] * b[n, j].
struct LoraArgs {
  const float* t;  // fp32 [M, rank] = x @ a^T, or nullptr for no LoRA term
  const void* b;   // [N, rank], b_dtype
  DType b_dtype;
  int rank;
  float scale;
};

__device__ __forceinline__ float lora_term(const LoraArgs& l, int m, int64_t n) {
  float s = 0.f;
  for (int j = 0; j < l.rank; ++j)
    s = fmaf(l.t[m * l.rank + j], load_as_float(l.b, l.b_dtype, n * l.rank + j), s);
  return l.scale * s;
}

// Why not a pair table (256 entries of two levels, one 8-byte load per two codes)? Tried
// with 16 interleaved copies (32 KiB, conflict-free) against the SASS cost model: it saves
// one instruction per weight (692 -> 558 per 4-row step at M = 1), but not shared-memory
// traffic (a warp's 8-byte load is two wavefronts: one per 32 weights, as here), and
// filling 32 KiB per 4-row block adds a quarter to it; several row tiles per block
// amortize the fill but unbalance the waves. M = 1 NF4 8192^2 came out at 2.68x on an
// H100 against 2.81x. The table's wavefronts (~9 us at 8192^2 on 132 SMs) bound any
// shared-memory decode; past that, decoding has to stay in registers.

// Alignment of the kernels' shared-memory LUT: lookup8 builds NF4 lookup addresses with one
// byte permute into the table's address (ptx::lds_table_byte), which needs its low byte 0.
// Other widths keep 16 bytes: a different shared layout is enough to tip ptxas into spills
// in some of their tensor-core instances.
template <int Bits>
inline constexpr int kLutAlign = Bits == 4 ? 256 : 16;

// Levels (fp32) of codes [8c, 8c + 8) of one group, read from the shared-memory LUT
// (__align__(kLutAlign<Bits>)). `c` must be a compile-time constant after unrolling (register
// array indices).
template <int Bits>
__device__ __forceinline__ void lookup8(const float* lut, const uint32_t (&w)[Bits], int c,
                                        float (&lv)[8]) {
  if constexpr (Bits == 4) {
    // Word c holds codes 8c..8c+7 as nibbles. Scale them to byte offsets (x4) in two masks,
    // even codes in `e`, odd codes in `o`, one per byte; a byte permute then moves each
    // byte offset into the low byte of the table's address for the shared-memory load.
    const uint32_t word = w[c];
    const uint32_t e = (word << 2) & 0x3c3c3c3cu;
    const uint32_t o = (word >> 2) & 0x3c3c3c3cu;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      lv[2 * k] = ptx::lds_table_byte(lut, e, k);
      lv[2 * k + 1] = ptx::lds_table_byte(lut, o, k);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) lv[i] = lut[unpack_code<Bits>(w, 8 * c + i)];
  }
}

// Fast path, K % 32 == 0 (rows never straddle a 32-code group).
//   x      : XT [M, K] contiguous, 16-byte aligned      out: XT [M, N]
//   qcodes : uint32 [N*K/32 * Bits], 16-byte aligned   (group of (n, g) = n*K/32 + g)
//   sa     : scale codes; offset fp32 [1]; levels fp32 [2^Bits]
//   B0 = 1 << log2_b0, nblocks = ceil(N*K / B0)
//   lora   : the fused LoRA term (lora.cuh): blocks [0, lora.producers) compute x @ a^T
// Grid: lora.producers + ceil(N / R) blocks of (32, WK) threads. Block P + b owns rows
// [b*R, b*R + R); warp y
// owns the contiguous group range [y*Gw, (y+1)*Gw) of those rows (Gw a multiple of 32) and
// walks it 32 groups per step, lane l on group base + l. The loop bounds are warp-uniform
// (lanes past the range run masked), so the warp can shuffle scales.
//
// Scales (B0 >= 32): a step touches at most 32 consecutive scales per row, and consecutive
// steps of a warp move through consecutive scales, so each row keeps a 32-scale window,
// lane l holding ŝ[wj + l]; a step refills it (one decode per lane, all lanes useful) only
// when it runs past the window, i.e. every B0/32 steps, and each lane takes its scale with
// one shuffle. Decoding per lane per step instead costs ~45 instructions per row per step
// (~180 next to the 481 of the 4-row step's weights, in the sm_90a SASS); the window pays
// ~15 per row per step plus the refill every B0/32 steps. B0 = 16 needs 64 scales per step,
// two per lane: decoded per lane.
// Registers per tile shape (blocks are at most 32 * kQmmMaxWarps = 128 threads). Left to its
// occupancy heuristic, ptxas gives the M = 1 kernels 64-72 registers and reloads a spilled
// scalar from local memory in the weight loop. The budget is the most blocks per SM without
// a spill: 80 registers (6 blocks) for NF2-NF5, 96 (5 blocks) for NF6-NF8, whose unpacking
// needs more (they spill at 80). M = 2..4 (MT = 4): left alone, ptxas picks 128-168
// registers, i.e. 3 blocks per SM above 128; a budget of 128 (4 blocks, spill-free) where it
// picks more. bf16 NF3, NF5 and NF6 land on 128 by themselves, and the explicit budget
// lengthens their schedule (~2% in the cost model), so they keep the default.
template <int MT, int Bits, typename XT>
inline constexpr int kFastMaxRegs =
    MT == 1 ? (Bits <= 5 ? 80 : 96)
            : (MT <= 4 && !(std::is_same_v<XT, __nv_bfloat16> && Bits >= 3 && Bits <= 6 &&
                             Bits != 4)
                   ? 128
                   : 168);

template <int Bits, typename XT, int MT, int R>
__global__ void LQ_MAXNREG((kFastMaxRegs<MT, Bits, XT>))
    qmatmul_fast_kernel(const XT* __restrict__ x, int M, int K, int N,
                        const uint32_t* __restrict__ qcodes, ScaleArgs sa,
                        const float* __restrict__ offset, const float* __restrict__ levels,
                        int log2_b0, int nblocks, LoraFused lora, XT* __restrict__ out) {
  static_assert(Bits >= 2 && Bits <= 8, "NF codes are 2..8 bits");
  static_assert(MT >= 1 && MT <= kSmallM && R >= 1, "tile shape");
  constexpr int kLevels = 1 << Bits;
  __shared__ __align__(kLutAlign<Bits>) float lut[kLevels];
  __shared__ float red[kQmmMaxWarps][R][MT];

  const int lane = threadIdx.x, wk = threadIdx.y, WK = blockDim.y;
  const int tid = wk * 32 + lane;
  for (int i = tid; i < kLevels; i += 32 * WK) lut[i] = levels[i];
  __syncthreads();
  const int bid = static_cast<int>(blockIdx.x);
  if (bid < lora.producers) {  // the LoRA down-projection (lora.cuh)
    lora_produce<MT>(lora, x, M, K, bid);
    return;
  }

  const int G = K >> 5;                                 // groups per row
  const int Gw = ceil_div(ceil_div(G, WK), 32) * 32;    // groups per warp, multiple of 32
  const int g_begin = wk * Gw, g_end = min(G, g_begin + Gw);
  const int n0 = (bid - lora.producers) * R;
  const float o = offset[0];
  const bool per_lane_scales = log2_b0 == 4;  // B0 = 16
  int row_group[R];  // first group of each row (rows past N clamp to N-1: never stored)
#pragma unroll
  for (int r = 0; r < R; ++r) row_group[r] = min(n0 + r, N - 1) * G;

  float acc[R][MT];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[r][m] = 0.f;
  float win[R];  // lane l: ŝ[wj[r] + l]
  int wj[R];     // window start (warp-uniform); far below 0 = empty
#pragma unroll
  for (int r = 0; r < R; ++r) {
    win[r] = 0.f;
    wj[r] = -64;
  }

  for (int gb = g_begin; gb < g_end; gb += 32) {
    const bool active = gb + lane < g_end;
    const int g = active ? gb + lane : gb;  // masked lanes re-read a valid group
    // Every load of this step is issued before the first wait: the R weight groups (DRAM
    // streams) first, then the scale codes (small, mostly L1/L2 hits), then the arithmetic.
    uint32_t w[R][Bits];
#pragma unroll
    for (int r = 0; r < R; ++r)
      load_group<Bits>(qcodes + static_cast<int64_t>(row_group[r] + g) * Bits, w[r]);
    float s_lo[R], s_hi[R];
    if (per_lane_scales) {
      ScaleRaw raw_lo[R], raw_hi[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const uint32_t j0 = static_cast<uint32_t>(row_group[r] + g) * 2u;  // 32 / 16
        raw_lo[r] = load_scale_raw(sa, j0);
        raw_hi[r] = load_scale_raw(sa, j0 + 1);  // exists: groups are full
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        s_lo[r] = finish_scale(sa, raw_lo[r], o);
        s_hi[r] = finish_scale(sa, raw_hi[r], o);
      }
    } else {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        // 32-bit unsigned element indices: e0 + 1023 < n + 1024 <= 2^31 + 1024.
        const uint32_t e0 = static_cast<uint32_t>(row_group[r] + gb) * 32u;  // step start
        const int j_last = static_cast<int>((e0 + 1023u) >> log2_b0);       // last scale
        if (j_last >= wj[r] + 32) {  // warp-uniform refill
          wj[r] = static_cast<int>(e0 >> log2_b0);
          win[r] = decode_scale(sa, o, static_cast<uint32_t>(min(wj[r] + lane, nblocks - 1)));
        }
        const int jm = static_cast<int>((e0 + static_cast<uint32_t>(g - gb) * 32u) >> log2_b0);
        s_lo[r] = s_hi[r] = __shfl_sync(kFullMask, win[r], jm - wj[r]);
      }
    }
    const int64_t k0 = static_cast<int64_t>(g) * 32;
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // half-groups of 16 codes: one scale each
      float p[R][MT];
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int m = 0; m < MT; ++m) p[r][m] = 0.f;
#pragma unroll
      for (int c = 2 * h; c < 2 * h + 2; ++c) {
        float lv[R][8];
#pragma unroll
        for (int r = 0; r < R; ++r) lookup8<Bits>(lut, w[r], c, lv[r]);
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          if (MT > 1 && m >= M) break;
          float xf[8];
          load8(x + m * static_cast<int64_t>(K) + k0 + 8 * c, xf);
#pragma unroll
          for (int r = 0; r < R; ++r)
#pragma unroll
            for (int i = 0; i < 8; ++i) p[r][m] = fmaf(lv[r][i], xf[i], p[r][m]);
        }
      }
      if (active) {
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int m = 0; m < MT; ++m)
            acc[r][m] = fmaf(h ? s_hi[r] : s_lo[r], p[r][m], acc[r][m]);
      }
    }
  }

#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const float v = warp_sum(acc[r][m]);
      if (lane == 0) red[wk][r][m] = v;
    }
  if (lora.producers > 0 && tid == 0) lora_wait(lora);
  __syncthreads();
  // One warp per output: the cross-warp sum, then the LoRA term with the lanes over rank.
  for (int idx = wk; idx < R * MT; idx += WK) {
    const int r = idx / MT, m = idx % MT, n = n0 + r;
    if (n >= N || m >= M) continue;  // warp-uniform
    float v = 0.f;
    for (int k = 0; k < WK; ++k) v = __fadd_rn(v, red[k][r][m]);
    if (lora.producers > 0) v = __fadd_rn(v, __fmul_rn(lora.scale, lora_dot(lora, m, n)));
    if (lane == 0) out[static_cast<int64_t>(m) * N + n] = from_float<XT>(v);
  }
}

// Generic path, any K (rows may start mid-group): one warp per row, lane k reads code
// n*K + k with the runtime-width extractor; the scale is re-decoded only when the block
// changes. Slow but simple; used only when K % 32 != 0.
template <typename XT>
__global__ void __launch_bounds__(128)
    qmatmul_generic_kernel(const XT* __restrict__ x, int M, int K, int N,
                           const uint32_t* __restrict__ qcodes, int bits, ScaleArgs sa,
                           const float* __restrict__ offset, const float* __restrict__ levels,
                           int log2_b0, LoraArgs lora, XT* __restrict__ out) {
  __shared__ float lut[256];
  for (int i = threadIdx.x; i < (1 << bits); i += blockDim.x) lut[i] = levels[i];
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int n = blockIdx.x * 4 + (threadIdx.x >> 5);
  if (n >= N) return;
  const float o = offset[0];
  float acc[kSmallM];
#pragma unroll
  for (int m = 0; m < kSmallM; ++m) acc[m] = 0.f;
  int64_t jc = -1;
  float sc = 0.f;
  for (int k = lane; k < K; k += 32) {
    const int64_t idx = static_cast<int64_t>(n) * K + k;
    const int64_t j = idx >> log2_b0;
    if (j != jc) {
      jc = j;
      sc = decode_scale(sa, o, j);
    }
    const float wv = __fmul_rn(lut[code_at(qcodes, bits, idx)], sc);
#pragma unroll
    for (int m = 0; m < kSmallM; ++m) {
      if (m >= M) break;
      acc[m] = fmaf(wv, to_float(x[static_cast<int64_t>(m) * K + k]), acc[m]);
    }
  }
#pragma unroll
  for (int m = 0; m < kSmallM; ++m) {
    if (m >= M) break;
    float v = warp_sum(acc[m]);
    if (lane == 0) {
      if (lora.t != nullptr) v = __fadd_rn(v, lora_term(lora, m, n));
      out[static_cast<int64_t>(m) * N + n] = from_float<XT>(v);
    }
  }
}

// t[m, j] = sum_k x[m, k] * a[j, k]: x XT [M, K], a [rank, K] (a_dtype), t fp32 [M, rank].
// Grid (rank, ceil(M / 16)): block (j, y) does rows [16y, 16y + 16); fp32 accumulation.
template <typename XT>
__global__ void __launch_bounds__(256)
    lora_down_kernel(const XT* __restrict__ x, int M, int K, const void* __restrict__ a,
                     DType a_dtype, int rank, float* __restrict__ t) {
  __shared__ float part[8][kSmallM];
  const int j = blockIdx.x, m0 = blockIdx.y * kSmallM;
  const int Mt = min(kSmallM, M - m0);
  float acc[kSmallM];
#pragma unroll
  for (int m = 0; m < kSmallM; ++m) acc[m] = 0.f;
  for (int k = threadIdx.x; k < K; k += blockDim.x) {
    const float av = load_as_float(a, a_dtype, static_cast<int64_t>(j) * K + k);
#pragma unroll
    for (int m = 0; m < kSmallM; ++m) {
      if (m >= Mt) break;
      acc[m] = fmaf(av, to_float(x[static_cast<int64_t>(m0 + m) * K + k]), acc[m]);
    }
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int m = 0; m < kSmallM; ++m) {
    const float v = warp_sum(acc[m]);
    if (lane == 0) part[warp][m] = v;
  }
  __syncthreads();
  const int tid = static_cast<int>(threadIdx.x), warps = static_cast<int>(blockDim.x >> 5);
  if (tid < Mt) {
    float v = 0.f;
    for (int w = 0; w < warps; ++w) v = __fadd_rn(v, part[w][tid]);
    t[(m0 + tid) * rank + j] = v;
  }
}

}  // namespace lqlora::cuda

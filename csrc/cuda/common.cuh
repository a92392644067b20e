// Device helpers shared by the lqlora CUDA kernels. Torch-free (nvcc only).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "launch.h"
#include "lqlora/pack.h"

// The launch seam: `LQ_LAUNCH(grid, block, smem, stream, kernel)(args...)` is
// `kernel<<<grid, block, smem, stream>>>(args...)` under nvcc; under the SIMT emulator
// (csrc/emu/cuda_emu.h, force-included, defines LQLORA_EMU) it runs the grid on fibers.
// `LQ_MAXNREG(n)`: a kernel's register budget (ptxas); nothing for the emulator, whose host
// compiler cannot parse the attribute. This is the only place kernel code tells the two
// builds apart.
#if !defined(LQLORA_EMU)
#define LQ_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#define LQ_MAXNREG(n) __maxnreg__(n)
#else
#define LQ_MAXNREG(n)
#endif

namespace lqlora::cuda {

constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
__host__ __device__ __forceinline__ T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

// SMs of the current device, host side, for launchers that size their grids to it; an
// H100-sized 132 if the query fails (the error is cleared).
inline int device_sm_count() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
    cudaGetLastError();
    return 132;
  }
  return sms;
}

// log2 of a power of two (block sizes), host side.
inline int ilog2(int v) {
  int s = 0;
  while ((1 << s) < v) ++s;
  return s;
}

// Runtime bit width -> `constexpr int kBits` (2..8) for the lambda body; torch-free twin of
// lqlora/switch.h. Out-of-range widths return cudaErrorInvalidValue (the glue has already
// validated them, this is the backstop).
#define LQ_CUDA_BITS_CASE(B, ...) \
  case B: {                       \
    constexpr int kBits = B;      \
    return __VA_ARGS__();         \
  }
#define LQ_CUDA_BITS_SWITCH(bits, ...)     \
  [&]() -> cudaError_t {                   \
    switch (bits) {                        \
      LQ_CUDA_BITS_CASE(2, __VA_ARGS__)    \
      LQ_CUDA_BITS_CASE(3, __VA_ARGS__)    \
      LQ_CUDA_BITS_CASE(4, __VA_ARGS__)    \
      LQ_CUDA_BITS_CASE(5, __VA_ARGS__)    \
      LQ_CUDA_BITS_CASE(6, __VA_ARGS__)    \
      LQ_CUDA_BITS_CASE(7, __VA_ARGS__)    \
      LQ_CUDA_BITS_CASE(8, __VA_ARGS__)    \
      default: return cudaErrorInvalidValue; \
    }                                      \
  }()

// Runtime DType -> `using T = float / __half / __nv_bfloat16` for the lambda body.
#define LQ_CUDA_DTYPE_SWITCH(dt, T, ...)                          \
  [&]() -> cudaError_t {                                          \
    switch (dt) {                                                 \
      case DType::kFloat32: { using T = float; return __VA_ARGS__(); }         \
      case DType::kFloat16: { using T = __half; return __VA_ARGS__(); }        \
      case DType::kBFloat16: { using T = __nv_bfloat16; return __VA_ARGS__(); } \
      default: return cudaErrorInvalidValue;                      \
    }                                                             \
  }()

// ---- scalar conversions (all exact widenings; narrowing is round-to-nearest-even) ----
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Element i of a runtime-typed array, widened to fp32 (uniform branch on dt).
__device__ __forceinline__ float load_as_float(const void* p, DType dt, int64_t i) {
  switch (dt) {
    case DType::kFloat16: return __half2float(static_cast<const __half*>(p)[i]);
    case DType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

// ---- double-quantized scales (docs/format.md) ----
// Everything a kernel needs to decode ŝ[j] in place.
struct ScaleArgs {
  const uint32_t* qscales;  // [ceil(nblocks/32) * scale_bits]
  const void* scale2;       // [ngroups]
  DType scale2_dtype;
  int scale_bits;
  int log2_b1;              // log2(scale_block_size)
  float Lq;                 // 2^scale_bits - 1
};

inline ScaleArgs make_scale_args(const uint32_t* qscales, const void* scale2, DType dt,
                                 int scale_bits, int scale_block_size) {
  return ScaleArgs{qscales, scale2, dt, scale_bits, ilog2(scale_block_size),
                   static_cast<float>((1 << scale_bits) - 1)};
}

// ŝ[j] in two steps so a kernel can issue the loads of several scales (and its weight
// loads) before waiting on any of them: load_scale_raw only loads, finish_scale does the
// arithmetic. Indices are 32-bit (nblocks * scale_bits < 2^31 since numel < 2^31) and the
// dtype handling is selects, not branches: a few instructions per scale, which matters in
// the decode GEMV where scales are decoded inside the weight loop.
struct ScaleRaw {
  uint32_t lo, hi;  // the word holding code j's first bit and, if it straddles, the next
  uint32_t c;       // scale2[j / B1] as raw bits (fp32, or fp16/bf16 in the low half)
  uint32_t sh;      // bit position of code j in `lo`
};

__device__ __forceinline__ ScaleRaw load_scale_raw(const ScaleArgs& a, uint32_t j) {
  ScaleRaw r;
  const uint32_t bit = j * static_cast<uint32_t>(a.scale_bits);  // groups are contiguous
  r.sh = bit & 31u;
  const uint32_t* p = a.qscales + (bit >> 5);
  r.lo = p[0];
  r.hi = r.sh + a.scale_bits > 32u ? p[1] : 0u;  // never for b0 in {2, 4, 8}
  const uint32_t gi = j >> a.log2_b1;
  r.c = a.scale2_dtype == DType::kFloat32 ? static_cast<const uint32_t*>(a.scale2)[gi]
                                          : static_cast<const uint16_t*>(a.scale2)[gi];
  return r;
}

// ŝ[j] = (q * c) / L + offset in fp32, in that order, each step rounded (no FMA
// contraction): bit-identical to lqlora::cpu::decode_scales.
__device__ __forceinline__ float finish_scale(const ScaleArgs& a, const ScaleRaw& r,
                                              float offset) {
  const uint32_t q = __funnelshift_r(r.lo, r.hi, r.sh) & ((1u << a.scale_bits) - 1u);
  const float c_f32 = __uint_as_float(r.c);
  const float c_bf16 = __uint_as_float(r.c << 16);
  const float c_f16 = __half2float(__ushort_as_half(static_cast<unsigned short>(r.c)));
  const float c = a.scale2_dtype == DType::kFloat32
                      ? c_f32
                      : (a.scale2_dtype == DType::kBFloat16 ? c_bf16 : c_f16);
  return __fadd_rn(__fdiv_rn(__fmul_rn(static_cast<float>(q), c), a.Lq), offset);
}

__device__ __forceinline__ float decode_scale(const ScaleArgs& a, float offset, uint32_t j) {
  return finish_scale(a, load_scale_raw(a, j), offset);
}

// ---- packed weight groups ----
// The Bits words of one 32-code group, with the widest aligned vector loads the width
// allows (group g starts at byte 4*Bits*g of a 16-byte aligned stream): NF4/NF8 are one/two
// 16-byte loads, NF2/NF6 8-byte loads, odd widths 4-byte loads. `ld.global.cs` (evict-first):
// weights are streamed once, so they should not push activations and the LUT out of L1/L2.
template <int Bits>
__device__ __forceinline__ void load_group(const uint32_t* __restrict__ p, uint32_t (&w)[Bits]) {
  if constexpr (Bits % 4 == 0) {
#pragma unroll
    for (int v = 0; v < Bits / 4; ++v) {
      const uint4 u = __ldcs(reinterpret_cast<const uint4*>(p) + v);
      w[4 * v + 0] = u.x; w[4 * v + 1] = u.y; w[4 * v + 2] = u.z; w[4 * v + 3] = u.w;
    }
  } else if constexpr (Bits % 2 == 0) {
#pragma unroll
    for (int v = 0; v < Bits / 2; ++v) {
      const uint2 u = __ldcs(reinterpret_cast<const uint2*>(p) + v);
      w[2 * v + 0] = u.x; w[2 * v + 1] = u.y;
    }
  } else {
#pragma unroll
    for (int v = 0; v < Bits; ++v) w[v] = __ldcs(p + v);
  }
}

// 8 consecutive activations x[0..8) widened to fp32 (16-byte aligned): one 16-byte load for
// 16-bit types, two for fp32. The 16-bit widenings are exact bit moves.
__device__ __forceinline__ void load8(const float* __restrict__ p, float (&f)[8]) {
  const float4 a = *reinterpret_cast<const float4*>(p);
  const float4 b = *(reinterpret_cast<const float4*>(p) + 1);
  f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
  f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
}
__device__ __forceinline__ void load8(const __nv_bfloat16* __restrict__ p, float (&f)[8]) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const uint32_t r[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(r[i] << 16);              // bf16 -> fp32 is a 16-bit shift
    f[2 * i + 1] = __uint_as_float(r[i] & 0xffff0000u);
  }
}
__device__ __forceinline__ void load8(const __half* __restrict__ p, float (&f)[8]) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const uint32_t r[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(r[i] & 0xffffu)));
    f[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(r[i] >> 16)));
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// Packs one `bits`-wide code per lane (lane i = code i of the warp's 32-code group) into
// the group's `bits` words; lane q < bits returns word q (others return garbage).
__device__ __forceinline__ uint32_t warp_pack(uint32_t code, int bits, int lane) {
  const int bit = lane * bits, w = bit >> 5, sh = bit & 31;
  const uint32_t lo = code << sh;
  const uint32_t hi = (sh + bits > 32) ? (code >> (32 - sh)) : 0u;
  uint32_t mine = 0;
  for (int q = 0; q < bits; ++q) {
    const uint32_t v = (w == q ? lo : 0u) | (w + 1 == q ? hi : 0u);
    const uint32_t r = __reduce_or_sync(kFullMask, v);
    if (lane == q) mine = r;
  }
  return mine;
}

}  // namespace lqlora::cuda

// The CUDA device environment for the SIMT emulator: force-included (-include) into every
// csrc/cuda/*.cu translation unit that the host C++ compiler builds for lqlora_ext._emu.
//
// The kernels compile unchanged: `__global__` functions become host functions, each CUDA
// thread runs them on its own fiber (runtime.cpp), and everything a kernel can observe of the
// machine is defined here with CUDA's semantics:
//   - threadIdx / blockIdx / blockDim / gridDim: `inline thread_local` values the scheduler
//     sets before it resumes a fiber (all fibers of a block share one OS thread);
//   - `__shared__`: `static thread_local`, i.e. one copy per OS thread, which runs one block
//     at a time; the scheduler poisons this module's whole TLS block (0xFF) at block start,
//     so a read of uninitialised shared memory shows up as NaN / all-ones words;
//   - barriers and warp collectives block the fiber until the block / the mask has arrived,
//     and report divergence, bad masks and deadlocks (runtime.h);
//   - device intrinsics: exact host equivalents (round-to-nearest fp32 with no contraction:
//     the module is compiled with -ffp-contract=off);
//   - loads through __ldg/__ldcs/... check their alignment (a misaligned vector load is a
//     fault on the GPU; plain dereferences are checked by UBSan in the sanitizer build).
// cuda_fp16.h / cuda_bf16.h are the toolkit's own headers: their host paths are what g++
// compiles; the few device-only functions the kernels use are added below. __CUDA_ARCH__
// stays undefined: kernel code has no architecture branches.
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <source_location>
#include <tuple>
#include <type_traits>
#include <utility>

#ifndef LQLORA_EMU
#define LQLORA_EMU 1  // kernel code's seams (LQ_LAUNCH, ptx.cuh) select the emulator
#endif

// Function-space qualifiers: host_defines.h keeps definitions it finds already present.
// (A C++11 `alignas` cannot follow `__shared__` here; kernels write `__shared__ __align__(16)`.)
#define __global__
#define __device__
#define __host__
#define __shared__ static thread_local
#define __constant__ static
#define __launch_bounds__(...)
#define __noinline__ __attribute__((noinline))

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "runtime.h"

#ifndef warpSize
inline constexpr int warpSize = 32;
#endif

// ---- barriers ----
inline void __syncthreads(std::source_location loc = std::source_location::current()) {
  lqlora::emu::block_barrier(lqlora::emu::Barrier::kSync, 0, loc);
}
inline int __syncthreads_count(int pred,
                               std::source_location loc = std::source_location::current()) {
  return lqlora::emu::block_barrier(lqlora::emu::Barrier::kCount, pred != 0, loc);
}
inline int __syncthreads_and(int pred,
                             std::source_location loc = std::source_location::current()) {
  return lqlora::emu::block_barrier(lqlora::emu::Barrier::kAnd, pred != 0, loc);
}
inline int __syncthreads_or(int pred, std::source_location loc = std::source_location::current()) {
  return lqlora::emu::block_barrier(lqlora::emu::Barrier::kOr, pred != 0, loc);
}
inline void __syncwarp(unsigned mask = 0xffffffffu,
                       std::source_location loc = std::source_location::current()) {
  lqlora::emu::warp_collective(lqlora::emu::WarpOp::kSync, mask, 0, 0, 32, loc);
}
// Threads never diverge implicitly here; every lane of the warp that has not exited.
inline unsigned __activemask() { return lqlora::emu::active_lanes(); }

// ---- warp collectives ----
// Values travel as raw bytes (memcpy): __half2 / __nv_bfloat162 are not trivially copyable
// in CUDA 13, and a shuffle moves bits, never converts.
namespace lqlora::emu::detail {
template <typename T>
inline uint64_t to_bits(const T& v) {
  static_assert(sizeof(T) <= 8, "warp shuffles move at most 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(static_cast<void*>(&v), &b, sizeof(T));
  return v;
}
template <typename T>
inline T shfl(WarpOp op, unsigned mask, const T& v, int arg, int width, std::source_location loc) {
  return from_bits<T>(warp_collective(op, mask, to_bits(v), arg, width, loc));
}
}  // namespace lqlora::emu::detail

template <typename T>
inline T __shfl_sync(unsigned mask, T var, int srcLane, int width = warpSize,
                     std::source_location loc = std::source_location::current()) {
  return lqlora::emu::detail::shfl(lqlora::emu::WarpOp::kShflIdx, mask, var, srcLane, width, loc);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                        std::source_location loc = std::source_location::current()) {
  return lqlora::emu::detail::shfl(lqlora::emu::WarpOp::kShflUp, mask, var,
                                   static_cast<int>(delta), width, loc);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                          std::source_location loc = std::source_location::current()) {
  return lqlora::emu::detail::shfl(lqlora::emu::WarpOp::kShflDown, mask, var,
                                   static_cast<int>(delta), width, loc);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = warpSize,
                         std::source_location loc = std::source_location::current()) {
  return lqlora::emu::detail::shfl(lqlora::emu::WarpOp::kShflXor, mask, var, laneMask, width,
                                   loc);
}

inline unsigned __ballot_sync(unsigned mask, int pred,
                              std::source_location loc = std::source_location::current()) {
  return static_cast<unsigned>(
      lqlora::emu::warp_collective(lqlora::emu::WarpOp::kBallot, mask, pred != 0, 0, 32, loc));
}
inline int __any_sync(unsigned mask, int pred,
                      std::source_location loc = std::source_location::current()) {
  return static_cast<int>(
      lqlora::emu::warp_collective(lqlora::emu::WarpOp::kAny, mask, pred != 0, 0, 32, loc));
}
inline int __all_sync(unsigned mask, int pred,
                      std::source_location loc = std::source_location::current()) {
  return static_cast<int>(
      lqlora::emu::warp_collective(lqlora::emu::WarpOp::kAll, mask, pred != 0, 0, 32, loc));
}

// __reduce_{add,min,max}_sync for int and unsigned, __reduce_{and,or,xor}_sync for unsigned.
#define LQ_EMU_REDUCE(NAME, T, OP, SIGNED)                                                  \
  inline T NAME(unsigned mask, T value,                                                     \
                std::source_location loc = std::source_location::current()) {              \
    return static_cast<T>(lqlora::emu::warp_collective(                                    \
        lqlora::emu::WarpOp::OP, mask, static_cast<uint64_t>(static_cast<uint32_t>(value)), \
        SIGNED, 32, loc));                                                                  \
  }
LQ_EMU_REDUCE(__reduce_add_sync, unsigned, kReduceAdd, 0)
LQ_EMU_REDUCE(__reduce_add_sync, int, kReduceAdd, 1)
LQ_EMU_REDUCE(__reduce_min_sync, unsigned, kReduceMin, 0)
LQ_EMU_REDUCE(__reduce_min_sync, int, kReduceMin, 1)
LQ_EMU_REDUCE(__reduce_max_sync, unsigned, kReduceMax, 0)
LQ_EMU_REDUCE(__reduce_max_sync, int, kReduceMax, 1)
LQ_EMU_REDUCE(__reduce_and_sync, unsigned, kReduceAnd, 0)
LQ_EMU_REDUCE(__reduce_or_sync, unsigned, kReduceOr, 0)
LQ_EMU_REDUCE(__reduce_xor_sync, unsigned, kReduceXor, 0)
#undef LQ_EMU_REDUCE

template <typename T>
inline unsigned __match_any_sync(unsigned mask, T value,
                                 std::source_location loc = std::source_location::current()) {
  return static_cast<unsigned>(lqlora::emu::warp_collective(
      lqlora::emu::WarpOp::kMatchAny, mask, lqlora::emu::detail::to_bits(value), 0, 32, loc));
}

// ---- integer and bit intrinsics ----
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  // Result byte i = byte (s >> 4i) & 7 of the 8-byte value {y, x} (x = bytes 0..3).
  const uint64_t v = (static_cast<uint64_t>(y) << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) {
    const unsigned sel = (s >> (4 * i)) & 7u;
    r |= static_cast<unsigned>((v >> (8 * sel)) & 0xffu) << (8 * i);
  }
  return r;
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned shift) {
  const uint64_t v = (static_cast<uint64_t>(hi) << 32) | lo;
  return static_cast<unsigned>(v >> (shift & 31u));
}
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned shift) {
  const uint64_t v = (static_cast<uint64_t>(hi) << 32) | lo;
  return static_cast<unsigned>((v << (shift & 31u)) >> 32);
}
inline unsigned __funnelshift_rc(unsigned lo, unsigned hi, unsigned shift) {
  return shift >= 32 ? hi : __funnelshift_r(lo, hi, shift);
}
inline unsigned __funnelshift_lc(unsigned lo, unsigned hi, unsigned shift) {
  return shift >= 32 ? lo : __funnelshift_l(lo, hi, shift);
}
inline int __popc(unsigned x) { return std::popcount(x); }
inline int __popcll(unsigned long long x) { return std::popcount(x); }
inline int __clz(int x) { return std::countl_zero(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return std::countl_zero(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return x == 0 ? 0 : std::countr_zero(static_cast<unsigned>(x)) + 1; }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<uint64_t>(a) * b) >> 32);
}

// ---- bit casts ----
inline float __uint_as_float(unsigned v) { return std::bit_cast<float>(v); }
inline float __int_as_float(int v) { return std::bit_cast<float>(v); }
inline unsigned __float_as_uint(float v) { return std::bit_cast<unsigned>(v); }
inline int __float_as_int(float v) { return std::bit_cast<int>(v); }
inline double __longlong_as_double(long long v) { return std::bit_cast<double>(v); }
inline long long __double_as_longlong(double v) { return std::bit_cast<long long>(v); }

// ---- IEEE fp32 with explicit rounding (round-to-nearest-even; fibers run with the
// default MXCSR, so no flush-to-zero, like CUDA without -ftz) ----
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __saturatef(float v) { return v != v ? 0.f : (v < 0.f ? 0.f : (v > 1.f ? 1.f : v)); }

// CUDA's integer and float min/max overloads (math_functions.h, device side).
#define LQ_EMU_MINMAX(T)                                 \
  inline T min(T a, T b) { return b < a ? b : a; }      \
  inline T max(T a, T b) { return a < b ? b : a; }
LQ_EMU_MINMAX(int)
LQ_EMU_MINMAX(unsigned)
LQ_EMU_MINMAX(long)
LQ_EMU_MINMAX(unsigned long)
LQ_EMU_MINMAX(long long)
LQ_EMU_MINMAX(unsigned long long)
#undef LQ_EMU_MINMAX
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }

// ---- half / bfloat16 device-only functions the kernels use ----
inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) {
  // Each half: fma in fp32 is exact for fp16 products (11+11 bits < 24), then one rounding.
  const float2 fa = __half22float2(a), fb = __half22float2(b), fc = __half22float2(c);
  return __floats2half2_rn(std::fma(fa.x, fb.x, fc.x), std::fma(fa.y, fb.y, fc.y));
}
// ---- atomics and fences (host atomics: blocks may run on several worker threads) ----
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
#define LQ_EMU_ATOMIC(T)                                                                \
  inline T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }   \
  inline T atomicMax(T* p, T v) {                                                        \
    T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);                                        \
    while (old < v && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST,  \
                                                   __ATOMIC_SEQ_CST)) {                  \
    }                                                                                    \
    return old;                                                                          \
  }                                                                                      \
  inline T atomicCAS(T* p, T cmp, T v) {                                                 \
    __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);  \
    return cmp;                                                                          \
  }
LQ_EMU_ATOMIC(int)
LQ_EMU_ATOMIC(unsigned)
LQ_EMU_ATOMIC(unsigned long long)
#undef LQ_EMU_ATOMIC
// A spinning thread lets the others run; the scheduler reports a spin that cannot end.
inline void __nanosleep(unsigned ns, std::source_location loc = std::source_location::current()) {
  lqlora::emu::spin_wait(ns, loc);
}

// ---- memory: cache-hinted loads and stores (alignment-checked) ----
#define LQ_EMU_LOAD(NAME)                                                              \
  template <typename T>                                                                \
  inline T NAME(const T* p, std::source_location loc = std::source_location::current()) { \
    lqlora::emu::check_aligned(p, alignof(T), sizeof(T), #NAME, loc);                  \
    return *p;                                                                         \
  }
LQ_EMU_LOAD(__ldg)
LQ_EMU_LOAD(__ldcg)
LQ_EMU_LOAD(__ldca)
LQ_EMU_LOAD(__ldcs)
LQ_EMU_LOAD(__ldlu)
LQ_EMU_LOAD(__ldcv)
#undef LQ_EMU_LOAD
#define LQ_EMU_STORE(NAME)                                                                 \
  template <typename T>                                                                    \
  inline void NAME(T* p, T v, std::source_location loc = std::source_location::current()) { \
    lqlora::emu::check_aligned(p, alignof(T), sizeof(T), #NAME, loc);                      \
    *p = v;                                                                                \
  }
LQ_EMU_STORE(__stwb)
LQ_EMU_STORE(__stcg)
LQ_EMU_STORE(__stcs)
LQ_EMU_STORE(__stwt)
#undef LQ_EMU_STORE

// ---- the launch seam: LQ_LAUNCH(grid, block, smem, stream, kernel...)(args...) ----
namespace lqlora::emu {
template <typename... P>
class Launch {
 public:
  Launch(const char* name, void (*fn)(P...), dim3 grid, dim3 block, size_t smem,
         cudaStream_t stream, std::source_location loc)
      : name_(name), fn_(fn), grid_(grid), block_(block), smem_(smem), stream_(stream),
        loc_(loc) {}

  // Arguments convert to the kernel's parameter types once, as a launch copies them into
  // parameter space; every emulated thread then calls the kernel with its own copy.
  template <typename... A>
  void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong argument count");
    std::tuple<std::decay_t<P>...> params(static_cast<P>(std::forward<A>(args))...);
    struct Ctx {
      void (*fn)(P...);
      std::tuple<std::decay_t<P>...>* params;
    } ctx{fn_, &params};
    run_grid(LaunchInfo{name_, reinterpret_cast<const void*>(fn_), grid_, block_, smem_, stream_,
                        loc_.file_name(),
                        static_cast<int>(loc_.line())},
             [](void* c) {
               auto* k = static_cast<Ctx*>(c);
               std::apply(k->fn, *k->params);
             },
             &ctx);
  }

 private:
  const char* name_;
  void (*fn_)(P...);
  dim3 grid_, block_;
  size_t smem_;
  cudaStream_t stream_;
  std::source_location loc_;
};

template <typename... P>
Launch<P...> make_launch(const char* name, void (*fn)(P...), dim3 grid, dim3 block, size_t smem,
                         cudaStream_t stream,
                         std::source_location loc = std::source_location::current()) {
  return Launch<P...>(name, fn, grid, block, smem, stream, loc);
}
}  // namespace lqlora::emu

#define LQ_LAUNCH(grid, block, smem, stream, ...) \
  ::lqlora::emu::make_launch(#__VA_ARGS__, __VA_ARGS__, grid, block, smem, stream)

// The inline-PTX wrappers of csrc/cuda/ptx.cuh (mma.sync, ldmatrix, cp.async).
#include "ptx_emu.h"

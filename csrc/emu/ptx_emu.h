// The emulator's definitions of csrc/cuda/ptx.cuh's inline-PTX wrappers (included by
// cuda_emu.h): the same names and signatures, built from the PTX ISA's fragment layouts.
//
// mma: products of two 16-bit floats are exact in fp64; each D element is the fp64 sum of
// its 16 products plus C, rounded once to fp32. Tensor cores sum with their own internal
// precision and rounding (neither IEEE-sequential nor this), so results agree with a GPU to
// about one fp32 ulp of the largest partial sum, not bit for bit.
#pragma once
#include <cstdint>
#include <cstring>
#include <source_location>
#include <type_traits>

namespace lqlora::cuda::ptx {
namespace emu_detail {

template <typename T>
inline double half_bits_to_double(uint16_t h) {
  T v;
  std::memcpy(static_cast<void*>(&v), &h, 2);
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return static_cast<double>(__bfloat162float(v));
  else return static_cast<double>(__half2float(v));
}

struct MmaIn {
  uint32_t a[4];
  uint32_t b[2];
  float c[4];
};

template <typename T>
void mma_16816_warp(const void* const* ins, void* const* outs) {
  double A[16][16], B[16][8], C[16][8];
  for (int l = 0; l < 32; ++l) {
    const auto* in = static_cast<const MmaIn*>(ins[l]);
    const int g = l >> 2, t = l & 3;
    auto lo = [](uint32_t r) { return static_cast<uint16_t>(r & 0xffffu); };
    auto hi = [](uint32_t r) { return static_cast<uint16_t>(r >> 16); };
    const int rows[4] = {g, g + 8, g, g + 8}, cols[4] = {2 * t, 2 * t, 2 * t + 8, 2 * t + 8};
    for (int i = 0; i < 4; ++i) {
      A[rows[i]][cols[i]] = half_bits_to_double<T>(lo(in->a[i]));
      A[rows[i]][cols[i] + 1] = half_bits_to_double<T>(hi(in->a[i]));
    }
    for (int i = 0; i < 2; ++i) {
      B[2 * t + 8 * i][g] = half_bits_to_double<T>(lo(in->b[i]));
      B[2 * t + 8 * i + 1][g] = half_bits_to_double<T>(hi(in->b[i]));
    }
    C[g][2 * t] = in->c[0];
    C[g][2 * t + 1] = in->c[1];
    C[g + 8][2 * t] = in->c[2];
    C[g + 8][2 * t + 1] = in->c[3];
  }
  for (int l = 0; l < 32; ++l) {
    auto* d = static_cast<float*>(outs[l]);
    const int g = l >> 2, t = l & 3;
    const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
    for (int i = 0; i < 4; ++i) {
      double s = C[rows[i]][cols[i]];
      for (int k = 0; k < 16; ++k) s += A[rows[i]][k] * B[k][cols[i]];
      d[i] = static_cast<float>(s);
    }
  }
}

template <bool Trans>
void ldmatrix_x4_warp(const void* const* ins, void* const* outs) {
  // ins[l]: the row address lane l supplied; matrix j's row r comes from lane 8j + r.
  for (int l = 0; l < 32; ++l) {
    auto* r = static_cast<uint32_t*>(outs[l]);
    for (int j = 0; j < 4; ++j) {
      uint16_t e[2];
      for (int h = 0; h < 2; ++h) {
        const int row = Trans ? 2 * (l & 3) + h : l >> 2;
        const int col = Trans ? l >> 2 : 2 * (l & 3) + h;
        const auto* p = *static_cast<const uint16_t* const*>(ins[8 * j + row]);
        e[h] = p[col];
      }
      r[j] = static_cast<uint32_t>(e[0]) | (static_cast<uint32_t>(e[1]) << 16);
    }
  }
}

}  // namespace emu_detail

template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                      std::source_location loc = std::source_location::current()) {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>,
                "mma_16816 takes bf16 or fp16 operands");
  emu_detail::MmaIn in;
  std::memcpy(in.a, a, sizeof in.a);
  std::memcpy(in.b, b, sizeof in.b);
  std::memcpy(in.c, d, sizeof in.c);
  lqlora::emu::warp_compute(0xffffffffu, &emu_detail::mma_16816_warp<T>,
                            std::is_same_v<T, __nv_bfloat16>
                                ? "mma.sync.m16n8k16.row.col.f32.bf16.bf16.f32"
                                : "mma.sync.m16n8k16.row.col.f32.f16.f16.f32",
                            &in, d, loc);
}

template <bool Trans = false>
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row,
                        std::source_location loc = std::source_location::current()) {
  lqlora::emu::check_aligned(row, 16, 16, Trans ? "ldmatrix.x4.trans" : "ldmatrix.x4", loc);
  const void* addr = row;
  lqlora::emu::warp_compute(0xffffffffu, &emu_detail::ldmatrix_x4_warp<Trans>,
                            Trans ? "ldmatrix.sync.m8n8.x4.trans" : "ldmatrix.sync.m8n8.x4",
                            &addr, r, loc);
}

template <int Bytes>
inline void cp_async(void* dst, const void* src,
                     std::source_location loc = std::source_location::current()) {
  static_assert(Bytes == 4 || Bytes == 8 || Bytes == 16, "cp.async copies 4, 8 or 16 bytes");
  lqlora::emu::async_copy(dst, src, Bytes, loc);
}
inline void cp_async_commit() { lqlora::emu::async_commit(); }
template <int N>
inline void cp_async_wait() {
  lqlora::emu::async_wait(N);
}

// The GPU builds the address by splicing the offset into the table's low byte, so a
// table that is not 256-byte aligned would read the wrong entry there: checked here.
inline float lds_table_byte(const float* table, uint32_t offs, int k,
                            std::source_location loc = std::source_location::current()) {
  lqlora::emu::check_aligned(table, 256, sizeof(float), "lds_table_byte", loc);
  float v;
  std::memcpy(&v, reinterpret_cast<const char*>(table) + ((offs >> (8 * k)) & 0xffu), sizeof v);
  return v;
}

inline int ld_acquire_gpu(const int* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
inline void red_add_release_gpu(int* p, int v) { __atomic_fetch_add(p, v, __ATOMIC_RELEASE); }

}  // namespace lqlora::cuda::ptx

// See gemv_avx2.h. Compiled for generic x86-64; the kernels carry target("avx2,fma") and are
// only called after a runtime CPU check, so the library still loads on older CPUs.
#include "gemv_avx2.h"

#include <c10/util/Exception.h>

#if defined(__x86_64__)
#include <immintrin.h>

#include <cstring>

#include "lqlora/pack.h"

namespace lqlora::cpu {

bool have_avx2_fma() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

namespace {

#define LQ_AVX2 __attribute__((target("avx2,fma"), always_inline)) inline

// The 32 codes of one group as 4 x 8 unscaled levels.
template <int Bits>
LQ_AVX2 void decode_group(const uint32_t* w, __m256 lo, __m256 hi, __m256 v[4]) {
  if constexpr (Bits == 4) {
    const __m256i sh = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    const __m256i mask = _mm256_set1_epi32(15);
    for (int j = 0; j < 4; ++j) {
      const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(w[j]), sh), mask);
      // two 8-entry permutes, selected by bit 3 of the code (moved into the sign bit)
      v[j] = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx),
                              _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
    }
  } else if constexpr (Bits == 2) {
    const __m256i sh = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
    const __m256i sh16 = _mm256_add_epi32(sh, _mm256_set1_epi32(16));
    const __m256i mask = _mm256_set1_epi32(3);
    for (int j = 0; j < 4; ++j) {
      const __m256i word = _mm256_set1_epi32(w[j >> 1]);
      const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(word, (j & 1) ? sh16 : sh), mask);
      v[j] = _mm256_permutevar8x32_ps(lo, idx);
    }
  } else {  // 3 bits: codes 8j..8j+7 are exactly bytes [3j, 3j+3) of the group
    static_assert(Bits == 3, "the fused AVX2 path covers 2, 3 and 4 bits");
    const __m256i sh = _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21);
    const __m256i mask = _mm256_set1_epi32(7);
    const auto* bytes = reinterpret_cast<const uint8_t*>(w);
    for (int j = 0; j < 4; ++j) {
      // 4-byte loads at byte 3j stay inside the 12-byte group for j < 3 (the 4th byte is
      // ignored by the shifts); the last 3 bytes are the top of word 2.
      uint32_t v24;
      if (j < 3) std::memcpy(&v24, bytes + 3 * j, 4);
      else v24 = w[2] >> 8;
      const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(v24), sh), mask);
      v[j] = _mm256_permutevar8x32_ps(lo, idx);
    }
  }
}

LQ_AVX2 float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int Bits>
__attribute__((target("avx2,fma"))) void rows_kernel(const uint32_t* qcodes, const float* scales,
                                                     const float* levels, int block_shift,
                                                     const float* x, int64_t M, int64_t K,
                                                     int64_t N, int64_t n0, int64_t n1,
                                                     float* out) {
  alignas(32) float lut[16] = {0.f};  // padded so 8-wide table loads never overrun
  for (int i = 0; i < (1 << Bits); ++i) lut[i] = levels[i];
  const __m256 lo = _mm256_load_ps(lut), hi = _mm256_load_ps(lut + 8);
  const int64_t G = K / 32;
  const bool two_blocks = block_shift < 5;  // B0 = 16
  // Rows of x per pass over W's row: decoding is a few vector ops, so re-decoding per 4
  // rows of x and keeping the accumulators in registers wins over spilling 16 of them.
  constexpr int MT = 4;
  for (int64_t n = n0; n < n1; ++n) {
    const uint32_t* wrow = qcodes + n * G * Bits;
    const int64_t flat0 = n * K;
    for (int64_t m0 = 0; m0 < M; m0 += MT) {
      const int mt = static_cast<int>(std::min<int64_t>(MT, M - m0));
      __m256 acc[MT];
      for (int t = 0; t < MT; ++t) acc[t] = _mm256_setzero_ps();
      for (int64_t g = 0; g < G; ++g) {
        __m256 v[4];
        decode_group<Bits>(wrow + g * Bits, lo, hi, v);
        const int64_t blk = (flat0 + g * 32) >> block_shift;
        const __m256 s0 = _mm256_set1_ps(scales[blk]);
        const __m256 s1 = two_blocks ? _mm256_set1_ps(scales[blk + 1]) : s0;
        for (int t = 0; t < mt; ++t) {
          const float* xp = x + (m0 + t) * K + g * 32;
          __m256 p0 = _mm256_mul_ps(v[0], _mm256_loadu_ps(xp));
          p0 = _mm256_fmadd_ps(v[1], _mm256_loadu_ps(xp + 8), p0);
          __m256 p1 = _mm256_mul_ps(v[2], _mm256_loadu_ps(xp + 16));
          p1 = _mm256_fmadd_ps(v[3], _mm256_loadu_ps(xp + 24), p1);
          acc[t] = _mm256_fmadd_ps(p0, s0, acc[t]);
          acc[t] = _mm256_fmadd_ps(p1, s1, acc[t]);
        }
      }
      for (int t = 0; t < mt; ++t) out[(m0 + t) * N + n] = hsum(acc[t]);
    }
  }
}

}  // namespace

void fused_gemv_avx2(int bits, const uint32_t* qcodes, const float* scales,
                     const float* levels, int64_t block_size, const float* x, int64_t M,
                     int64_t K, int64_t N, int64_t n0, int64_t n1, float* out) {
  TORCH_CHECK(K % 32 == 0 && (block_size & (block_size - 1)) == 0 && block_size >= 16,
              "lqlora: fused CPU GEMV needs K % 32 == 0 and a power-of-two block size");
  const int block_shift = __builtin_ctzll(static_cast<unsigned long long>(block_size));
  switch (bits) {
    case 2: rows_kernel<2>(qcodes, scales, levels, block_shift, x, M, K, N, n0, n1, out); break;
    case 3: rows_kernel<3>(qcodes, scales, levels, block_shift, x, M, K, N, n0, n1, out); break;
    case 4: rows_kernel<4>(qcodes, scales, levels, block_shift, x, M, K, N, n0, n1, out); break;
    default: TORCH_CHECK(false, "lqlora: fused CPU GEMV covers 2..4 bits, got ", bits);
  }
}

}  // namespace lqlora::cpu

#else  // not x86-64: the generic path in qmatmul.cpp is used

namespace lqlora::cpu {
bool have_avx2_fma() { return false; }
void fused_gemv_avx2(int, const uint32_t*, const float*, const float*, int64_t, const float*,
                     int64_t, int64_t, int64_t, int64_t, int64_t, float*) {
  TORCH_CHECK(false, "lqlora: AVX2 GEMV called on a non-x86 CPU");
}
}  // namespace lqlora::cpu

#endif

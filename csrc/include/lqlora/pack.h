// Bit packing of the "32-lane group" layout (docs/format.md, format version 1).
//
// A stream of k-bit codes is cut into groups of 32 codes; group G occupies the k uint32
// words [G*k, G*k + k), read as one little-endian 32k-bit integer where code i (0..31)
// sits at bits [i*k, i*k + k). Everything here is header-only and usable from host and
// device code, so CPU and CUDA kernels share one definition of the layout.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define LQ_HD __host__ __device__ __forceinline__
#else
#define LQ_HD inline
#endif

namespace lqlora {

constexpr int kGroupCodes = 32;  // codes per packed group, for every bit width

// Code i (0..31) of a group whose k words start at `words`. With Bits and i known at
// compile time (unrolled loops) every shift and mask below folds to a constant.
template <int Bits>
LQ_HD uint32_t unpack_code(const uint32_t* words, int i) {
  static_assert(Bits >= 1 && Bits <= 8, "codes are 1..8 bits wide");
  constexpr uint32_t kMask = (1u << Bits) - 1u;
  const int bit = i * Bits;
  const int w = bit >> 5;
  const int sh = bit & 31;
  if constexpr ((32 % Bits) == 0) {
    return (words[w] >> sh) & kMask;  // never straddles a word
  } else {
    uint64_t pair = words[w];
    if (sh + Bits > 32) pair |= static_cast<uint64_t>(words[w + 1]) << 32;
    return static_cast<uint32_t>(pair >> sh) & kMask;
  }
}

// Runtime-width variant for cold paths (scale codes, ragged edges, packing checks).
LQ_HD uint32_t unpack_code_rt(const uint32_t* words, int bits, int i) {
  const uint32_t mask = (1u << bits) - 1u;
  const int bit = i * bits;
  const int w = bit >> 5;
  const int sh = bit & 31;
  uint64_t pair = words[w];
  if (sh + bits > 32) pair |= static_cast<uint64_t>(words[w + 1]) << 32;
  return static_cast<uint32_t>(pair >> sh) & mask;
}

// Code at flat index `idx` of a packed stream of `bits`-wide codes.
LQ_HD uint32_t code_at(const uint32_t* stream, int bits, int64_t idx) {
  return unpack_code_rt(stream + (idx >> 5) * bits, bits, static_cast<int>(idx & 31));
}

// Packs 32 codes (each < 2^bits) into `bits` words (zeroed first).
LQ_HD void pack_group(const uint8_t* codes, int bits, uint32_t* words) {
  for (int w = 0; w < bits; ++w) words[w] = 0;
  for (int i = 0; i < kGroupCodes; ++i) {
    const int bit = i * bits;
    const int w = bit >> 5;
    const int sh = bit & 31;
    words[w] |= static_cast<uint32_t>(codes[i]) << sh;
    if (sh + bits > 32) words[w + 1] |= static_cast<uint32_t>(codes[i]) >> (32 - sh);
  }
}

// Number of int32 words holding n codes of `bits` bits.
LQ_HD int64_t packed_words(int64_t n, int bits) { return ((n + 31) / 32) * bits; }

}  // namespace lqlora

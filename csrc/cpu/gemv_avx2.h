// Fused dequantize + skinny GEMM for the CPU decode path (M <= 16), AVX2 + FMA.
//
// Layout assumed (docs/format.md): codes bit-packed in 32-code groups of Bits words; a row
// of K = 32*G codes starts on a group boundary (the caller guarantees K % 32 == 0), so row
// n owns groups [n*G, n*G + G). Block size B0 is a power of two >= 16, so a group lies in
// one block (B0 >= 32) or two (B0 = 16).
//
// Covers 2..4 bits (wider codes take the generic path: AVX2 gathers lose to it). Per group:
// the 32 codes become 4 vectors of 8 *unscaled* levels (permute-based table lookup), each row of x does 4 FMAs into a group partial, and
// the block scale is applied once per group (acc += ŝ · Σ level·x). Levels are decoded
// once and reused by every row of x.
#pragma once
#include <cstdint>

namespace lqlora::cpu {

// True when this CPU can run fused_gemv_avx2.
bool have_avx2_fma();

// out[m * N + n] = Σ_k W[n, k] x[m, k] for rows n in [n0, n1), all m < M (M <= 16),
// bits in 2..4.
// qcodes: packed codes; scales: fp32 [nblocks]; levels: fp32 [2^bits]; x: fp32 [M, K].
void fused_gemv_avx2(int bits, const uint32_t* qcodes, const float* scales,
                     const float* levels, int64_t block_size, const float* x, int64_t M,
                     int64_t K, int64_t N, int64_t n0, int64_t n1, float* out);

}  // namespace lqlora::cpu

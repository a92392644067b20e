// Named wrappers for the inline PTX the kernels use: tensor-core MMA, ldmatrix, cp.async,
// a shared-memory table load, and the acquire/release pair of a grid-level flag.
// Each is one instruction on the GPU (the table load two). Under the SIMT emulator
// (LQLORA_EMU) the same names are defined by csrc/emu/ptx_emu.h from the PTX ISA's fragment
// layouts, as warp collectives; this #if is, with LQ_LAUNCH's, the only place kernel code
// tells the two builds apart.
//
// Fragment layouts of mma.sync.m16n8k16.row.col with 16-bit A/B and fp32 C/D (PTX ISA,
// "Matrix Fragments for mma.m16n8k16"), g = lane / 4, t = lane % 4, two 16-bit elements per
// 32-bit register, the lower-index element in the low half:
//   A (16x16, row-major): a[0] = A[g][2t..2t+1]    a[1] = A[g+8][2t..2t+1]
//                         a[2] = A[g][2t+8..2t+9]  a[3] = A[g+8][2t+8..2t+9]
//   B (16x8, k x n):      b[0] = B[2t..2t+1][g]    b[1] = B[2t+8..2t+9][g]
//   C, D (16x8):          c[0] = C[g][2t]  c[1] = C[g][2t+1]  c[2] = C[g+8][2t]  c[3] = C[g+8][2t+1]
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#if !defined(LQLORA_EMU)
namespace lqlora::cuda::ptx {

// d += A * B (m16n8k16, fp32 accumulation), T = __nv_bfloat16 or __half: the element type
// of A and B.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4],
                                          const uint32_t (&b)[2]) {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>,
                "mma_16816 takes bf16 or fp16 operands");
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16: lanes 8j..8j+7 give the addresses of the
// 8 rows (16 bytes each, 16-byte aligned, shared memory) of matrix j; r[j] receives
// M_j[lane/4][2(lane%4)..+1] (transposed: M_j[2(lane%4)..+1][lane/4]).
template <bool Trans = false>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row));
  if constexpr (Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}

// cp.async: Bytes (4, 8 or 16) from global `src` to shared `dst`, asynchronously; visible to
// the issuing thread after cp_async_wait<N> leaves at most N newer groups pending.
template <int Bytes>
__device__ __forceinline__ void cp_async(void* dst, const void* src) {
  static_assert(Bytes == 4 || Bytes == 8 || Bytes == 16, "cp.async copies 4, 8 or 16 bytes");
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  if constexpr (Bytes == 16)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src));
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(d), "l"(src), "n"(Bytes));
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::);
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// The fp32 at byte offset (byte k of `offs`) of a 256-byte aligned shared-memory table:
// one byte permute builds the whole address (the table's shared-window address, whose low
// byte is 0, with byte k of `offs` in its place) and one ld.shared reads it. sm_90 shared
// addresses carry the block's cluster rank, so they are not constants; a generic pointer
// `table + offset` costs a separate add per lookup wherever ptxas keeps the base in a
// regular register.
__device__ __forceinline__ float lds_table_byte(const float* table, uint32_t offs, int k) {
  const unsigned base = static_cast<unsigned>(__cvta_generic_to_shared(table));
  const unsigned a = __byte_perm(offs, base, 0x7650u | static_cast<unsigned>(k));
  float v;
  asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(v) : "r"(a));
  return v;
}

// A GPU-scope acquire load of a flag another block releases (ld.acquire.gpu).
__device__ __forceinline__ int ld_acquire_gpu(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// A GPU-scope release increment (red.release.gpu): everything this thread wrote before is
// visible to a block that acquires the new value.
__device__ __forceinline__ void red_add_release_gpu(int* p, int v) {
  asm volatile("red.release.gpu.global.add.s32 [%0], %1;\n" ::"l"(p), "r"(v) : "memory");
}

}  // namespace lqlora::cuda::ptx
#endif  // !LQLORA_EMU

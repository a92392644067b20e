// The SIMT emulator's own tests: small kernels, correct and deliberately broken, built with
// the host compiler and the emulator (csrc/emu) by tests/test_emu.py, plainly or under
// ASan+UBSan. `selftest CASE` runs one case and prints what happened; the test decides
// whether that was right:
//   "result <values>"                  the kernel completed; its output
//   "fault <cudaError name>: <report>" the emulator refused it
// The schedule order comes from LQLORA_EMU_SCHEDULE / LQLORA_EMU_SEED, the worker count from
// LQLORA_EMU_WORKERS.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "../../csrc/cuda/ptx.cuh"

namespace {
namespace ptx = lqlora::cuda::ptx;

// ---------------------------------------------------------------- correct kernels
// Block-wide sum: shared-memory tree with barriers, then a warp shuffle tail.
__global__ void block_sum(const float* x, int n, float* out) {
  __shared__ float part[256];
  const int t = threadIdx.x;
  const int i = blockIdx.x * blockDim.x + t;
  part[t] = i < n ? x[i] : 0.f;
  __syncthreads();
  for (int s = blockDim.x / 2; s >= 32; s >>= 1) {
    if (t < s) part[t] += part[t + s];
    __syncthreads();
  }
  if (t < 32) {
    float v = part[t];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (t == 0) out[blockIdx.x] = v;
  }
}

// Every shuffle form, width 8 and 32, plus votes and reductions; one warp of 32 lanes.
__global__ void warp_ops(int* out) {
  const int l = threadIdx.x;
  int k = 0;
  out[32 * k++ + l] = __shfl_sync(0xffffffffu, l * 10, 3);
  out[32 * k++ + l] = __shfl_sync(0xffffffffu, l * 10, l + 1, 8);
  out[32 * k++ + l] = __shfl_up_sync(0xffffffffu, l, 2, 8);
  out[32 * k++ + l] = __shfl_down_sync(0xffffffffu, l, 3);
  out[32 * k++ + l] = __shfl_xor_sync(0xffffffffu, l, 5, 8);
  out[32 * k++ + l] = static_cast<int>(__ballot_sync(0xffffffffu, l % 3 == 0));
  out[32 * k++ + l] = __any_sync(0xffffffffu, l == 31) + 2 * __all_sync(0xffffffffu, l < 31);
  out[32 * k++ + l] = __reduce_add_sync(0xffffffffu, l);
  out[32 * k++ + l] = __reduce_min_sync(0xffffffffu, 7 - l);
  out[32 * k++ + l] = static_cast<int>(__reduce_or_sync(0xffffffffu, 1u << l));
  out[32 * k++ + l] = __syncthreads_count(l & 1) + 100 * __syncthreads_or(l == 5) +
                      1000 * __syncthreads_and(l < 40);
  if (l < 16) out[32 * k + l] = __shfl_xor_sync(0x0000ffffu, l, 1);  // half-warp mask
  else out[32 * k + l] = __shfl_xor_sync(0xffff0000u, l, 2);
}

// A partial warp (blockDim 40): lanes 8..31 of warp 1 do not exist, so its shuffles name
// lanes 0..7 only and use width 8.
__global__ void partial_warp(int* out) {
  const int t = threadIdx.x;
  const unsigned mask = t < 32 ? 0xffffffffu : 0xffu;
  out[t] = __shfl_down_sync(mask, t, 1, t < 32 ? 32 : 8);
}

// One m16n8k16 bf16 MMA: A[m][k] = ((m * 16 + k) % 13 - 6) / 8, B[k][n] = ((k * 8 + n) % 11 -
// 5) / 4, C[m][n] = m - n (all exact in bf16, so D is exact): out = D[16][8], row-major.
__device__ unsigned short bf16_bits(float v) {
  const __nv_bfloat16 h = __float2bfloat16_rn(v);
  unsigned short u;
  memcpy(&u, &h, 2);
  return u;
}
__global__ void mma_bf16(float* out) {
  const int l = threadIdx.x, g = l / 4, t = l % 4;
  auto A = [](int m, int k) { return ((m * 16 + k) % 13 - 6) / 8.f; };
  auto B = [](int k, int n) { return ((k * 8 + n) % 11 - 5) / 4.f; };
  auto pack = [](float lo, float hi) {
    return static_cast<uint32_t>(bf16_bits(lo)) | (static_cast<uint32_t>(bf16_bits(hi)) << 16);
  };
  const uint32_t a[4] = {pack(A(g, 2 * t), A(g, 2 * t + 1)), pack(A(g + 8, 2 * t), A(g + 8, 2 * t + 1)),
                         pack(A(g, 2 * t + 8), A(g, 2 * t + 9)),
                         pack(A(g + 8, 2 * t + 8), A(g + 8, 2 * t + 9))};
  const uint32_t b[2] = {pack(B(2 * t, g), B(2 * t + 1, g)), pack(B(2 * t + 8, g), B(2 * t + 9, g))};
  float d[4] = {static_cast<float>(g - 2 * t), static_cast<float>(g - 2 * t - 1),
                static_cast<float>(g + 8 - 2 * t), static_cast<float>(g + 8 - 2 * t - 1)};
  ptx::mma_16816<__nv_bfloat16>(d, a, b);
  out[g * 8 + 2 * t] = d[0];
  out[g * 8 + 2 * t + 1] = d[1];
  out[(g + 8) * 8 + 2 * t] = d[2];
  out[(g + 8) * 8 + 2 * t + 1] = d[3];
}

// ldmatrix.x4 (and .trans) from a 32x8 shared tile holding 0..255: out[lane*4 + j] = r[j] of
// lane, then the transposed load after it.
__global__ void ldmatrix(unsigned* out) {
  __shared__ __align__(16) unsigned short tile[32][8];
  const int l = threadIdx.x;
  for (int i = 0; i < 8; ++i) tile[l][i] = static_cast<unsigned short>(l * 8 + i);
  __syncwarp();
  uint32_t r[4];
  ptx::ldmatrix_x4(r, &tile[l][0]);
  for (int j = 0; j < 4; ++j) out[l * 4 + j] = r[j];
  ptx::ldmatrix_x4<true>(r, &tile[l][0]);
  for (int j = 0; j < 4; ++j) out[128 + l * 4 + j] = r[j];
}

// cp.async through shared memory: two groups, each waited for before use.
__global__ void cp_async_ok(const unsigned* src, unsigned* out) {
  __shared__ __align__(16) unsigned s[2][128];
  const int t = threadIdx.x;
  ptx::cp_async<16>(&s[0][4 * t], src + 4 * t);
  ptx::cp_async_commit();
  ptx::cp_async<8>(&s[1][2 * t], src + 128 + 2 * t);
  ptx::cp_async<8>(&s[1][64 + 2 * t], src + 192 + 2 * t);
  ptx::cp_async_commit();
  ptx::cp_async_wait<1>();  // the first group has landed
  __syncthreads();
  out[t] = s[0][(t * 5) % 128];
  ptx::cp_async_wait<0>();
  __syncthreads();
  out[32 + t] = s[1][(t * 7) % 128];
}

// ------------------------------------------------------------------ broken kernels
// Reads the cp.async destination before waiting for it.
__global__ void cp_async_no_wait(const unsigned* src, unsigned* out) {
  __shared__ __align__(16) unsigned s[128];
  const int t = threadIdx.x;
  ptx::cp_async<16>(&s[4 * t], src + 4 * t);
  ptx::cp_async_commit();
  __syncthreads();
  out[t] = s[(t * 5) % 128];  // a cp_async_wait<0>() belongs before the barrier
}

// An MMA issued by half the warp.
__global__ void mma_half_warp(float* out) {
  uint32_t a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
  float d[4] = {0, 0, 0, 0};
  if (threadIdx.x < 16) ptx::mma_16816<__half>(d, a, b);
  out[threadIdx.x] = d[0];
}

// Missing barrier between the shared write and the read of a neighbour's value: the output
// depends on the schedule order.
__global__ void missing_barrier(int* out) {
  __shared__ int s[64];
  const int t = threadIdx.x;
  s[t] = t;
  out[t] = s[(t + 1) % 64];  // a __syncthreads() belongs before this read
}

// Full-mask shuffle inside a divergent branch.
__global__ void divergent_shuffle(int* out) {
  const int t = threadIdx.x;
  int v = t;
  if (t < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
  else v = __shfl_xor_sync(0xffffffffu, v, 2);
  out[t] = v;
}

// Barrier after an early return.
__global__ void barrier_after_return(int* out, int n) {
  __shared__ int s[64];
  const int t = threadIdx.x;
  if (t >= n) return;
  s[t] = t;
  __syncthreads();
  out[t] = s[n - 1 - t];
}

// Threads waiting at two different barriers.
__global__ void divergent_barrier(int* out) {
  const int t = threadIdx.x;
  if (t < 32) __syncthreads();
  else __syncthreads();
  out[t] = t;
}

// A 16-byte vector load from an address 4 bytes off alignment.
__global__ void misaligned_vector_load(const unsigned* p, unsigned* out) {
  const uint4 v = __ldcs(reinterpret_cast<const uint4*>(p + 1));
  out[threadIdx.x] = v.x;
}

// The same through a plain dereference (caught by UBSan's alignment check).
__global__ void misaligned_deref(const unsigned* p, unsigned* out) {
  const uint4 v = *reinterpret_cast<const uint4*>(p + 1);
  out[threadIdx.x] = v.x;
}

// Reads one element past the end of its input (caught by ASan).
__global__ void out_of_bounds(const float* x, int n, float* out) {
  out[threadIdx.x] = x[threadIdx.x + n - 31];
}

// The same without the width: lane 7 of warp 1 reads lane 8, outside the mask (undefined).
__global__ void shuffle_outside_mask(int* out) {
  const int t = threadIdx.x;
  const unsigned mask = t < 32 ? 0xffffffffu : 0xffu;
  out[t] = __shfl_down_sync(mask, t, 1);
}

// Lanes 0-15 wait at a barrier, lanes 16-31 at a full-mask shuffle that needs lanes 0-15.
__global__ void deadlock(int* out) {
  const int t = threadIdx.x;
  if (t < 16) __syncthreads();
  else out[t] = __shfl_sync(0xffffffffu, t, 0);
}

// A mask that does not include the calling lane; one naming lanes that exited.
__global__ void mask_misses_caller(int* out) {
  out[threadIdx.x] = __shfl_sync(0x1u, static_cast<int>(threadIdx.x), 0);
}
__global__ void mask_names_exited(int* out) {
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x), 0);
}
// Reads shared memory nobody wrote: the poison (0xFF bytes) shows.
__global__ void uninitialised_shared(unsigned* out) {
  __shared__ unsigned s[32];
  if (threadIdx.x == 0) s[1] = 7;
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x];
}

// ------------------------------------------------------------------------- driver
void report(cudaError_t err) {
  std::printf("fault %s: %s\n", cudaGetErrorName(err), cudaGetErrorString(err));
}

template <typename T>
void print_result(const std::vector<T>& v) {
  std::printf("result");
  for (const T& x : v) std::printf(" %lld", static_cast<long long>(x));
  std::printf("\n");
}

int run(const std::string& c) {
  if (c == "block_sum") {
    const int n = 10000;
    std::vector<float> x(n), out(40);
    for (int i = 0; i < n; ++i) x[i] = static_cast<float>(i % 7);
    LQ_LAUNCH(dim3(40), dim3(256), 0, nullptr, block_sum)(x.data(), n, out.data());
    if (cudaError_t e = cudaGetLastError()) return report(e), 0;
    print_result(out);
  } else if (c == "warp_ops") {
    std::vector<int> out(32 * 12, -1);
    LQ_LAUNCH(dim3(1), dim3(32), 0, nullptr, warp_ops)(out.data());
    if (cudaError_t e = cudaGetLastError()) return report(e), 0;
    print_result(out);
  } else if (c == "partial_warp") {
    std::vector<int> out(40, -1);
    LQ_LAUNCH(dim3(1), dim3(40), 0, nullptr, partial_warp)(out.data());
    if (cudaError_t e = cudaGetLastError()) return report(e), 0;
    print_result(out);
  } else if (c == "shuffle_outside_mask") {
    std::vector<int> out(40, -1);
    LQ_LAUNCH(dim3(1), dim3(40), 0, nullptr, shuffle_outside_mask)(out.data());
    if (cudaError_t e = cudaGetLastError()) return report(e), 0;
    print_result(out);
  } else if (c == "deadlock") {
    std::vector<int> out(32, -1);
    LQ_LAUNCH(dim3(1), dim3(32), 0, nullptr, deadlock)(out.data());
    if (cudaError_t e = cudaGetLastError()) return report(e), 0;
    print_result(out);
  } else if (c == "mma_bf16") {
    std::vector<float> out(128, -1.f);
    LQ_LAUNCH(dim3(1), dim3(32), 0, nullptr, mma_bf16)(out.data());
    if (cudaError_t e = cudaGetLastError()) return report(e), 0;
    std::printf("result");
    for (float v : out) std::printf(" %.9g", v);
    std::printf("\n");
  } else if (c == "ldmatrix") {
    std::vector<unsigned> out(256, 0);
    LQ_LAUNCH(dim3(1), dim3(32), 0, nullptr, ldmatrix)(out.data());
    if (cudaError_t e = cudaGetLastError()) return report(e), 0;
    print_result(out);
  } else if (c == "cp_async_ok" || c == "cp_async_no_wait") {
    std::vector<unsigned> src(256), out(64, 0);
    for (int i = 0; i < 256; ++i) src[i] = 1000 + i;
    if (c == "cp_async_ok")
      LQ_LAUNCH(dim3(1), dim3(32), 0, nullptr, cp_async_ok)(src.data(), out.data());
    else
      LQ_LAUNCH(dim3(1), dim3(32), 0, nullptr, cp_async_no_wait)(src.data(), out.data());
    if (cudaError_t e = cudaGetLastError()) return report(e), 0;
    print_result(out);
  } else if (c == "mma_half_warp") {
    std::vector<float> out(32, -1.f);
    LQ_LAUNCH(dim3(1), dim3(32), 0, nullptr, mma_half_warp)(out.data());
    if (cudaError_t e = cudaGetLastError()) return report(e), 0;
    print_result(out);
  } else if (c == "missing_barrier") {
    std::vector<int> out(64, -1);
    LQ_LAUNCH(dim3(1), dim3(64), 0, nullptr, missing_barrier)(out.data());
    if (cudaError_t e = cudaGetLastError()) return report(e), 0;
    print_result(out);
  } else if (c == "divergent_shuffle") {
    std::vector<int> out(32, -1);
    LQ_LAUNCH(dim3(1), dim3(32), 0, nullptr, divergent_shuffle)(out.data());
    if (cudaError_t e = cudaGetLastError()) return report(e), 0;
    print_result(out);
  } else if (c == "barrier_after_return") {
    std::vector<int> out(64, -1);
    LQ_LAUNCH(dim3(1), dim3(64), 0, nullptr, barrier_after_return)(out.data(), 40);
    if (cudaError_t e = cudaGetLastError()) return report(e), 0;
    print_result(out);
  } else if (c == "divergent_barrier") {
    std::vector<int> out(64, -1);
    LQ_LAUNCH(dim3(1), dim3(64), 0, nullptr, divergent_barrier)(out.data());
    if (cudaError_t e = cudaGetLastError()) return report(e), 0;
    print_result(out);
  } else if (c == "misaligned_vector_load" || c == "misaligned_deref") {
    alignas(16) unsigned buf[16] = {};
    std::vector<unsigned> out(32, 0);
    if (c == "misaligned_vector_load")
      LQ_LAUNCH(dim3(1), dim3(32), 0, nullptr, misaligned_vector_load)(buf, out.data());
    else
      LQ_LAUNCH(dim3(1), dim3(32), 0, nullptr, misaligned_deref)(buf, out.data());
    if (cudaError_t e = cudaGetLastError()) return report(e), 0;
    print_result(out);
  } else if (c == "out_of_bounds") {
    const int n = 64;
    float* x = static_cast<float*>(std::malloc(n * sizeof(float)));
    for (int i = 0; i < n; ++i) x[i] = 1.f;
    std::vector<float> out(32, 0.f);
    LQ_LAUNCH(dim3(1), dim3(32), 0, nullptr, out_of_bounds)(x, n, out.data());
    std::free(x);
    if (cudaError_t e = cudaGetLastError()) return report(e), 0;
    print_result(out);
  } else if (c == "mask_misses_caller" || c == "mask_names_exited") {
    std::vector<int> out(32, -1);
    if (c == "mask_misses_caller")
      LQ_LAUNCH(dim3(1), dim3(32), 0, nullptr, mask_misses_caller)(out.data());
    else
      LQ_LAUNCH(dim3(1), dim3(32), 0, nullptr, mask_names_exited)(out.data());
    if (cudaError_t e = cudaGetLastError()) return report(e), 0;
    print_result(out);
  } else if (c == "uninitialised_shared") {
    std::vector<unsigned> out(32, 0);
    LQ_LAUNCH(dim3(1), dim3(32), 0, nullptr, uninitialised_shared)(out.data());
    if (cudaError_t e = cudaGetLastError()) return report(e), 0;
    print_result(out);
  } else if (c == "bad_config") {
    std::vector<int> out(32, -1);
    LQ_LAUNCH(dim3(1), dim3(2048), 0, nullptr, warp_ops)(out.data());
    if (cudaError_t e = cudaGetLastError()) return report(e), 0;
    print_result(out);
  } else {
    std::fprintf(stderr, "unknown case %s\n", c.c_str());
    return 2;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s CASE\n", argv[0]);
    return 2;
  }
  return run(argv[1]);
}

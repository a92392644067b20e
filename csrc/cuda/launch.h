// Host launchers of the lqlora CUDA kernels: raw device pointers, sizes and a stream in,
// a cudaError_t out (the launch error; kernels run asynchronously on `stream`).
//
// This header is the only contract between the torch-free .cu files and the torch glue
// (ops_cuda.cpp): it includes no torch header, so the .cu files compile with nvcc alone.
// Every argument check (dtypes, lengths, devices, contiguity) happens in the glue before a
// launcher is called; the launchers trust their arguments.
//
// Alignment contract: `qcodes` and the activation pointers are 16-byte aligned (the glue
// copies a misaligned view), so the kernels may use 16-byte vector loads.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace lqlora::cuda {

// Floating dtypes the kernels read or write. Values are stable (used in switches).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// One packed NFTensor on the device (docs/format.md, format version 1).
struct PackedView {
  const uint32_t* qcodes;   // [ceil(rows*cols/32) * bits] weight codes, 32-code groups
  const uint32_t* qscales;  // [ceil(nblocks/32) * scale_bits] first-level scale codes
  const void* scale2;       // [ngroups] second-level scales, scale2_dtype
  DType scale2_dtype;
  const float* offset;      // [1]
  const float* levels;      // [2^bits] NormalFloat table, ascending
  int64_t rows, cols;       // logical weight shape; rows*cols < 2^31
  int bits;                 // 2..8
  int block_size;           // B0 in {16, 32, 64, 128, 256}
  int scale_bits;           // b0 in {2, 3, 4, 8}
  int scale_block_size;     // B1 in {16, 64, 256}
};

// Low-rank term of qmatmul: out += scale * (x @ a^T) @ b^T.
struct LoraView {
  const void* a;  // [rank, cols], a_dtype, contiguous
  DType a_dtype;
  const void* b;  // [rows, rank], b_dtype, contiguous
  DType b_dtype;
  int rank;
  float scale;
  float* t;       // workspace fp32 [lora_t_floats(M, cols, rank)] (x @ a^T, K-slice partials)
  int* ready;     // workspace int32 [lora_ready_ints(M, rank)] (the fused kernels' counters;
                  // zeroed by the launch)
};

// The fused kernels' LoRA work split (lora.cuh): tiles of kLoraJ columns of t by kLoraTileM
// rows of x, each split over K into lora_k_slices(cols) producer blocks of kLoraKChunk.
constexpr int kLoraJ = 4;
constexpr int kLoraTileM = 16;
constexpr int kLoraKChunk = 512;
constexpr int kLoraMaxSlices = 16;
inline int lora_tiles(int rank, int M) {
  return ((rank + kLoraJ - 1) / kLoraJ) * ((M + kLoraTileM - 1) / kLoraTileM);
}
inline int lora_k_slices(int64_t cols) {
  const int64_t s = (cols + kLoraKChunk - 1) / kLoraKChunk;
  return static_cast<int>(s < 1 ? 1 : s > kLoraMaxSlices ? kLoraMaxSlices : s);
}
inline int64_t lora_t_floats(int64_t M, int64_t cols, int64_t rank) {
  const int s = lora_k_slices(cols);
  return (s == 1 ? 1 : 1 + s) * M * rank;
}
inline int64_t lora_ready_ints(int M, int rank) { return 1 + lora_tiles(rank, M); }

// ŝ[j] for j in [0, nblocks): fp32 out[nblocks], bit-exact with the CPU.
cudaError_t launch_unpack_scales(const uint32_t* qscales, const void* scale2, DType scale2_dtype,
                                 const float* offset, int64_t nblocks, int scale_bits,
                                 int scale_block_size, float* out, cudaStream_t stream);

// Flat elements [e_begin, e_end) of the dense weight -> out[e - e_begin] in out_dtype
// (level[code] * ŝ in fp32, then a round-to-nearest-even cast), bit-exact with the CPU.
cudaError_t launch_dequantize(const PackedView& w, int64_t e_begin, int64_t e_end, void* out,
                              DType out_dtype, cudaStream_t stream);

// Quantization, step 1: s1[j] = max |w| over block j of the dense fp32 w [n] (contiguous),
// s1 fp32 [nblocks]. NaN propagates: s1 is finite exactly when w is.
cudaError_t launch_quantize_absmax(const float* w, int64_t n, int block_size, float* ws_s1,
                                   cudaStream_t stream);

// Quantization, the rest: dense fp32 w[rows, cols] (contiguous) and its block absmax s1
// (launch_quantize_absmax) -> the four packed tensors, bit-exact with the CPU. Workspaces:
// shat fp32 [nblocks], c fp32 [ngroups]. The input must be finite (the glue checks s1).
// scale2 is written in scale_dtype, offset[0] in fp32.
cudaError_t launch_quantize(const float* w, int64_t rows, int64_t cols, const float* levels,
                            int bits, int block_size, int scale_bits, int scale_block_size,
                            DType scale_dtype, uint32_t* qcodes, uint32_t* qscales, void* scale2,
                            float* offset, const float* ws_s1, float* ws_c, float* ws_shat,
                            cudaStream_t stream);

// Fused qmatmul, 1 <= M <= qmatmul_fused_max_m(x_dtype): out[M, rows] = x[M, cols] @ W^T
// (+ LoRA), fp32 accumulation, out in x_dtype. x contiguous [M, cols]. lora may be null.
// fp32 x: CUDA cores up to kSmallM rows; 16-bit x: tensor cores for kMmaMinM < M <= kMmaMaxM
// when cols % 32 == 0 (CUDA cores below, and for other cols up to kSmallM), and at
// 2 <= M <= kMmaMinM too for tall NF2-NF4 matrices (qmatmul_use_mma).
constexpr int kSmallM = 16;
constexpr int kMmaMinM = 4;
// At M = 2..4 the decode kernel redoes its per-weight work for every row of x, the
// tensor-core kernel does not; but it has a grid of rows / 32 blocks, which leaves the SMs
// short of warps for short matrices. The SASS cost model (bench/results/sass_cost_model.md,
// "CUDA-core decode kernel vs tensor-core kernel") puts it ahead for NF2-NF4 from 8192 rows
// at M = 2 (1.2-1.6x at 8192 and 28672 rows) and from 4096 rows at M = 3, 4 (1.01-1.27x),
// behind at 4096 rows and M = 2 and on the small (576-1536 row) shapes, and even for NF8.
constexpr int64_t kMmaTallRows = 8192;  // M >= 2
constexpr int64_t kMmaMidRows = 4096;   // M >= 3
// For 16-bit x (the tensor-core kernel takes nothing else).
inline bool qmatmul_use_mma(int M, int64_t rows, int64_t cols, int bits) {
  if (cols % 32 != 0) return false;
  if (M > kMmaMinM) return true;
  return bits <= 4 && ((M >= 2 && rows >= kMmaTallRows) || (M >= 3 && rows >= kMmaMidRows));
}
// Beyond 64 rows dequantize + cuBLAS wins: the SASS cost model puts M = 128 at 183 us on
// the MMA kernel (every warp reloads its x rows per chunk through L1) against 104 us, for
// 8192^2 NF4 on an H100 (bench/results/sass_cost_model.md).
constexpr int kMmaMaxM = 64;
inline int qmatmul_fused_max_m(DType x_dtype, int64_t cols) {
  return x_dtype != DType::kFloat32 && cols % 32 == 0 ? kMmaMaxM : kSmallM;
}
cudaError_t launch_qmatmul_small(const void* x, DType x_dtype, int M, const PackedView& w,
                                 const LoraView* lora, void* out, cudaStream_t stream);

// Small-M qmatmul_t (M <= kSmallM): out[M, cols] = g[M, rows] @ W in g_dtype, through
// per-split fp32 partial sums partial[splits, M, cols] (workspace) added in split order.
// `scales` is fp32 [nblocks] from launch_unpack_scales. `splits` from qmatmul_t_splits().
int qmatmul_t_splits(int64_t rows, int64_t cols, int M);
cudaError_t launch_qmatmul_t_small(const void* g, DType g_dtype, int M, const PackedView& w,
                                   const float* scales, int splits, float* partial, void* out,
                                   cudaStream_t stream);

}  // namespace lqlora::cuda

// Host launchers of lqlora::rsvd's kernels on CUDA: the batched symmetric Jacobi eigensolver
// (rsvd.cu) and the Gaussian sketch (sketch.cu); the glue is ops_rsvd.cpp. Torch-free, like
// launch.h: raw device pointers, sizes and a stream in, the launch error out.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "lqlora/pack.h"  // LQ_HD: host + device under nvcc, plain inline for the host compiler

namespace lqlora::cuda {

// The padded order (k rounded up to even: the round-robin pairing needs an even count) up
// to which the working copy of G lives in shared memory: 76^2 fp64 = 45.1 KiB (+ 0.6 KiB of
// rotations), under the 48 KiB of static shared memory a block may have; it covers rank
// 64 + oversample 10. Larger k, up to kJacobiMaxOrder, runs the same kernel on a
// global-memory copy (jacobi_workspace_doubles); beyond that the glue uses ATen's eigh.
constexpr int kJacobiMaxSharedOrder = 76;
constexpr int kJacobiMaxOrder = 1024;
constexpr int kJacobiThreads = 512;  // 16 warps: at most 3 of the 38 pairs each (k <= 76)
constexpr int kJacobiMaxSweeps = 40;

LQ_HD int jacobi_padded_order(int k) { return k + (k & 1); }

// fp64 elements of the global workspace per batch entry: the eigenvector rows [kp, kp],
// plus the working copy of G [kp, kp] when kp exceeds kJacobiMaxSharedOrder.
LQ_HD int64_t jacobi_workspace_doubles(int k) {
  const int64_t kp = jacobi_padded_order(k);
  return (kp > kJacobiMaxSharedOrder ? 2 : 1) * kp * kp;
}

// Eigen-decomposition of `batch` symmetric matrices g [batch, k, k] (fp64, row-major,
// contiguous; read only): evals [batch, k] in descending order and evecs [batch, k, k]
// whose row j is the unit eigenvector of evals[j] (so evecs^T has the eigenvectors as
// columns). One block per matrix; cyclic parallel Jacobi (Brent-Luk round-robin order, a
// fixed number of rounds per sweep), stopping after the first sweep that rotates nothing
// or after kJacobiMaxSweeps sweeps: deterministic, no atomics. `work` holds
// batch * jacobi_workspace_doubles(k) doubles.
cudaError_t launch_jacobi_eigh(const double* g, int64_t batch, int k, double* evals,
                               double* evecs, double* work, cudaStream_t stream);

// Fills out[0, count) (float32, or float64 when fp64) with the Gaussian sketch of `seed`
// (lqlora/gaussian.h: element t of the flat tensor, the same bits as the CPU draw).
// sketch.cu.
cudaError_t launch_gaussian_sketch(uint64_t seed, int64_t count, bool fp64, void* out,
                                   cudaStream_t stream);

}  // namespace lqlora::cuda

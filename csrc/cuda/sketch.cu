// lqlora::rsvd's Gaussian sketch drawn on the device: the bits of lqlora/gaussian.h (the
// CPU op's sketch, bit for bit), without the host draw and copy. Counter-based, so any
// thread can draw any pair: thread i of the grid takes pairs i, i + grid, ... and writes
// both of a pair's elements.
#include "common.cuh"
#include "lqlora/gaussian.h"
#include "rsvd.h"

namespace lqlora::cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(256) gaussian_sketch_kernel(uint64_t seed, int64_t count,
                                                                T* out) {
  const int64_t npairs = (count + 1) / 2;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < npairs;
       p += stride) {
    gauss::fill_pairs(seed, 2 * p, 2 * p + 2 < count ? 2 * p + 2 : count, out);
  }
}

}  // namespace

cudaError_t launch_gaussian_sketch(uint64_t seed, int64_t count, bool fp64, void* out,
                                   cudaStream_t stream) {
  if (count <= 0) return cudaSuccess;
  constexpr int kThreads = 256;
  // Up to 1024 blocks (8 per SM on 132 SMs, each thread ~1-4 pairs for a 4096 x 74 sketch).
  const int64_t blocks = std::min<int64_t>(((count + 1) / 2 + kThreads - 1) / kThreads, 1024);
  const dim3 grid(static_cast<unsigned>(blocks)), block(kThreads);
  if (fp64) {
    LQ_LAUNCH(grid, block, 0, stream, gaussian_sketch_kernel<double>)(
        seed, count, static_cast<double*>(out));
  } else {
    LQ_LAUNCH(grid, block, 0, stream, gaussian_sketch_kernel<float>)(
        seed, count, static_cast<float*>(out));
  }
  return cudaGetLastError();
}

}  // namespace lqlora::cuda

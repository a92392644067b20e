// Seeded randomized SVD (Halko, Martinsson & Tropp 2011, Alg. 4.4 with QR-stabilized
// power iterations), batched over leading dims. Written with ATen calls, so it is
// registered as CompositeExplicitAutograd and runs wherever the inputs live. The sketch
// (lqlora/gaussian.h) is drawn on the CPU here and moved to the input's device; devices with
// their own kernel (CUDA) draw the same bits in place, so the same inputs give the same
// sketch on every device.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "lqlora/gaussian.h"
#include "lqlora/guards.h"
#include "lqlora/rsvd_args.h"

namespace lqlora {
namespace {

// The Gaussian sketch of lqlora/gaussian.h drawn on the CPU: `shape`, float32 or float64.
// This file is compiled with -ffp-contract=off (CMakeLists.txt), which the bits rely on.
at::Tensor gaussian_sketch_cpu(at::IntArrayRef shape, at::ScalarType dtype, int64_t seed) {
  at::Tensor out = at::empty(shape, at::TensorOptions().dtype(dtype));
  const int64_t count = out.numel();
  AT_DISPATCH_FLOATING_TYPES(dtype, "rsvd_sketch", [&] {
    scalar_t* p = out.data_ptr<scalar_t>();
    // Whole pairs per task (begin even): 2^13 pairs, ~0.1 ms of work.
    at::parallel_for(0, (count + 1) / 2, int64_t{1} << 13, [&](int64_t lo, int64_t hi) {
      gauss::fill_pairs(static_cast<uint64_t>(seed), 2 * lo, std::min(2 * hi, count), p);
    });
  });
  return out;
}

// Draws the sketch on the CPU, then moves it to `device`.
auto draw_on_cpu(const at::Device& device) {
  return [device](at::IntArrayRef shape, at::ScalarType dtype, int64_t seed) {
    return gaussian_sketch_cpu(shape, dtype, seed).to(device);
  };
}

at::Tensor sketch_impl(const at::Tensor& a, int64_t k, int64_t seed) {
  rsvd_sketch_check_args(a, k);
  return draw_on_cpu(a.device())(rsvd_sketch_shape(a, k), a.scalar_type(), seed);
}

at::Tensor orthonormal(const at::Tensor& y) { return std::get<0>(at::linalg_qr(y, "reduced")); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> rsvd_impl(const at::Tensor& a, int64_t rank,
                                                         int64_t oversample, int64_t niter,
                                                         int64_t seed,
                                                         const std::optional<at::Tensor>& init) {
  const NoAutocast no_autocast;
  const int64_t k = rsvd_check_args(a, rank, oversample, niter);
  const at::Tensor omega = rsvd_sketch(a, k, seed, init, draw_on_cpu(a.device()));
  const at::Tensor at_ = a.mT();
  // NaN/Inf in A refused by name through Y (LAPACK would return NaN factors or fail
  // obscurely), without a pass over A (lqlora/rsvd_args.h).
  const at::Tensor y = at::matmul(a, omega);
  rsvd_check_sketch_product(y, a);
  at::Tensor q = orthonormal(y);
  for (int64_t i = 0; i < niter; ++i) {
    q = orthonormal(at::matmul(a, orthonormal(at::matmul(at_, q))));
  }
  auto [ub, s, vh] = at::linalg_svd(at::matmul(q.mT(), a), /*full_matrices=*/false);
  at::Tensor u = at::matmul(q, ub.narrow(-1, 0, rank));
  return {u, s.narrow(-1, 0, rank).contiguous(), vh.narrow(-2, 0, rank).mT().contiguous()};
}

}  // namespace

TORCH_LIBRARY_IMPL(lqlora, CompositeExplicitAutograd, m) {
  m.impl("rsvd", &rsvd_impl);
  m.impl("rsvd_sketch", &sketch_impl);
}

}  // namespace lqlora

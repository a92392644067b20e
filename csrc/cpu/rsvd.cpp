// Seeded randomized SVD (Halko, Martinsson & Tropp 2011, Alg. 4.4 with QR-stabilized
// power iterations), batched over leading dims. Written with ATen calls, so it is
// registered as CompositeExplicitAutograd and runs wherever the inputs live; the sketch is
// always drawn on the CPU from `seed` so the same inputs give the same factors on every
// device.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/library.h>

#include "lqlora/guards.h"

namespace lqlora {
namespace {

at::Tensor orthonormal(const at::Tensor& y) { return std::get<0>(at::linalg_qr(y, "reduced")); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> rsvd_impl(const at::Tensor& a, int64_t rank,
                                                         int64_t oversample, int64_t niter,
                                                         int64_t seed,
                                                         const std::optional<at::Tensor>& init) {
  const NoAutocast no_autocast;
  TORCH_CHECK_TYPE(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble,
                   "lqlora.rsvd: input must be float32 or float64, got ", a.scalar_type());
  TORCH_CHECK_VALUE(a.dim() >= 2, "lqlora.rsvd: input must be [..., m, n], got ", a.dim(), "-D");
  const int64_t m = a.size(-2), n = a.size(-1);
  TORCH_CHECK_VALUE(rank >= 1 && rank <= std::min(m, n), "lqlora.rsvd: rank must be in 1..",
                    std::min(m, n), " for a [", m, ", ", n, "] input, got ", rank);
  TORCH_CHECK_VALUE(oversample >= 0 && niter >= 0,
                    "lqlora.rsvd: oversample and niter must be non-negative");
  const int64_t k = std::min(rank + oversample, std::min(m, n));
  std::vector<int64_t> sk(a.sizes().begin(), a.sizes().end() - 2);
  sk.push_back(n);
  sk.push_back(k);
  at::Tensor omega;
  if (init.has_value()) {
    omega = init->to(a.device(), a.scalar_type());
    TORCH_CHECK_VALUE(omega.sizes() == at::IntArrayRef(sk), "lqlora.rsvd: init must have shape ",
                      at::IntArrayRef(sk), ", got ", init->sizes());
  } else {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(seed));
    omega = at::randn(sk, gen, at::TensorOptions().dtype(a.scalar_type())).to(a.device());
  }
  const at::Tensor at_ = a.mT();
  at::Tensor q = orthonormal(at::matmul(a, omega));
  for (int64_t i = 0; i < niter; ++i) {
    q = orthonormal(at::matmul(a, orthonormal(at::matmul(at_, q))));
  }
  auto [ub, s, vh] = at::linalg_svd(at::matmul(q.mT(), a), /*full_matrices=*/false);
  at::Tensor u = at::matmul(q, ub.narrow(-1, 0, rank));
  return {u, s.narrow(-1, 0, rank).contiguous(), vh.narrow(-2, 0, rank).mT().contiguous()};
}

}  // namespace

TORCH_LIBRARY_IMPL(lqlora, CompositeExplicitAutograd, m) { m.impl("rsvd", &rsvd_impl); }

}  // namespace lqlora

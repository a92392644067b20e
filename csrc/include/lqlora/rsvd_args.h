// lqlora::rsvd's argument checks and sketch, shared by the CPU op (csrc/cpu/rsvd.cpp) and the
// CUDA one (csrc/cuda/ops_rsvd.cpp), so that both refuse the same inputs with the same
// messages and start from the same Gaussian sketch. Host-only.
#pragma once
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <optional>
#include <vector>

namespace lqlora {

// NaN/Inf in `t` is refused naming the first bad element (one reduction; a sync on a GPU).
inline void rsvd_check_finite(const at::Tensor& t, const char* what) {
  const at::Tensor bad = at::logical_not(at::isfinite(t)).reshape(-1);
  if (!bad.any().item<bool>()) return;
  int64_t i = at::argmax(bad.to(at::kByte)).item<int64_t>();
  std::vector<int64_t> pos(t.dim());
  for (int64_t d = t.dim() - 1; d >= 0; --d) {
    pos[d] = i % t.size(d);
    i /= t.size(d);
  }
  TORCH_CHECK_VALUE(false, "lqlora.rsvd: ", what, " contains NaN/Inf; first at ",
                    at::IntArrayRef(pos));
}

// Checks a [..., m, n] input and the rank / oversampling / power-iteration counts; returns
// the sketch width k = min(rank + oversample, m, n).
inline int64_t rsvd_check_args(const at::Tensor& a, int64_t rank, int64_t oversample,
                               int64_t niter) {
  TORCH_CHECK_TYPE(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble,
                   "lqlora.rsvd: input must be float32 or float64, got ", a.scalar_type());
  TORCH_CHECK_VALUE(a.dim() >= 2, "lqlora.rsvd: input must be [..., m, n], got ", a.dim(), "-D");
  const int64_t m = a.size(-2), n = a.size(-1);
  TORCH_CHECK_VALUE(rank >= 1 && rank <= std::min(m, n), "lqlora.rsvd: rank must be in 1..",
                    std::min(m, n), " for a [", m, ", ", n, "] input, got ", rank);
  TORCH_CHECK_VALUE(oversample >= 0 && niter >= 0,
                    "lqlora.rsvd: oversample and niter must be non-negative");
  return std::min(rank + oversample, std::min(m, n));
}

// The sketch Omega [..., n, k] on a's device in a's dtype: `init` (checked: shape, finite),
// or Gaussian drawn on the CPU from `seed`, so the same seed gives the same sketch on every
// device.
inline at::Tensor rsvd_sketch(const at::Tensor& a, int64_t k, int64_t seed,
                              const std::optional<at::Tensor>& init) {
  std::vector<int64_t> sk(a.sizes().begin(), a.sizes().end() - 2);
  sk.push_back(a.size(-1));
  sk.push_back(k);
  if (init.has_value()) {
    at::Tensor omega = init->to(a.device(), a.scalar_type());
    TORCH_CHECK_VALUE(omega.sizes() == at::IntArrayRef(sk), "lqlora.rsvd: init must have shape ",
                      at::IntArrayRef(sk), ", got ", init->sizes());
    rsvd_check_finite(omega, "init");
    return omega;
  }
  auto gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(seed));
  return at::randn(sk, gen, at::TensorOptions().dtype(a.scalar_type())).to(a.device());
}

}  // namespace lqlora

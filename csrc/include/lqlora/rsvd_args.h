// lqlora::rsvd's argument checks and sketch, shared by the CPU op (csrc/cpu/rsvd.cpp) and the
// CUDA one (csrc/cuda/ops_rsvd.cpp), so that both refuse the same inputs with the same
// messages and start from the same Gaussian sketch (lqlora/gaussian.h). Host-only.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <optional>
#include <vector>

namespace lqlora {

// NaN/Inf in `t` is refused naming the first bad element (one reduction; a sync on a GPU).
// rsvd checks its input A through rsvd_check_sketch_product, which calls this only when A
// has a NaN/Inf (or Y overflowed).
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

// NaN/Inf in A [..., m, n] found through the first sketch product Y = A Omega [..., m, k]:
// x * Inf, x * NaN and Inf * 0 are all non-finite and Omega is finite, so every NaN/Inf of A
// reaches its row of Y in an IEEE GEMM (BLAS kernels and cuBLAS do not skip zero operands).
// A finite Y thus proves A finite while reading m k values instead of A's m n (on the CPU,
// isfinite over a 4096 x 4096 A costs a third of the whole rsvd). A bad Y sends the check back
// to A to name its first bad element; a finite A with a non-finite Y overflowed.
inline void rsvd_check_sketch_product(const at::Tensor& y, const at::Tensor& a) {
  if (at::isfinite(y).all().item<bool>()) return;
  rsvd_check_finite(a, "input");
  TORCH_CHECK_VALUE(false, "lqlora.rsvd: the sketch product A @ Omega overflows ", y.scalar_type(),
                    " (input entries up to ", a.abs().max().item<double>(),
                    "); scale the input down or use float64");
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

// The shape [..., n, k] of a [..., m, n]'s sketch.
inline std::vector<int64_t> rsvd_sketch_shape(const at::Tensor& a, int64_t k) {
  std::vector<int64_t> sk(a.sizes().begin(), a.sizes().end() - 2);
  sk.push_back(a.size(-1));
  sk.push_back(k);
  return sk;
}

// The sketch Omega [..., n, k] on a's device in a's dtype: `init` (checked: shape, finite),
// or the Gaussian sketch of `seed` (lqlora/gaussian.h), drawn by the backend's
// `draw(shape, dtype, seed)`: the same bits on every device.
template <typename Draw>
inline at::Tensor rsvd_sketch(const at::Tensor& a, int64_t k, int64_t seed,
                              const std::optional<at::Tensor>& init, Draw&& draw) {
  const std::vector<int64_t> sk = rsvd_sketch_shape(a, k);
  if (init.has_value()) {
    at::Tensor omega = init->to(a.device(), a.scalar_type());
    TORCH_CHECK_VALUE(omega.sizes() == at::IntArrayRef(sk), "lqlora.rsvd: init must have shape ",
                      at::IntArrayRef(sk), ", got ", init->sizes());
    rsvd_check_finite(omega, "init");
    return omega;
  }
  return draw(at::IntArrayRef(sk), a.scalar_type(), seed);
}

// lqlora::rsvd_sketch's checks: a [..., m, n] float32/float64, k >= 0.
inline void rsvd_sketch_check_args(const at::Tensor& a, int64_t k) {
  TORCH_CHECK_TYPE(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble,
                   "lqlora.rsvd_sketch: input must be float32 or float64, got ", a.scalar_type());
  TORCH_CHECK_VALUE(a.dim() >= 2, "lqlora.rsvd_sketch: input must be [..., m, n], got ", a.dim(),
                    "-D");
  TORCH_CHECK_VALUE(k >= 0, "lqlora.rsvd_sketch: k must be non-negative, got ", k);
}

}  // namespace lqlora

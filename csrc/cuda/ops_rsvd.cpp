// lqlora::rsvd on CUDA tensors (and lqlora_emu::rsvd on the SIMT emulator, backend.h): the
// CPU op's algorithm (csrc/cpu/rsvd.cpp: same checks, the same sketch from `seed` or `init`,
// the same power iterations), with the sketch drawn on the device (sketch.cu: the CPU's bits)
// and its two LAPACK-shaped steps replaced:
//   - orthonormalization of the tall-skinny sketches by CholeskyQR (Gram and triangular
//     solve through ATen, i.e. cuBLAS/cuSOLVER, in fp64): one pass when its Q is already
//     orthonormal far below the factors' rounding (fp32), else CholeskyQR2, falling back per
//     batch entry to Householder QR when a Gram matrix is not numerically positive definite
//     (rank-deficient or zero input);
//   - the SVD of the projected k x n matrix B = Q^T A through the eigenpairs of its fp64 Gram
//     matrix B B^T, computed by the batched shared-memory Jacobi kernel of rsvd.cu; then
//     U = Q W, V = orth(B^T W) (which is B^T W / S where S is well above rounding, and stays
//     orthonormal where it is not).
// Column signs are fixed: each column of U has its largest-magnitude entry (the first, on
// ties) positive, and V's column follows.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include <optional>
#include <tuple>
#include <vector>

#include "backend.h"
#include "lqlora/guards.h"
#include "lqlora/rsvd_args.h"
#include "rsvd.h"

namespace lqlora::cuda {
namespace {

// Q of a Householder QR with R's diagonal made non-negative: the Q CholeskyQR produces,
// so the two paths agree on column signs.
at::Tensor householder_q(const at::Tensor& y) {
  auto [q, r] = at::linalg_qr(y, "reduced");
  const at::Tensor neg = r.diagonal(0, -2, -1).lt(0).to(q.scalar_type());
  return q * (1 - 2 * neg).unsqueeze(-2);
}

// One CholeskyQR pass from the Gram matrix gram = y^T y: y = Q L^T with L L^T = gram. `l` gets
// L, `info` cholesky's status.
at::Tensor cholqr_pass(const at::Tensor& y, const at::Tensor& gram, at::Tensor& l,
                       at::Tensor& info) {
  std::tie(l, info) = at::linalg_cholesky_ex(gram, /*upper=*/false, /*check_errors=*/false);
  return at::linalg_solve_triangular(l.mT(), y, /*upper=*/true, /*left=*/false);
}

// Orthonormal basis of the columns of y [B, m, k], k <= m, fp64 in and out. CholeskyQR's
// orthogonality error is ~ eps cond(y)^2. The first pass's is measured on the Gram matrix
// of its Q, which a second pass needs anyway: when every entry's max |Q^T Q - I| is at most
// `accept`, Q is returned after one pass (one Cholesky and one triangular solve instead of
// two of each). Otherwise CholeskyQR2: the second pass restores what the first lost, and
// an entry is redone by Householder QR when either Cholesky fails or the second factor is
// far from the identity (the first pass was too ill-conditioned to trust). One host sync,
// two on the CholeskyQR2 path.
at::Tensor orthonormal(const at::Tensor& y, double accept) {
  at::Tensor l1, info1, l2, info2;
  const int64_t k = y.size(-1);
  const at::Tensor eye = at::eye(k, y.options());
  const at::Tensor q1 = cholqr_pass(y, at::matmul(y.mT(), y), l1, info1);
  const at::Tensor g2 = at::matmul(q1.mT(), q1);
  if (accept > 0 &&
      info1.eq(0).logical_and((g2 - eye).abs().amax({-2, -1}).le(accept)).all().item<bool>())
    return q1;
  at::Tensor q = cholqr_pass(q1, g2, l2, info2);
  const at::Tensor dev = (l2 - eye).abs().amax({-2, -1});
  const at::Tensor bad = info1.ne(0).logical_or(info2.ne(0)).logical_or(dev.le(0.5).logical_not());
  if (bad.any().item<bool>()) {
    const at::Tensor idx = bad.nonzero().squeeze(-1);
    q.index_put_({idx}, householder_q(y.index({idx})));
  }
  return q;
}

// The orthogonality a single CholeskyQR pass must reach to be kept, for factors returned in
// dtype dt: far below fp32's rounding (6e-8) for fp32 factors; fp64 factors always take
// the second pass (an fp64 pass alone reaches ~1e-16 cond^2, rarely fp64's own rounding).
double single_pass_accept(at::ScalarType dt) { return dt == at::kFloat ? 1e-10 : 0.0; }

// Eigenpairs of the symmetric g [B, k, k] (fp64): evals [B, k] descending, evecs [B, k, k]
// with row j the eigenvector of evals[j].
std::tuple<at::Tensor, at::Tensor> eigh_desc(const at::Tensor& g, const at::Device& device) {
  const int64_t B = g.size(0), k = g.size(1);
  if (jacobi_padded_order(static_cast<int>(k)) > kJacobiMaxOrder) {
    // Beyond the kernel's order limit (rank + oversample > 1023): ATen's eigh, ascending.
    auto [w, v] = at::linalg_eigh(g);
    return {w.flip(-1).contiguous(), v.flip(-1).mT().contiguous()};
  }
  const at::Tensor gc = g.contiguous();
  at::Tensor evals = at::empty({B, k}, gc.options());
  at::Tensor evecs = at::empty({B, k, k}, gc.options());
  at::Tensor work = at::empty({B * jacobi_workspace_doubles(static_cast<int>(k))}, gc.options());
  check_launch(launch_jacobi_eigh(gc.data_ptr<double>(), B, static_cast<int>(k),
                                  evals.data_ptr<double>(), evecs.data_ptr<double>(),
                                  work.data_ptr<double>(), current_stream(device)),
               "rsvd");
  return {evals, evecs};
}

// The Gaussian sketch (lqlora/gaussian.h) drawn on a's device.
at::Tensor draw_sketch(at::IntArrayRef shape, at::ScalarType dtype, int64_t seed,
                       const at::Device& device) {
  at::Tensor out = at::empty(shape, at::TensorOptions().dtype(dtype).device(device));
  check_launch(launch_gaussian_sketch(static_cast<uint64_t>(seed), out.numel(),
                                      dtype == at::kDouble, out.data_ptr(),
                                      current_stream(device)),
               "rsvd");
  return out;
}

at::Tensor sketch_cuda(const at::Tensor& a, int64_t k, int64_t seed) {
  rsvd_sketch_check_args(a, k);
  TORCH_CHECK_VALUE(on_backend(a), "lqlora.rsvd_sketch: expected ", kBackendDevice,
                    " tensors, got the input on ", a.device());
  c10::DeviceGuard guard(a.device());
  return draw_sketch(rsvd_sketch_shape(a, k), a.scalar_type(), seed, a.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rsvd_cuda(const at::Tensor& a, int64_t rank,
                                                         int64_t oversample, int64_t niter,
                                                         int64_t seed,
                                                         const std::optional<at::Tensor>& init) {
  const NoAutocast no_autocast;
  // The CPU op's checks, messages and sketch bits (lqlora/rsvd_args.h, lqlora/gaussian.h).
  const int64_t k = rsvd_check_args(a, rank, oversample, niter);
  TORCH_CHECK_VALUE(on_backend(a), "lqlora.rsvd: expected ", kBackendDevice,
                    " tensors, got the input on ", a.device());
  const int64_t m = a.size(-2), n = a.size(-1);
  c10::DeviceGuard guard(a.device());
  const at::ScalarType dt = a.scalar_type();
  std::vector<int64_t> batch(a.sizes().begin(), a.sizes().end() - 2);
  const at::Tensor omega =
      rsvd_sketch(a, k, seed, init, [&](at::IntArrayRef shape, at::ScalarType dtype, int64_t s) {
        return draw_sketch(shape, dtype, s, a.device());
      });

  auto shaped = [&](std::vector<int64_t> tail) {
    std::vector<int64_t> s = batch;
    s.insert(s.end(), tail.begin(), tail.end());
    return s;
  };
  int64_t B = 1;
  for (int64_t d : batch) B *= d;
  if (B == 0) {
    return {at::empty(shaped({m, rank}), a.options()), at::empty(shaped({rank}), a.options()),
            at::empty(shaped({n, rank}), a.options())};
  }
  const at::Tensor a3 = a.reshape({B, m, n});
  const at::Tensor at3 = a3.mT();
  // The sketches are multiplied in a's dtype (cuBLAS) and orthonormalized in fp64.
  const double accept = single_pass_accept(dt);
  auto orth = [&](const at::Tensor& y) { return orthonormal(y.to(at::kDouble), accept).to(dt); };
  // A is checked for NaN/Inf through Y = A Omega (lqlora/rsvd_args.h): exact, and it reads
  // m k values instead of the m n of A.
  const at::Tensor y = at::matmul(a3, omega.reshape({B, n, k}));
  rsvd_check_sketch_product(y, a);
  at::Tensor q = orth(y);
  for (int64_t i = 0; i < niter; ++i) q = orth(at::matmul(a3, orth(at::matmul(at3, q))));

  const at::Tensor bd = at::matmul(q.mT(), a3).to(at::kDouble);  // B = Q^T A [B, k, n]
  auto [evals, evecs] = eigh_desc(at::matmul(bd, bd.mT()), a.device());
  const at::Tensor w = evecs.narrow(-2, 0, rank).mT();            // [B, k, rank] fp64
  const at::Tensor s = evals.narrow(-1, 0, rank).clamp_min(0).sqrt();
  at::Tensor u = at::matmul(q, w.to(dt));                         // [B, m, rank]
  at::Tensor v = orthonormal(at::matmul(bd.mT(), w), accept).to(dt);  // [B, n, rank]

  const at::Tensor top = u.gather(-2, u.abs().argmax(-2, /*keepdim=*/true));  // [B, 1, rank]
  const at::Tensor sign = 1 - 2 * top.lt(0).to(dt);
  u = u * sign;
  v = v * sign;
  return {u.reshape(shaped({m, rank})).contiguous(), s.to(dt).reshape(shaped({rank})).contiguous(),
          v.reshape(shaped({n, rank})).contiguous()};
}

}  // namespace

TORCH_LIBRARY_IMPL(LQ_OPS_NAMESPACE, LQ_OPS_DISPATCH, m) {
  m.impl("rsvd", &rsvd_cuda);
  m.impl("rsvd_sketch", &sketch_cuda);
}

}  // namespace lqlora::cuda

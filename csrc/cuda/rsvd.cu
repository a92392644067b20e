// The small dense step of lqlora::rsvd on CUDA: a batched symmetric eigensolver for the
// (r + p) x (r + p) Gram matrices G = B B^T of the projected matrices B = Q^T A
// (ops_rsvd.cpp builds G in fp64 and turns the eigenpairs into the SVD of B).
//
// Why Jacobi on the Gram matrix: B is (r + p) x n with n up to the model width, too large
// for shared memory, while G fits there (fp64, k <= 76) for the ranks LQ-LoRA uses
// (64 + 10 = 74), so the whole iteration runs in shared memory, one block per batch entry, no
// global traffic but the eigenvector rows. fp64 keeps the squared spectrum accurate: from an
// fp32 B, G's eigenvalues carry an absolute error ~1e-16 * s_max^2, i.e. singular values
// accurate to ~1e-8 * s_max, as good as an fp32 SVD of B.
//
// Order of work (fixed, so results are deterministic): cyclic parallel Jacobi with the
// Brent-Luk round-robin pairing. A sweep is kp - 1 rounds; in a round the kp / 2 pairs
// (p, q) are disjoint, so their rotations commute and are applied together: thread i of
// the first kp / 2 computes pair i's (p, q) and (c, s) from the round's G into shared
// memory, then warp w rotates the rows of pairs w, w + 16, ... (G <- J^T G, and the
// eigenvector rows), its lanes the elements of a row, then the columns (G <- G J) the same
// way; each element is written by exactly one thread. The pair and element indices come
// from the warp and lane numbers, not from dividing a flat thread index: the divisions and
// modulos that cost ~100 instructions per element are gone (sm_90a SASS: ~20 per rotated
// row element, ~10 per column element). A pair is skipped when |g_pq| <= eps * sqrt(g_pp
// g_qq) (the relative rule that keeps small eigenvalues of a PSD matrix accurate) or below
// eps^2 * max_i g_ii; the first sweep that rotates nothing ends the iteration. The final
// sort is by counting (rank of each eigenvalue, ties broken by index), again one writer per
// element.
#include "common.cuh"
#include "rsvd.h"

namespace lqlora::cuda {
namespace {

constexpr double kEps = 2.220446049250313e-16;  // DBL_EPSILON

// Round `round` of the round-robin tournament on kp players: pair i is (p, q), p < q.
// Player kp - 1 stays put, the others rotate; every pair meets once in kp - 1 rounds.
__device__ __forceinline__ void round_pair(int round, int i, int kp, int& p, int& q) {
  const int n1 = kp - 1;
  const int a = i == 0 ? round : (round + i) % n1;
  const int b = i == 0 ? n1 : (round - i + n1) % n1;
  p = a < b ? a : b;
  q = a < b ? b : a;
}

// 2^-e for x = 2^e * [1, 2) (x > 0 finite), from the exponent bits: an exact scale factor that
// brings x into [1, 2). Subnormal x and x >= 2^1022 get the nearest representable factor.
__device__ __forceinline__ double inv_pow2_near(double x) {
  long long e = (__double_as_longlong(x) >> 52) & 0x7ff;  // biased exponent of x
  e = 2046 - e;                                           // biased exponent of 2^-(e - 1023)
  e = e < 1 ? 1 : (e > 2046 ? 2046 : e);
  return __longlong_as_double(e << 52);
}

// Plane rotation x' = c x - s y, y' = s x + c y of the kp-element rows (x, y) and (vx, vy),
// lane j taking elements j, j + 32, ... With kE > 0 (kp <= 32 kE) all of a lane's loads are
// issued before its first store, so a pair costs one shared-memory (or L2) latency instead
// of one per element; kE = 0 loops over any kp. Same arithmetic per element either way.
template <int kE>
__device__ __forceinline__ void rotate_rows(double* x, double* y, double* vx, double* vy, int kp,
                                            int lane, double c, double s) {
  if constexpr (kE > 0) {
    double xe[kE], ye[kE], vxe[kE], vye[kE];
#pragma unroll
    for (int e = 0; e < kE; ++e) {
      const int j = lane + 32 * e;
      if (j < kp) {
        xe[e] = x[j];
        ye[e] = y[j];
        vxe[e] = vx[j];
        vye[e] = vy[j];
      }
    }
#pragma unroll
    for (int e = 0; e < kE; ++e) {
      const int j = lane + 32 * e;
      if (j < kp) {
        x[j] = c * xe[e] - s * ye[e];
        y[j] = s * xe[e] + c * ye[e];
        vx[j] = c * vxe[e] - s * vye[e];
        vy[j] = s * vxe[e] + c * vye[e];
      }
    }
  } else {
    for (int j = lane; j < kp; j += 32) {
      const double xj = x[j], yj = y[j];
      x[j] = c * xj - s * yj;
      y[j] = s * xj + c * yj;
      const double vxj = vx[j], vyj = vy[j];
      vx[j] = c * vxj - s * vyj;
      vy[j] = s * vxj + c * vyj;
    }
  }
}

// The same for columns p, q of the row-major [kp, kp] matrix: x = &a[p], y = &a[q], element
// j at offset j * kp.
template <int kE>
__device__ __forceinline__ void rotate_cols(double* x, double* y, int kp, int lane, double c,
                                            double s) {
  if constexpr (kE > 0) {
    double xe[kE], ye[kE];
#pragma unroll
    for (int e = 0; e < kE; ++e) {
      const int j = lane + 32 * e;
      if (j < kp) {
        xe[e] = x[j * kp];
        ye[e] = y[j * kp];
      }
    }
#pragma unroll
    for (int e = 0; e < kE; ++e) {
      const int j = lane + 32 * e;
      if (j < kp) {
        x[j * kp] = c * xe[e] - s * ye[e];
        y[j * kp] = s * xe[e] + c * ye[e];
      }
    }
  } else {
    for (int j = lane; j < kp; j += 32) {
      const double xj = x[j * kp], yj = y[j * kp];
      x[j * kp] = c * xj - s * yj;
      y[j * kp] = s * xj + c * yj;
    }
  }
}

// One block per matrix. kShared: the working copy of G in shared memory (kp <=
// kJacobiMaxSharedOrder), else in `work` after the eigenvector rows.
template <bool kShared>
// 96 registers: enough not to spill (ptxas -v, sm_90a: 80 spills 24 bytes); __launch_bounds__(512)
// would cap it at 64 and spill.
__global__ void LQ_MAXNREG(96)
    jacobi_eigh_kernel(const double* __restrict__ g, int k, double* __restrict__ evals,
                       double* __restrict__ evecs, double* __restrict__ work) {
  constexpr int kMaxPairs = (kShared ? kJacobiMaxSharedOrder : kJacobiMaxOrder) / 2;
  constexpr int kLaneElems = kShared ? (kJacobiMaxSharedOrder + 31) / 32 : 0;
  __shared__ double g_shared[kShared ? kJacobiMaxSharedOrder * kJacobiMaxSharedOrder : 1];
  __shared__ double cs[kMaxPairs];
  __shared__ double sn[kMaxPairs];
  __shared__ int pp[kMaxPairs];
  __shared__ int qq[kMaxPairs];

  const int kp = jacobi_padded_order(k);
  const int half = kp / 2;
  const int tid = threadIdx.x;
  const int nt = blockDim.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int nwarps = nt >> 5;
  const int64_t b = blockIdx.x;
  double* vt = work + b * jacobi_workspace_doubles(k);  // [kp, kp]: row j = eigenvector j
  double* a = kShared ? g_shared : vt + static_cast<int64_t>(kp) * kp;
  const double* gb = g + b * k * k;

  // The padding row/column (odd k) is zero: it never pairs with a nonzero entry, so it
  // stays e_k with eigenvalue 0 and is dropped at the end.
  for (int idx = tid; idx < kp * kp; idx += nt) {
    const int i = idx / kp, j = idx % kp;
    a[idx] = (i < k && j < k) ? gb[i * k + j] : 0.0;
    vt[idx] = i == j ? 1.0 : 0.0;
  }
  __syncthreads();
  double dmax = 0.0;  // every thread the same value: same reads, same order
  for (int i = 0; i < k; ++i) dmax = fmax(dmax, fabs(a[i * kp + i]));
  const double floor_abs = kEps * kEps * dmax;

  for (int sweep = 0; sweep < kJacobiMaxSweeps; ++sweep) {
    int rotated = 0;
    for (int round = 0; round < kp - 1; ++round) {
      int any = 0;
      for (int i = tid; i < half; i += nt) {
        int p, q;
        round_pair(round, i, kp, p, q);
        const double apq = a[p * kp + q], app = a[p * kp + p], aqq = a[q * kp + q];
        double c = 1.0, s = 0.0;
        // The pair scaled by a power of two near 1 / max(|g_pp|, |g_qq|, |g_pq|) (exact): c
        // and s depend only on ratios, and the squares below can neither overflow nor
        // underflow whatever the scale of G.
        const double sc = inv_pow2_near(fmax(fmax(fabs(app), fabs(aqq)), fabs(apq)));
        const double xpq = apq * sc, xpp = app * sc, xqq = aqq * sc;
        // |g_pq| <= eps sqrt(g_pp g_qq), squared: no square root on the round's critical path.
        const bool skip =
            fabs(apq) <= floor_abs || xpq * xpq <= (kEps * kEps) * fabs(xpp * xqq);
        if (!skip) {
          // Symmetric Schur 2x2 (Golub & Van Loan, Alg. 8.5.1), the smaller root
          // t = sign(d) h / (|d| + r) with d = g_qq - g_pp, h = 2 g_pq, r = sqrt(d^2 + h^2),
          // written without t: 1 + t^2 = 2 r (r + |d|) / (|d| + r)^2, so with
          // w = sqrt(2 r (r + |d|)): c = (|d| + r) / w, s = sign(d) h / w. Two dependent
          // square roots and two independent divisions, instead of the textbook's chain of
          // three divisions and two roots; no cancellation (every sum has equal signs).
          const double h = 2.0 * xpq, d = xqq - xpp, ad = fabs(d);
          const double r = sqrt(d * d + h * h);
          const double w = sqrt(2.0 * r * (r + ad));
          c = (ad + r) / w;
          s = (d >= 0.0 ? h : -h) / w;
          any |= s != 0.0;
        }
        cs[i] = c;
        sn[i] = s;
        pp[i] = p;
        qq[i] = q;
      }
      if (!__syncthreads_or(any)) continue;  // uniform: every thread sees the same result
      rotated = 1;
      // Rows p, q of G and of the eigenvector rows: x' = c x - s y, y' = s x + c y.
      for (int i = warp; i < half; i += nwarps) {
        const double s = sn[i];
        if (s == 0.0) continue;  // uniform over the warp
        const int p = pp[i], q = qq[i];
        rotate_rows<kLaneElems>(a + p * kp, a + q * kp, vt + p * kp, vt + q * kp, kp, lane,
                                cs[i], s);
      }
      __syncthreads();
      // Columns p, q of J^T G.
      for (int i = warp; i < half; i += nwarps) {
        const double s = sn[i];
        if (s == 0.0) continue;
        rotate_cols<kLaneElems>(a + pp[i], a + qq[i], kp, lane, cs[i], s);
      }
      __syncthreads();
      // The rotation annihilates g_pq; what is left there is rounding (Rutishauser).
      for (int i = tid; i < half; i += nt) {
        if (sn[i] == 0.0) continue;
        a[pp[i] * kp + qq[i]] = 0.0;
        a[qq[i] * kp + pp[i]] = 0.0;
      }
      __syncthreads();
    }
    if (!rotated) break;
  }

  // Descending order by counting: eigenvalue i goes to slot #{j : d_j > d_i, or d_j == d_i
  // and j < i}, a permutation, so every output element has one writer.
  for (int i = tid; i < k; i += nt) {
    const double di = a[i * kp + i];
    int r = 0;
    for (int j = 0; j < k; ++j) {
      const double dj = a[j * kp + j];
      r += (dj > di || (dj == di && j < i)) ? 1 : 0;
    }
    evals[b * k + r] = di;
    for (int j = 0; j < k; ++j) evecs[(b * k + r) * k + j] = vt[i * kp + j];
  }
}

}  // namespace

cudaError_t launch_jacobi_eigh(const double* g, int64_t batch, int k, double* evals,
                               double* evecs, double* work, cudaStream_t stream) {
  if (batch <= 0) return cudaSuccess;
  const int kp = jacobi_padded_order(k);
  if (k < 1 || kp > kJacobiMaxOrder || batch > 0x7fffffff) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(batch)), block(kJacobiThreads);
  if (kp <= kJacobiMaxSharedOrder) {
    LQ_LAUNCH(grid, block, 0, stream, jacobi_eigh_kernel<true>)(g, k, evals, evecs, work);
  } else {
    LQ_LAUNCH(grid, block, 0, stream, jacobi_eigh_kernel<false>)(g, k, evals, evecs, work);
  }
  return cudaGetLastError();
}

}  // namespace lqlora::cuda

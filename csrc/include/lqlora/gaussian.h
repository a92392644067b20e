// The Gaussian sketch of lqlora::rsvd, drawn the same way on every device: one definition
// compiled for the host (CPU op), by nvcc (CUDA kernel) and for the SIMT emulator, giving
// the same bits on each, so the same seed gives the same factors wherever rsvd runs and
// the GPU draws its sketch without a host round trip.
//
// Element t of the flat [..., n, k] sketch is one of the pair p = t / 2 (t even: z0, odd: z1):
//   - 128 random bits x0..x3 = Philox4x32-10(counter = (p lo, p hi, 0, 0),
//     key = (seed lo, seed hi)) (Salmon et al., SC'11);
//   - u1 = (b1 + 1) 2^-53 in (0, 1] with b1 the top 53 bits of x0:x1; the angle's octant is
//     the top 3 bits of x2:x3 and its fraction f = the next 53 bits times 2^-53;
//   - Box-Muller: r = sqrt(-2 ln u1), (z0, z1) = r (cos th, sin th), th = 2 pi u2.
// ln and sin/cos are this file's polynomials (series on [1/sqrt2, sqrt2) and [0, pi/4]),
// evaluated in fp64 with correctly rounded +, -, *, / and sqrt only, each one rounded on
// its own (no FMA contraction: __d*_rn under nvcc, -ffp-contract=off for host code), so
// every compiler produces the same bits. The polynomials are accurate to ~1e-16 relative;
// fp32 sketches are the fp64 values rounded to nearest. Python's bit-exact reference is
// lqlora_ext.ops.reference.rsvd_sketch.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "lqlora/pack.h"  // LQ_HD

namespace lqlora::gauss {

#if defined(__CUDA_ARCH__)
LQ_HD double add(double a, double b) { return __dadd_rn(a, b); }
LQ_HD double sub(double a, double b) { return __dsub_rn(a, b); }
LQ_HD double mul(double a, double b) { return __dmul_rn(a, b); }
LQ_HD double div(double a, double b) { return __ddiv_rn(a, b); }
LQ_HD double sqrt_rn(double a) { return __dsqrt_rn(a); }
LQ_HD double pow2(int e) { return __longlong_as_double(static_cast<long long>(1023 + e) << 52); }
LQ_HD int floor_log2(uint64_t v) { return 63 - __clzll(static_cast<long long>(v)); }
#else
LQ_HD double add(double a, double b) { return a + b; }
LQ_HD double sub(double a, double b) { return a - b; }
LQ_HD double mul(double a, double b) { return a * b; }
LQ_HD double div(double a, double b) { return a / b; }
LQ_HD double sqrt_rn(double a) { return std::sqrt(a); }
LQ_HD double pow2(int e) {  // 2^e for -1022 <= e <= 1023, from its bits (exact)
  const uint64_t bits = static_cast<uint64_t>(1023 + e) << 52;
  double d;
  std::memcpy(&d, &bits, sizeof d);
  return d;
}
LQ_HD int floor_log2(uint64_t v) { return 63 - __builtin_clzll(v); }
#endif

struct Bits128 {
  uint32_t x0, x1, x2, x3;
};

// Philox4x32 with 10 rounds: the multipliers and Weyl key increments of Random123.
LQ_HD Bits128 philox4x32_10(uint64_t counter, uint64_t key) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t h0 = static_cast<uint32_t>(p0 >> 32), l0 = static_cast<uint32_t>(p0);
    const uint32_t h1 = static_cast<uint32_t>(p1 >> 32), l1 = static_cast<uint32_t>(p1);
    c0 = h1 ^ c1 ^ k0;
    c1 = l1;
    c2 = h0 ^ c3 ^ k1;
    c3 = l0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return {c0, c1, c2, c3};
}

// ln(v 2^-53) for an integer 1 <= v <= 2^53 (exactly representable): v = 2^e m, m in
// [1/sqrt2, sqrt2), ln m = 2 atanh(s) = 2 s (1 + s^2/3 + ... + s^20/21), s = (m-1)/(m+1),
// |s| <= 0.172 (the truncation is below 1e-17).
LQ_HD double log_u53(uint64_t v) {
  int e = floor_log2(v);
  double m = mul(static_cast<double>(v), pow2(-e));  // exact: [1, 2)
  if (m > 0x1.6a09e667f3bcdp+0) {
    m = mul(m, 0.5);
    ++e;
  }
  const double s = div(sub(m, 1.0), add(m, 1.0));
  const double z = mul(s, s);
  const double c[11] = {0x1.0p+0,           0x1.5555555555555p-2, 0x1.999999999999ap-3,
                        0x1.2492492492492p-3, 0x1.c71c71c71c71cp-4, 0x1.745d1745d1746p-4,
                        0x1.3b13b13b13b14p-4, 0x1.1111111111111p-4, 0x1.e1e1e1e1e1e1ep-5,
                        0x1.af286bca1af28p-5, 0x1.8618618618618p-5};
  double p = c[10];
  for (int j = 9; j >= 0; --j) p = add(mul(p, z), c[j]);
  return add(mul(static_cast<double>(e - 53), 0x1.62e42fefa39efp-1), mul(mul(2.0, s), p));
}

// sin x and cos x for x in [0, pi/4]: Taylor series to x^17 / x^18 (error below 1e-19).
LQ_HD void sincos_octant(double x, double& s, double& c) {
  const double z = mul(x, x);
  const double sc[8] = {-0x1.5555555555555p-3, 0x1.1111111111111p-7,  -0x1.a01a01a01a01ap-13,
                        0x1.71de3a556c734p-19,  -0x1.ae64567f544e4p-26, 0x1.6124613a86d09p-33,
                        -0x1.ae7f3e733b81fp-41, 0x1.952c77030ad4ap-49};
  const double cc[9] = {-0x1.0p-1,             0x1.5555555555555p-5,  -0x1.6c16c16c16c17p-10,
                        0x1.a01a01a01a01ap-16,  -0x1.27e4fb7789f5cp-22, 0x1.1eed8eff8d898p-29,
                        -0x1.93974a8c07c9dp-37, 0x1.ae7f3e733b81fp-45,  -0x1.6827863b97d97p-53};
  double ps = sc[7];
  for (int j = 6; j >= 0; --j) ps = add(mul(ps, z), sc[j]);
  s = add(x, mul(mul(x, z), ps));
  double pc = cc[8];
  for (int j = 7; j >= 0; --j) pc = add(mul(pc, z), cc[j]);
  c = add(1.0, mul(z, pc));
}

// The two standard normal samples of pair p (see the top of this file).
LQ_HD void gaussian_pair(uint64_t seed, uint64_t p, double& z0, double& z1) {
  const Bits128 r = philox4x32_10(p, seed);
  const uint64_t b1 = ((static_cast<uint64_t>(r.x0) << 32) | r.x1) >> 11;
  const uint64_t b2 = (static_cast<uint64_t>(r.x2) << 32) | r.x3;
  const double rad = sqrt_rn(mul(-2.0, log_u53(b1 + 1)));
  const unsigned oct = static_cast<unsigned>(b2 >> 61);
  const double f = mul(static_cast<double>((b2 >> 8) & ((uint64_t{1} << 53) - 1)), 0x1p-53);
  // th = (oct + f) pi/4 = q pi/2 + phi. Even octant: phi = x; odd: phi = pi/2 - x, with
  // x = f pi/4 or (1 - f) pi/4 (1 - f is exact on the 2^-53 grid), so x stays in [0, pi/4].
  double s, c;
  sincos_octant(mul((oct & 1) ? sub(1.0, f) : f, 0x1.921fb54442d18p-1), s, c);
  const double sp = (oct & 1) ? c : s, cp = (oct & 1) ? s : c;  // sin, cos of phi
  double ct, st;
  switch (oct >> 1) {
    case 0: ct = cp; st = sp; break;
    case 1: ct = -sp; st = cp; break;
    case 2: ct = -cp; st = -sp; break;
    default: ct = sp; st = -cp; break;
  }
  z0 = mul(rad, ct);
  z1 = mul(rad, st);
}

// Writes elements [begin, end) of the flat sketch (begin even). T is float or double.
template <typename T>
LQ_HD void fill_pairs(uint64_t seed, int64_t begin, int64_t end, T* out) {
  for (int64_t t = begin; t < end; t += 2) {
    double z0, z1;
    gaussian_pair(seed, static_cast<uint64_t>(t) / 2, z0, z1);
    // double -> float rounds to nearest even on the host and in CUDA (cvt.rn.f32.f64).
    out[t] = static_cast<T>(z0);
    if (t + 1 < end) out[t + 1] = static_cast<T>(z1);
  }
}

}  // namespace lqlora::gauss

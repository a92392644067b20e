"""How much work csrc/cuda/rsvd.cu's Jacobi eigensolver does on a given Gram matrix: a
replica of its iteration in PyTorch fp64 (same padding, Brent-Luk round-robin pairs, skip
rules, rotation formulas and stopping rule), which counts what the kernel's loops run.

The kernel's time depends on the data only through these counts: sweeps (the last one
rotates nothing and ends the iteration), rounds that rotate at least one pair (the others
stop after the pair pass and one barrier) and pairs rotated in them. The replica applies a
round's rotations as whole-row/column tensor updates, so its rounding differs from the
kernel's in the last bits and a count can differ by one on borderline matrices; the
counts are model inputs, not a reference for the kernel's output.

Needs torch (unlike the rest of sass_model).
"""
from __future__ import annotations

import dataclasses

EPS = 2.220446049250313e-16  # rsvd.cu kEps (DBL_EPSILON)
MAX_SWEEPS = 40              # rsvd.h kJacobiMaxSweeps


@dataclasses.dataclass(frozen=True)
class SweepStats:
    k: int
    sweeps: int            # sweeps run, the final quiet one included
    rotating_rounds: int   # rounds in which at least one pair rotated
    quiet_rounds: int      # rounds in which no pair rotated
    rotated_pairs: int     # pair rotations over the whole iteration

    @property
    def kp(self) -> int:
        return self.k + (self.k & 1)

    @property
    def pair_fraction(self) -> float:
        """Rotated pairs per pair slot of the rotating rounds."""
        return self.rotated_pairs / max(1, self.rotating_rounds * (self.kp // 2))


def round_pairs(rnd: int, kp: int):
    """rsvd.cu round_pair for every i of one round: lists p, q (p < q)."""
    n1 = kp - 1
    ps, qs = [], []
    for i in range(kp // 2):
        a = rnd if i == 0 else (rnd + i) % n1
        b = n1 if i == 0 else (rnd - i + n1) % n1
        ps.append(min(a, b))
        qs.append(max(a, b))
    return ps, qs


def _iterate(g):
    """The kernel's iteration on ``g [k, k]`` in fp64: (final working matrix [kp, kp],
    SweepStats)."""
    import torch

    g = g.to(torch.float64)
    k = g.shape[0]
    kp = k + (k & 1)
    a = torch.zeros(kp, kp, dtype=torch.float64)
    a[:k, :k] = g
    dmax = float(g.diagonal().abs().max()) if k else 0.0
    floor_abs = EPS * EPS * dmax
    pairs = [tuple(torch.tensor(x) for x in round_pairs(r, kp)) for r in range(kp - 1)]
    rot_rounds = quiet = rotated = sweeps = 0
    for _ in range(MAX_SWEEPS):
        sweeps += 1
        any_round = False
        for p, q in pairs:
            apq, app, aqq = a[p, q], a[p, p], a[q, q]
            # rsvd.cu's pair pass: the pair scaled by 2^-floor(log2 max |.|) (exact), the
            # squared skip test, c = (|d| + r) / w, s = sign(d) h / w.
            big = torch.maximum(torch.maximum(app.abs(), aqq.abs()), apq.abs())
            sc = torch.where(big > 0, torch.exp2(-torch.floor(torch.log2(big))), torch.ones_like(big))
            xpq, xpp, xqq = apq * sc, app * sc, aqq * sc
            skip = (apq.abs() <= floor_abs) | (xpq * xpq <= (EPS * EPS) * (xpp * xqq).abs())
            h = 2.0 * torch.where(skip, torch.ones_like(xpq), xpq)
            d = xqq - xpp
            r = (d * d + h * h).sqrt()
            w = (2.0 * r * (r + d.abs())).sqrt()
            c = torch.where(skip, torch.ones_like(w), (d.abs() + r) / w)
            s = torch.where(skip, torch.zeros_like(w), torch.where(d >= 0, h, -h) / w)
            live = s != 0
            n = int(live.sum())
            if n == 0:
                quiet += 1
                continue
            any_round = True
            rot_rounds += 1
            rotated += n
            p, q, c, s = p[live], q[live], c[live], s[live]
            x, y = a[p, :].clone(), a[q, :].clone()
            a[p, :] = c[:, None] * x - s[:, None] * y
            a[q, :] = s[:, None] * x + c[:, None] * y
            x, y = a[:, p].clone(), a[:, q].clone()
            a[:, p] = c[None, :] * x - s[None, :] * y
            a[:, q] = s[None, :] * x + c[None, :] * y
            a[p, q] = 0.0
            a[q, p] = 0.0
        if not any_round:
            break
    return a, SweepStats(k, sweeps, rot_rounds, quiet, rotated)


def sweep_stats(g) -> SweepStats:
    """Counts of the kernel's iteration on the symmetric ``g [k, k]`` (any float dtype;
    run in fp64 like the kernel)."""
    return _iterate(g)[1]


def eigenvalues(g):
    """The replica's eigenvalues of ``g`` [k] (descending), to check it against eigh."""
    a, st = _iterate(g)
    return a.diagonal()[:st.k].sort(descending=True).values

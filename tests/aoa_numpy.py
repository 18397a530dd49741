"""The age-of-acquisition fit as numpy vectorised it over tokens before the compiled kernel (commit
28d84b8, `tokendyn.analysis.curves`), kept as a reference for the tests: the same method in other code
(whole (ckpt, token) arrays per operation, float32 column sums, a vectorised 3x3 solve)."""

from __future__ import annotations

import numpy as np

from tokendyn.analysis.curves import _grid


def grid_start(y: np.ndarray, x: np.ndarray, chance: float) -> np.ndarray:
    """(k, x0, lo) of every token, (3, token): the best least-squares fit over a grid of (k, x0), lo
    solved exactly.

    For a fixed (k, x0) the sigmoid s is the same for every token and the fit is linear in lo: with
    u = 1 - s and t = y.u - chance s.u, the best lo is t / u.u and the sum of squares is
    |y|^2 - 2 chance y.s + chance^2 s.s - t^2 / u.u. Up to a per-token constant that is
    e - (z + b)^2 with z = y . (s / |u| - 1 / |u|) (y.u = sum(y) - y.s), b = chance (s.u / |u| + |u|)
    and e = chance^2 (u.u + s.s + 2 s.u): one matrix product and three passes over (token, grid).
    float32 throughout: it only ranks grid points. y is (ckpt, token) float32.
    """
    k, x0, s, su, uu, g, b, e = _grid(tuple(x.tolist()), float(chance))
    z = y.T @ g  # (token, grid): the argmin runs along contiguous rows
    z += b
    np.square(z, out=z)
    np.subtract(e, z, out=z)
    best = np.argmin(z, axis=-1)
    t = y.sum(0, dtype=np.float64) - (y * s[best].T).sum(0, dtype=np.float64) - chance * su[best]
    return np.stack([k[best], x0[best], t / uu[best]])


def solve3(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solutions of the symmetric 3x3 systems a x = b (..., 3, 3), (..., 3) by cofactors: one vectorised
    expression instead of a LAPACK call per token. NaN where a is singular."""
    c00 = a[..., 1, 1] * a[..., 2, 2] - a[..., 1, 2] * a[..., 2, 1]
    c01 = a[..., 1, 2] * a[..., 2, 0] - a[..., 1, 0] * a[..., 2, 2]
    c02 = a[..., 1, 0] * a[..., 2, 1] - a[..., 1, 1] * a[..., 2, 0]
    c11 = a[..., 0, 0] * a[..., 2, 2] - a[..., 0, 2] * a[..., 2, 0]
    c12 = a[..., 0, 1] * a[..., 2, 0] - a[..., 0, 0] * a[..., 2, 1]
    c22 = a[..., 0, 0] * a[..., 1, 1] - a[..., 0, 1] * a[..., 1, 0]
    det = a[..., 0, 0] * c00 + a[..., 0, 1] * c01 + a[..., 0, 2] * c02
    with np.errstate(divide="ignore", invalid="ignore"):
        return (
            np.stack(
                [
                    c00 * b[..., 0] + c01 * b[..., 1] + c02 * b[..., 2],
                    c01 * b[..., 0] + c11 * b[..., 1] + c12 * b[..., 2],
                    c02 * b[..., 0] + c12 * b[..., 1] + c22 * b[..., 2],
                ],
                -1,
            )
            / det[..., None]
        )


def sigmoid_midpoint(y: np.ndarray, x: np.ndarray, chance: float, n_iter: int) -> np.ndarray:
    """Midpoint x0 of the least-squares fit y ~ lo + (chance - lo) / (1 + exp(k (x - x0))).

    y is (ckpt, token), x the log10 steps; the upper level is fixed at `chance`, (k, x0, lo) fitted:
    start from the best point of a (k, x0) grid (`grid_start`, all tokens at once), then take
    Levenberg-Marquardt steps, vectorised over tokens. The (ckpt, token) arrays are float32 (the
    parameters, normal equations and sums of squares float64), with tokens along the contiguous
    axis so that every operation runs over whole rows of tokens: per step one pass builds the
    Jacobian and residual rows, ten row products summed over checkpoints give J'J, J'r and |r|^2,
    and the 3x3 solve is closed form.
    NaN unless the fit falls (k > 0) from chance to lo < chance with x0 inside the data, and the
    first checkpoint is above halfway and the last below.
    """
    y = np.ascontiguousarray(y, dtype=np.float32)
    theta = grid_start(y, x, chance)
    x32 = x.astype(np.float32)[:, None]
    rows = np.empty((4,) + y.shape, np.float32)  # d fit / d (k, x0, lo), then the residual
    d, s, work = (np.empty(y.shape, np.float32) for _ in range(3))
    pairs = [(i, j) for i in range(4) for j in range(i, 4)]

    def fill(theta: np.ndarray) -> np.ndarray:
        """Jacobian and residual rows at theta (3, token); returns their Gram matrices (4, 4, token)."""
        k, x0, lo = theta.astype(np.float32)
        amplitude = np.float32(chance) - lo
        np.subtract(x32, x0, out=d)
        np.multiply(k, d, out=s)
        np.clip(s, -60, 60, out=s)
        np.exp(s, out=s)
        np.add(s, 1, out=s)
        np.reciprocal(s, out=s)  # s = 1 / (1 + exp(k (x - x0))), falling from 1 to 0
        np.subtract(1, s, out=rows[2])
        np.multiply(s, rows[2], out=work)
        np.multiply(work, amplitude, out=work)  # the slope of the fit in its argument
        np.multiply(work, d, out=rows[0])
        np.negative(rows[0], out=rows[0])
        np.multiply(work, k, out=rows[1])
        np.subtract(y, lo, out=rows[3])
        np.multiply(s, amplitude, out=work)
        rows[3] -= work
        gram = np.empty((4, 4, y.shape[1]))
        for i, j in pairs:
            np.multiply(rows[i], rows[j], out=work)
            gram[i, j] = gram[j, i] = work.sum(axis=0)
        return gram

    gram = fill(theta)
    sse = gram[3, 3]
    damping = np.full(sse.shape, 1e-3)
    diagonal = np.arange(3)
    for _ in range(n_iter):
        jtj = gram[:3, :3].copy()
        jtj[diagonal, diagonal] *= 1 + damping
        jtj[diagonal, diagonal] += 1e-12
        # _solve3 takes (..., 3, 3): views with the token axis first, whose elements are contiguous rows
        step = solve3(np.moveaxis(jtj, -1, 0), np.moveaxis(gram[:3, 3], -1, 0))
        trial = theta + np.nan_to_num(step.T)
        trial_gram = fill(trial)
        better = trial_gram[3, 3] < sse
        theta = np.where(better, trial, theta)
        gram = np.where(better, trial_gram, gram)  # the normal equations at the kept theta
        sse = gram[3, 3]
        damping = np.where(better, damping / 3, damping * 4)
    k, x0, lo = theta
    half = (lo + chance) / 2
    crosses = (y[0] > half) & (y[-1] < half)  # the data itself goes from above halfway to below
    ok = (lo < chance) & (k > 0) & (x0 >= x.min()) & (x0 <= x.max()) & crosses
    return np.where(ok, x0, np.nan)

"""The age-of-acquisition kernel before issue 15 (logit-line start, 10 LM steps), for benchmarks/analysis.py."""

from __future__ import annotations

import itertools

import numpy as np
import scipy.special


def sigmoid_midpoint_before(y: np.ndarray, x: np.ndarray, chance: float, n_iter: int) -> np.ndarray:
    """Midpoint x0 of the least-squares fit y ~ lo + (chance - lo) / (1 + exp(k (x - x0))).

    y is (ckpt, token), x the log10 steps; the upper level is fixed at `chance`, (k, x0, lo) fitted:
    start from the line through the logit of the curve rescaled between its minimum and chance,
    then take Levenberg-Marquardt steps, vectorised over tokens (a 3x3 solve per token).
    NaN unless the fit falls (k > 0) from chance to lo < chance with x0 inside the data, and the
    first checkpoint is above halfway and the last below.
    """
    y = np.ascontiguousarray(y.T, dtype=np.float64)  # (token, ckpt): the fit's sums run along checkpoints
    lo = y.min(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.clip((y - lo[..., None]) / (chance - lo[..., None]), 0.02, 0.98)
        logit = np.log(z / (1 - z))
        xc = x - x.mean()
        slope = (logit - logit.mean(-1, keepdims=True)) @ xc / (xc @ xc)
        x0 = x.mean() + logit.mean(-1) / -slope
    theta = np.stack([np.maximum(-slope, 1e-3), np.clip(np.nan_to_num(x0, nan=x.mean()), x.min(), x.max()), lo], -1)

    def fit(theta):
        s = scipy.special.expit(-theta[..., :1] * (x - theta[..., 1:2]))
        return s, y - (theta[..., 2:] + (chance - theta[..., 2:]) * s)

    s, r = fit(theta)
    sse = (r * r).sum(-1)
    damping = np.full(sse.shape, 1e-2)
    for _ in range(n_iter):
        slope_s = (chance - theta[..., 2:]) * s * (1 - s)
        jac = [-slope_s * (x - theta[..., 1:2]), slope_s * theta[..., :1], 1 - s]  # d fit / d (k, x0, lo)
        jtj = np.empty(sse.shape + (3, 3))
        for i, j in itertools.combinations_with_replacement(range(3), 2):
            jtj[..., i, j] = jtj[..., j, i] = (jac[i] * jac[j]).sum(-1)
        jtj += damping[..., None, None] * np.eye(3) * np.diagonal(jtj, axis1=-2, axis2=-1)[..., None, :]
        jtr = np.stack([(part * r).sum(-1) for part in jac], -1)
        with np.errstate(divide="ignore", invalid="ignore"):
            step = np.linalg.solve(jtj + 1e-12 * np.eye(3), jtr[..., None])[..., 0]
        trial = theta + np.nan_to_num(step)
        s_new, r_new = fit(trial)
        sse_new = (r_new * r_new).sum(-1)
        better = sse_new < sse
        theta = np.where(better[..., None], trial, theta)
        s, r = np.where(better[..., None], s_new, s), np.where(better[..., None], r_new, r)
        sse = np.where(better, sse_new, sse)
        damping = np.where(better, damping / 3, damping * 4)
    k, x0, lo = theta[..., 0], theta[..., 1], theta[..., 2]
    half = (lo + chance) / 2
    crosses = (y[:, 0] > half) & (y[:, -1] < half)  # the data itself goes from above halfway to below
    ok = (lo < chance) & (k > 0) & (x0 >= x.min()) & (x0 <= x.max()) & crosses
    return np.where(ok, x0, np.nan)

"""The loss threshold of emergence (methods.md §2, after Du et al., arXiv 2403.15796).

Every function takes one point per checkpoint of every model of the suite together: arrays of any
shape (typically (model, ckpt)) holding the checkpoint's validation loss, its task performance
(any metric: accuracy, correct-choice probability, Brier score, ...) and optionally its training
compute (6 N D) and step. NaN marks checkpoints without a value; they are dropped.

- `fit_segmented`: perf = b for L >= eta and b + g (eta - L) below, eta by least squares over a
  grid, with a percentile bootstrap interval over checkpoints (case resampling, seeded).
- `collapse_score`: how tightly the points lie on one curve against loss, compared with compute
  and step (isotonic fits; see the function).
- `leaves_random`: whether a task ever rises above its random baseline; tasks that never do are
  reported as such and not fitted.
- `emergence_threshold`: all of the above for one task.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy.stats import spearmanr
from sklearn.isotonic import IsotonicRegression

from tokendyn.errors import TokendynError

# Defaults of `fit_segmented` and `leaves_random`, which `emergence_threshold` passes on (each
# documented in its function).
N_GRID = 200  # candidate etas of the segmented fit's grid search
MIN_SIDE = 3  # checkpoints the segmented fit leaves on each side of every candidate eta
N_BOOT = 1000  # bootstrap resamples for the interval of eta
CI = 0.95  # level of that interval
SEED = 0  # seed of the bootstrap
MIN_BEYOND = 3  # checkpoints beyond the random baseline for a task to leave random


@dataclass(frozen=True)
class SegmentedFit:
    """perf = baseline for loss >= eta, baseline + slope * (eta - loss) below.

    eta_low, eta_high: percentile bootstrap interval of eta at level `ci`.
    r2: 1 - SSE / total sum of squares of the fit on all points.
    """

    eta: float
    eta_low: float
    eta_high: float
    baseline: float
    slope: float
    r2: float
    n_points: int
    ci: float

    def predict(self, loss: ArrayLike) -> np.ndarray:
        return self.baseline + self.slope * np.maximum(self.eta - np.asarray(loss, dtype=float), 0.0)


@dataclass(frozen=True)
class Collapse:
    """Unexplained variance fraction of performance around one monotone curve against each axis,
    and the ratios loss/compute and loss/step (< 1: the points collapse better against loss).
    NaN where an axis was not given."""

    unexplained_loss: float
    unexplained_compute: float
    unexplained_step: float
    ratio_compute: float
    ratio_step: float


@dataclass(frozen=True)
class EmergenceResult:
    """One task's emergence analysis. `fit` is None when the task never leaves random."""

    leaves_random: bool
    fit: SegmentedFit | None
    spearman: float
    spearman_p: float
    collapse: Collapse
    n_points: int


def _points(*arrays) -> list[np.ndarray]:
    """Flatten same-shaped arrays and keep the points finite in all of them."""
    flat = [np.asarray(a, dtype=float).ravel() for a in arrays]
    if any(f.shape != flat[0].shape for f in flat):
        raise TokendynError("loss, performance, compute and step must have the same shape (one value per checkpoint)")
    keep = np.logical_and.reduce([np.isfinite(f) for f in flat])
    return [f[keep] for f in flat]


def _segmented_sse(loss: np.ndarray, perf: np.ndarray, etas: np.ndarray, weights: np.ndarray):
    """Weighted least squares of perf ~ b + g * max(eta - loss, 0) for every eta (columns) and
    every row of point weights (n_rows, n_points): (sse, intercept, slope), each (n_rows, n_etas).
    Rows of bootstrap counts make this the whole bootstrap in a few matrix products."""
    x = np.maximum(etas[:, None] - loss[None, :], 0.0)  # (eta, point)
    y = perf - perf.mean()
    total = weights.sum(1, keepdims=True)
    sx, sy = weights @ x.T, weights @ y[:, None]
    sxx = weights @ (x**2).T - sx**2 / total
    sxy = weights @ (x * y).T - sx * sy / total
    syy = weights @ (y**2)[:, None] - sy**2 / total
    slope = np.divide(sxy, sxx, out=np.zeros_like(sxy), where=sxx > 1e-12)
    intercept = perf.mean() + (sy - slope * sx) / total
    return syy - slope * sxy, intercept, slope


def fit_segmented(
    loss: ArrayLike,
    perf: ArrayLike,
    *,
    n_grid: int = N_GRID,
    min_side: int = MIN_SIDE,
    n_boot: int = N_BOOT,
    ci: float = CI,
    seed: int = SEED,
) -> SegmentedFit:
    """Fit the loss threshold eta of the segmented model by grid search.

    loss, perf: one value per checkpoint, same shape (NaN dropped).
    n_grid: candidate etas, evenly spaced between the losses that leave `min_side` points on each
        side of eta (below it, where the slope acts, and at or above it; the resolution of eta is
        that range / n_grid).
    n_boot, ci, seed: percentile bootstrap over checkpoints (resampled with replacement, the grid
        kept fixed) for the interval of eta.
    """
    loss, perf = _points(loss, perf)
    if min_side < 2 or loss.size < 2 * min_side:
        raise TokendynError(
            f"the segmented fit needs at least {2 * max(min_side, 2)} checkpoints with a loss and a score"
        )
    ordered = np.sort(loss)
    # min_side points strictly below the lowest eta (a point at eta adds nothing to the slope) and at
    # or above the highest
    etas = np.linspace(ordered[min_side], ordered[-min_side], n_grid)
    sse, intercept, slope = (v[0] for v in _segmented_sse(loss, perf, etas, np.ones((1, loss.size))))
    best = int(np.argmin(sse))
    idx = np.random.default_rng(seed).integers(0, loss.size, (n_boot, loss.size))
    counts = np.bincount((idx + loss.size * np.arange(n_boot)[:, None]).ravel(), minlength=n_boot * loss.size)
    boot = etas[np.argmin(_segmented_sse(loss, perf, etas, counts.reshape(n_boot, loss.size))[0], axis=1)]
    tss = ((perf - perf.mean()) ** 2).sum()
    low, high = np.quantile(boot, [(1 - ci) / 2, (1 + ci) / 2])
    return SegmentedFit(
        eta=float(etas[best]),
        eta_low=float(low),
        eta_high=float(high),
        baseline=float(intercept[best]),
        slope=float(slope[best]),
        r2=float(1 - sse[best] / tss) if tss > 0 else float("nan"),
        n_points=int(loss.size),
        ci=ci,
    )


def unexplained_variance(x: ArrayLike, perf: ArrayLike) -> float:
    """Residual variance of perf around the best monotone curve of perf against x (isotonic
    regression, increasing or decreasing, whichever fits better), over the total variance of perf.
    Isotonic fits are invariant to monotone transforms of x: raw or log compute give the same number."""
    x, perf = _points(x, perf)
    total = perf.var()
    if total == 0:
        return float("nan")
    residual = min(
        ((perf - IsotonicRegression(increasing=up).fit_transform(x, perf)) ** 2).mean() for up in (True, False)
    )
    return float(residual / total)


def collapse_score(
    loss: ArrayLike, perf: ArrayLike, compute: ArrayLike | None = None, step: ArrayLike | None = None
) -> Collapse:
    """Compare how well one monotone curve of performance explains the points against validation
    loss, against training compute (6 N D) and against step (all checkpoints of all models).

    unexplained_<axis> = `unexplained_variance(axis, perf)` (0 = all points on one curve, 1 = the
    curve explains nothing); ratio_<axis> = unexplained_loss / unexplained_<axis>. The collapse onto
    loss reported by Du et al. shows as ratio_compute well below 1. Only checkpoints with a finite
    value on every given axis are used, so all axes see the same points.
    """
    given = {name: x for name, x in (("loss", loss), ("compute", compute), ("step", step)) if x is not None}
    kept_perf, *kept_axes = _points(perf, *given.values())  # the same checkpoints on every axis
    unexplained = {name: float("nan") for name in ("loss", "compute", "step")}
    unexplained.update({name: unexplained_variance(x, kept_perf) for name, x in zip(given, kept_axes)})

    def ratio(other: float) -> float:
        return unexplained["loss"] / other if other > 0 else float("nan")

    return Collapse(
        unexplained_loss=unexplained["loss"],
        unexplained_compute=unexplained["compute"],
        unexplained_step=unexplained["step"],
        ratio_compute=ratio(unexplained["compute"]),
        ratio_step=ratio(unexplained["step"]),
    )


def leaves_random(
    perf: ArrayLike, baseline: float, margin: float, *, higher_is_better: bool = True, min_beyond: int = MIN_BEYOND
) -> bool:
    """Whether a task leaves random: at least `min_beyond` checkpoints beat `baseline` by more than
    `margin` in the better direction. For accuracy, `tokendyn.analysis.choices.chance_margin` gives a margin
    of z binomial standard errors; requiring several checkpoints guards against single noisy ones."""
    (perf,) = _points(perf)
    gain = perf - baseline if higher_is_better else baseline - perf
    return bool((gain > margin).sum() >= min_beyond)


def emergence_threshold(
    loss: ArrayLike,
    perf: ArrayLike,
    *,
    baseline: float,
    margin: float,
    compute: ArrayLike | None = None,
    step: ArrayLike | None = None,
    higher_is_better: bool = True,
    min_beyond: int = MIN_BEYOND,
    n_grid: int = N_GRID,
    min_side: int = MIN_SIDE,
    n_boot: int = N_BOOT,
    ci: float = CI,
    seed: int = SEED,
) -> EmergenceResult:
    """The §2 analysis of one task: leaves-random check, segmented fit (only if it leaves random),
    Spearman's rho of performance with loss, collapse score. Arrays: one value per checkpoint,
    same shape (e.g. (model, ckpt)); parameters as in `leaves_random` and `fit_segmented`."""
    kept_loss, kept_perf = _points(loss, perf)
    if kept_loss.size < 3:
        raise TokendynError("the emergence analysis needs at least 3 checkpoints with a loss and a score")
    varies = np.ptp(kept_perf) > 0 and np.ptp(kept_loss) > 0
    rho, p_value = spearmanr(kept_loss, kept_perf) if varies else (float("nan"), float("nan"))
    left = leaves_random(kept_perf, baseline, margin, higher_is_better=higher_is_better, min_beyond=min_beyond)
    fit = (
        fit_segmented(kept_loss, kept_perf, n_grid=n_grid, min_side=min_side, n_boot=n_boot, ci=ci, seed=seed)
        if left
        else None
    )
    return EmergenceResult(
        leaves_random=left,
        fit=fit,
        spearman=float(rho),
        spearman_p=float(p_value),
        collapse=collapse_score(loss, perf, compute, step),
        n_points=int(kept_loss.size),
    )

"""PassUntil (methods.md §4, after Hu et al., arXiv 2310.03262): pass rates too small to see with a
fixed number of samples, and the task scaling law they follow.

Per instance and checkpoint, completions are sampled in batches until `target` of them pass or
`max_samples` have been drawn. With r passes after K samples:

- stopped by the target (r = target >= 2): rate = (r - 1) / (K - 1), unbiased under this
  stopping rule (inverse binomial sampling);
- stopped by the cap with r >= 2: rate = r / K, which together with the above is the unbiased
  estimator of the capped design (Girshick, Mosteller & Savage 1946);
- stopped by the cap with r < 2: **censored**. The reported rate is NaN, never 0, and the
  observation is an upper bound: the one-sided Clopper-Pearson bound at `confidence`,
  Beta(confidence; r + 1, K - r) quantile (for r = 0, 1 - (1 - confidence)^(1/K), about 3/K).

The per-task rate is the mean over instances of the design-unbiased values (a censored instance
contributes r / K there, 0 or 1/K, which keeps the mean unbiased), with a percentile bootstrap
interval over instances; `upper` replaces censored instances by their bounds.

Task scaling law: PU(N) = exp(-c N^-alpha), so F = log(-log PU) = log c - alpha log N is linear in
log N; the same fit against log excess loss replaces N (alpha then comes out negative). How the
fits treat censoring: at dataset level F comes from the per-task mean, which is only censored when
no instance passed at all (such points are left out); at instance level censored points are left
out of the least squares and the fit reports how many of their upper bounds it exceeds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy.stats import beta as beta_dist

from tokendyn.errors import TokendynError

CONFIDENCE = 0.95  # level of the one-sided Clopper-Pearson bound of a censored instance
CI = 0.95  # level of the percentile bootstrap intervals (over instances)
SEED = 0  # seed of the bootstrap resampling
TASK_RATE_BOOT = 2000  # bootstrap resamples of a task rate's interval (`task_rate`)
SCALING_BOOT = 1000  # bootstrap resamples of the scaling law's curvature interval (`fit_task_scaling`)


@dataclass(frozen=True)
class PassUntilRun:
    """One instance at one checkpoint: `passes` passes within the first `samples` samples (the
    sample that made the target pass, or the cap); `drawn` completions were generated in
    `batches` batches (the cost, including the rest of the last batch)."""

    passes: int
    samples: int
    target: int
    drawn: int
    batches: int

    @property
    def capped(self) -> bool:
        return self.passes < self.target

    @property
    def censored(self) -> bool:
        return self.passes < 2


def pass_until(
    sample_fn: Callable[[int, np.random.Generator], Sequence],
    check_fn: Callable[[object], bool],
    passes: int,
    max_samples: int,
    batch_size: int,
    rng: np.random.Generator,
) -> PassUntilRun:
    """Sample in batches until `passes` completions pass `check_fn` or `max_samples` are drawn.

    sample_fn(n, rng) returns n completions (the model sampler plugs in here); check_fn(completion)
    says whether one passes. passes >= 2 (the unbiased estimator needs two); batches are capped so
    that no more than `max_samples` completions are drawn.
    """
    if passes < 2 or max_samples < passes or batch_size < 1:
        raise TokendynError("pass_until needs passes >= 2, max_samples >= passes and batch_size >= 1")
    found = seen = drawn = batches = 0
    while found < passes and drawn < max_samples:
        n = min(batch_size, max_samples - drawn)
        batch = sample_fn(n, rng)
        if len(batch) != n:
            raise TokendynError(
                f"the sampler returned {len(batch)} completions for a batch of {n}; it must return exactly n"
            )
        hits = np.flatnonzero([bool(check_fn(c)) for c in batch])
        drawn += n
        batches += 1
        if hits.size >= passes - found:
            seen += int(hits[passes - found - 1]) + 1  # K counts up to the sample that reached the target
            found = passes
        else:
            seen += n
            found += hits.size
    return PassUntilRun(passes=found, samples=seen, target=passes, drawn=drawn, batches=batches)


@dataclass(frozen=True)
class InstanceRates:
    """Per-instance pass rates (arrays of the input shape): `rate` unbiased, NaN where censored;
    `upper` the one-sided Clopper-Pearson bound where censored, NaN elsewhere."""

    rate: np.ndarray
    upper: np.ndarray
    censored: np.ndarray


def _validate_runs(passes, samples, target: int) -> tuple[np.ndarray, np.ndarray]:
    passes = np.asarray(passes)
    samples = np.asarray(samples)
    if passes.shape != samples.shape:
        raise TokendynError("passes and samples must have the same shape (one run per instance and checkpoint)")
    if target < 2:
        raise TokendynError(
            "PassUntil needs a target of at least 2 passes for its unbiased estimate; rerun with passes >= 2"
        )
    if np.any(passes < 0) or np.any(passes > target) or np.any(samples < np.maximum(passes, 1)):
        raise TokendynError("runs must satisfy 0 <= passes <= target and samples >= max(passes, 1)")
    return passes.astype(float), samples.astype(float)


def _design_unbiased(passes: np.ndarray, samples: np.ndarray, target: int) -> np.ndarray:
    stopped = passes == target
    return np.where(stopped, (passes - 1) / np.maximum(samples - 1, 1), passes / samples)


def instance_rates(
    passes: ArrayLike, samples: ArrayLike, target: int, *, confidence: float = CONFIDENCE
) -> InstanceRates:
    """Per-instance rates from PassUntil runs. passes, samples: arrays of any shape (e.g. (model,
    instance)); target: the pass target of the runs (r); censored = the cap was hit before 2 passes."""
    passes, samples = _validate_runs(passes, samples, target)
    censored = passes < 2  # the cap was hit before the second pass (target >= 2)
    upper = np.where(censored, beta_dist.ppf(confidence, passes + 1, np.maximum(samples - passes, 1)), np.nan)
    rate = np.where(censored, np.nan, _design_unbiased(passes, samples, target))
    return InstanceRates(rate=rate, upper=upper, censored=censored)


@dataclass(frozen=True)
class TaskRate:
    """A task's pass rate at one checkpoint: mean over instances with a percentile bootstrap
    interval (ci_low, ci_high) at level `ci`; `upper` = mean with censored instances at their bound;
    `censored` = no instance passed at all (the estimate is then 0 and only `upper` is informative)."""

    estimate: float
    ci_low: float
    ci_high: float
    upper: float
    censored: bool
    n_instances: int
    n_censored: int
    ci: float


def _bootstrap_weights(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) weights that turn a sum over instances into the mean over a resample with
    replacement (counts / n): the bootstrap without materialising resampled (point, instance) arrays."""
    idx = np.random.default_rng(seed).integers(0, n, (n_boot, n)) + n * np.arange(n_boot)[:, None]
    return np.bincount(idx.ravel(), minlength=n_boot * n).reshape(n_boot, n) / n


def task_rate(
    passes: ArrayLike,
    samples: ArrayLike,
    target: int,
    *,
    confidence: float = CONFIDENCE,
    n_boot: int = TASK_RATE_BOOT,
    ci: float = CI,
    seed: int = SEED,
) -> TaskRate:
    """The per-task PassUntil estimate from one checkpoint's runs: passes, samples of shape (instance,)."""
    passes, samples = _validate_runs(passes, samples, target)
    if passes.ndim != 1 or passes.size == 0:
        raise TokendynError("task_rate takes one checkpoint's runs: 1-D arrays over instances")
    values = _design_unbiased(passes, samples, target)
    rates = instance_rates(passes, samples, target, confidence=confidence)
    low, high = np.quantile(values @ _bootstrap_weights(values.size, n_boot, seed).T, [(1 - ci) / 2, (1 + ci) / 2])
    return TaskRate(
        estimate=float(values.mean()),
        ci_low=float(low),
        ci_high=float(high),
        upper=float(np.where(rates.censored, rates.upper, rates.rate).mean()),
        censored=bool(np.all(values == 0)),
        n_instances=int(values.size),
        n_censored=int(rates.censored.sum()),
        ci=ci,
    )


def log_neg_log(rate: ArrayLike) -> np.ndarray:
    """F = log(-log rate); NaN where the rate is not in (0, 1)."""
    rate = np.asarray(rate, dtype=float)
    valid = (rate > 0) & (rate < 1)
    return np.where(valid, np.log(-np.log(np.where(valid, rate, 0.5))), np.nan)


@dataclass(frozen=True)
class InstanceScaling:
    """Per-instance fits F_i = intercept + slope * log x over the points where instance i is not
    censored and 0 < rate < 1 (NaN with fewer than two). bound_violations counts the censored points
    whose upper bound lies below the fitted rate."""

    slope: np.ndarray
    intercept: np.ndarray
    n_points: np.ndarray
    bound_violations: np.ndarray


@dataclass(frozen=True)
class ScalingFit:
    """Dataset-level task scaling law F = log(-log PU) = intercept + slope * log x.

    c = exp(intercept), alpha = -slope: PU = exp(-c x^-alpha).
    curvature: q of F = a + b u + q u^2 (u = log x, centred) on all points; curvature_low/high its
    percentile bootstrap interval over instances at level `ci` (n_boot_used resamples where every
    point stayed in (0, 1)). shape: "accelerated" (interval below 0: F concave), "sub-scaling"
    (above 0: convex), "linear" (contains 0), "undetermined" (fewer than 3 points).
    holdout_*: arrays over the points of the largest model (usually one): PU predicted there by the
    line fitted without them, PU observed, F error (predicted - observed F; NaN when the observed PU
    is 0 or 1) and log10(predicted / observed PU). NaN when fewer than two other sizes remain.
    """

    slope: float
    intercept: float
    c: float
    alpha: float
    curvature: float
    curvature_low: float
    curvature_high: float
    shape: str
    n_points: int
    n_boot_used: int
    holdout_predicted: np.ndarray
    holdout_observed: np.ndarray
    holdout_f_error: np.ndarray
    holdout_log10_ratio: np.ndarray
    instances: InstanceScaling
    ci: float


def _line(u: np.ndarray, f: np.ndarray) -> tuple[float, float]:
    slope, intercept = np.polyfit(u, f, 1)
    return float(slope), float(intercept)


def _instance_fits(u: np.ndarray, rates: InstanceRates) -> InstanceScaling:
    f = log_neg_log(rates.rate)  # (point, instance)
    used = np.isfinite(f)
    n = used.sum(0)
    um = np.divide(np.where(used, u[:, None], 0).sum(0), n, out=np.full(n.shape, np.nan), where=n > 0)
    fm = np.divide(np.where(used, f, 0).sum(0), n, out=np.full(n.shape, np.nan), where=n > 0)
    du = np.where(used, u[:, None] - um, 0.0)
    sxx = (du**2).sum(0)
    sxy = (du * np.where(used, f - fm, 0.0)).sum(0)
    ok = (n >= 2) & (sxx > 0)
    slope = np.where(ok, sxy / np.where(ok, sxx, 1), np.nan)
    intercept = np.where(ok, fm - slope * um, np.nan)
    fitted_rate = np.exp(-np.exp(intercept + slope * u[:, None]))
    violations = (rates.censored & (fitted_rate > rates.upper)).sum(0)
    return InstanceScaling(slope=slope, intercept=intercept, n_points=n, bound_violations=violations)


def fit_task_scaling(
    passes: ArrayLike,
    samples: ArrayLike,
    target: int,
    n_params: ArrayLike,
    *,
    excess_loss: ArrayLike | None = None,
    confidence: float = CONFIDENCE,
    n_boot: int = SCALING_BOOT,
    ci: float = CI,
    seed: int = SEED,
) -> ScalingFit:
    """Fit the task scaling law to PassUntil runs of several models.

    passes, samples: (point, instance) runs, one point per model (e.g. its final checkpoint; several
        checkpoints of a model may be points too); target: the runs' pass target.
    n_params: (point,) parameter count N; the x axis is log N, or log `excess_loss` (point,) when
        given (loss minus irreducible loss, see tokendyn.analysis.skills). Points of the largest N are held
        out for the prediction error.
    Dataset-level PU per point is the per-task mean (see `task_rate`); points where it is 0 (no
    instance passed) or 1 are left out. The bootstrap resamples instances jointly across points.
    """
    passes, samples = _validate_runs(passes, samples, target)
    n_params = np.asarray(n_params, dtype=float)
    if passes.ndim != 2 or n_params.shape != passes.shape[:1]:
        raise TokendynError("fit_task_scaling takes (point, instance) runs and one n_params per point")
    x = n_params if excess_loss is None else np.asarray(excess_loss, dtype=float)
    if x.shape != n_params.shape or np.any(~(x > 0)):
        raise TokendynError("the scaling axis (n_params or excess_loss) needs one positive value per point")
    u = np.log(x)
    values = _design_unbiased(passes, samples, target)
    f = log_neg_log(values.mean(1))
    valid = np.isfinite(f)
    if valid.sum() < 2:
        raise TokendynError("the task scaling fit needs at least two models whose pass rate lies in (0, 1)")
    slope, intercept = _line(u[valid], f[valid])

    curvature = low = high = float("nan")
    shape, n_used = "undetermined", 0
    if np.unique(u[valid]).size >= 3:
        centred = u[valid] - u[valid].mean()
        curvature = float(np.polyfit(centred, f[valid], 2)[0])
        boot_f = log_neg_log(values[valid] @ _bootstrap_weights(values.shape[1], n_boot, seed).T)  # (point, boot)
        keep = np.all(np.isfinite(boot_f), axis=0)
        n_used = int(keep.sum())
        if n_used:
            q = np.polyfit(centred, boot_f[:, keep], 2)[0]
            low, high = (float(v) for v in np.quantile(q, [(1 - ci) / 2, (1 + ci) / 2]))
            shape = "accelerated" if high < 0 else "sub-scaling" if low > 0 else "linear"

    held = n_params == n_params.max()
    train = valid & ~held
    observed = values[held].mean(1)
    f_predicted = np.full(observed.shape, np.nan)
    if np.unique(u[train]).size >= 2:
        s, i = _line(u[train], f[train])
        f_predicted = s * u[held] + i
    predicted = np.exp(-np.exp(f_predicted))
    with np.errstate(divide="ignore", invalid="ignore"):
        log10_ratio = np.where(observed > 0, np.log10(predicted / observed), np.nan)

    rates = instance_rates(passes, samples, target, confidence=confidence)
    return ScalingFit(
        slope=slope,
        intercept=intercept,
        c=float(np.exp(intercept)),
        alpha=-slope,
        curvature=curvature,
        curvature_low=low,
        curvature_high=high,
        shape=shape,
        n_points=int(valid.sum()),
        n_boot_used=n_used,
        holdout_predicted=predicted,
        holdout_observed=observed,
        holdout_f_error=f_predicted - log_neg_log(observed),
        holdout_log10_ratio=log10_ratio,
        instances=_instance_fits(u, rates),
        ci=ci,
    )

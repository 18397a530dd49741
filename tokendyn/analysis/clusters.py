"""Clustering token loss trajectories into named shapes, with scikit-learn (docs/methods.md §5).

Samples are (model, token) pairs; features are the token's loss trajectory over the trained part
(steps > 0) in that model: by default (`on="progress"`) over the model's own trained checkpoints,
the span the per-token detectors see; `on="perplexity"` on the matched-perplexity grid (comparable
points across sizes, but only the range every model reaches); `on="checkpoints"` one model's
checkpoints. The estimator is fitted on a random subsample and then labels every token chunk by
chunk (lazy, out of core).

Features (`normalize="window"`, default). The late window is the points with step >= start x the
final step (start = 0.4), the trend categories' window (methods.md §1.2). A token's trajectory
features are its loss over the late window minus its mean there (nats), followed by its whole
trajectory minus its mean, weighted so that both blocks carry the same total variance in the fit
sample. Without the window block, the fall from random initialisation that every token shares
(about 6 nats on the built-in suite) outweighs the late stagnation and rises (tenths of a nat) the
detectors look at.

Change features (`change_statistics`), appended to the trajectory features: the statistics the
per-token detectors threshold, computed on the checkpoints each detector sees, so that a shape
counts whenever in training it happens (a time-aligned curve smears a double descent whose timing
varies from token to token):
- "descent": the double-descent depth (nats), the largest d such that the smoothed loss falls by d,
  rises d and falls d again (`descent_depth`; the detector flags depth >= its tol);
- "late_trend": the trend categories' slope t statistic over the trend window in units of its
  critical value (|late_trend| >= 1: a significant trend), clipped to +-2;
- "late_spread": the larger distance of the trend window's first and last loss from its mean
  (nats; the stagnation band's test).
Each is scaled so that the change block carries `change_weight` (1) x the trajectory block's total
variance in the fit sample, in equal shares.

Naming rules mirror the per-token detectors. A cluster's centroid curve c is the mean over its
members of the loss change from the first point (nats); D, T and S are its members' mean descent,
late_trend and late_spread; the first rule that holds names it:
1. "double descent": D >= dd_tol (the detector's tolerance, 0.5 nats);
2. "stagnating": |T| < 1 and S <= ln(1 + band) (no significant trend, ends within the stagnation
   band, band = 0.05 as in the trend categories);
3. "rising": T >= 1 (a significant rise, as the "upward" category);
4. "falling then rising": the minimum of c is at least tol below both ends;
5. "rising then falling": the maximum of c is at least tol above both ends;
6. falling (c[-1] - c[0] <= -tol), by the share f of the total drop reached at the middle point:
   f >= 2/3 "early-falling", f <= 1/3 "late-falling", else "steadily falling";
7. "wavy" otherwise.
Clusters are numbered by size (0 = largest); a name that occurs twice gets the total change
appended, e.g. "steadily falling (-2.10 nats)".

Choosing the number of clusters. The default, n_clusters="shapes", does not under-split: k-means
(or the mixture) is fitted with `n_fine` (96) clusters, every fine cluster is named by the rules
above, and fine clusters with the same name are merged, so there is one cluster per shape found. A
small group with its own shape (stagnating, rising, double-descent tokens) keeps its own cluster
even when it is a few percent of the tokens; silhouette ("auto" with k-means) prefers two big
groups. `detector_agreement` compares the named clusters with the per-token detectors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numba
import numpy as np
import pandas as pd
import scipy.stats
import xarray as xr
from sklearn.cluster import MiniBatchKMeans
from sklearn.metrics import adjusted_rand_score, silhouette_score
from sklearn.mixture import GaussianMixture
from threadpoolctl import threadpool_limits

from tokendyn.analysis.compiled import decoded, ols_t, stored
from tokendyn.analysis.labels import MISSING, flag_array, flag_names, label_mask, label_share
from tokendyn.analysis.shared import computed
from tokendyn.analysis.spill import filled
from tokendyn.analysis.trajectories import (
    DESCENT_TOL,
    DESCENT_WINDOW,
    SLICE_TOKENS,
    _average_columns,
    at_perplexity,
    default_of,
    double_descent,
    load_small,
    model_index,
    model_loss,
    valid_tokens,
)
from tokendyn.analysis.trends import trend_categories, window_start
from tokendyn.errors import TokendynError
from tokendyn.store.layout import TOKEN_DIMS

FEATURES = ("perplexity", "progress", "checkpoints")
METHODS = ("kmeans", "gmm")
# k-means++ starts per k-means fit (the best is kept). The refits that only score stability take
# fewer: the starts are most of a fit's time, and the labels come from the main fit alone.
N_INIT, REFIT_N_INIT = 10, 3
FIT_THREADS = 2  # the stability refits run beside the fit (scikit-learn's loops release the GIL)
MIN_FINE_SIZE = 30  # "shapes": fit samples per fine cluster at least, so a fine centroid averages out the noise
NORMALIZATIONS = ("window", "center", "start", "zscore")
WINDOW_TOKENS = 2**18  # tokens per window of the top-token counts (ids read, counted, released)
N_POINTS = 10  # points of a trajectory feature: matched perplexities or training-progress points
# The per-token detectors' own defaults, so that the names use their definitions (one place per default;
# the double-descent ones are trajectories.DESCENT_TOL and DESCENT_WINDOW).
BAND = default_of(trend_categories, "band")
ALPHA = default_of(trend_categories, "alpha")


@dataclass
class Clustering:
    """Result of `cluster`.

    labels: cluster of every (model, token), a label array (`tokendyn.analysis.labels`); names: the
    cluster names. centroids: (cluster, point) mean loss change from the first point, nats, with
    the grid as a coordinate and the members' mean change features (CHANGES) per cluster. scores:
    criterion value per candidate number of clusters (empty when given). stability: mean
    adjusted Rand index between the fit and refits with other seeds, on the fit sample.
    top_tokens: the most frequent token ids of each cluster with their text and frequencies
    (`cluster_top_tokens`).
    """

    labels: xr.DataArray
    centroids: xr.DataArray
    criterion: str
    scores: dict[int, float]
    stability: float
    top_tokens: pd.DataFrame

    @property
    def names(self) -> tuple[str, ...]:
        return flag_names(self.labels)

    def share(self) -> xr.DataArray:
        """Percentage of each model's tokens in each cluster: (model, category)."""
        return label_share(self.labels)


def trajectory_features(
    ds: xr.Dataset,
    on: str = "perplexity",
    model: int | str | None = None,
    levels: Sequence[float] | None = None,
    n_levels: int = N_POINTS,
) -> xr.DataArray:
    """Trajectories as (model, token, point), `point` whole in each chunk. Lazy.

    on="perplexity": loss at matched validation perplexity (levels, default a grid of n_levels
    every model reaches; levels some model misses are dropped). on="checkpoints": one model's
    loss over its done checkpoints (`model` needed when the store has several).
    """
    if on == "perplexity":
        grid = at_perplexity(ds, levels, n_levels)
        reached = np.isfinite(grid["step"].values).all(axis=0)
        grid = grid.isel(val_ppl=np.flatnonzero(reached)).rename(val_ppl="point")
    elif on == "progress":
        grid = progress_loss(ds, n_levels)
    elif on == "checkpoints":
        if model is None and ds.sizes["model"] > 1:
            raise TokendynError("clustering on checkpoints needs one model: pass model=NAME")
        m = model_index(ds, model or 0)
        grid = model_loss(ds, m)
        grid = grid.isel(ckpt=np.flatnonzero(grid["step"].values > 0))  # the trained part
        grid = grid.rename(ckpt="point").assign_coords(point=grid["step"].values).drop_vars("step")
        grid = grid.expand_dims(model=[ds["model"].values[m]])
    else:
        raise TokendynError(f"unknown clustering features {on!r}; choose one of {', '.join(FEATURES)}")
    if grid.sizes["point"] < 2:
        raise TokendynError("clustering needs trajectories of at least 2 points; add levels or checkpoints")
    return grid.transpose("model", *TOKEN_DIMS, "point").chunk({"point": -1})


def progress_loss(ds: xr.Dataset, n_points: int = N_POINTS) -> xr.DataArray:
    """Every model's loss over its own trained part (steps > 0): (model, point, token), lazy.

    `point` is the training progress in [0, 1] along the model's own trained checkpoints: point p
    lies at position p * (n - 1) in its sequence of n trained checkpoints, linearly interpolated
    between the two around it (the double-descent detector's axis, methods.md §1.3; it follows the
    suite's own checkpoint spacing, dense where it saved often). A `step` coordinate
    (model, point) holds the interpolated steps. Unlike the matched-perplexity grid it needs no
    perplexity range shared by the models: every model is seen over its whole run.
    """
    ds = load_small(ds)
    targets = np.linspace(0.0, 1.0, n_points)
    per_model, steps = [], []
    for m, name in enumerate(ds["model"].values):
        # model_loss, as change_features reads it: computed together, the two share their reads
        loss = model_loss(ds, m)
        step = loss["step"].values
        idx = np.flatnonzero(step > 0)
        if len(idx) < 2:
            raise TokendynError(f"model {name} has fewer than 2 trained checkpoints (step > 0); extract more")
        position = targets * (len(idx) - 1)
        lo = np.minimum(np.floor(position).astype(int), len(idx) - 2)
        weight = position - lo
        a, b = (loss.isel(ckpt=xr.DataArray(idx[i], dims="point")).astype(np.float32) for i in (lo, lo + 1))
        per_model.append((a + xr.DataArray(weight, dims="point") * (b - a)).reset_coords(drop=True))
        steps.append(step[idx][lo] + weight * (step[idx][lo + 1] - step[idx][lo]))
    out = xr.concat(per_model, dim="model").assign_coords(
        model=ds["model"].values, point=targets, step=(("model", "point"), np.array(steps))
    )
    return out.transpose("model", "point", *TOKEN_DIMS)


def normalise(x: np.ndarray, how: str, window: np.ndarray | None = None, weight: float = 1.0) -> np.ndarray:
    """Rows of x (..., point): "window" = the points of the boolean mask `window` (the late
    window, see `late_window`) minus their mean, followed by the whole row minus its mean times
    `weight`; "center" = deviation from the row's mean (nats:
    magnitudes kept, no single noisy point as the anchor); "start" = change from the first point;
    "zscore" = standardised shape."""
    if how == "window":
        late = x[..., window]
        whole = x - x.mean(axis=-1, keepdims=True)
        return np.concatenate([late - late.mean(axis=-1, keepdims=True), weight * whole], axis=-1)
    if how == "center":
        return x - x.mean(axis=-1, keepdims=True)
    if how == "start":
        return x - x[..., :1]
    std = x.std(axis=-1, keepdims=True)
    return np.where(std > 0, (x - x.mean(axis=-1, keepdims=True)) / np.where(std > 0, std, 1), 0.0)


def late_window(steps: np.ndarray, start: float) -> np.ndarray:
    """Mask of the points in the trend window: step >= start * final step in every model.

    steps: (point,) or (model, point). As `trends.trend_categories` (methods.md §1.2), so that a
    cluster's name over this window means what the trend category means; at least the last 2
    points.
    """
    steps = np.atleast_2d(np.asarray(steps, dtype=float))
    window = (steps >= start * steps[:, -1:]).all(axis=0)
    window[-2:] = True
    return window


def name_shape(
    curve: np.ndarray,
    tol: float,
    *,
    window: np.ndarray | None = None,
    dd_tol: float | None = None,
    band: float = BAND,
    changes: np.ndarray | None = None,
) -> str:
    """Name of a centroid curve (change from its first point, nats) by the module's rules.

    window: mask of the late-window points (default: all; a suffix of the points); dd_tol: the
    double-descent tolerance (default: tol); band: the trend categories' stagnation band.
    changes: the cluster's mean change features (descent, late_trend, late_spread; see
    `change_statistics`); default: the curve's own, unsmoothed, with the point index as x.
    """
    if changes is None:
        late = np.arange(len(curve), dtype=float)[slice(None) if window is None else window]
        changes = change_statistics(curve, late, smooth=1)
    descent, late_trend, late_spread = changes
    total = curve[-1] - curve[0]
    if descent >= (tol if dd_tol is None else dd_tol):
        return "double descent"
    if late_spread <= np.log1p(band) and abs(late_trend) < 1:
        return "stagnating"
    if late_trend >= 1:
        return "rising"
    if min(curve[0], curve[-1]) - curve.min() >= tol:
        return "falling then rising"
    if curve.max() - max(curve[0], curve[-1]) >= tol:
        return "rising then falling"
    if total <= -tol:
        early = (curve[(len(curve) - 1) // 2] - curve[0]) / total
        return "early-falling" if early >= 2 / 3 else "late-falling" if early <= 1 / 3 else "steadily falling"
    return "wavy"


CHANGES = ("descent", "late_trend", "late_spread")
TREND_CLIP = 2.0  # late_trend is clipped to +-2 critical values: past that, a trend is certain


def descent_depth(y: np.ndarray, smooth: int = 1) -> np.ndarray:
    """Depth of the deepest double descent along the last axis of y (its units), whatever its timing.

    After the double-descent detector's centred moving average over `smooth` points
    (`trajectories.moving_average`; 1 = none): the largest d such that the curve falls by d to
    some point b, later rises d above it to a peak c, and later still falls d below the peak; 0
    when it has no fall-rise-fall, NaN when the row has a NaN. So
    `trajectories.double_descent(tol, window=smooth)` flags a NaN-free row exactly when its depth
    is >= tol: the detector's test as a number. float64 rows are computed in float64, others in
    float32.
    """
    y = np.asarray(y)
    depth = np.zeros(int(np.prod(y.shape[:-1])))
    if y.shape[-1]:
        work = np.float64 if y.dtype == np.float64 else np.float32
        _descent_depth_rows(_stored_rows(y), smooth, np.empty(y.shape[-1], work), depth)
    return depth.reshape(y.shape[:-1])


def _stored_rows(y: np.ndarray) -> np.ndarray:
    """y as contiguous rows (..., point) for a compiled kernel: dask hands (token, point) blocks, so
    usually without a copy; float16 as its bits (`compiled.stored`)."""
    return np.ascontiguousarray(stored(y).reshape(-1, y.shape[-1]))


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _descent_depth_rows(rows: np.ndarray, smooth: int, y: np.ndarray, depth: np.ndarray) -> None:
    """`descent_depth` of each row of stored values (`decoded`), into depth, in y's precision (y:
    a work row); one pass per row, no temporaries per token.

    The smoothing is `moving_average`'s own kernel, so the smoothed values are the same to the
    bit. With M the running maximum and L the minimum from each point on, a peak c
    after a low point b gives the depth min(M[b] - y[b], y[c] - y[b], y[c] - L[c]); the largest
    over b < c is kept. A peak c is tried only when it could beat the depth so far and the next
    point is lower (a later, higher point would do at least as well), so few peaks cost a pass.
    """
    n = rows.shape[1]
    raw = np.empty_like(y)
    top = np.empty_like(y)
    low = np.empty_like(y)
    for r in range(rows.shape[0]):
        clean = True
        for i in range(n):
            raw[i] = decoded(rows[r, i])
            clean &= raw[i] == raw[i]
        if not clean:
            depth[r] = np.nan
            continue
        _average_columns(raw.reshape(n, 1), smooth, y.reshape(n, 1))  # the row as one column
        top[0], low[n - 1] = y[0], y[n - 1]
        for i in range(1, n):
            top[i] = max(top[i - 1], y[i])
            low[n - 1 - i] = min(low[n - i], y[n - 1 - i])
        best = 0.0
        lowest, deepest = y[0], 0.0  # before c: the lowest point, the largest fall to a point
        for c in range(1, n - 1):
            bound = min(y[c] - low[c], y[c] - lowest, deepest)  # no b < c gives more than this
            lowest, deepest = min(lowest, y[c]), max(deepest, top[c] - y[c])
            if bound <= best or y[c + 1] >= y[c]:
                continue
            fall_after = y[c] - low[c]
            rise = -np.inf
            for b in range(c):
                rise = max(rise, min(top[b], y[c]) - y[b])
            best = max(best, min(rise, fall_after))
        depth[r] = best


def change_statistics(y: np.ndarray, late_x: np.ndarray, smooth: int, alpha: float = ALPHA) -> np.ndarray:
    """The change features of loss trajectories y (..., point) over one model's checkpoints: the
    statistics the per-token detectors threshold, none depending on when in training a shape happens.

    Returns (..., 3) in the order of CHANGES. "descent": the double-descent depth (nats,
    `descent_depth`) after the detector's centred moving average over `smooth` points.
    Over the trend window, the last len(late_x) points at x = late_x (their log steps):
    "late_trend", the t statistic of the least-squares slope of perplexity against x (the trend
    categories' test) in units of its critical value at `alpha` (|late_trend| >= 1: a significant
    trend), clipped to +-TREND_CLIP, 0 with fewer than 3 points; "late_spread", the larger distance
    of the window's first and last loss from its mean (nats; the stagnation band's test).
    """
    y = np.asarray(y)
    rows = _stored_rows(y)
    t, spread = np.empty(len(rows)), np.empty(len(rows))
    _late_window_rows(rows, np.asarray(late_x, dtype=np.float64), t, spread)
    trend = np.zeros(len(rows))
    if len(late_x) >= 3:
        trend = np.clip(t / scipy.stats.t.isf(alpha / 2, len(late_x) - 2), -TREND_CLIP, TREND_CLIP)
    trend[np.isnan(spread)] = np.nan
    changes = np.stack([descent_depth(y, smooth).ravel(), trend, spread], axis=-1)
    return changes.reshape(*y.shape[:-1], len(CHANGES))


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _late_window_rows(rows: np.ndarray, x: np.ndarray, t: np.ndarray, spread: np.ndarray) -> None:
    """Per row of stored values (`decoded`) over its last len(x) points, the trend window (loss at
    x), in float64: the t statistic of the least-squares slope of perplexity relative to the first
    point, exp(loss - loss[0]), against x, by `compiled.ols_t` as `trends.ols` computes it (0 for a
    row flat to rounding, +-inf for an exact line; 0 with fewer than 3 points), and the larger
    distance of the first and last loss from the mean. NaN in a row gives NaN."""
    n = len(x)
    xc = x - x.mean()
    sxx = (xc * xc).sum()
    w = np.empty(n)
    for r in range(rows.shape[0]):
        for i in range(n):
            w[i] = decoded(rows[r, rows.shape[1] - n + i])
        mean = w.mean()
        spread[r] = max(abs(w[0] - mean), abs(w[n - 1] - mean))
        sum_y = sum_y2 = sxy = 0.0
        for i in range(n):
            e = np.exp(w[i] - w[0])
            sum_y += e
            sum_y2 += e * e
            sxy += xc[i] * e
        if n < 3:  # no residual degree of freedom: no test
            t[r] = 0.0 if mean == mean else np.nan
        else:
            t[r] = ols_t(n, sum_y, sum_y2, sxy, sxx)[1]


def change_features(ds: xr.Dataset, start: float = 0.4, smooth: int = DESCENT_WINDOW) -> xr.DataArray:
    """`change_statistics` of every token in every model: (model, token, change), lazy.

    Each over the checkpoints its detector sees: the descent over all done checkpoints (step 0
    included when the suite has it), as `trajectories.double_descent`; late_trend and late_spread
    over the trend window of `trends.trend_categories`, the trained checkpoints (step > 0) with
    step >= start x the final step (at least the last 2).
    """
    ds = load_small(ds)
    per_model = []
    for m, name in enumerate(ds["model"].values):
        loss = model_loss(ds, m)
        steps = loss["step"].values
        trained = int(np.searchsorted(steps, 0, side="right"))  # the first step > 0
        if len(steps) - trained < 2:
            raise TokendynError(f"model {name} has fewer than 2 trained checkpoints (step > 0); extract more")
        late = min(max(window_start(steps, start), trained), len(steps) - 2)
        per_model.append(
            xr.apply_ufunc(
                change_statistics,
                loss.drop_vars("step"),
                input_core_dims=[["ckpt"]],
                output_core_dims=[["change"]],
                kwargs=dict(late_x=np.log(steps[late:]), smooth=smooth),
                dask="parallelized",
                output_dtypes=[np.float64],
                dask_gufunc_kwargs={"output_sizes": {"change": len(CHANGES)}},
            )
        )
    out = xr.concat(per_model, dim="model").assign_coords(model=ds["model"].values, change=list(CHANGES))
    return out.transpose("model", *TOKEN_DIMS, "change")


def _estimator(method: str, k: int, seed: int, n_init: int = N_INIT):
    if method == "kmeans":
        return MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=n_init, batch_size=4096)
    return GaussianMixture(n_components=k, covariance_type="diag", random_state=seed)


def _choose_k(x: np.ndarray, method: str, k_range: Sequence[int], seed: int) -> tuple[int, dict[int, float]]:
    """k by silhouette (k-means, highest; on <= 5000 points) or BIC (Gaussian mixture, lowest)."""
    scores = {}
    for k in k_range:
        estimator = _estimator(method, k, seed).fit(x)
        if method == "kmeans":
            scores[k] = float(
                silhouette_score(x, estimator.predict(x), sample_size=min(5000, len(x)), random_state=seed)
            )
        else:
            scores[k] = float(estimator.bic(x))
    best = max(scores, key=scores.get) if method == "kmeans" else min(scores, key=scores.get)
    return best, scores


def _fit(
    x: np.ndarray, n_clusters: int | str, method: str, k_range: Sequence[int], n_seeds: int, seed: int
) -> tuple[int, dict[int, float], object, np.ndarray, float]:
    """(k, criterion scores, fitted estimator, its labels of x, mean ARI of refits with other seeds)."""
    if n_clusters == "auto":
        k_range = [k for k in k_range if k < len(x)]
        if not k_range:
            raise TokendynError("too few tokens to choose a number of clusters; pass n_clusters")
        n_clusters, scores = _choose_k(x, method, k_range, seed)
    else:
        n_clusters, scores = int(n_clusters), {}
        if not 1 <= n_clusters < len(x):
            raise TokendynError(f"n_clusters must be between 1 and {len(x) - 1} for these tokens")

    def refit(s: int) -> np.ndarray:
        return _estimator(method, n_clusters, seed + s, REFIT_N_INIT).fit(x).predict(x)

    with ThreadPoolExecutor(FIT_THREADS) as pool:
        refitting = [pool.submit(refit, s) for s in range(1, n_seeds + 1)]
        estimator = _estimator(method, n_clusters, seed).fit(x)
        labels = estimator.predict(x)
        refits = [job.result() for job in refitting]
    stability = float(np.mean([adjusted_rand_score(labels, r) for r in refits])) if refits else np.nan
    return n_clusters, scores, estimator, labels, stability


def _shape_merge(
    labels: np.ndarray, change: np.ndarray, stats: np.ndarray, k: int, namer: Callable
) -> tuple[np.ndarray, list[str]]:
    """(map from fine cluster to merged cluster, merged names): fine clusters with the same shape name
    share one cluster, which keeps that name. change: loss change from the first point per sample;
    stats: change features per sample."""
    # each cluster's members in index order, as labels == j selects them (so the same means), one sort
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(k + 1))
    members = [order[bounds[j] : bounds[j + 1]] for j in range(k)]
    names = [
        namer(change[rows].mean(axis=0), changes=stats[rows].mean(axis=0)) if len(rows) else "empty" for rows in members
    ]
    distinct = list(dict.fromkeys(names))
    return np.array([distinct.index(n) for n in names]), distinct


def _fit_shapes(
    x: np.ndarray,
    change: np.ndarray,
    stats: np.ndarray,
    method: str,
    n_fine: int,
    n_seeds: int,
    seed: int,
    namer: Callable,
) -> tuple[list[str], object, np.ndarray, np.ndarray, float]:
    """("shapes") (merged cluster names, fine estimator, fine -> merged map, merged labels of x,
    mean ARI of the merged labels of refits with other seeds)."""
    k = min(n_fine, len(x) - 1)
    if k < 1:
        raise TokendynError("too few tokens to cluster; pass more tokens or fewer clusters")

    def fit(s: int, n_init: int = N_INIT):
        estimator = _estimator(method, k, s, n_init).fit(x)
        fine = estimator.predict(x)
        merge, names = _shape_merge(fine, change, stats, k, namer)
        return estimator, merge, merge[fine], names

    # The fit and its refits are independent and release the GIL in their loops: two at a time
    with ThreadPoolExecutor(FIT_THREADS) as pool:
        refitting = [pool.submit(fit, seed + s, REFIT_N_INIT) for s in range(1, n_seeds + 1)]
        estimator, merge, labels, names = fit(seed)
        refits = [job.result()[2] for job in refitting]
    stability = float(np.mean([adjusted_rand_score(labels, r) for r in refits])) if refits else np.nan
    return names, estimator, merge, labels, stability


def design(
    x: np.ndarray, stats: np.ndarray, how: str, window: np.ndarray, weight: float, scale: np.ndarray
) -> np.ndarray:
    """The fit features of rows x (n, point) with their change features stats (n, change): the
    normalised trajectory (`normalise`) followed by the change features times `scale` (per feature)."""
    return np.concatenate([normalise(x, how, window, weight), scale * stats], axis=-1)


SAMPLE_POOL = 4  # fit_sample draws from stored token chunks holding at least this many times the sample


def fit_sample(ds: xr.Dataset, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of n random tokens (all of them when there are fewer), sorted.

    In a store of many token chunks, the tokens are drawn from randomly chosen whole chunks that
    hold at least SAMPLE_POOL x n tokens, so that reading the sample reads those chunks only: its
    cost stays the same however long the evaluation text is.
    """
    n_tokens = ds.sizes["token"]
    if n >= n_tokens:
        return np.arange(n_tokens)
    loss = ds["loss"]
    chunks = loss.chunks[loss.get_axis_num("token")] if loss.chunks is not None else None
    if chunks is None or SAMPLE_POOL * n > n_tokens - max(chunks):  # the pool would be every chunk
        return np.sort(rng.choice(n_tokens, n, replace=False))
    starts = np.cumsum([0, *chunks])
    pool: list[np.ndarray] = []
    for c in rng.permutation(len(chunks)):
        pool.append(np.arange(starts[c], starts[c + 1]))
        if sum(len(p) for p in pool) >= SAMPLE_POOL * n:
            break
    return np.sort(rng.choice(np.concatenate(pool), n, replace=False))


def _predict(x: np.ndarray, stats: np.ndarray, estimator, order: np.ndarray, **design_kwargs) -> np.ndarray:
    """Cluster codes of trajectories x (..., point) with change features stats (..., change);
    MISSING where a value is NaN."""
    flat, flat_stats = x.reshape(-1, x.shape[-1]), stats.reshape(-1, stats.shape[-1])
    ok = np.isfinite(flat).all(axis=1) & np.isfinite(flat_stats).all(axis=1)
    codes = np.full(len(flat), MISSING, dtype=np.int8)
    # a slice of tokens at a time: the design matrix and k-means' distances of a whole chunk are
    # hundreds of MB in float64, held by every thread at once
    for i in range(0, len(flat), SLICE_TOKENS):
        rows = slice(i, i + SLICE_TOKENS)
        keep = np.flatnonzero(ok[rows]) + i
        if len(keep):
            codes[keep] = order[estimator.predict(design(flat[keep], flat_stats[keep], **design_kwargs))]
    return codes.reshape(x.shape[:-1])


def _decode(ids: Sequence[int], token_text) -> list[str]:
    """Text of token ids via a callable (ids -> texts) or a tokenizer; the ids themselves if neither."""
    if token_text is None:
        return [str(i) for i in ids]
    if hasattr(token_text, "decode"):
        return [token_text.decode([int(i)]) for i in ids]
    return [str(text) for text in token_text([int(i) for i in ids])]


def _id_counts(codes: np.ndarray, token_id: np.ndarray | xr.Variable, n_clusters: int) -> tuple[np.ndarray, np.ndarray]:
    """(per cluster, all labelled) occurrences of every token id, (cluster, id) and (id,), counted a
    window of tokens at a time: the token ids are read a window at a time (a lazy array stays on
    disk) and no per-token copy is made. Labelled tokens are never padding: their ids are >= 0."""
    codes = codes.reshape(-1, codes.shape[-1])
    per_cluster, corpus = np.zeros((n_clusters, 0), np.int64), np.zeros(0, np.int64)
    for begin in range(0, codes.shape[1], WINDOW_TOKENS):
        part = codes[:, begin : begin + WINDOW_TOKENS]
        ids = np.broadcast_to(np.asarray(token_id[begin : begin + WINDOW_TOKENS]), part.shape)
        labelled = part >= 0
        size = max(per_cluster.shape[1], int(ids[labelled].max()) + 1 if labelled.any() else 0)
        per_cluster = np.pad(per_cluster, ((0, 0), (0, size - per_cluster.shape[1])))
        corpus = np.pad(corpus, (0, size - len(corpus)))
        corpus += np.bincount(ids[labelled], minlength=size)
        for k in range(n_clusters):
            per_cluster[k] += np.bincount(ids[part == k], minlength=size)
    return per_cluster, corpus


def cluster_top_tokens(
    labels: xr.DataArray,
    token_id: np.ndarray | xr.Variable,
    top: int = 10,
    token_text: Callable[[Sequence[int]], Sequence[str]] | None = None,
) -> pd.DataFrame:
    """Most frequent token ids per cluster, pooled over models.

    Columns: cluster, name, token_id, text, count (occurrences in the cluster), cluster_share
    (% of the cluster), corpus_count (occurrences among labelled tokens, all models),
    token_share (% of that token's occurrences that fall in this cluster).
    """
    names = flag_names(labels)
    per_cluster, corpus = _id_counts(np.asarray(labels.values), token_id, len(names))
    rows = []
    for k, name in enumerate(names):
        member_ids = np.flatnonzero(per_cluster[k])
        counts = per_cluster[k][member_ids]
        best = np.argsort(-counts, kind="stable")[:top]
        texts = _decode(member_ids[best].tolist(), token_text)
        for i, text in zip(best, texts):
            token = int(member_ids[i])
            rows.append(
                {
                    "cluster": k,
                    "name": name,
                    "token_id": token,
                    "text": text,
                    "count": int(counts[i]),
                    "cluster_share": 100 * counts[i] / counts.sum(),
                    "corpus_count": corpus[token],
                    "token_share": 100 * counts[i] / corpus[token],
                }
            )
    return pd.DataFrame(rows)


def cluster(
    ds: xr.Dataset,
    n_clusters: int | str = "shapes",
    on: str = "progress",
    model: int | str | None = None,
    levels: Sequence[float] | None = None,
    n_levels: int = default_of(trajectory_features, "n_levels"),
    method: str = "kmeans",
    normalize: str = "window",
    start: float = default_of(change_features, "start"),
    k_range: Sequence[int] = range(2, 9),
    n_fine: int = 96,
    max_fit_tokens: int = 50_000,
    n_seeds: int = 5,
    change_weight: float = 1.0,
    tol: float = 0.1,
    dd_tol: float = DESCENT_TOL,
    dd_window: int = DESCENT_WINDOW,
    top: int = default_of(cluster_top_tokens, "top"),
    token_text: Callable[[Sequence[int]], Sequence[str]] | None = None,
    random_state: int = 0,
) -> Clustering:
    """Cluster token trajectories and name the clusters by shape (see the module doc).

    n_clusters: "shapes" (default: `n_fine` clusters, fewer where the fit sample has under
    MIN_FINE_SIZE tokens per cluster so that no centroid is the mean of a handful of noisy
    tokens, merged by shape name: one cluster per shape),
    a number, or "auto": the k in `k_range` with the highest silhouette score (method="kmeans",
    MiniBatchKMeans) or the lowest BIC (method="gmm", diagonal Gaussian mixture).
    on/model/levels/n_levels: the features (`trajectory_features`; default "progress": each
    model over its own trained checkpoints, the span the per-token detectors see). normalize:
    "window" (default: the loss over the late window, the points with step >= start * final step,
    minus its mean there, in nats: the trend categories' window, past the fall from random
    initialisation that every token shares), "center" (the whole trajectory minus its mean; unlike
    "start", the change from the first point, it does not split flat tokens by the noise of their
    first point) or "zscore" (shape only). start: the late window's start fraction (0.4, one of
    the trend study's start fractions), used by the names and the change features too.
    change_weight: total variance of the change features (`change_features`) relative to the
    trajectory features' (1: equal; 0: trajectories only, the names still use the change features).
    max_fit_tokens: size of the fit subsample (`fit_sample`), pooled over models. n_seeds: refits
    for the stability score. tol: naming tolerance (nats) of the falling and U shapes.
    dd_tol, dd_window: the double-descent name's tolerance (nats) and the descent's moving-average
    window (checkpoints); default: the per-token detector's. top: tokens listed per cluster.
    token_text: callable from token ids to their texts, or a tokenizer with `decode`; default: the
    store's vocabulary (`vocab_text`), else the ids are shown. Labels are computed (int8 per model
    and token).
    """
    ds = load_small(ds)
    if method not in METHODS:
        raise TokendynError(f"unknown clustering method {method!r}; choose 'kmeans' or 'gmm'")
    if normalize not in NORMALIZATIONS:
        raise TokendynError(f"unknown normalisation {normalize!r}; choose one of {', '.join(NORMALIZATIONS)}")
    features = trajectory_features(ds, on, model, levels, n_levels)
    features = features.where(valid_tokens(ds))
    if not 0 <= start < 1:
        raise TokendynError(f"start must be a fraction in [0, 1), e.g. 0.4, not {start}")
    if not change_weight >= 0:
        raise TokendynError(f"change_weight must be >= 0 (0: trajectories only), not {change_weight}")
    changes = change_features(ds, start, dd_window).sel(model=features["model"].values)
    steps = features["step"].values if "step" in features.coords else features["point"].values
    window = late_window(steps, start)
    namer = partial(name_shape, tol=tol, window=window, dd_tol=dd_tol)
    rng = np.random.default_rng(random_state)
    fit_tokens = fit_sample(ds, max(1, math.ceil(max_fit_tokens / features.sizes["model"])), rng)
    # The sample's features from the sample's loss: selecting them from the lazy features of every
    # token would compute those for every token once more than labelling them does.
    sample = ds.isel(token=fit_tokens)
    sample["loss"] = sample["loss"].compute()  # read once for both
    raw = trajectory_features(sample, on, model, levels, n_levels).where(valid_tokens(sample)).values
    raw = raw.reshape(-1, features.sizes["point"])
    stats = change_features(sample, start, dd_window).sel(model=features["model"].values).values
    stats = stats.reshape(-1, len(CHANGES))
    ok = np.isfinite(raw).all(axis=1) & np.isfinite(stats).all(axis=1)
    raw, stats = raw[ok], stats[ok]
    # "window": the whole trajectory weighs as much as the late window in total (its shared early
    # fall would otherwise outweigh the late window's stagnation and rises).
    late, whole = normalise(raw, "window", window, 1.0)[:, : window.sum()], normalise(raw, "center")
    weight = float(np.sqrt((late**2).sum() / max((whole**2).sum(), 1e-12)))
    # The change block carries change_weight x the trajectory block's total variance, in equal shares:
    # its raw variance is mostly the late change of the falling tokens, not the rarer shapes' statistics.
    curve_variance = normalise(raw, normalize, window, weight).var(axis=0).sum()
    scale = change_weight * np.sqrt(curve_variance / len(CHANGES) / np.maximum(stats.var(axis=0), 1e-12))
    design_kwargs = dict(how=normalize, window=window, weight=weight, scale=scale)
    x = design(raw, stats, **design_kwargs)
    change = raw - raw[:, :1]
    # One OpenMP thread per fit: the sample is small, and k-means' OpenMP threads spin against dask's
    # threads (the fitted estimators keep this setting when they label the chunks in parallel).
    with threadpool_limits(limits=1, user_api="openmp"):
        shape_names = None
        if n_clusters == "shapes":
            n_fine = max(2, min(n_fine, len(x) // MIN_FINE_SIZE))
            shape_names, estimator, merge, fit_labels, stability = _fit_shapes(
                x, change, stats, method, n_fine, n_seeds, random_state, namer
            )
            n_clusters, scores, criterion = len(shape_names), {}, f"shape names of {n_fine} fine clusters"
        else:
            n_clusters, scores, estimator, fit_labels, stability = _fit(
                x, n_clusters, method, k_range, n_seeds, random_state
            )
            merge = np.arange(n_clusters)
            criterion = "silhouette" if method == "kmeans" else "bic"

    sizes = np.bincount(fit_labels, minlength=n_clusters)
    by_size = np.argsort(-sizes, kind="stable")
    rank = np.empty(n_clusters, dtype=np.int8)
    rank[by_size] = np.arange(n_clusters)  # code by size, 0 = largest
    order = rank[merge]  # estimator label -> code
    curves = np.array(
        [change[fit_labels == k].mean(axis=0) if sizes[k] else np.full(raw.shape[1], np.nan) for k in by_size]
    )
    means = np.array(
        [stats[fit_labels == k].mean(axis=0) if sizes[k] else np.full(len(CHANGES), np.nan) for k in by_size]
    )
    if shape_names is None:
        names = [namer(curve, changes=m) for curve, m in zip(curves, means)]
        names = [f"{n} ({c[-1] - c[0]:+.2f} nats)" if names.count(n) > 1 else n for n, c in zip(names, curves)]
    else:  # each merged cluster keeps the name its fine clusters share
        names = [shape_names[k] for k in by_size]

    codes = xr.apply_ufunc(
        _predict,
        features,
        changes.chunk({"change": -1}),
        input_core_dims=[["point"], ["change"]],
        dask="parallelized",
        output_dtypes=[np.int8],
        kwargs=dict(estimator=estimator, order=order, **design_kwargs),
    )
    labels = flag_array(filled(codes), names, "cluster", "cluster of the token's loss trajectory")
    centroids = xr.DataArray(
        curves,
        dims=("cluster", "point"),
        coords={
            "cluster": np.arange(n_clusters),
            "name": ("cluster", names),
            "point": features["point"].values,
            "late_window": ("point", window),
            **{name: ("cluster", means[:, i]) for i, name in enumerate(CHANGES)},
        },
        attrs={
            "on": on,
            "long_name": "mean loss change from the first point",
            "units": "nats",
            "tol": tol,
            "dd_tol": dd_tol,
            "dd_window": dd_window,
            "start": start,
        },
    )
    if token_text is None and "vocab_text" in ds.variables:
        vocab = ds["vocab_text"].values
        token_text = vocab.__getitem__  # labelled tokens are never padding, so every id indexes the vocabulary
    table = cluster_top_tokens(labels, ds["token_id"].variable, top, token_text)  # read a window at a time
    return Clustering(labels, centroids, criterion, scores, stability, table)


# Named cluster -> (detector, what it flags): the per-token detectors the clusters should agree with.
DETECTED = {"stagnating": "stagnated", "rising": "upward", "double descent": "double descent"}


def detector_agreement(
    ds: xr.Dataset,
    clustering: Clustering,
    *,
    dd_tol: float = DESCENT_TOL,
    dd_window: int = DESCENT_WINDOW,
    trend_start: float | None = None,
) -> pd.DataFrame:
    """How well the named clusters agree with the per-token detectors, per model.

    "stagnating" and "rising" clusters against the trend categories "stagnated" and "upward"
    (`trends.trend_categories` with start `trend_start`, default the clustering's late-window
    start), "double descent" against `trajectories.double_descent(dd_tol, dd_window)`.
    Rows: model, cluster, detector, cluster_tokens, detector_tokens, both, precision (share of the
    cluster the detector flags), recall (share of the flagged tokens in the cluster), and the
    detector's share of all labelled tokens (`base_rate`, what precision would be by chance).
    Where the detector labels none of a model's clustered tokens (trend categories of a window with
    too few checkpoints), detector_tokens and both are NA and the rates NaN: nothing to compare.
    Clusters without a detector are left out.
    """
    ds = load_small(ds)
    if trend_start is None:
        trend_start = clustering.centroids.attrs["start"]
    codes = clustering.labels
    models = [str(m) for m in codes["model"].values]
    trends = None
    rows = []
    for k, name in enumerate(clustering.names):
        detector = next((d for shape, d in DETECTED.items() if name == shape or name.startswith(shape + " (")), None)
        if detector is None:
            continue
        # computed: shared with the double-descent and trend studies when `tokendyn analyze` runs them
        if detector == "double descent":
            flags = computed(double_descent, ds, tol=dd_tol, window=dd_window)
            judged = xr.ones_like(flags, dtype=bool)  # a yes or a no for every token
        else:
            if trends is None:
                trends = computed(trend_categories, ds, along="start", start=[trend_start])
            flags = label_mask(trends, detector).isel(start=0)
            judged = trends.isel(start=0) >= 0  # -1: too few checkpoints in the trend window
        flags, judged = flags.sel(model=models), judged.sel(model=models)
        for model in models:
            member = (codes.sel(model=model) == k).values
            labelled = (codes.sel(model=model) >= 0).values
            flagged = flags.sel(model=model).values.astype(bool) & labelled
            both = int((member & flagged).sum())
            row = {
                "model": model,
                "cluster": name,
                "detector": detector,
                "cluster_tokens": int(member.sum()),
                "detector_tokens": int(flagged.sum()),
                "both": both,
                "precision": both / member.sum() if member.any() else np.nan,
                "recall": both / flagged.sum() if flagged.any() else np.nan,
                "base_rate": flagged.sum() / labelled.sum() if labelled.any() else np.nan,
            }
            if not (judged.sel(model=model).values & labelled).any():  # the detector labelled none: nothing to compare
                row.update(detector_tokens=pd.NA, both=pd.NA, precision=np.nan, recall=np.nan, base_rate=np.nan)
            rows.append(row)
    columns = ["model", "cluster", "detector", "cluster_tokens", "detector_tokens", "both", "precision", "recall"]
    table = pd.DataFrame(rows, columns=[*columns, "base_rate"])  # the columns even when no cluster has a detector
    return table.astype({"detector_tokens": "Int64", "both": "Int64"})  # NA where the detector labelled nothing

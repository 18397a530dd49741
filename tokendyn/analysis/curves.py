"""Per-token learning-curve measures (methods.md §5).

- Chang, Tu & Bergen (TACL 2024): final loss and its variability over the last checkpoints, age of
  acquisition, forgettability.
- Rho-1 (Lin et al. 2024): four classes of tokens between two checkpoints (H->H, L->H, H->L, L->L).
- Dataset cartography (Swayamdipta et al. 2020): confidence and variability of the probability of
  the true token over checkpoints.

Losses are in nats, as in the store (Chang et al. report surprisal in bits: divide by ln 2).
Every function returns lazy per-token arrays with dims (model, token); only done checkpoints
take part.
"""

from __future__ import annotations

import itertools
from functools import partial

import numpy as np
import scipy.special
import xarray as xr

from tokendyn.errors import TokendynError
from tokendyn.analysis.labels import MISSING, describe, flag_array
from tokendyn.analysis.trajectories import (CHUNK_MB, chunk_tokens, done_checkpoints, load_small, model_loss,
                                   moving_average, over_token_slices, token_loss, valid_tokens)

RHO1_CLASSES = ("H->H", "L->H", "H->L", "L->L")
AOA_SLICE_TOKENS = 8192  # the sigmoid fit keeps ~15 float64 copies of its slice


def last_checkpoints(ds: xr.Dataset, last: int) -> xr.DataArray:
    """(model, ckpt) mask of each model's last `last` done checkpoints."""
    mask = np.zeros((ds.sizes["model"], ds.sizes["ckpt"]), bool)
    for m in range(ds.sizes["model"]):
        mask[m, done_checkpoints(ds, m)[-last:]] = True
    return xr.DataArray(mask, dims=("model", "ckpt"))


def final_loss(ds: xr.Dataset, last: int = 5) -> xr.Dataset:
    """Mean ("final_loss") and standard deviation ("final_variability", ddof 0) of each token's
    loss over its model's last `last` done checkpoints (Chang et al.'s final surprisal and
    within-run variability)."""
    ds = load_small(ds)
    if last < 1:
        raise TokendynError("last must be at least 1 checkpoint")
    loss = chunk_tokens(token_loss(ds)).where(last_checkpoints(ds, last))
    return xr.Dataset({"final_loss": describe(loss.mean("ckpt"), "mean loss over the last checkpoints", "nats"),
                       "final_variability": describe(loss.std("ckpt"), "standard deviation of the loss over the last "
                                                     "checkpoints", "nats")})


def _sigmoid_midpoint(y: np.ndarray, x: np.ndarray, chance: float, n_iter: int) -> np.ndarray:
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


def age_of_acquisition(ds: xr.Dataset, chance: float | None = None, n_iter: int = 10,
                       chunk_mb: float = CHUNK_MB) -> xr.DataArray:
    """Age of acquisition: log10 step where a fitted sigmoid crosses halfway between chance and
    the sigmoid's minimum (Chang et al.).

    For each token, its loss over the model's done checkpoints with step > 0 is fitted (least
    squares) by lo + (chance - lo) / (1 + exp(k (log10 step - x0))), with the upper level fixed at
    `chance` and k, x0 and the floor lo fitted; the halfway crossing is then x0. Chang et al. fit
    each token separately with a generic optimiser; here the same least-squares problem is
    solved by vectorised Levenberg-Marquardt steps (`n_iter`) from a logit-line start.
    chance: the loss of an uninformed model, e.g. log(vocab size); default: each model's mean
    loss at its first done checkpoint. NaN unless the token's loss goes from above halfway at the
    first checkpoint to below it at the last (a token that never falls, or rises, has no age; the
    crossing is never extrapolated). Lazy; (model, token).
    """
    ds = load_small(ds)
    per_model = []
    for m in range(ds.sizes["model"]):
        loss = model_loss(ds, m, chunk_mb)
        steps = loss["step"].values
        level = float(loss.isel(ckpt=0).mean().compute()) if chance is None else float(chance)
        loss = loss.isel(ckpt=np.flatnonzero(steps > 0)).drop_vars("step")
        if loss.sizes["ckpt"] < 3:
            per_model.append(xr.full_like(loss.isel(ckpt=0, drop=True), np.nan, dtype=float))
            continue
        per_model.append(xr.apply_ufunc(
            partial(over_token_slices, _sigmoid_midpoint, slice_tokens=AOA_SLICE_TOKENS), loss,
            input_core_dims=[["ckpt"]], dask="parallelized", output_dtypes=[float],
            kwargs={"x": np.log10(steps[steps > 0]), "chance": level, "n_iter": n_iter}))
    out = xr.concat(per_model, dim="model").assign_coords(model=ds["model"].values)
    return describe(out.where(valid_tokens(ds)).rename("age_of_acquisition"), "age of acquisition (log10 step)")


def forgettability(ds: xr.Dataset, window: int = 3) -> xr.DataArray:
    """Sum of the upward moves of each token's loss curve after a centred moving average over
    `window` checkpoints (Chang et al.): 0 for a curve that never goes up. Nats."""
    ds = load_small(ds)
    out = xr.apply_ufunc(partial(over_token_slices, _upward_moves), chunk_tokens(token_loss(ds)),
                         input_core_dims=[["ckpt"]], kwargs={"window": window}, dask="parallelized",
                         output_dtypes=[float])
    return describe(out.where(valid_tokens(ds)).rename("forgettability"), "summed upward moves of the smoothed loss",
                    "nats")


def _upward_moves(loss: np.ndarray, window: int) -> np.ndarray:
    """Sum of the rises of the smoothed curves (ckpt, token); gaps are skipped."""
    return np.nansum(np.clip(np.diff(moving_average(loss, window), axis=0), 0, None), axis=0)


def _at_done(ds: xr.Dataset, position: int) -> xr.DataArray:
    """Loss of every model at the `position`-th of its done checkpoints (negative from the end)."""
    idx = [done_checkpoints(ds, m)[position] for m in range(ds.sizes["model"])]
    return token_loss(ds).isel(ckpt=xr.DataArray(idx, dims="model")).drop_vars("ckpt")


def rho1_classes(ds: xr.Dataset, first: int = 0, last: int = -1, threshold: float | None = None) -> xr.DataArray:
    """Rho-1 classes between two of each model's done checkpoints (positions `first`, `last`).

    A token is H (high loss) at a checkpoint when its loss exceeds `threshold` (nats), else L.
    Classes "H->H", "L->H", "H->L", "L->L" (Rho-1's reference shares 11%, 12%, 26%, 51%).
    Rho-1 gives no threshold to reuse; the default is the median loss over the valid tokens of
    both checkpoints of all models (this loads those two checkpoints' losses). A label array
    (`tokendyn.analysis.labels`) of codes (model, token), the threshold in its attributes.
    """
    ds = load_small(ds)
    a, b = _at_done(ds, first), _at_done(ds, last)
    valid = valid_tokens(ds)
    if threshold is None:
        pooled = xr.concat([a, b], dim="which").where(valid).values
        threshold = float(np.nanmedian(pooled))
    high_a, high_b = a > threshold, b > threshold
    codes = xr.where(high_a, xr.where(high_b, 0, 2), xr.where(high_b, 1, 3))
    codes = codes.where(valid & a.notnull() & b.notnull(), MISSING).astype(np.int8)
    return flag_array(codes, RHO1_CLASSES, "rho1", "Rho-1 class of the token between two checkpoints",
                      threshold=threshold, threshold_units="nats")


def cartography(ds: xr.Dataset) -> xr.Dataset:
    """Mean ("confidence") and standard deviation ("variability", ddof 0) over done checkpoints of
    the probability the model gives the true token, exp(-loss)."""
    ds = load_small(ds)
    prob = np.exp(-chunk_tokens(token_loss(ds)))
    valid = valid_tokens(ds)
    return xr.Dataset({"confidence": describe(prob.mean("ckpt").where(valid), "mean probability of the true token"),
                       "variability": describe(prob.std("ckpt").where(valid),
                                               "standard deviation of the probability of the true token")})


def curve_measures(ds: xr.Dataset, last: int = 5, chance: float | None = None, window: int = 3) -> xr.Dataset:
    """All per-token §5 measures in one lazy Dataset (model, token): final_loss,
    final_variability, age_of_acquisition, forgettability, confidence, variability."""
    ds = load_small(ds)
    return xr.merge([final_loss(ds, last), age_of_acquisition(ds, chance), forgettability(ds, window),
                     cartography(ds)], compat="override", join="override")

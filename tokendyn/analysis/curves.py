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

import functools
from functools import partial

import numpy as np
import scipy.special
import xarray as xr

from tokendyn.analysis.labels import MISSING, describe, flag_array
from tokendyn.analysis.trajectories import (
    CHUNK_MB,
    chunk_tokens,
    done_checkpoints,
    load_small,
    model_loss,
    moving_average,
    over_token_slices,
    token_loss,
    trained_checkpoints,
    valid_tokens,
)
from tokendyn.errors import TokendynError

RHO1_CLASSES = ("H->H", "L->H", "H->L", "L->L")
AOA_SLICE_TOKENS = 1024  # the sigmoid fit keeps ~15 float64 copies of its slice: small enough for the cache
# The fit's starting grid: AOA_GRID = (x0 values across the steps, k values) with k from
# AOA_GRID_K[0] to AOA_GRID_K[1] per span of log10 steps (a fall over twice the span to 1/50 of it).
AOA_GRID = (32, 12)
AOA_GRID_K = (2.0, 200.0)
AOA_STEPS = 3  # Levenberg-Marquardt steps from the grid's best point


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
    mask = last_checkpoints(ds, last)
    used = np.flatnonzero(mask.values.any(axis=0))  # read only checkpoints that are some model's last ones
    loss = chunk_tokens(token_loss(ds).isel(ckpt=used)).where(mask.isel(ckpt=used))
    return xr.Dataset(
        {
            "final_loss": describe(loss.mean("ckpt"), "mean loss over the last checkpoints", "nats"),
            "final_variability": describe(
                loss.std("ckpt"), "standard deviation of the loss over the last checkpoints", "nats"
            ),
        }
    )


@functools.lru_cache(maxsize=8)
def _grid(x: tuple[float, ...], chance: float) -> tuple[np.ndarray, ...]:
    """The starting grid for checkpoints at x (log10 steps), computed once per x and chance (every
    slice of tokens of a model shares it): (k, x0, s, su, uu) per grid point, the float32 matrix g
    and offsets b, e of `_grid_start`."""
    x = np.asarray(x)
    span = max(float(x.max() - x.min()), 1e-6)
    k, x0 = (
        grid.ravel()
        for grid in np.meshgrid(
            np.geomspace(*AOA_GRID_K, AOA_GRID[1]) / span, np.linspace(x.min(), x.max(), AOA_GRID[0])
        )
    )
    s = scipy.special.expit(-k[:, None] * (x - x0[:, None]))  # (grid, ckpt)
    u = 1 - s
    uu, su, ss = (u * u).sum(-1), (s * u).sum(-1), (s * s).sum(-1)
    norm = np.sqrt(uu)
    g = ((s - 1) / norm[:, None]).T.astype(np.float32)
    b = (chance * (su / norm + norm)).astype(np.float32)
    e = (chance * chance * (uu + ss + 2 * su)).astype(np.float32)
    return k, x0, s.astype(np.float32), su, uu, g, b, e


def _grid_start(y: np.ndarray, x: np.ndarray, chance: float) -> np.ndarray:
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


def _solve3(a: np.ndarray, b: np.ndarray) -> np.ndarray:
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


def _sigmoid_midpoint(y: np.ndarray, x: np.ndarray, chance: float, n_iter: int) -> np.ndarray:
    """Midpoint x0 of the least-squares fit y ~ lo + (chance - lo) / (1 + exp(k (x - x0))).

    y is (ckpt, token), x the log10 steps; the upper level is fixed at `chance`, (k, x0, lo) fitted:
    start from the best point of a (k, x0) grid (`_grid_start`, all tokens at once), then take
    Levenberg-Marquardt steps, vectorised over tokens. The (ckpt, token) arrays are float32 (the
    parameters, normal equations and sums of squares float64), with tokens along the contiguous
    axis so that every operation runs over whole rows of tokens: per step one pass builds the
    Jacobian and residual rows, ten row products summed over checkpoints give J'J, J'r and |r|^2,
    and the 3x3 solve is closed form.
    NaN unless the fit falls (k > 0) from chance to lo < chance with x0 inside the data, and the
    first checkpoint is above halfway and the last below.
    """
    y = np.ascontiguousarray(y, dtype=np.float32)
    theta = _grid_start(y, x, chance)
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
        step = _solve3(np.moveaxis(jtj, -1, 0), np.moveaxis(gram[:3, 3], -1, 0))
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


def uniform_loss(ds: xr.Dataset) -> float:
    """ln(V): the loss of the uniform distribution over the store's vocabulary of V tokens (nats).

    V is the tokenizer's vocabulary (`vocab_text`); a model whose output layer is padded beyond it
    has a slightly larger uniform loss (pass it as `chance` where that matters).
    """
    if "vocab" not in ds.sizes:
        raise TokendynError(
            "the store has no vocabulary (vocab_text), so chance = ln(vocabulary size) is unknown; pass chance="
        )
    return float(np.log(ds.sizes["vocab"]))


def age_of_acquisition(
    ds: xr.Dataset, chance: float | None = None, n_iter: int = AOA_STEPS, chunk_mb: float = CHUNK_MB
) -> xr.DataArray:
    """Age of acquisition: log10 step where a fitted sigmoid crosses halfway between chance and
    the sigmoid's minimum (Chang et al.).

    For each token, its loss over the model's done checkpoints with step > 0 is fitted (least
    squares) by lo + (chance - lo) / (1 + exp(k (log10 step - x0))), with the upper level fixed at
    `chance` and k, x0 and the floor lo fitted; the halfway crossing is then x0. Chang et al. fit
    each token separately with a generic optimiser; here the same least-squares problem is
    solved for all tokens at once: the best point of a (k, x0) grid (one matrix product), then
    `n_iter` vectorised Levenberg-Marquardt steps.
    chance: the loss of an uninformed model; default `uniform_loss(ds)` = ln(vocabulary size), the
    loss of the uniform distribution (Chang et al.'s chance surprisal), which does not depend on
    which checkpoints the suite has. NaN unless the token's loss goes from above halfway at the
    first checkpoint to below it at the last (a token that never falls, or rises, has no age; the
    crossing is never extrapolated). Lazy; (model, token).
    """
    ds = load_small(ds)
    level = uniform_loss(ds) if chance is None else float(chance)
    per_model = []
    for m in range(ds.sizes["model"]):
        loss = model_loss(ds, m, chunk_mb)
        steps = loss["step"].values
        loss = loss.isel(ckpt=np.flatnonzero(steps > 0)).drop_vars("step")
        if loss.sizes["ckpt"] < 3:
            per_model.append(xr.full_like(loss.isel(ckpt=0, drop=True), np.nan, dtype=float))
            continue
        per_model.append(
            xr.apply_ufunc(
                partial(over_token_slices, _sigmoid_midpoint, slice_tokens=AOA_SLICE_TOKENS),
                loss,
                input_core_dims=[["ckpt"]],
                dask="parallelized",
                output_dtypes=[float],
                kwargs={"x": np.log10(steps[steps > 0]), "chance": level, "n_iter": n_iter},
            )
        )
    out = xr.concat(per_model, dim="model").assign_coords(model=ds["model"].values)
    return describe(out.where(valid_tokens(ds)).rename("age_of_acquisition"), "age of acquisition (log10 step)")


def forgettability(ds: xr.Dataset, window: int = 3) -> xr.DataArray:
    """Sum of the upward moves of each token's loss curve after a centred moving average over
    `window` checkpoints (Chang et al.): 0 for a curve that never goes up. Nats."""
    ds = load_small(ds)
    out = xr.apply_ufunc(
        partial(over_token_slices, _upward_moves),
        chunk_tokens(token_loss(ds)),
        input_core_dims=[["ckpt"]],
        kwargs={"window": window},
        dask="parallelized",
        output_dtypes=[float],
    )
    return describe(
        out.where(valid_tokens(ds)).rename("forgettability"), "summed upward moves of the smoothed loss", "nats"
    )


def _upward_moves(loss: np.ndarray, window: int) -> np.ndarray:
    """Sum of the rises of the smoothed curves (ckpt, token); gaps are skipped."""
    return np.nansum(np.clip(np.diff(moving_average(loss, window), axis=0), 0, None), axis=0)


def _at(ds: xr.Dataset, positions: list[int], trained: bool) -> xr.DataArray:
    """Loss of every model at the given position among its done (or trained, step > 0) checkpoints."""
    pick = trained_checkpoints if trained else done_checkpoints
    idx = []
    for m, position in enumerate(positions):
        candidates = pick(ds, m)
        if not -len(candidates) <= position < len(candidates):
            raise TokendynError(
                f"model {ds['model'].values[m]} has {len(candidates)} "
                f"{'trained' if trained else 'done'} checkpoints, so no checkpoint {position}"
            )
        idx.append(candidates[position])
    steps = ds["step"].values[np.arange(len(idx)), idx]
    return (
        token_loss(ds).isel(ckpt=xr.DataArray(idx, dims="model")).drop_vars("ckpt").assign_coords(step=("model", steps))
    )


def rho1_classes(
    ds: xr.Dataset, first: int | None = None, last: int = -1, threshold: float | None = None
) -> xr.DataArray:
    """Rho-1 classes between two checkpoints of each model.

    first, last: positions among each model's done checkpoints; first=None (default) is the first
    trained checkpoint (step > 0), so the default does not depend on whether the suite includes
    random initialisation (against step 0 almost every token would be H->L).
    A token is H (high loss) at a checkpoint when its loss exceeds `threshold` (nats), else L.
    Classes "H->H", "L->H", "H->L", "L->L" (Rho-1's reference shares 11%, 12%, 26%, 51%).
    Rho-1 (Lin et al. 2024) states no numeric threshold that transfers to other models and data;
    the default is the median loss over the valid tokens of both compared checkpoints of all models
    (this loads those two checkpoints' losses). The threshold and the compared steps are attributes.
    A label array (`tokendyn.analysis.labels`) of codes (model, token).
    """
    ds = load_small(ds)
    n_models = ds.sizes["model"]
    a = _at(ds, [0] * n_models, trained=True) if first is None else _at(ds, [first] * n_models, trained=False)
    b = _at(ds, [last] * n_models, trained=False)
    steps = {"first_step": a["step"].values.tolist(), "last_step": b["step"].values.tolist()}
    a, b = a.drop_vars("step"), b.drop_vars("step")
    valid = valid_tokens(ds)
    if threshold is None:
        pooled = xr.concat([a, b], dim="which").where(valid).values
        threshold = float(np.nanmedian(pooled))
    high_a, high_b = a > threshold, b > threshold
    codes = xr.where(high_a, xr.where(high_b, 0, 2), xr.where(high_b, 1, 3))
    codes = codes.where(valid & a.notnull() & b.notnull(), MISSING).astype(np.int8)
    return flag_array(
        codes,
        RHO1_CLASSES,
        "rho1",
        "Rho-1 class of the token between two checkpoints",
        threshold=threshold,
        threshold_units="nats",
        **steps,
    )


def cartography(ds: xr.Dataset) -> xr.Dataset:
    """Mean ("confidence") and standard deviation ("variability", ddof 0) over done checkpoints of
    the probability the model gives the true token, exp(-loss)."""
    ds = load_small(ds)
    prob = np.exp(-chunk_tokens(token_loss(ds)))
    valid = valid_tokens(ds)
    return xr.Dataset(
        {
            "confidence": describe(prob.mean("ckpt").where(valid), "mean probability of the true token"),
            "variability": describe(
                prob.std("ckpt").where(valid), "standard deviation of the probability of the true token"
            ),
        }
    )


MEASURES = ("final_loss", "final_variability", "age_of_acquisition", "forgettability", "confidence", "variability")


def curve_measures(
    ds: xr.Dataset,
    last: int = 5,
    chance: float | None = None,
    window: int = 3,
    n_iter: int = AOA_STEPS,
    chunk_mb: float = CHUNK_MB,
) -> xr.Dataset:
    """All per-token §5 measures in one lazy Dataset (model, token): final_loss,
    final_variability, age_of_acquisition, forgettability, confidence, variability.

    The same numbers as `final_loss`, `age_of_acquisition`, `forgettability` and `cartography`
    (see them for last, chance, window and n_iter), computed together from each slice of tokens
    as it is read, so the store is read once per model instead of once per measure.
    """
    ds = load_small(ds)
    if last < 1:
        raise TokendynError("last must be at least 1 checkpoint")
    level = uniform_loss(ds) if chance is None else float(chance)
    loss = token_loss(ds)
    per_model = []
    for m in range(ds.sizes["model"]):
        done = done_checkpoints(ds, m)
        steps = ds["step"].values[m]
        trained = done[steps[done] > 0]
        per_model.append(
            xr.apply_ufunc(
                partial(over_token_slices, _measures, slice_tokens=AOA_SLICE_TOKENS),
                chunk_tokens(loss.isel(model=m), chunk_mb),
                input_core_dims=[["ckpt"]],
                output_core_dims=[["measure"]],
                dask="parallelized",
                output_dtypes=[float],
                dask_gufunc_kwargs={"output_sizes": {"measure": len(MEASURES)}},
                kwargs=dict(
                    done=done,
                    last=done[-last:],
                    trained=trained,
                    x=np.log10(steps[trained]),
                    chance=level,
                    n_iter=n_iter,
                    window=window,
                ),
            )
        )
    out = xr.concat(per_model, dim="model").assign_coords(model=ds["model"].values).where(valid_tokens(ds))
    described = {
        "final_loss": ("mean loss over the last checkpoints", "nats"),
        "final_variability": ("standard deviation of the loss over the last checkpoints", "nats"),
        "age_of_acquisition": ("age of acquisition (log10 step)", None),
        "forgettability": ("summed upward moves of the smoothed loss", "nats"),
        "confidence": ("mean probability of the true token", None),
        "variability": ("standard deviation of the probability of the true token", None),
    }
    return xr.Dataset(
        {
            name: describe(out.isel(measure=i, drop=True).rename(name), *described[name])
            for i, name in enumerate(MEASURES)
        }
    )


def _measures(
    loss: np.ndarray,
    done: np.ndarray,
    last: np.ndarray,
    trained: np.ndarray,
    x: np.ndarray,
    chance: float,
    n_iter: int,
    window: int,
) -> np.ndarray:
    """The six measures of `curve_measures` (token, measure) from one slice of loss (ckpt, token) over
    all the store's checkpoints (NaN where not done); done, last, trained: checkpoint indices."""
    loss = loss.astype(np.float32)  # float16 stores: one conversion; sums below are float64
    aoa = _sigmoid_midpoint(loss[trained], x, chance, n_iter) if len(trained) >= 3 else np.full(loss.shape[1], np.nan)
    return np.stack(
        [
            *_mean_std(loss[last]),
            aoa,
            _upward_moves(loss, window),
            *_mean_std(np.exp(-loss[done])),
        ],
        axis=-1,
    )


def _mean_std(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation (ddof 0) along axis 0 in float64, skipping NaN; a slice without
    NaN (the usual case) takes numpy's plain mean and std, several times faster than the nan versions."""
    if np.isnan(values).any():
        return np.nanmean(values, axis=0, dtype=np.float64), np.nanstd(values, axis=0, dtype=np.float64)
    return values.mean(axis=0, dtype=np.float64), values.std(axis=0, dtype=np.float64)

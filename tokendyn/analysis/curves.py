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
import warnings
from functools import partial

import numba
import numba.extending
import numpy as np
import scipy.special
import xarray as xr

from tokendyn.analysis.compiled import as_float32
from tokendyn.analysis.labels import MISSING, describe, flag_array
from tokendyn.analysis.spill import nanmedian
from tokendyn.analysis.trajectories import (
    CHUNK_MB,
    check_window,
    chunk_tokens,
    default_of,
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
AOA_SLICE_TOKENS = 2048  # tokens per slice of the kernels: its (token, grid) float32 scores (3 MB) stay in the cache
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


def _grid_start(rows: np.ndarray, x: np.ndarray, chance: float) -> np.ndarray:
    """The index into `_grid` of every token's best least-squares fit over the (k, x0) grid, lo solved
    exactly (`_fit` solves it again at the chosen point). rows: the curves (token, ckpt) float32.

    For a fixed (k, x0) the sigmoid s is the same for every token and the fit is linear in lo: with
    u = 1 - s and t = y.u - chance s.u, the best lo is t / u.u and the sum of squares is
    |y|^2 - 2 chance y.s + chance^2 s.s - t^2 / u.u. Up to a per-token constant that is
    e - (z + b)^2 with z = y . (s / |u| - 1 / |u|) (y.u = sum(y) - y.s), b = chance (s.u / |u| + |u|)
    and e = chance^2 (u.u + s.s + 2 s.u): one matrix product, one compiled pass over (token, grid) and
    numpy's argmin (SIMD: a compiled argmin does not vectorise). float32: it only ranks grid points.
    """
    *_, g, b, e = _grid(tuple(x.tolist()), float(chance))
    z = rows @ g  # (token, grid): the argmin runs along contiguous rows
    _grid_scores(z, b, e)
    return np.argmin(z, axis=-1)


@numba.njit(nogil=True, cache=True)
def _grid_scores(z, b, e):
    """z <- e - (z + b)^2, in place (see `_grid_start`)."""
    for t in range(z.shape[0]):
        for p in range(z.shape[1]):
            w = z[t, p] + b[p]
            z[t, p] = e[p] - w * w


@numba.njit(nogil=True, cache=True)
def _transpose(block, columns):
    """(token, len(columns)) float32 rows of the checkpoints `columns` of block (ckpt, token)."""
    out = np.empty((block.shape[1], len(columns)), np.float32)
    for j in range(len(columns)):
        row = block[columns[j]]
        for t in range(block.shape[1]):
            out[t, j] = as_float32(row[t])
    return out


def _rows(block: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """Each token's curve over the checkpoints `columns` of block (ckpt, token) as a contiguous float32
    row: the compiled kernels go token by token. float16 is converted in the same pass."""
    if block.dtype == np.float16:
        block = block.view(np.uint16)
    return _transpose(block, np.asarray(columns, np.int64))


# Cephes' expf: exp(a) = 2^n exp(r), n = round(a / ln 2), r = a - n ln 2 (ln 2 in two parts), exp(r) a
# degree-7 polynomial on |r| <= ln(2) / 2; within 2 ulp of float32.
_LOG2E, _LN2_HI, _LN2_LO = np.float32(1.44269504088896341), np.float32(0.693359375), np.float32(-2.12194440e-4)
_P0, _P1, _P2 = np.float32(1.9875691500e-4), np.float32(1.3981999507e-3), np.float32(8.3334519073e-3)
_P3, _P4, _P5 = np.float32(4.1665795894e-2), np.float32(1.6666665459e-1), np.float32(5.0000001201e-1)
_HALF, _ONE = np.float32(0.5), np.float32(1)


@numba.extending.intrinsic
def _pow2(typingctx, n):
    """2^n for a float32 n holding an integer in [-126, 127], from its bits (numba has no bit cast)."""

    def codegen(context, builder, signature, args):
        int32 = context.get_value_type(numba.types.int32)
        exponent = builder.add(builder.fptosi(args[0], int32), int32(127))
        return builder.bitcast(builder.shl(exponent, int32(23)), context.get_value_type(numba.types.float32))

    return numba.types.float32(numba.types.float32), codegen


@numba.njit(nogil=True, cache=True)
def _exp32(a):
    """exp(a) for a float32 a in [-87, 88] (the callers clip), in plain arithmetic so that loops over it
    vectorise: LLVM's exp is a libm call per element (numba vectorises it only with Intel's SVML)."""
    n = np.floor(a * _LOG2E + _HALF)
    r = a - n * _LN2_HI - n * _LN2_LO
    p = ((((_P0 * r + _P1) * r + _P2) * r + _P3) * r + _P4) * r + _P5
    return (p * r * r + r + _ONE) * _pow2(n)


@numba.njit(nogil=True, cache=True, fastmath={"reassoc", "contract"}, error_model="numpy")
def _normal_equations(y, x, k, x0, lo, chance):
    """Levenberg-Marquardt's sums at (k, x0, lo) for one token's curve y over x (float32 arrays):
    J'J (6 entries), J'r (3) and r'r, J the Jacobian of the fit in (k, x0, lo), r the residual.

    One fused pass over the checkpoints in float32, vectorised: fastmath reassoc and contract only (the
    sums run in any order; NaN and inf keep their meaning), error_model numpy (a division by zero gives
    inf, as in numpy, instead of a check per element that stops vectorisation)."""
    k32, x032, lo32 = np.float32(k), np.float32(x0), np.float32(lo)
    amplitude = np.float32(chance) - lo32
    a00 = a01 = a02 = a11 = a12 = a22 = b0 = b1 = b2 = rr = np.float32(0)
    for c in range(len(y)):
        d = x[c] - x032
        s = _ONE / (_ONE + _exp32(min(max(k32 * d, np.float32(-60)), np.float32(60))))
        u = _ONE - s  # s falls from 1 to 0; the fit is lo + amplitude s
        slope = s * u * amplitude
        j0, j1, j2 = -slope * d, slope * k32, u  # d fit / d (k, x0, lo)
        r = y[c] - lo32 - s * amplitude
        a00 += j0 * j0
        a01 += j0 * j1
        a02 += j0 * j2
        a11 += j1 * j1
        a12 += j1 * j2
        a22 += j2 * j2
        b0 += j0 * r
        b1 += j1 * r
        b2 += j2 * r
        rr += r * r
    return a00, a01, a02, a11, a12, a22, b0, b1, b2, rr


@numba.njit(nogil=True, cache=True)
def _solve3(a00, a01, a02, a11, a12, a22, b0, b1, b2):
    """Solution of the symmetric 3x3 system a x = b by cofactors; NaN or inf where a is singular."""
    c00 = a11 * a22 - a12 * a12
    c01 = a12 * a02 - a01 * a22
    c02 = a01 * a12 - a11 * a02
    c11 = a00 * a22 - a02 * a02
    c12 = a01 * a02 - a00 * a12
    c22 = a00 * a11 - a01 * a01
    det = a00 * c00 + a01 * c01 + a02 * c02
    if det == 0:
        return np.nan, np.nan, np.nan
    return (
        (c00 * b0 + c01 * b1 + c02 * b2) / det,
        (c01 * b0 + c11 * b1 + c12 * b2) / det,
        (c02 * b0 + c12 * b1 + c22 * b2) / det,
    )


@numba.njit(nogil=True, cache=True)
def _finite(v):
    """np.nan_to_num of a scalar: NaN to 0, +-inf to the largest finite float64."""
    if np.isnan(v):
        return 0.0
    return min(max(v, -1.7976931348623157e308), 1.7976931348623157e308)


@numba.njit(nogil=True, cache=True, fastmath={"reassoc", "contract"}, error_model="numpy")
def _fit(y, x, chance, n_iter, best, grid_k, grid_x0, grid_s, grid_su, grid_uu):
    """(k, x0, lo) of one token's fit: y its curve (ckpt,) float32 without NaN, x float32, best its grid
    point (`_grid_start`), grid_* from `_grid`."""
    total = along = 0.0
    for c in range(len(y)):
        total += y[c]
        along += y[c] * grid_s[best, c]
    k, x0, lo = grid_k[best], grid_x0[best], (total - along - chance * grid_su[best]) / grid_uu[best]
    sums = _normal_equations(y, x, k, x0, lo, chance)
    damping = 1e-3
    for _ in range(n_iter):
        scale = 1 + damping
        step = _solve3(
            sums[0] * scale + 1e-12,
            sums[1],
            sums[2],
            sums[3] * scale + 1e-12,
            sums[4],
            sums[5] * scale + 1e-12,
            sums[6],
            sums[7],
            sums[8],
        )
        trial_k, trial_x0, trial_lo = k + _finite(step[0]), x0 + _finite(step[1]), lo + _finite(step[2])
        trial = _normal_equations(y, x, trial_k, trial_x0, trial_lo, chance)
        if trial[9] < sums[9]:  # a smaller sum of squares: keep the step, trust the linear model more
            k, x0, lo, sums = trial_k, trial_x0, trial_lo, trial
            damping /= 3
        else:
            damping *= 4
    return k, x0, lo


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _fit_tokens(rows, first, stop, x, chance, n_iter, best, grid_k, grid_x0, grid_s, grid_su, grid_uu):
    """`_midpoints` given the grid points `best` (`_grid_start`)."""
    out = np.full(rows.shape[0], np.nan)
    x32, lowest, highest = x.astype(np.float32), x.min(), x.max()
    for t in range(rows.shape[0]):
        curve = rows[t, first:stop]
        gaps = False
        for c in range(len(curve)):
            gaps |= np.isnan(curve[c])
        if gaps:  # a fit through NaN is NaN
            continue
        k, x0, lo = _fit(curve, x32, chance, n_iter, best[t], grid_k, grid_x0, grid_s, grid_su, grid_uu)
        half = (lo + chance) / 2
        crosses = curve[0] > half and curve[-1] < half  # the data itself goes from above halfway to below
        if lo < chance and k > 0 and lowest <= x0 <= highest and crosses:
            out[t] = x0
    return out


def _midpoints(rows: np.ndarray, columns: slice, x: np.ndarray, chance: float, n_iter: int) -> np.ndarray:
    """`_sigmoid_midpoint` of the curves rows[:, columns] (rows: (token, ckpt) float32).

    Only tokens whose curve ends below chance and below where it starts are fitted: the others have
    no age whatever the fit (lo < chance and a crossing of halfway, (lo + chance) / 2, need both).
    """
    k, x0, s, su, uu, *_ = _grid(tuple(x.tolist()), float(chance))
    first, stop, _ = columns.indices(rows.shape[1])
    falls = np.flatnonzero((rows[:, first] > rows[:, stop - 1]) & (rows[:, stop - 1] < chance))
    out = np.full(len(rows), np.nan)
    if len(falls):
        rows = rows[falls]
        best = _grid_start(rows[:, columns], x, chance)
        out[falls] = _fit_tokens(
            rows, first, stop, np.asarray(x, np.float64), float(chance), n_iter, best, k, x0, s, su, uu
        )
    return out


def _sigmoid_midpoint(y: np.ndarray, x: np.ndarray, chance: float, n_iter: int) -> np.ndarray:
    """Midpoint x0 of the least-squares fit y ~ lo + (chance - lo) / (1 + exp(k (x - x0))).

    y is (ckpt, token), x the log10 steps; the upper level is fixed at `chance`, (k, x0, lo) fitted:
    start from the best point of a (k, x0) grid (`_grid_start`: one matrix product for all tokens),
    then take `n_iter` Levenberg-Marquardt steps (damping 1e-3 at the start, a step kept only when it
    lowers the sum of squares, the damping then divided by 3, else multiplied by 4). Token by token
    in compiled kernels (numba, no GIL: dask's threads run them in parallel) that write no
    (ckpt, token) temporaries: the curve, the fit and its derivatives in float32, one fused pass over
    the checkpoints per step (`_normal_equations`), the parameters and the 3x3 solve in float64.
    NaN unless the fit falls (k > 0) from chance to lo < chance with x0 inside the data, and the
    first checkpoint is above halfway and the last below; NaN where the curve has NaN.
    """
    return _midpoints(_rows(y, np.arange(len(y))), slice(None), x, chance, n_iter)


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


def _unmeasured(ds: xr.Dataset, model: int, value: float = np.nan) -> xr.DataArray:
    """A lazy per-token array of `value` for a model with too few done checkpoints to measure."""
    return xr.full_like(ds["loss"].isel(model=model, ckpt=0, drop=True).reset_coords(drop=True), value, dtype=float)


def age_of_acquisition(
    ds: xr.Dataset, chance: float | None = None, n_iter: int = AOA_STEPS, chunk_mb: float = CHUNK_MB
) -> xr.DataArray:
    """Age of acquisition: log10 step where a fitted sigmoid crosses halfway between chance and
    the sigmoid's minimum (Chang et al.).

    For each token, its loss over the model's done checkpoints with step > 0 is fitted (least
    squares) by lo + (chance - lo) / (1 + exp(k (log10 step - x0))), with the upper level fixed at
    `chance` and k, x0 and the floor lo fitted; the halfway crossing is then x0. Chang et al. fit
    each token separately with a generic optimiser; here the same least-squares problem starts
    from the best point of a (k, x0) grid (one matrix product for a slice of tokens), then takes
    `n_iter` Levenberg-Marquardt steps token by token in a compiled kernel (`_sigmoid_midpoint`).
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
        if (ds["step"].values[m][done_checkpoints(ds, m)] > 0).sum() < 3:
            per_model.append(_unmeasured(ds, m))
            continue
        loss = model_loss(ds, m, chunk_mb)
        steps = loss["step"].values
        loss = loss.isel(ckpt=np.flatnonzero(steps > 0)).drop_vars("step")
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
    check_window(window)
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
    A label array (`tokendyn.analysis.labels`) of codes (model, token); a model whose first compared
    checkpoint is not before its last (one trained checkpoint) is left unlabelled, with a warning.
    """
    ds = load_small(ds)
    n_models = ds.sizes["model"]
    a = _at(ds, [0] * n_models, trained=True) if first is None else _at(ds, [first] * n_models, trained=False)
    b = _at(ds, [last] * n_models, trained=False)
    steps = {"first_step": a["step"].values.tolist(), "last_step": b["step"].values.tolist()}
    compared = xr.DataArray(a["step"].values < b["step"].values, dims="model")
    if not compared.all():  # one trained checkpoint (or first after last): no change to classify
        unlabelled = ", ".join(str(m) for m in ds["model"].values[~compared.values])
        warnings.warn(
            f"Rho-1 classes: {unlabelled} left unlabelled (the first compared checkpoint is not before the last)",
            stacklevel=2,
        )
    a, b = a.drop_vars("step"), b.drop_vars("step")
    valid = valid_tokens(ds) & compared
    if threshold is None:
        threshold = float(nanmedian(xr.concat([a, b], dim="which").where(valid)))  # out of core
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
    last: int = default_of(final_loss, "last"),
    chance: float | None = None,
    window: int = default_of(forgettability, "window"),
    n_iter: int = default_of(age_of_acquisition, "n_iter"),
    chunk_mb: float = CHUNK_MB,
) -> xr.Dataset:
    """All per-token §5 measures in one lazy Dataset (model, token): final_loss,
    final_variability, age_of_acquisition, forgettability, confidence, variability.

    The same numbers as `final_loss`, `age_of_acquisition`, `forgettability` and `cartography`
    (see them for last, chance, window and n_iter), computed together from each slice of tokens
    as it is read, so the store is read once per model instead of once per measure.
    """
    check_window(window)
    ds = load_small(ds)
    if last < 1:
        raise TokendynError("last must be at least 1 checkpoint")
    level = uniform_loss(ds) if chance is None else float(chance)
    per_model = []
    for m in range(ds.sizes["model"]):
        if not len(done_checkpoints(ds, m)):  # nothing scored yet: no measure, and no rise (forgettability 0)
            unmeasured = [_unmeasured(ds, m, 0.0 if name == "forgettability" else np.nan) for name in MEASURES]
            per_model.append(xr.concat(unmeasured, dim="measure").transpose(..., "measure"))
            continue
        loss = model_loss(ds, m, chunk_mb)  # only the done checkpoints are read
        steps = loss["step"].values
        per_model.append(
            xr.apply_ufunc(
                _measures,
                loss.drop_vars("step"),
                input_core_dims=[["ckpt"]],
                output_core_dims=[["measure"]],
                dask="parallelized",
                output_dtypes=[float],
                dask_gufunc_kwargs={"output_sizes": {"measure": len(MEASURES)}},
                kwargs=dict(
                    done=done_checkpoints(ds, m),
                    n_last=min(last, len(steps)),
                    trained=np.flatnonzero(steps > 0),
                    x=np.log10(steps[steps > 0]),
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
    block: np.ndarray,
    done: np.ndarray,
    n_last: int,
    trained: np.ndarray,
    x: np.ndarray,
    chance: float,
    n_iter: int,
    window: int,
) -> np.ndarray:
    """The six measures of `curve_measures` (token, measure) from one block of a model's loss (token,
    ckpt) over its done checkpoints `done` (their indices among all the store's): the last n_last of
    them averaged, those at positions `trained` (step > 0, log10 steps x) fitted. Slice by slice of
    AOA_SLICE_TOKENS tokens, each read straight from the block (its layout is the store's (ckpt,
    token)) into float32 rows, one per token."""
    loss = block.T
    out = np.empty((loss.shape[1], len(MEASURES)))
    run = len(trained) and trained[-1] - trained[0] == len(trained) - 1  # usually: the fit reads a view
    for i in range(0, loss.shape[1], AOA_SLICE_TOKENS):
        rows = _rows(loss[:, i : i + AOA_SLICE_TOKENS], np.arange(len(loss)))
        out[i : i + AOA_SLICE_TOKENS] = _curve_stats(rows, np.asarray(done, np.int64), n_last, window)
        if len(trained) >= 3:
            fit = (rows, slice(trained[0], trained[-1] + 1)) if run else (rows[:, trained].copy(), slice(None))
            out[i : i + AOA_SLICE_TOKENS, MEASURES.index("age_of_acquisition")] = _midpoints(*fit, x, chance, n_iter)
    return out


@numba.njit(nogil=True, cache=True, fastmath={"reassoc", "contract"}, error_model="numpy")
def _curve_stats(rows, done, n_last, window):
    """`MEASURES` but the age of acquisition (left NaN) of the curves rows (token, done checkpoint)
    float32 over the done checkpoints `done` (indices among all), token by token: mean and std of the
    loss over the last n_last and of exp(-loss) over all, skipping NaN, in float64; the rises of the
    moving average over `window` checkpoints (`moving_average` over all checkpoints, NaN where not
    done: float32, a checkpoint not done is a gap) summed in float64. Every loop runs over whole rows
    with NaN tests as selects, not branches, so that it vectorises."""
    n, half = rows.shape[1], window // 2
    out = np.full((rows.shape[0], len(MEASURES)), np.nan)
    # weight[o, i]: 1 where done checkpoint i + o - half is in the moving window of done checkpoint i
    weight = np.zeros((window, n), np.float32)
    for o in range(window):
        for i in range(max(half - o, 0), min(n + half - o, n)):
            weight[o, i] = done[i] - half <= done[i + o - half] < done[i] + window - half
    step = np.zeros(n, np.bool_)  # done checkpoints i - 1 and i are next to each other: a rise counts
    step[1:] = done[1:] == done[:-1] + 1
    padded = np.full(n + window, np.nan, np.float32)  # the curve with NaN around: no bounds in the loops
    total, count, prob = np.empty(n, np.float32), np.empty(n, np.float32), np.empty(n, np.float32)
    for t in range(rows.shape[0]):
        curve = rows[t]
        out[t, 0], out[t, 1] = _mean_std(curve[n - n_last :])
        padded[half : n + half] = curve
        total[:] = 0
        count[:] = 0
        for o in range(window):
            for i in range(n):
                value, w, gap = padded[i + o], weight[o, i], np.isnan(padded[i + o])
                total[i] += np.float32(0) if gap else value * w
                count[i] += np.float32(0) if gap else w
        rises = 0.0
        for i in range(1, n):
            rise = total[i] / count[i] - total[i - 1] / count[i - 1]
            seen = step[i] & ~np.isnan(curve[i]) & ~np.isnan(curve[i - 1])  # NaN or a gap: no rise
            rises += rise if seen & (rise > 0) else np.float32(0)
        out[t, 3] = rises
        for i in range(n):
            loss = curve[i]
            power = -loss if -loss > -87 else np.float32(-87)  # exp(-87) is 0 in float32 terms
            prob[i] = loss if np.isnan(loss) else _exp32(power)
        out[t, 4], out[t, 5] = _mean_std(prob)
    return out


@numba.njit(nogil=True, cache=True, fastmath={"reassoc", "contract"}, error_model="numpy")
def _mean_std(values):
    """Mean and standard deviation (ddof 0) of float32 values skipping NaN, in float64; NaN if all are."""
    total = count = spread = 0.0
    for i in range(len(values)):
        value, gap = np.float64(values[i]), np.isnan(values[i])
        total += 0.0 if gap else value
        count += 0.0 if gap else 1.0
    mean = total / count
    for i in range(len(values)):
        value, gap = np.float64(values[i]), np.isnan(values[i])
        spread += 0.0 if gap else (value - mean) ** 2
    return mean, np.sqrt(spread / count)

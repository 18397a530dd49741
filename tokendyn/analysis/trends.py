"""Token trend categories over the late part of training (methods.md §1.2; Xia et al. 2023, Eq. 1).

For a start fraction p, let j be the model's first checkpoint whose step is at least p * final
step and n its last. For every token, over checkpoints j..n, fit ppl_i / ppl_j = a + b x_i by
ordinary least squares (ppl_i = exp(loss_i)); then
- upward: b > 0 with two-sided p-value < alpha; downward: b < 0 with p-value < alpha;
- stagnated: neither, and ppl_j and ppl_n both within [1 - band, 1 + band] x the geometric mean of
  ppl over j..n (optionally also var(ppl) < mean(ppl) over j..n, as in the released code);
- uncategorised: everything else.

x is log(step) by default (the released code) or the checkpoint index ("index", the paper's
text). log(0) is undefined, so with x="log_step" a checkpoint at step 0 is left out: the window
then starts at the first positive step even when p = 0. A (model, start) whose window has fewer
than 3 checkpoints (no residual degree of freedom) gets no label (-1) and a warning.

The fit is closed form and vectorised over tokens (one pass over the data for all start
fractions), so it runs chunk by chunk on stores larger than memory.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from functools import lru_cache, partial

import dask.array as da
import numba
import numpy as np
import scipy.special
import scipy.stats
import xarray as xr

from tokendyn.analysis.compiled import ols_t
from tokendyn.analysis.labels import MISSING, flag_array
from tokendyn.analysis.trajectories import (
    CHUNK_MB,
    SLICE_TOKENS,
    chunk_tokens,
    default_of,
    done_checkpoints,
    load_small,
    model_loss,
    over_token_slices,
    valid_tokens,
)
from tokendyn.errors import TokendynError
from tokendyn.store.layout import TOKEN_DIMS

CATEGORIES = ("stagnated", "upward", "downward", "uncategorised")


class TrendWarning(UserWarning):
    """A (model, start) has too few checkpoints for a trend fit."""


STARTS = (0.1, 0.2, 0.4, 0.7)
START = 0.2  # the start fraction where one trend window is used (`trend_fit`, the subset and trend studies)
X_KINDS = ("log_step", "index")


def _fit(y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(slope, standard error, t statistic) of least squares y = a + b x along axis 0 of y.

    The rule of `compiled.ols_t` (flat to rounding: slope 0 and t 0), vectorised over the tokens:
    sums run over whole rows (one per checkpoint), without a centred copy of y.
    """
    n = len(x)
    xc = x - x.mean()
    sxx = xc @ xc
    sum_y = y.sum(axis=0)
    # Not a BLAS product: inside dask's threads, waking BLAS threads costs more than the product.
    sxy = (np.expand_dims(xc, tuple(range(1, y.ndim))) * y).sum(axis=0)
    sum_y2 = np.einsum("i...,i...->...", y, y)
    syy = sum_y2 - sum_y**2 / n
    flat = syy <= 16 * n * np.finfo(np.float64).eps * sum_y2
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = np.where(flat, 0.0, sxy / sxx)
        stderr = np.where(flat, 0.0, np.sqrt(np.maximum(syy - slope * sxy, 0.0) / (n - 2) / sxx))
        t = np.where(flat, 0.0, slope / stderr)
    return slope, stderr, t


def ols(y: np.ndarray, x: np.ndarray, axis: int = -1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least-squares fit y = a + b x along `axis` of y, for one shared 1-D x.

    Returns (slope b, its standard error, two-sided Student-t p-value with n - 2 degrees of
    freedom), the numbers `scipy.stats.linregress` gives, for every other index at once.
    A trajectory that is constant up to rounding gets slope 0 and p-value 1.
    """
    x = np.asarray(x, dtype=np.float64)
    slope, stderr, t = _fit(np.moveaxis(np.asarray(y, dtype=np.float64), axis, 0), x)
    return slope, stderr, 2 * scipy.special.stdtr(len(x) - 2, -np.abs(t))


def fit_points(steps: np.ndarray, x: str) -> tuple[np.ndarray, np.ndarray]:
    """(mask of usable checkpoints, x values at them) for one model's steps in step order."""
    if x not in X_KINDS:
        raise TokendynError(f"unknown trend x {x!r}; choose 'log_step' or 'index'")
    keep = steps > 0 if x == "log_step" else np.ones(len(steps), bool)
    values = np.log(steps[keep]) if x == "log_step" else np.arange(keep.sum(), dtype=float)
    return keep, values


def window_start(steps: np.ndarray, start: float) -> int:
    """Index of the first step >= start * final step (steps increasing)."""
    return int(np.searchsorted(steps, start * steps[-1], side="left"))


def _window_sums(
    loss: Sequence[np.ndarray], x: np.ndarray, starts: list[int]
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per window start j: the sums over checkpoints j.. of ppl, x ppl, ppl^2 and loss (4, token),
    and ppl at j.

    One backward pass over the checkpoints gives every window's sums (windows share their tails),
    instead of one pass per window; NaN propagates as in a direct sum.
    """
    sums, out = np.empty((4, len(loss[0]))), {}
    for i in range(len(loss) - 1, min(starts) - 1, -1):
        row, ppl = _loss_and_ppl(loss[i])
        _accumulate(sums, ppl, row, x[i], i == len(loss) - 1)
        if i in starts:
            out[i] = (sums.copy(), ppl)
    return out


_HALVES = np.arange(2**16, dtype=np.uint16).view(np.float16).astype(np.float64)  # every float16 value
with np.errstate(over="ignore", invalid="ignore"):
    _EXP_OF_HALVES = np.exp(_HALVES)


def _loss_and_ppl(loss: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(loss, exp(loss)) in float64 for a row of losses; numpy's exp, a row at a time (small
    temporaries). A float16 row (65,536 possible values) is looked up in a table of numpy's exp
    of every float16 value: the same numbers, several times faster."""
    if loss.dtype == np.float16:
        bits = loss.view(np.uint16)
        return _HALVES.take(bits), _EXP_OF_HALVES.take(bits)
    row = loss.astype(np.float64)
    return row, np.exp(row)


@numba.njit(nogil=True, cache=True)
def _accumulate(sums: np.ndarray, ppl: np.ndarray, loss: np.ndarray, x: float, first: bool) -> None:
    """Add one checkpoint's ppl, x ppl, ppl^2 and loss to `sums` (4, token); the first sets them."""
    for t in range(len(ppl)):
        p = ppl[t]
        if first:
            sums[0, t], sums[1, t], sums[2, t], sums[3, t] = p, x * p, p * p, loss[t]
        else:
            sums[0, t] += p
            sums[1, t] += x * p
            sums[2, t] += p * p
            sums[3, t] += loss[t]


def _categorise(
    loss: Sequence[np.ndarray],
    x: np.ndarray,
    starts: Sequence[int | None],
    alpha: float,
    band: float,
    var_condition: bool,
) -> np.ndarray:
    """Category codes (token, start) of trajectories loss (ckpt, token: an array or its rows) for
    window starts `starts`.

    Regressing ppl_i or ppl_i / ppl_j on x gives the same t statistic and slope sign (ppl_j is a
    positive constant per token), so ppl is computed once for all starts; and p < alpha is
    tested as |t| > the Student-t critical value, which avoids a p-value per token. The least-squares
    sums of every window come from one backward pass (`_window_sums`); the slope's t statistic is
    then the one `_fit` gives.
    """
    codes = np.full((len(loss[0]), len(starts)), MISSING, dtype=np.int8)
    used = [j for j in starts if j is not None]
    if not used:
        return codes
    sums = _window_sums(loss, x, used)
    ppl_last = _loss_and_ppl(loss[-1])[1]
    for s, j in enumerate(starts):
        if j is not None:
            n = len(x) - j
            xc = x[j:] - x[j:].mean()
            (sum_j, ppl_first) = sums[j]
            codes[..., s] = _codes(
                sum_j,
                ppl_first,
                ppl_last,
                np.exp(sum_j[3] / n),
                n,
                x[j:].mean(),
                xc @ xc,
                _critical_t(alpha, n - 2),
                band,
                var_condition,
            )
    return codes


@lru_cache
def _critical_t(alpha: float, dof: int) -> float:
    """|t| above which a slope is significant at level alpha (two-sided): asked per token slice,
    computed once (scipy's distributions parse their arguments slowly)."""
    return float(scipy.stats.t.isf(alpha / 2, dof))


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _codes(
    sums: np.ndarray,
    ppl_first: np.ndarray,
    ppl_last: np.ndarray,
    geo_mean: np.ndarray,
    n: int,
    x_mean: float,
    sxx: float,
    critical: float,
    band: float,
    var_condition: bool,
) -> np.ndarray:
    """Category code per token of one window from its sums (`_window_sums`): the slope's t statistic
    by `compiled.ols_t` (a trajectory flat to rounding has t 0, an exact line +-inf), |t| > `critical`
    for a trend, the band around the geometric mean for stagnation; MISSING where the loss has NaN."""
    codes = np.empty(sums.shape[1], np.int8)
    for t in range(len(codes)):
        sum_y, sum_xy, sum_y2, sum_loss = sums[0, t], sums[1, t], sums[2, t], sums[3, t]
        if np.isnan(sum_loss):
            codes[t] = MISSING
            continue
        slope, t_stat = ols_t(n, sum_y, sum_y2, sum_xy - x_mean * sum_y, sxx)
        significant = abs(t_stat) > critical  # NaN: not significant
        stagnated = abs(ppl_first[t] / geo_mean[t] - 1) <= band and abs(ppl_last[t] / geo_mean[t] - 1) <= band
        if var_condition:
            mean = sum_y / n
            stagnated = stagnated and sum_y2 / n - mean**2 < mean
        if significant and slope > 0:
            codes[t] = 1
        elif significant and slope < 0:
            codes[t] = 2
        else:
            codes[t] = 0 if stagnated else 3
    return codes


def _categorise_blocks(blocks: list[np.ndarray], **kwargs) -> np.ndarray:
    """`_categorise` of (ckpt, token) blocks, one per chunk of checkpoints, SLICE_TOKENS tokens at a
    time: their rows are used in place, never copied into one array."""
    rows = [row for block in blocks for row in block]
    n_token = blocks[0].shape[1]
    if not rows:
        return np.full((n_token, len(kwargs["starts"])), MISSING, dtype=np.int8)
    return np.concatenate(
        [
            _categorise([row[i : i + SLICE_TOKENS] for row in rows], **kwargs)
            for i in range(0, max(n_token, 1), SLICE_TOKENS)
        ]
    )


def trend_categories(
    ds: xr.Dataset,
    start: float | Sequence[float] = STARTS,
    x: str = "log_step",
    alpha: float = 0.05,
    band: float = 0.05,
    var_condition: bool = False,
    chunk_mb: float = CHUNK_MB,
) -> xr.DataArray:
    """Trend category of every token in every model at every start fraction (see module doc).

    start: start fraction(s) p in [0, 1); default 0.1, 0.2, 0.4, 0.7 (the paper sweeps 10-70%).
    x: "log_step" (default, released code) or "index" (checkpoint index, the paper's text).
    alpha: significance level of the slope test (0.05). band: stagnation band around the
    geometric mean (0.05, i.e. [0.95, 1.05]). var_condition: also require var(ppl) < mean(ppl).
    Returns a label array (`tokendyn.analysis.labels`): int8 codes (model, start, token) with
    flag_meanings CATEGORIES and coordinate `window_step` (model, start), the first step of each
    window (NaN without one; two start fractions can select the same window when checkpoints are
    sparse); `labels.label_share` gives the percentages per model and start. Lazy.
    """
    ds = load_small(ds)
    starts = np.atleast_1d(np.asarray(start, dtype=float))
    if np.any((starts < 0) | (starts >= 1)):
        raise TokendynError("start fractions must lie in [0, 1), e.g. 0.2 for 20%")
    per_model, window_steps = [], []
    for m, name in enumerate(ds["model"].values):
        steps = ds["step"].values[m, done_checkpoints(ds, m)]
        keep, xs = fit_points(steps, x)  # steps increase: the kept checkpoints are the last ones
        js = []
        for p in starts:
            j = window_start(steps[keep], p) if len(xs) else len(xs)
            if len(xs) - j < 3:
                warnings.warn(
                    f"model {name}: fewer than 3 checkpoints from {p:.0%} of the final step; no trend categories there",
                    TrendWarning,
                    stacklevel=2,
                )
                js.append(None)
            else:
                js.append(j)
        window_steps.append([np.nan if j is None else float(steps[keep][j]) for j in js])
        # only the checkpoints from the earliest window start on are read
        first = min((j for j in js if j is not None), default=0)
        idx = done_checkpoints(ds, m)[len(steps) - len(xs) + first :]
        loss = ds["loss"].isel(model=m, ckpt=idx).transpose("ckpt", *TOKEN_DIMS)
        loss = loss if loss.chunks is not None else chunk_tokens(loss.chunk(), chunk_mb)
        codes = da.blockwise(  # a task per token range takes its stored chunks as they are (not rechunked)
            _categorise_blocks,
            "ts",
            loss.data,
            "ct",
            new_axes={"s": len(starts)},
            concatenate=False,
            dtype=np.int8,
            meta=np.array((), dtype=np.int8),
            x=xs[first:],
            starts=[None if j is None else j - first for j in js],
            alpha=alpha,
            band=band,
            var_condition=var_condition,
        )
        per_model.append(xr.DataArray(codes, dims=(*TOKEN_DIMS, "start")))
    codes = xr.concat(per_model, dim="model").assign_coords(
        model=ds["model"].values, start=starts, window_step=(("model", "start"), np.asarray(window_steps))
    )
    codes = codes.where(valid_tokens(ds), MISSING).astype(np.int8)
    return flag_array(
        codes.transpose("model", "start", *TOKEN_DIMS), CATEGORIES, "trend", "trend category of the token's perplexity"
    )


FIT_NAMES = {
    "slope": "slope of ppl_i / ppl_first against {x} in the trend window",
    "stderr": "standard error of that slope",
    "pvalue": "two-sided p-value of the slope (n - 2 degrees of freedom)",
}


def trend_fit(
    ds: xr.Dataset, start: float = START, x: str = default_of(trend_categories, "x"), chunk_mb: float = CHUNK_MB
) -> xr.Dataset:
    """Slope, standard error and p-value of every token's fit ppl_i/ppl_j = a + b x_i: (model, token).

    Same window and x as `trend_categories` (start: one start fraction, default `START`); NaN
    where the window has fewer than 3 checkpoints. Lazy.
    """
    ds = load_small(ds)

    def fit(loss: np.ndarray, xs: np.ndarray) -> np.ndarray:
        window = loss.astype(np.float64)
        return np.stack(ols(np.exp(window - window[0]), xs, axis=0), axis=-1)

    per_model = []
    for m in range(ds.sizes["model"]):
        loss = model_loss(ds, m, chunk_mb)
        keep, xs = fit_points(loss["step"].values, x)
        loss = loss.isel(ckpt=np.flatnonzero(keep))
        j = window_start(loss["step"].values, start) if len(xs) else 0
        if len(xs) - j < 3:
            nan = xr.full_like(loss.isel(ckpt=0).reset_coords(drop=True), np.nan, dtype=float)
            per_model.append(xr.Dataset({"slope": nan, "stderr": nan, "pvalue": nan}))
            continue
        stats = xr.apply_ufunc(
            partial(over_token_slices, fit),
            loss.isel(ckpt=slice(j, None)).drop_vars("step"),
            kwargs={"xs": xs[j:]},
            input_core_dims=[["ckpt"]],
            output_core_dims=[["stat"]],
            dask="parallelized",
            output_dtypes=[float],
            dask_gufunc_kwargs={"output_sizes": {"stat": 3}},
        )
        per_model.append(stats.to_dataset("stat").rename({0: "slope", 1: "stderr", 2: "pvalue"}))
    fits = xr.concat(per_model, dim="model").assign_coords(model=ds["model"].values, start=start)
    fits = fits.where(valid_tokens(ds))
    fits.attrs = {"x": x, "start": start}  # not the loss's attributes: these are slopes, not nats
    for name, long_name in FIT_NAMES.items():
        fits[name].attrs = {"long_name": long_name.format(x=x), "units": "1"}
    return fits

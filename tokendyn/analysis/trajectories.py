"""Token loss trajectories on comparable x axes (methods.md §1.1, §1.3).

A trajectory is one token's loss over the checkpoints of one model. To compare models of different
sizes, trajectories are read off at common x values: training step, tokens seen, training FLOPs
(6 N D) or validation perplexity ("matched perplexity"). This module also holds subset curves (the
perplexity of a token mask in every model), the per-token double-descent detector and the
cross-size agreement of per-token loss drops.

Conventions used throughout tokendyn's analyses:
- only checkpoints marked `done` with a finite `step` take part, in step order;
- per-token results stay lazy (dask); small summaries (curves, tables) are computed;
- each default is written once: a function that passes a parameter on to another takes the other's
  default (`default_of`), and a default that several functions define alike is a named constant.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import dask.array as da
import numba
import numpy as np
import pandas as pd
import xarray as xr

from tokendyn.analysis.compiled import assign, decoded, stored, stored_difference
from tokendyn.analysis.labels import describe
from tokendyn.analysis.ranks import pair_statistics
from tokendyn.analysis.shared import alongside
from tokendyn.errors import TokendynError
from tokendyn.store.layout import TOKEN_DIMS

AXES = ("step", "tokens_seen", "flops", "val_ppl")
CHUNK_MB = 64  # loss data per dask chunk of the per-token computations (ckpt whole, token chunked)
SLICE_TOKENS = 2**15  # tokens per slice inside a kernel: bounds its float64 temporaries
SMALL_SET_BYTES = 64 * 2**20  # a set this small is read whole into memory by the analyses that span sets
DESCENT_TOKENS = 2048  # tokens per slice of the double-descent kernel: its buffers stay in cache
DESCENT_TOL = 0.5  # double descent: the fall, rise and second fall a trajectory needs (nats for loss)
DESCENT_WINDOW = 3  # double descent: points of the centred moving average before the test (1 = none)


def default_of(function: Callable, parameter: str) -> Any:
    """The default of `parameter` in `function`'s signature: a function passing a parameter on to
    another uses it as its own default, so the default is written once, where it is documented."""
    return inspect.signature(function).parameters[parameter].default


# --- selecting checkpoints -------------------------------------------------------------------------


def load_small(ds: xr.Dataset) -> xr.Dataset:
    """A shallow copy of ds with every variable without token dims (step, val_ppl, done, ...) in memory.

    They are tiny, and reading them once saves many small dask computations.
    """
    ds = ds.copy()
    for variable in ds.variables.values():
        if not set(variable.dims) & set(TOKEN_DIMS):
            variable.load()
    return ds


def load_if_small(ds: xr.Dataset, limit: int = SMALL_SET_BYTES) -> xr.Dataset:
    """ds read into memory (a copy) when its variables total at most `limit` bytes, else ds itself.

    For the named sets and tasks that sequence and task analyses read whole: one read, where each
    use of a lazy set would be a dask computation over its (model, ckpt) chunks.
    """
    return ds.copy().load() if ds.nbytes <= limit else ds


def model_index(ds: xr.Dataset, model: int | str) -> int:
    """Position of `model` (a name or an index) along the model dimension."""
    if isinstance(model, (int, np.integer)):
        return int(model)
    names = [str(name) for name in ds["model"].values]
    if model not in names:
        raise TokendynError(f"unknown model {model!r}; the store has {', '.join(names)}")
    return names.index(model)


def done_checkpoints(ds: xr.Dataset, model: int | str) -> np.ndarray:
    """Indices along `ckpt` of the model's done checkpoints with a finite step, in step order."""
    m = model_index(ds, model)
    step = np.asarray(ds["step"].values[m], dtype=float)
    done = np.asarray(ds["done"].values[m], dtype=bool) if "done" in ds else np.ones_like(step, bool)
    idx = np.flatnonzero(done & np.isfinite(step))
    return idx[np.argsort(step[idx], kind="stable")]


def trained_checkpoints(ds: xr.Dataset, model: int | str) -> np.ndarray:
    """`done_checkpoints` after training started (step > 0): random initialisation (step 0) is not a
    point of training, and whether a suite includes it must not change a default."""
    idx = done_checkpoints(ds, model)
    return idx[ds["step"].values[model_index(ds, model), idx] > 0]


def chunk_tokens(da: xr.DataArray, chunk_mb: float = CHUNK_MB) -> xr.DataArray:
    """Rechunk so that `ckpt` is whole and a chunk holds about chunk_mb of data.

    Other dims keep their chunks (the store's: one model); the token chunk is a multiple of the
    stored one (at least one), so no stored chunk is split. Kernels bound their
    own working memory with `over_token_slices`.
    """
    if da.chunks is None:
        return da.chunk({"ckpt": -1} if "ckpt" in da.dims else {})
    sizes = {dim: (da.sizes[dim] if dim == "ckpt" else max(chunks)) for dim, chunks in zip(da.dims, da.chunks)}
    per_token = da.dtype.itemsize * math.prod(size for dim, size in sizes.items() if dim != "token")
    stored = sizes["token"]
    n_token = max(1, int(chunk_mb * 2**20 // per_token) // stored) * stored
    return da.chunk({"ckpt": -1, "token": n_token} if "ckpt" in da.dims else {"token": n_token})


def over_token_slices(
    func: Callable[..., np.ndarray], block: np.ndarray, slice_tokens: int = SLICE_TOKENS, **kwargs: Any
) -> np.ndarray:
    """Apply func to (ckpt, tokens) slices of a (..., ckpt) block of at most `slice_tokens` tokens.

    func returns (tokens, ...) per slice; the result is (..., ...) over the block's leading dims.
    The float64 temporaries of a kernel then stay small whatever the chunk size.
    """
    lead, n = block.shape[:-1], block.shape[-1]
    flat = np.moveaxis(block, -1, 0).reshape(n, -1)
    parts = [
        func(np.ascontiguousarray(flat[:, i : i + slice_tokens]), **kwargs)
        for i in range(0, flat.shape[1], slice_tokens)
    ]
    out = np.concatenate(parts, axis=0) if parts else func(flat, **kwargs)
    return out.reshape(lead + out.shape[1:])


def token_loss(ds: xr.Dataset) -> xr.DataArray:
    """`loss` with NaN outside done checkpoints, without the per-checkpoint coordinates."""
    loss = ds["loss"]
    if "done" in ds and not ds["done"].all():  # all done: no masked copy of every value
        loss = loss.where(ds["done"])
    return loss.drop_vars([name for name in loss.coords if "ckpt" in loss[name].dims and name != "ckpt"])


def model_loss(ds: xr.Dataset, model: int | str, chunk_mb: float = CHUNK_MB, first: int = 0) -> xr.DataArray:
    """One model's loss over its done checkpoints as (ckpt, token), ckpt in a single chunk.

    first: leave out the model's first `first` done checkpoints (in step order); they are not read.
    The `step` coordinate of the selected checkpoints is kept.
    """
    m = model_index(ds, model)
    idx = done_checkpoints(ds, m)[first:]
    contiguous = len(idx) > 0 and np.array_equal(idx, np.arange(idx[0], idx[0] + len(idx)))
    loss = ds["loss"].isel(model=m, ckpt=slice(idx[0], idx[-1] + 1) if contiguous else idx)
    return chunk_tokens(loss.reset_coords(drop=True).assign_coords(step=("ckpt", loss["step"].values)), chunk_mb)


def valid_tokens(ds: xr.Dataset) -> xr.DataArray:
    """Tokens that have a prediction: every token of a format-2 store (it holds scored tokens only).

    Kept so analyses can mask per-token results uniformly. In memory (a byte per token), so it
    never imposes its chunks on the lazy per-token results.
    """
    return xr.DataArray(np.ones(ds.sizes["token"], dtype=bool), dims=TOKEN_DIMS)


# --- x axes ----------------------------------------------------------------------------------------


AXIS_ATTRS = {  # long_name, units of each x axis
    "step": ("training step", "steps"),
    "tokens_seen": ("tokens seen in training", "tokens"),
    "val_ppl": ("validation perplexity of the main set", "1"),
    "flops": ("training compute, 6 N D", "FLOP"),
}


def training_compute(n_params: xr.DataArray, tokens_seen: xr.DataArray) -> xr.DataArray:
    """Training compute C = 6 N D in FLOPs, with N = n_params parameters and D = tokens_seen."""
    return 6.0 * n_params * tokens_seen


def x_axis(ds: xr.Dataset, axis: str = "step", params: str = "n_params") -> xr.DataArray:
    """Values of an x axis per (model, ckpt).

    axis: "step", "tokens_seen", "val_ppl", or "flops", the training compute 6 N D
    (`training_compute`) with N = ds[params]: "n_params" (default, as in methods.md) or
    "n_params_nonembed".
    """
    if axis not in AXES:
        raise TokendynError(f"unknown x axis {axis!r}; choose one of {', '.join(AXES)}")
    if axis == "flops":
        if params not in ds.coords:
            raise TokendynError(f"the store has no {params!r} coordinate; FLOPs need parameter counts")
        values = training_compute(ds[params], ds["tokens_seen"])
    else:
        values = ds[axis]
    values = values.astype(float).reset_coords(drop=True).compute()
    if axis in ("tokens_seen", "flops") and not np.isfinite(values.values).any():
        raise TokendynError(
            f"the store has no tokens_seen values, so no {axis!r} axis; set tokens_per_step in the suite and re-extract"
        )
    values = values.rename(axis)
    values.attrs = {"long_name": AXIS_ATTRS[axis][0], "units": AXIS_ATTRS[axis][1]}
    if axis == "flops":
        values.attrs["params"] = params
    return values


def envelope(ppl: np.ndarray) -> np.ndarray:
    """Mask of the checkpoints (in step order) on the running-minimum envelope of validation
    perplexity: those that set a new lowest value. Matched perplexity reads the loss on these points
    (`at_axis`), and the figures draw curves against validation perplexity through them, so that a
    loss spike or a late rise does not fold a curve back into a zig-zag.

    NaN (a checkpoint without a perplexity) is never on the envelope and does not end it: the
    points after it are compared with the lowest value before it.
    """
    ppl = np.asarray(ppl, dtype=float)
    previous = np.minimum.accumulate(np.concatenate([[np.inf], np.where(np.isnan(ppl), np.inf, ppl)[:-1]]))
    return np.isfinite(ppl) & (ppl < previous)


def _axis_points(ds: xr.Dataset, axis: str, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(checkpoint indices, increasing x) that one model's trajectories are interpolated on.

    For val_ppl the points are the running-minimum envelope and x = -log(val_ppl).
    """
    idx = done_checkpoints(ds, m)
    x = x_axis(ds, axis).values[m, idx]
    idx, x = idx[np.isfinite(x)], x[np.isfinite(x)]
    if axis == "val_ppl":
        keep = envelope(x)
        return idx[keep], -np.log(x[keep])
    if np.any(np.diff(x) <= 0):
        raise TokendynError(f"{axis} of model {ds['model'].values[m]} is not increasing over its checkpoints")
    return idx, x


def _brackets(x: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For increasing x: (lo, hi, weight of hi, reachable) of linear interpolation at targets."""
    if len(x) == 0:
        zeros = np.zeros(len(targets), int)
        return zeros, zeros, np.zeros(len(targets)), np.zeros(len(targets), bool)
    slack = 1e-9 * (1 + np.abs(x).max())  # a level equal to an end up to rounding is reached
    reachable = (targets >= x[0] - slack) & (targets <= x[-1] + slack)
    if len(x) == 1:
        zeros = np.zeros(len(targets), int)
        return zeros, zeros, np.zeros(len(targets)), reachable
    hi = np.clip(np.searchsorted(x, targets, side="right"), 1, len(x) - 1)
    lo = hi - 1
    weight = np.clip((targets - x[lo]) / (x[hi] - x[lo]), 0.0, 1.0)
    return lo, hi, weight, reachable


def _interpolation(ds: xr.Dataset, axis: str, levels: np.ndarray) -> list[tuple]:
    """Per model: (ckpt of lo, ckpt of hi, weight, reachable) at `levels` of `axis`."""
    targets = -np.log(levels) if axis == "val_ppl" else levels
    plans = []
    for m in range(ds.sizes["model"]):
        idx, x = _axis_points(ds, axis, m)
        lo, hi, weight, reachable = _brackets(x, targets)
        safe = idx if len(idx) else np.zeros(1, int)
        plans.append((safe[lo], safe[hi], weight, reachable))
    return plans


def reach(ds: xr.Dataset, axis: str, levels: Sequence[float], of: str = "step") -> xr.DataArray:
    """Value of axis `of` where each model reaches each level of `axis` (model, axis); NaN if never.

    Interpolated with the same checkpoints and weights as the losses in `at_axis`.
    """
    ds = load_small(ds)
    levels = np.asarray(levels, dtype=float)
    values = x_axis(ds, of).values
    rows = []
    for m, (lo, hi, weight, reachable) in enumerate(_interpolation(ds, axis, levels)):
        rows.append(np.where(reachable, values[m, lo] + weight * (values[m, hi] - values[m, lo]), np.nan))
    return xr.DataArray(np.array(rows), dims=("model", axis), coords={"model": ds["model"].values, axis: levels})


def at_axis(ds: xr.Dataset, axis: str, levels: Sequence[float]) -> xr.DataArray:
    """Loss of every token in every model at given levels of an x axis: (model, axis, token).

    Linear interpolation between the two checkpoints that bracket each level; for "val_ppl" it is
    linear in log(val_ppl) on the running-minimum envelope (the checkpoints that set a new lowest
    validation perplexity), so a later checkpoint that got worse is skipped. Levels a model never
    reaches (outside its first..last value) are NaN, never extrapolated. Lazy. A `step`
    coordinate (model, axis) gives the (interpolated) step at which each model is read.
    """
    ds = load_small(ds)
    levels = np.asarray(levels, dtype=float)
    if levels.ndim != 1 or len(levels) == 0:
        raise TokendynError("levels must be a non-empty list of numbers")
    if axis == "val_ppl" and not np.all(np.isfinite(levels) & (levels >= 1)):
        raise TokendynError(
            f"perplexity levels must be finite numbers >= 1, got {levels.tolist()}; fix them (--levels in the CLI)"
        )
    lo, hi, weight, reachable = (np.stack(part) for part in zip(*_interpolation(ds, axis, levels)))
    # only the checkpoints some level reads (done ones) are taken; lo and hi become positions among them
    used, position = np.unique(np.concatenate([lo.ravel(), hi.ravel()]), return_inverse=True)
    lo, hi = position[: lo.size].reshape(lo.shape), position[lo.size :].reshape(hi.shape)
    loss = ds["loss"].transpose("model", "ckpt", *TOKEN_DIMS).isel(ckpt=used)
    loss = loss if loss.chunks is not None else loss.chunk()
    plans = [da.from_array(plan, chunks=(loss.chunks[0], -1)) for plan in (lo, hi, weight, reachable)]
    # each task takes a token range's stored chunks as they are and reads its two rows per level
    data = da.blockwise(
        _interpolate_blocks,
        "mlt",
        loss.data,
        "mct",
        *(arg for plan in plans for arg in (plan, "ml")),
        concatenate=False,
        dtype=np.float64,
        meta=np.array((), dtype=np.float64),
    ).rechunk({1: 1})
    coords = {name: coord for name, coord in ds.coords.items() if coord.dims == ("model",)}
    coords |= {name: coord for name, coord in loss.coords.items() if set(coord.dims) <= set(TOKEN_DIMS)}
    out = xr.DataArray(data, dims=("model", axis, *TOKEN_DIMS), coords=coords | {axis: levels})
    if axis != "step":
        out = out.assign_coords(step=reach(ds, axis, levels, "step"))
    return describe(out.rename("loss"), f"loss at matched {axis}", "nats")


def _interpolate_blocks(
    blocks: list[np.ndarray], lo: np.ndarray, hi: np.ndarray, weight: np.ndarray, reachable: np.ndarray
) -> np.ndarray:
    """(model, level, token) float64 from (model, ckpt, token) blocks, one per chunk of checkpoints:
    per model and level, a + weight (b - a) of the rows a = lo, b = hi (b - a in the loss's dtype,
    as numpy computes it), NaN where not reachable."""
    ends = np.cumsum([0] + [block.shape[1] for block in blocks])

    def row(m: int, ckpt: int) -> np.ndarray:
        k = np.searchsorted(ends, ckpt, side="right") - 1
        return blocks[k][m, ckpt - ends[k]]

    out = np.empty((*lo.shape, blocks[0].shape[2]))
    for m, level in np.ndindex(lo.shape):
        if reachable[m, level]:
            a, b = row(m, lo[m, level]), row(m, hi[m, level])
            if a.dtype in (np.float16, np.float32) and a.dtype == b.dtype and weight.dtype == np.float64:
                _interpolate_row(stored(a), stored(b), float(weight[m, level]), out[m, level])
            else:
                out[m, level] = a + weight[m, level : level + 1] * (b - a)
        else:
            out[m, level] = np.nan
    return out


@numba.njit(nogil=True, cache=True)
def _interpolate_row(a: np.ndarray, b: np.ndarray, weight: float, out: np.ndarray) -> None:
    """out = a + weight (b - a) in float64 from rows of stored values (`decoded`), b - a in the stored
    dtype: numpy's numbers, without numpy's element-at-a-time float16 arithmetic."""
    for t in range(len(out)):
        out[t] = decoded(a[t]) + weight * stored_difference(b[t], a[t])


def perplexity_range(ds: xr.Dataset) -> tuple[float, float]:
    """(highest, lowest) validation perplexity that every model reaches on its envelope after
    training started (step > 0).

    Random initialisation (step 0) is left out: a level between it and the first trained checkpoint
    would be a blend of two checkpoints rather than data, and whether a suite includes step 0 must
    not move the default levels (a model with a single trained checkpoint uses its step 0 too).
    """
    ds = load_small(ds)
    highs, lows = [], []
    for m in range(ds.sizes["model"]):
        idx, x = _axis_points(ds, "val_ppl", m)
        if len(idx) == 0:
            raise TokendynError(
                f"model {ds['model'].values[m]} has no done checkpoint with a validation "
                "perplexity; run extraction first"
            )
        trained = ds["step"].values[m, idx] > 0
        if trained.sum() >= 2:
            x = x[trained]
        highs.append(np.exp(-x[0]))
        lows.append(np.exp(-x[-1]))
    high, low = min(highs), max(lows)
    if low > high:
        raise TokendynError(
            f"no validation perplexity is reached by every model (the common range "
            f"[{low:.4g}, {high:.4g}] is empty); pass levels explicitly or drop a model"
        )
    return high, low


def perplexity_grid(ds: xr.Dataset, n_levels: int = 20) -> np.ndarray:
    """`n_levels` perplexities evenly spaced in log between the common range's ends, descending."""
    high, low = perplexity_range(ds)
    return np.geomspace(high, low, n_levels)


def at_perplexity(
    ds: xr.Dataset, levels: Sequence[float] | None = None, n_levels: int = default_of(perplexity_grid, "n_levels")
) -> xr.DataArray:
    """Loss at matched validation perplexity: (model, val_ppl, token); see `at_axis`.

    levels: perplexities to read at; default `perplexity_grid(ds, n_levels)`, the levels every
    model reaches (n_levels: as in `perplexity_grid`).
    """
    return at_axis(ds, "val_ppl", perplexity_grid(ds, n_levels) if levels is None else levels)


# --- subsets and double descent --------------------------------------------------------------------


def subset_curve(
    ds: xr.Dataset, mask: xr.DataArray, also: Sequence[tuple[Callable[..., xr.DataArray], dict]] = ()
) -> xr.DataArray:
    """Perplexity of a token subset in every model and checkpoint: exp(mean loss over the mask).

    mask: boolean (token,), e.g. `cats.sel(model="m", start=0.2) == "upward"`; chosen on one
    model, tracked in all. Extra dims (other than model/ckpt) give one curve each, computed in one
    pass. Returns (model, ckpt, ...) with the `val_ppl` and `step` coordinates, so it plots
    against validation perplexity directly; NaN for an empty subset. Computed.
    also: shared per-token results, (function, params) pairs, to compute in the same pass over the
    store (`tokendyn.analysis.shared.alongside`).
    """
    ds = load_small(ds)
    mask = mask.reset_coords(drop=True)
    if not set(TOKEN_DIMS) <= set(mask.dims) or set(mask.dims) & {"model", "ckpt"}:
        raise TokendynError(
            f"the mask must have the token dim and no model/ckpt dims, not {mask.dims}; "
            "select one model (and start) first"
        )
    extra = [dim for dim in mask.dims if dim not in TOKEN_DIMS]
    mask = mask.transpose(*extra, *TOKEN_DIMS)
    flat = np.asarray(mask.values, dtype=bool).reshape(-1, ds.sizes["token"])  # (subset, token)
    loss = ds["loss"].transpose("model", "ckpt", *TOKEN_DIMS).data
    loss = loss if hasattr(loss, "chunks") else da.from_array(loss, chunks=(1, 1, -1))
    # a task per token range takes its stored chunks as they are (the double-descent flags' tasks take
    # the same ones: brought `also`, each chunk is read once and then released), and the mask's
    # columns of that range: no list of every subset's token positions is made
    parts = da.blockwise(
        _subset_blocks,
        "mtxsv",
        loss,
        "mct",
        da.from_array(flat, chunks=(-1, loss.chunks[2])),
        "st",
        new_axes={"x": loss.shape[1], "v": 2},
        adjust_chunks={"t": 1},
        concatenate=False,
        dtype=np.float64,
        meta=np.array((), dtype=np.float64),
    )
    total, count = np.moveaxis(alongside(ds, parts.sum(axis=1), also), -1, 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ppl = np.exp(total / np.where(count > 0, count, np.nan))
    if "done" in ds:
        ppl = np.where(ds["done"].values[..., None], ppl, np.nan)
    shape = (ds.sizes["model"], ds.sizes["ckpt"], *(mask.sizes[dim] for dim in extra))
    ppl = xr.DataArray(
        ppl.reshape(shape),
        dims=("model", "ckpt", *extra),
        coords={name: coord for name, coord in ds.coords.items() if set(coord.dims) <= {"model", "ckpt"}}
        | {name: mask.coords[name] for name in extra if name in mask.coords},
    ).rename("subset_ppl")
    return describe(ppl, "perplexity of the token subset")


def _subset_blocks(blocks: list[np.ndarray], mask: np.ndarray) -> np.ndarray:
    """Sums and counts (model, 1, ckpt, subset, 2) of the non-NaN loss of each subset's tokens in a
    token range: (model, ckpt, token) blocks, one per chunk of checkpoints, and the subsets' mask
    (subset, token) of the same range."""
    n_model, _, n_token = blocks[0].shape
    index = [np.flatnonzero(row) for row in mask]
    starts = np.cumsum([0] + [len(i) for i in index])
    sums = [
        _subset_sums(stored(block.reshape(-1, n_token)), np.concatenate(index), starts).reshape(
            n_model, block.shape[1], len(index), 2
        )
        for block in blocks
    ]
    return np.concatenate(sums, axis=1)[:, None]


@numba.njit(nogil=True, cache=True)
def _subset_sums(loss: np.ndarray, index: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """(row, subset, 2): per row of loss (row, token) of stored values (`decoded`), the float64 sum
    of the non-NaN loss at each subset's tokens (index[starts[j]:starts[j + 1]] for subset j) and how
    many they are."""
    out = np.zeros((loss.shape[0], len(starts) - 1, 2))
    for r in range(loss.shape[0]):
        row = loss[r]
        for j in range(len(starts) - 1):
            total, count = 0.0, 0
            for i in range(starts[j], starts[j + 1]):
                value = decoded(row[index[i]])
                if value == value:
                    total += value
                    count += 1
            out[r, j, 0], out[r, j, 1] = total, count
    return out


def check_window(window: int) -> None:
    """A one-line error unless `window` (checkpoints of a moving average) is a whole number >= 1."""
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise TokendynError(f"window = {window!r}: give a whole number of checkpoints >= 1 (1 = no smoothing)")


def _check_descent(window: int, tol: float, min_fall: float | None) -> None:
    """One-line errors for a window below 1 and for tolerances with which every trajectory qualifies."""
    check_window(window)
    if not (math.isfinite(tol) and tol > 0):
        raise TokendynError(f"tol = {tol!r}: give a positive number of nats (with tol <= 0 every curve qualifies)")
    if min_fall is not None and not (math.isfinite(min_fall) and min_fall >= 0):
        raise TokendynError(f"min_fall = {min_fall!r}: give a number of nats >= 0 (0: any fall), or None for tol")


def moving_average(y: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average along axis 0 over `window` points, skipping NaN (fewer points at the
    ends, like a rolling mean with min_periods=1); NaN points stay NaN.

    Float32 data (float16 stores) is averaged in float32, float64 in float64. Any memory layout:
    the kernel walks the axis-0 neighbours of a point where they are contiguous (a (token, ckpt)
    array seen as (ckpt, token)) and whole rows otherwise.
    """
    check_window(window)
    dtype = np.result_type(y.dtype, np.float32)
    flat = np.asarray(y, dtype=dtype).reshape(len(y), -1)
    out = np.empty_like(flat)  # in flat's memory order
    if flat.strides[0] < flat.strides[1]:
        _average_columns(flat, window, out)
    else:
        _average_rows(flat, window, out)
    return out.reshape(y.shape)


@numba.njit(nogil=True, cache=True)
def _average_rows(y: np.ndarray, window: int, out: np.ndarray) -> None:
    """`moving_average` of 2-D y into out, a row at a time (inner loops run along contiguous rows).

    As numpy would: NaN adds 0 and no count, the sums accumulate in out's dtype in the window's
    order, and the counts are of out's dtype.
    """
    n, m = y.shape
    half = window // 2
    count = np.empty(m, out.dtype)
    zero, one = np.zeros(1, out.dtype)[0], np.ones(1, out.dtype)[0]  # typed: the loops stay in out's dtype
    for i in range(n):
        total = out[i]
        total[:] = zero
        count[:] = zero
        for j in range(max(i - half, 0), min(i + window - half, n)):
            row = y[j]
            for t in range(m):
                valid = row[t] == row[t]
                total[t] += row[t] if valid else zero
                count[t] += one if valid else zero
        row = y[i]
        for t in range(m):
            total[t] = total[t] / max(count[t], one) if row[t] == row[t] else np.nan


@numba.njit(nogil=True, cache=True)
def _average_columns(y: np.ndarray, window: int, out: np.ndarray) -> None:
    """`moving_average` of 2-D y into out, a column at a time (for columns contiguous in memory)."""
    n, m = y.shape
    half = window // 2
    for t in range(m):
        clean = True
        for i in range(n):
            clean &= y[i, t] == y[i, t]
        if clean:  # the same sums in the same order, without a NaN test per point
            for i in range(n):
                lo, hi = max(i - half, 0), min(i + window - half, n)
                out[i, t] = 0
                for j in range(lo, hi):
                    out[i, t] += y[j, t]
                out[i, t] /= max(hi - lo, 1)
            continue
        for i in range(n):
            if np.isnan(y[i, t]):
                out[i, t] = np.nan
                continue
            out[i, t] = 0
            count = 0
            for j in range(max(i - half, 0), min(i + window - half, n)):
                if not np.isnan(y[j, t]):
                    out[i, t] += y[j, t]
                    count += 1
            out[i, t] /= max(count, 1)


@numba.njit(nogil=True, cache=True)
def _descents(z: np.ndarray, tol, min_fall, complete: bool) -> np.ndarray:
    """Per column of z (ckpt, token): whether it falls >= min_fall (and below an earlier point) to a
    point, rises >= tol above it and, if `complete`, later falls >= tol below that peak; NaN points
    are skipped.

    A backward pass marks the points with a fall >= tol after them; a forward pass keeps, per
    column, the running maximum and the lowest point reached after a fall. All arithmetic is in
    z's dtype (tol is of z's dtype too), as numpy's; the loops run along contiguous rows.
    """
    n, m = z.shape
    falls_after = np.ones((n, m), np.bool_)
    if complete:
        lowest_after = z[n - 1].copy()
        for i in range(n - 1, -1, -1):
            row, falls = z[i], falls_after[i]
            for t in range(m):
                low = lowest_after[t]
                low = row[t] if (row[t] < low) | (low != low) else low  # fmin: NaN skipped
                lowest_after[t] = low
                falls[t] = row[t] - low >= tol
    highest = np.full(m, np.nan, z.dtype)
    lowest = np.full(m, np.inf, z.dtype)  # lowest point so far that lies >= min_fall below an earlier one
    found = np.zeros(m, np.bool_)
    for i in range(n):
        row, falls = z[i], falls_after[i]
        for t in range(m):
            high = highest[t]
            high = row[t] if (row[t] > high) | (high != high) else high  # fmax: NaN skipped
            highest[t] = high
            low = lowest[t]
            low = row[t] if (high - row[t] >= min_fall) & (row[t] < high) & (row[t] < low) else low
            lowest[t] = low
            found[t] |= (row[t] - low >= tol) & falls[t]
    return found


@numba.njit(nogil=True, cache=True)
def _smoothed_descents(y: np.ndarray, window: int, tol, min_fall, complete: bool) -> np.ndarray:
    """`_descents` of the `window`-point moving average of y (ckpt, token), C-contiguous."""
    smoothed = np.empty_like(y)
    _average_rows(y, window, smoothed)
    return _descents(smoothed, tol, min_fall, complete)


def _double_descent_flags(
    y: np.ndarray, tol: float, window: int = 1, complete: bool = True, min_fall: float | None = None
) -> np.ndarray:
    """Per trajectory along axis 0 of y (any other dims): the double-descent test of
    `detect_double_descent` after a `window`-point moving average, in y's float precision
    (float32 at least, as `moving_average`)."""
    dtype = np.result_type(y.dtype, np.float32)
    flat = np.ascontiguousarray(y.reshape(len(y), -1), dtype=dtype)
    fall = dtype.type(tol if min_fall is None else min_fall)
    return _smoothed_descents(flat, window, dtype.type(tol), fall, complete).reshape(y.shape[1:])


def detect_double_descent(
    curve: xr.DataArray,
    dim: str = "ckpt",
    tol: float = DESCENT_TOL,
    window: int = DESCENT_WINDOW,
    complete: bool = True,
    min_fall: float | None = None,
) -> xr.DataArray:
    """Per-trajectory double descent along `dim` (boolean; any other dims are kept).

    After a centred moving average over `window` points (1 = none), a trajectory is flagged when
    it falls by at least `min_fall` to some point, later rises at least `tol` above that point,
    and later still falls at least `tol` below that peak (docs/methods.md §1.3); defaults
    DESCENT_TOL and DESCENT_WINDOW. `tol` and `min_fall` are in the curve's units (nats for loss).
    min_fall: None = `tol`; 0 = any fall (the spec's literal rule, which also flags the early rise
    of a token's loss above its initial value while the model learns token frequencies). NaN
    points are skipped. complete=False drops the last condition: the double descents begun (fall,
    rise), of which the complete ones are a part.
    """
    _check_descent(window, tol, min_fall)
    if getattr(curve.data, "chunks", None) is not None:
        curve = curve.chunk({dim: -1})
    return xr.apply_ufunc(
        partial(over_token_slices, _double_descent_flags, slice_tokens=DESCENT_TOKENS),
        curve,
        input_core_dims=[[dim]],
        kwargs={"tol": tol, "window": window, "complete": complete, "min_fall": min_fall},
        dask="parallelized",
        output_dtypes=[bool],
    ).rename("double_descent")


def double_descent(
    ds: xr.Dataset,
    tol: float = DESCENT_TOL,
    window: int = DESCENT_WINDOW,
    chunk_mb: float = CHUNK_MB,
    complete: bool = True,
    min_fall: float | None = None,
) -> xr.DataArray:
    """Per-token double descent over each model's checkpoints: (model, token), lazy.

    See `detect_double_descent` for `tol` (nats), `window` (checkpoints), `complete` and `min_fall`. Each task
    takes the stored chunks of a token range in every checkpoint as they are (no rechunked copy
    of the loss) and copies DESCENT_TOKENS tokens at a time into the kernel's (ckpt, token) layout.
    chunk_mb: data per task for a loss held in memory (a store's loss keeps its chunks).
    """
    _check_descent(window, tol, min_fall)
    ds = load_small(ds)
    loss = ds["loss"].transpose("model", "ckpt", *TOKEN_DIMS)
    if loss.chunks is None:
        loss = chunk_tokens(loss.chunk(), chunk_mb)
    done = ds["done"].values if "done" in ds else np.ones(loss.shape[:2], bool)
    flags = da.blockwise(
        _descent_blocks,
        "mt",
        loss.data,
        "mct",
        da.from_array(done, chunks=loss.chunks[:2]),
        "mc",
        concatenate=False,
        dtype=bool,
        meta=np.array((), dtype=bool),
        tol=tol,
        window=window,
        complete=complete,
        min_fall=tol if min_fall is None else min_fall,
    )
    coords = {name: coord for name, coord in loss.coords.items() if "ckpt" not in coord.dims}
    flags = xr.DataArray(flags, dims=("model", *TOKEN_DIMS), coords=coords, name="double_descent")
    return describe(flags & valid_tokens(ds), "token's loss shows double descent")


def _descent_blocks(
    blocks: list[np.ndarray], done: list[np.ndarray], tol: float, window: int, complete: bool, min_fall: float
) -> np.ndarray:
    """`detect_double_descent` along the checkpoints of (model, ckpt, token) blocks, one per chunk of
    checkpoints; NaN at checkpoints not `done` (the blocks of the done flags, (model, ckpt))."""
    n_model, _, n_token = blocks[0].shape
    dtype = np.result_type(blocks[0].dtype, np.float32)
    ends = np.cumsum([0] + [block.shape[1] for block in blocks])
    y = np.empty((ends[-1], min(DESCENT_TOKENS, n_token)), dtype)
    out = np.empty((n_model, n_token), bool)
    for m in range(n_model):
        missing = ~np.concatenate([d[m] for d in done])
        for first in range(0, n_token, DESCENT_TOKENS):
            part = y[:, : min(DESCENT_TOKENS, n_token - first)]
            for block, start, stop in zip(blocks, ends[:-1], ends[1:]):
                assign(part[start:stop], block[m, :, first : first + part.shape[1]])
            part[missing] = np.nan
            part = np.ascontiguousarray(part)
            out[m, first : first + part.shape[1]] = _smoothed_descents(
                part, window, dtype.type(tol), dtype.type(min_fall), complete
            )
    return out


def token_share(ds: xr.Dataset, mask: xr.DataArray) -> xr.DataArray:
    """Percentage of the valid tokens where `mask` holds, over the tokens. Computed."""
    valid = valid_tokens(ds)
    share = (100 * (mask & valid).sum(TOKEN_DIMS) / valid.sum(TOKEN_DIMS)).compute()
    return describe(share, "share of valid tokens", "%")


# --- cross-size agreement --------------------------------------------------------------------------


def _drop_blocks(grid: xr.DataArray, axis: str) -> Iterator[np.ndarray]:
    """(model, token) float64 loss drops from the first level of `axis` to the second, a token chunk
    at a time (computed whole, dask would hold every chunk and their concatenation)."""
    drop = (grid.isel({axis: 0}) - grid.isel({axis: 1})).transpose("model", "token")
    step = max(drop.chunks[1]) if drop.chunks else drop.sizes["token"]
    for begin in range(0, drop.sizes["token"], step):
        yield drop.isel(token=slice(begin, begin + step)).values.astype(np.float64, copy=False)


def agreement(
    ds: xr.Dataset,
    levels: Sequence[float] | None = None,
    top: float = 0.1,
    axes: Sequence[str] = ("step", "tokens_seen"),
) -> pd.DataFrame:
    """Do the same tokens drop most in every model between two matched perplexities?

    For each model, the per-token loss drop = loss at levels[0] - loss at levels[1] (validation
    perplexities, levels[0] > levels[1]; default: the points 10% and 90% of the way through the
    common perplexity range in log). For every pair of models: Spearman rank correlation of the
    drops, and the Jaccard overlap of their top `top` tokens by drop (a fraction of the tokens if
    < 1, else a count), with `jaccard_chance` = what independent choices would give.
    The same numbers follow at matched steps (and tokens seen, where known): the two levels on
    those axes are the mean over models of where each model reaches the two perplexities, and
    every model is read there (a model that does not span them gives NaN for its pairs).
    Returns a tidy table: axis, from_level, to_level, model_a, model_b, n_tokens, top_k,
    spearman, jaccard, jaccard_chance, and `as_at_val_ppl`: both models read both levels of this
    axis and of matched perplexity between the same two checkpoints, so the pair's drops rank as at
    matched perplexity by construction (no evidence either way).
    """
    ds = load_small(ds)
    if levels is None:
        high, low = perplexity_range(ds)
        levels = [high * (low / high) ** 0.1, high * (low / high) ** 0.9]
    levels = np.asarray(levels, dtype=float)
    if levels.shape != (2,) or not levels[0] > levels[1]:
        raise TokendynError("agreement needs two perplexity levels, the higher first (e.g. levels=[100, 50])")
    models = [str(name) for name in ds["model"].values]
    valid = valid_tokens(ds)
    matched = {"val_ppl": levels}
    for axis in axes:
        try:
            matched[axis] = np.nanmean(reach(ds, "val_ppl", levels, of=axis).values, axis=0)
        except TokendynError:
            continue  # tokens seen unknown: that comparison is left out
    rows, by_plan = [], {}
    at_ppl = _one_interval(_interpolation(ds, "val_ppl", levels))
    for axis, pair in matched.items():
        plans = _interpolation(ds, axis, pair)
        # Axes read at the same checkpoints with the same weights (tokens seen a constant times the
        # step, as in most suites) have the same drops: computed and ranked once.
        plan = tuple(np.asarray(v).tobytes() for per_model in plans for v in per_model)
        if plan not in by_plan:
            by_plan[plan] = pair_statistics(_drop_blocks(at_axis(ds, axis, pair).where(valid), axis), models, top)
        # A model reading both levels of both axes between the same two checkpoints has drops that are
        # fractions of that one interval's drop on both: the pair ranks alike there by construction.
        here = _one_interval(plans)
        alike = {m: at_ppl[i] is not None and at_ppl[i] == here[i] for i, m in enumerate(models)}
        for row in by_plan[plan]:
            same = axis != "val_ppl" and alike[row["model_a"]] and alike[row["model_b"]]
            rows.append({"axis": axis, "from_level": pair[0], "to_level": pair[1], **row, "as_at_val_ppl": same})
    return pd.DataFrame(rows)


def _one_interval(plans: list[tuple]) -> list[tuple[int, int] | None]:
    """Per model: the (lo, hi) checkpoints when it reaches both levels between the same two, else None."""
    return [
        (int(lo[0]), int(hi[0])) if reachable.all() and lo[0] == lo[1] and hi[0] == hi[1] else None
        for lo, hi, _, reachable in plans
    ]

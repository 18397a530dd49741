"""Matched perplexity and x axes, subset curves, the double-descent detector and cross-size agreement
(methods.md §1.1, §1.3), on planted stores and against direct numpy computations."""

from __future__ import annotations

import numba
import numpy as np
import pytest
import scipy.stats
import xarray as xr

from planted_stores import KINDS, TOKENS_PER_STEP, write_store
from tokendyn.analysis.compiled import as_float16, assign
from tokendyn.analysis.trajectories import (
    _double_descent_flags,
    _interpolate_blocks,
    _interpolation,
    agreement,
    at_axis,
    at_perplexity,
    detect_double_descent,
    double_descent,
    moving_average,
    perplexity_grid,
    subset_curve,
    x_axis,
)
from tokendyn.errors import TokendynError


@pytest.fixture(scope="module")
def planted(planted_store):
    return planted_store  # the shared planted store (conftest.py)


def test_x_axes(planted):
    ds, _ = planted
    steps = ds["step"].values
    assert np.array_equal(x_axis(ds, "step").values, steps, equal_nan=True)
    flops = 6 * ds["n_params"].values[:, None] * steps * TOKENS_PER_STEP
    np.testing.assert_allclose(x_axis(ds, "flops").values, flops)
    np.testing.assert_allclose(x_axis(ds, "flops", params="n_params_nonembed").values, flops / 2)
    assert x_axis(ds, "flops").attrs == {"long_name": "training compute, 6 N D", "units": "FLOP", "params": "n_params"}
    assert all(x_axis(ds, a).attrs["long_name"] for a in ("step", "tokens_seen", "val_ppl"))
    with pytest.raises(TokendynError, match="unknown x axis"):
        x_axis(ds, "epochs")


def test_sizes_coincide_at_matched_perplexity_not_at_matched_step(planted):
    ds, truth = planted
    grid = at_perplexity(ds, n_levels=8)
    assert grid.dims == ("model", "val_ppl", "token")
    loss = grid.values
    valid = truth["kind"] >= 0
    assert np.isfinite(loss[..., valid]).all()
    at_ppl = np.abs(loss[0] - loss[2])[:, valid].mean()
    by_step = at_axis(ds, "step", np.linspace(2000, 10000, 8)).values
    at_step = np.abs(by_step[0] - by_step[2])[:, valid].mean()
    assert at_ppl < 0.03 < 0.3 < at_step
    # The larger model reaches each perplexity at an earlier step.
    reached = grid["step"].values
    assert (reached[2, 1:] < reached[0, 1:]).all()


def test_interpolation_is_linear_in_log_ppl_on_the_envelope(tmp_path):
    # val_ppl = exp(mean loss) of one token per sequence: 100, 50, 60 (worse), 20, 25 (worse), 10.
    ppl = np.array([100, 50, 60, 20, 25, 10.0])
    loss = np.full((1, 6, 3, 2), np.nan)
    loss[0, :, :, 1] = np.log(ppl)[:, None] + np.array([0.0, 0.3, -0.3])  # per-seq offsets cancel in the mean
    ds = write_store(tmp_path / "s.zarr", loss, np.array([[1, 2, 3, 4, 5, 6.0]]))
    stored_ppl, stored_loss = ds["val_ppl"].values[0], ds["loss"].values[0]  # one stored token per sequence
    np.testing.assert_allclose(stored_ppl, ppl, rtol=1e-5)
    levels = np.array([150, stored_ppl[0], 70, 55, 30, 22, 12, stored_ppl[5], 9])
    got = at_perplexity(ds, levels).values[0]
    envelope = [0, 1, 3, 5]  # checkpoints that set a new running minimum
    reachable = np.array([False] + [True] * 7 + [False])
    for s in range(3):
        expected = np.interp(-np.log(levels), -np.log(stored_ppl[envelope]), stored_loss[envelope, s])
        np.testing.assert_allclose(got[reachable, s], expected[reachable], rtol=1e-6)
        assert np.isnan(got[~reachable, s]).all()


def test_levels_not_reached_by_every_model_are_missing(tmp_path):
    loss = np.zeros((2, 3, 2, 3))
    loss[0] = np.log([[[50.0]], [[30.0]], [[20.0]]])
    loss[1] = np.log([[[40.0]], [[10.0]], [[5.0]]])
    ds = write_store(tmp_path / "s.zarr", loss, np.array([[1, 2, 3], [1, 2, 3.0]]))
    grid = perplexity_grid(ds, 3)
    np.testing.assert_allclose(grid, [40, np.sqrt(40 * 20), 20], rtol=1e-5)
    got = at_perplexity(ds, [45, 8]).values[:, :, 0]
    assert np.isfinite(got[0, 0]) and np.isnan(got[1, 0]) and np.isnan(got[0, 1]) and np.isfinite(got[1, 1])
    loss[1] = np.log([[[15.0]], [[10.0]], [[5.0]]])
    ds = write_store(tmp_path / "t.zarr", loss, np.array([[1, 2, 3], [1, 2, 3.0]]))
    with pytest.raises(TokendynError, match="no validation perplexity is reached by every model"):
        perplexity_grid(ds)


@pytest.mark.filterwarnings("ignore:Mean of empty slice")  # missing checkpoints of the smaller models
def test_subset_curve_matches_numpy(planted):
    ds, truth = planted
    mask = ds["token_id"].isin([40, 41, 42])  # the planted upward tokens
    curve = subset_curve(ds, mask)
    loss = ds["loss"].values
    expected = np.exp(np.nanmean(np.where(mask.values, loss, np.nan), axis=-1))
    np.testing.assert_allclose(curve.values, expected, rtol=1e-5)
    assert "val_ppl" in curve.coords and curve.dims == ("model", "ckpt")
    # Upward tokens rise as validation perplexity falls.
    done = np.isfinite(curve.values[2])
    assert np.all(np.diff(curve.values[2][done]) > 0)


@pytest.mark.parametrize(
    "curve,expected",
    [
        ([3, 2, 1, 2, 3, 2, 1], True),  # fall, rise, fall
        ([3, 2, 1, 2, 3, 3, 3], False),  # fall and rise only
        ([1, 2, 3, 2, 1, 1, 1], False),  # rise then fall, no first descent
        ([3, 2, 1, 1.2, 1.4, 1.2, 1], False),  # rise below the tolerance
        ([3, 2, 1, np.nan, 3, 2, 1], True),  # a missing point is skipped
    ],
)
def test_falls_rises_falls(curve, expected):
    assert bool(_double_descent_flags(np.array(curve, float), tol=0.5)) is expected


def test_planted_double_descent_is_detected(planted):
    ds, truth = planted
    flags = double_descent(ds).values
    kind = truth["kind"]
    dd = kind == KINDS.index("double_descent")
    assert not flags[0, dd].any()  # the small model stops at the peak: no second descent
    assert flags[1:, dd].all()
    assert not flags[:, (kind >= 0) & ~dd].any()


def test_detector_smoothing_removes_single_point_noise():
    noisy = xr.DataArray(np.array([3, 2, 1, 1.8, 1, 0.9, 0.8]), dims="ckpt")
    assert bool(detect_double_descent(noisy, tol=0.5, window=1))
    assert not bool(detect_double_descent(noisy, tol=0.5, window=3))


def _numpy_moving_average(y, window):
    """The moving average written with numpy, a shifted slice at a time."""
    n, half = len(y), window // 2
    dtype = np.result_type(y.dtype, np.float32)
    total, count = np.zeros(y.shape, dtype), np.zeros(y.shape, dtype)
    valid = ~np.isnan(y)
    values = np.where(valid, y, 0)
    for offset in range(-half, window - half):
        source = slice(max(offset, 0), n + min(offset, 0))
        target = slice(max(-offset, 0), n - max(offset, 0))
        total[target] += values[source]
        count[target] += valid[source]
    return np.where(valid, total / np.maximum(count, 1), np.nan)


def _numpy_double_descent(y, tol, complete, min_fall=None):
    """The detector written with numpy accumulations along axis 0."""
    lowest_after = np.fmin.accumulate(y[::-1], axis=0)[::-1]
    fall = np.fmax.accumulate(y, axis=0) - y
    after_fall = (fall >= (tol if min_fall is None else min_fall)) & (fall > 0)
    peaks = y - np.fmin.accumulate(np.where(after_fall, y, np.inf), axis=0) >= tol
    return (peaks & (y - lowest_after >= tol)).any(axis=0) if complete else peaks.any(axis=0)


def _random_walks(dtype):
    """Trajectories (ckpt, token) that fall, rise and fall by chance, with NaN checkpoints and tokens."""
    rng = np.random.default_rng(0)
    y = np.cumsum(rng.normal(0, 0.4, (30, 3000)), axis=0).astype(dtype)
    y[rng.random(y.shape) < 0.1] = np.nan
    y[:, :5] = np.nan
    return y


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("window", [1, 2, 3, 5])
def test_moving_average_equals_numpy_in_every_layout(dtype, window):
    y = _random_walks(dtype)
    expected = _numpy_moving_average(y, window)
    np.testing.assert_array_equal(moving_average(y, window), expected)
    by_token = np.ascontiguousarray(y.T)  # (token, ckpt) seen as (ckpt, token): the columns are contiguous
    np.testing.assert_array_equal(moving_average(by_token.T, window), expected)
    np.testing.assert_array_equal(moving_average(y.reshape(30, 3, 1000), window), expected.reshape(30, 3, 1000))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("tol", [0.5, 0.3, 1.1])
def test_double_descent_kernel_equals_numpy(dtype, tol):
    y = _random_walks(dtype)
    for window in (1, 3):
        smoothed = _numpy_moving_average(y, window)
        complete = _numpy_double_descent(smoothed, tol, complete=True)
        assert 0 < complete.sum() < complete.size  # the test sees both outcomes
        flags = detect_double_descent(xr.DataArray(y, dims=("ckpt", "token")), tol=tol, window=window)
        np.testing.assert_array_equal(flags.values, complete)
        begun = detect_double_descent(xr.DataArray(y, dims=("ckpt", "token")), tol=tol, window=window, complete=False)
        np.testing.assert_array_equal(begun.values, _numpy_double_descent(smoothed, tol, complete=False))
    unsmoothed = y.astype(smoothed.dtype)  # window 1: the test on the points themselves
    np.testing.assert_array_equal(_double_descent_flags(y, tol), _numpy_double_descent(unsmoothed, tol, True))
    np.testing.assert_array_equal(
        _double_descent_flags(y, tol, complete=False), _numpy_double_descent(unsmoothed, tol, False)
    )


@pytest.mark.parametrize("min_fall", [0.0, 0.2, 1.1])
def test_double_descent_with_its_own_first_fall_equals_numpy(min_fall):
    y = _random_walks(np.float32)
    flags = detect_double_descent(xr.DataArray(y, dims=("ckpt", "token")), tol=0.5, window=3, min_fall=min_fall)
    expected = _numpy_double_descent(_numpy_moving_average(y, 3), 0.5, True, min_fall)
    assert (expected != _numpy_double_descent(_numpy_moving_average(y, 3), 0.5, True)).any()  # the parameter counts
    np.testing.assert_array_equal(flags.values, expected)


def test_first_fall_is_min_fall_deep():
    """docs/methods.md §1.3: min_fall bounds the first fall (default tol); 0 accepts any fall, not a plateau."""
    curves = np.array([[5.0, 4.8, 5.5, 4.0], [5.0, 5.0, 5.5, 4.0], [5.6, 5.0, 5.5, 4.0]]).T  # falls 0.2, 0, 0.6
    found = [
        detect_double_descent(
            xr.DataArray(curves, dims=("ckpt", "token")), tol=0.5, window=1, min_fall=f
        ).values.tolist()
        for f in (None, 0.0)
    ]
    assert found == [[False, False, True], [True, False, True]]


def test_double_descent_of_a_store_equals_numpy(planted):
    ds, _ = planted
    assert not ds["done"].values.all()  # missing checkpoints are skipped, not read as losses
    loss = ds["loss"].where(ds["done"]).values  # (model, ckpt, token)
    for tol, window, fall in ((0.5, 3, None), (0.2, 1, None), (0.3, 2, None), (0.5, 3, 0.0)):
        expected = [_numpy_double_descent(_numpy_moving_average(y, window), tol, True, fall) for y in loss]
        np.testing.assert_array_equal(double_descent(ds, tol=tol, window=window, min_fall=fall).values, expected)


def _reference_pairs(a, b, top):
    both = np.isfinite(a) & np.isfinite(b)
    a, b = a[both], b[both]
    k = round(top * len(a))
    top_a = set(np.argsort(-a, kind="stable")[:k])
    top_b = set(np.argsort(-b, kind="stable")[:k])
    return scipy.stats.spearmanr(a, b).statistic, len(top_a & top_b) / len(top_a | top_b)


def test_agreement_matched_perplexity_beats_matched_step(planted):
    ds, _ = planted
    table = agreement(ds, levels=[50, 32], top=0.1)
    assert set(table["axis"]) == {"val_ppl", "step", "tokens_seen"}
    by_axis = table.groupby("axis")[["spearman", "jaccard"]].min()
    assert by_axis.loc["val_ppl", "spearman"] > 0.95 and by_axis.loc["val_ppl", "jaccard"] > 0.8
    assert by_axis.loc["step", "spearman"] < by_axis.loc["val_ppl", "spearman"] - 0.2
    # The numbers are the plain Spearman and Jaccard of the drops between the two levels.
    grid = at_perplexity(ds, [50, 32]).values
    drops = (grid[:, 0] - grid[:, 1]).reshape(3, -1)
    row = table[(table["axis"] == "val_ppl") & (table["model_a"] == "small") & (table["model_b"] == "large")].iloc[0]
    spearman, jaccard = _reference_pairs(drops[0], drops[2], 0.1)
    assert row["spearman"] == pytest.approx(spearman) and row["jaccard"] == pytest.approx(jaccard)
    # Matched steps: the mean over models of where each reaches the two levels.
    reached = at_perplexity(ds, [50, 32])["step"].values
    step_row = table[table["axis"] == "step"].iloc[0]
    assert [step_row["from_level"], step_row["to_level"]] == pytest.approx(reached.mean(axis=0))


def _as_float16_store(ds: xr.Dataset) -> xr.Dataset:
    """The store's loss in float16, in token chunks of 64 as dask hands a float16 store's chunks."""
    return ds.assign(loss=ds["loss"].astype(np.float16).chunk({"model": 1, "ckpt": 1, "token": 64}))


def test_float16_stores_give_numpys_numbers(planted):
    """The compiled kernels read float16 as its bits: the same numbers numpy computes from the float16 values."""
    ds = _as_float16_store(planted[0])
    loss = ds["loss"].values  # float16 (model, ckpt, token)
    levels = perplexity_grid(ds, 7)
    lo, hi, weight, reachable = (np.stack(part) for part in zip(*_interpolation(ds, "val_ppl", levels)))
    for m, level in np.ndindex(lo.shape):
        a, b = loss[m, lo[m, level]], loss[m, hi[m, level]]
        expected = a + weight[m, level : level + 1] * (b - a) if reachable[m, level] else np.full(a.shape, np.nan)
        np.testing.assert_array_equal(at_perplexity(ds, levels).values[m, level], expected)
    mask = ds["token_id"].isin([40, 41, 42])
    members = np.where(mask.values, loss.astype(np.float32), np.nan)
    expected = np.exp(np.nansum(members, axis=-1, dtype=np.float64) / np.isfinite(members).sum(-1))
    np.testing.assert_allclose(subset_curve(ds, mask).values, expected, rtol=1e-12)
    done = np.where(ds["done"].values[..., None], loss.astype(np.float32), np.nan)
    for tol, window in ((0.5, 3), (0.2, 1)):
        expected = [_numpy_double_descent(_numpy_moving_average(y, window), tol, True) for y in done]
        np.testing.assert_array_equal(double_descent(ds, tol=tol, window=window).values, expected)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_interpolation_kernel_equals_numpy(dtype):
    """b - a in the stored dtype (float16 rounds it), then a + weight (b - a) in float64, as numpy does."""
    rng = np.random.default_rng(6)
    blocks = [(rng.uniform(0, 12, (2, 4, 5000)) * 10.0 ** rng.integers(-4, 1, (2, 4, 5000))).astype(dtype)]
    blocks[0][0, 1, ::9] = np.nan
    lo, hi = np.array([[0, 1, 2], [1, 0, 3]]), np.array([[1, 3, 3], [2, 2, 3]])
    weight, reachable = rng.uniform(0, 1, (2, 3)), np.array([[True, True, False], [True, True, True]])
    got = _interpolate_blocks(blocks, lo, hi, weight, reachable)
    for m, level in np.ndindex(lo.shape):
        a, b = blocks[0][m, lo[m, level]], blocks[0][m, hi[m, level]]
        expected = a + weight[m, level : level + 1] * (b - a) if reachable[m, level] else np.full(a.shape, np.nan)
        np.testing.assert_array_equal(got[m, level], expected)


def test_moving_average_of_rows_without_nan_equals_numpy():
    y = np.cumsum(np.random.default_rng(1).normal(0, 0.4, (30, 500)), axis=0).astype(np.float32)
    for window in (1, 2, 3, 5):
        np.testing.assert_array_equal(moving_average(y, window), _numpy_moving_average(y, window))


def test_float16_rounding_and_assignment_match_numpy():
    values = np.random.default_rng(3).standard_normal(200_000).astype(np.float32)
    values *= np.float32(10.0) ** np.random.default_rng(4).integers(-9, 6, values.size).astype(np.float32)
    values[:6] = [np.nan, np.inf, -np.inf, 65519.99, 65520, 2.98e-8]  # overflow and the smallest subnormal
    rounded = _rounded_to_float16(values)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(rounded, values.astype(np.float16).astype(np.float32))
    block = np.random.default_rng(5).uniform(0, 9, (3, 20, 300)).astype(np.float16)
    block[0, 4, ::7] = np.nan
    out = np.zeros((20, 400), np.float32)
    assign(out[:, 50:250], block[0, :, 100:300])  # strided views on both sides
    np.testing.assert_array_equal(out[:, 50:250], block[0, :, 100:300].astype(np.float32))
    assert not out[:, :50].any() and not out[:, 250:].any()


@numba.njit
def _rounded_to_float16(values):
    out = np.empty_like(values)
    for i in range(len(values)):
        out[i] = as_float16(values[i])
    return out

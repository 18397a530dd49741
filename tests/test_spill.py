"""Per-token results kept out of memory (`tokendyn.analysis.spill`): the exact median, mean and
histogram of values seen in parts equal numpy's on the values whole; results written a token window
at a time and spilled to a temporary store read back equal to the computation."""

from __future__ import annotations

import gc

import dask.array as da
import numpy as np
import pytest
import xarray as xr

from tokendyn.analysis.spill import Summary, filled, nanmedian, prepared, spill, token_windows, write_by_windows


def _summary(values: np.ndarray, parts: int, edges: np.ndarray | None = None) -> Summary:
    summary = Summary()
    for part in np.array_split(values, parts):
        summary.add(part)
    for part in np.array_split(values, parts):
        summary.refine(part, edges)
    return summary


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 1001])
@pytest.mark.parametrize("parts", [1, 3])
def test_median_mean_and_histogram_equal_numpy(n, parts):
    rng = np.random.default_rng(n)
    values = rng.normal(0, 3, n).astype(np.float32)
    values[rng.random(n) < 0.1] = np.nan
    values[: n // 4] = np.round(values[: n // 4])  # ties, and -0.0 beside 0.0
    if n > 5:
        values[3] = -0.0
    finite = values[np.isfinite(values)]
    edges = np.histogram_bin_edges(finite, 7) if len(finite) else np.array([0.0, 1.0])
    summary = _summary(values, parts, edges)
    if not len(finite):
        assert np.isnan(summary.mean())
        return
    assert summary.median() == np.nanmedian(values)
    assert summary.median().dtype == np.nanmedian(values).dtype
    assert summary.mean() == pytest.approx(np.nanmean(values), rel=1e-6)
    np.testing.assert_array_equal(summary.counts, np.histogram(finite, edges)[0])
    assert summary.n_finite == len(finite)


def test_median_of_extreme_and_infinite_values():
    values = np.array([np.inf, -np.inf, 3e38, -3e38, 1e-45, -1e-45, np.nan, 5.0, np.inf, np.inf], np.float32)
    for cut in range(1, len(values) + 1):
        median = _summary(values[:cut], 2).median()
        assert median == np.nanmedian(values[:cut]) or np.isnan(median) and np.isnan(np.nanmedian(values[:cut]))


def test_written_and_spilled_results_read_back_equal(tmp_path):
    values = np.arange(3 * 1000, dtype=np.float32).reshape(3, 1000)
    lazy = xr.Dataset(
        {"a": (("model", "token"), da.from_array(values, chunks=(1, 128))), "b": (("model",), np.arange(3))},
        coords={"token_id": ("token", np.arange(1000))},  # a token coordinate stays with the store: dropped
    )
    write_by_windows(prepared(lazy, "x"), tmp_path / "out.zarr", "g")
    back = xr.open_zarr(tmp_path / "out.zarr", group="g")
    np.testing.assert_array_equal(back["a"].values, values)
    np.testing.assert_array_equal(back["b"].values, np.arange(3))
    assert "token_id" not in back.variables
    spilled = spill(lazy)
    np.testing.assert_array_equal(np.concatenate([w["a"].values for w in token_windows(spilled)], axis=1), values)
    folder = spilled.encoding["tokendyn_spilled"][0].parent
    assert folder.is_dir()
    del spilled, back
    gc.collect()
    assert not folder.exists()  # the temporary store goes with the dataset


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_nanmedian_of_a_lazy_array_equals_numpy(dtype):
    rng = np.random.default_rng(3)
    values = rng.gamma(2, 2, (2, 3, 1001)).astype(dtype)
    values[..., rng.random(1001) < 0.05] = np.nan
    lazy = xr.DataArray(da.from_array(values, chunks=(1, 1, 100)), dims=("which", "model", "token"))
    median = nanmedian(lazy)
    assert median == np.nanmedian(values) and median.dtype == np.nanmedian(values).dtype


def test_filled_equals_the_computed_array_and_keeps_coordinates_lazy():
    values = np.arange(2 * 1000, dtype=np.int8).reshape(1000, 2)
    token_id = xr.DataArray(da.arange(1000, chunks=300), dims="token")
    lazy = xr.DataArray(da.from_array(values, chunks=(300, 1)), dims=("token", "model"), coords={"token_id": token_id})
    out = filled(lazy)
    assert isinstance(out.data, np.ndarray) and out["token_id"].chunks is not None
    np.testing.assert_array_equal(out.values, values)

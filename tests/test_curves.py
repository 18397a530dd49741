"""Per-token curve measures (methods.md §5) against direct numpy/scipy computations and planted curves."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize

from planted_stores import flat, write_store
from tokendyn.analysis.labels import flag_names
from tokendyn.analysis.curves import (RHO1_CLASSES, age_of_acquisition, cartography, curve_measures, final_loss,
                             forgettability, rho1_classes)


@pytest.fixture(scope="module")
def random_store(tmp_path_factory):
    """Two models, the first with only 5 of 7 checkpoints."""
    rng = np.random.default_rng(3)
    loss = rng.uniform(0.5, 4, (2, 7, 4, 6))
    steps = np.array([[0, 10, 20, 40, 80, np.nan, np.nan], [0, 10, 20, 40, 80, 160, 320]])
    return write_store(tmp_path_factory.mktemp("curves") / "r.zarr", loss, steps)


def _done_loss(ds, m):
    steps = ds["step"].values[m]
    return ds["loss"].values[m][np.isfinite(steps)]


def test_final_loss_and_variability(random_store):
    ds = random_store
    out = final_loss(ds, last=3)
    for m in range(2):
        last = _done_loss(ds, m)[-3:]
        np.testing.assert_allclose(out["final_loss"].values[m], last.mean(axis=0), rtol=1e-5)
        np.testing.assert_allclose(out["final_variability"].values[m], last.std(axis=0), rtol=1e-5, atol=1e-7)


def test_forgettability(random_store):
    ds = random_store
    got = forgettability(ds, window=3).values
    for m in range(2):
        y = _done_loss(ds, m)
        smooth = np.array([y[max(0, i - 1): i + 2].mean(axis=0) for i in range(len(y))])
        expected = np.clip(np.diff(smooth, axis=0), 0, None).sum(axis=0)
        np.testing.assert_allclose(got[m], expected, rtol=1e-5)


def test_cartography(random_store):
    ds = random_store
    out = cartography(ds)
    for m in range(2):
        p = np.exp(-_done_loss(ds, m).astype(np.float64))
        np.testing.assert_allclose(out["confidence"].values[m], p.mean(axis=0), rtol=1e-5)
        np.testing.assert_allclose(out["variability"].values[m], p.std(axis=0), rtol=1e-5)


def test_rho1_classes(random_store):
    ds = random_store
    labels = rho1_classes(ds, threshold=2.0)
    codes = labels.values
    for m in range(2):
        y = _done_loss(ds, m)
        high_a, high_b = y[0] > 2.0, y[-1] > 2.0
        expected = np.select([high_a & high_b, ~high_a & high_b, high_a & ~high_b], [0, 1, 2], 3)
        assert np.array_equal(codes[m], expected)
    assert flag_names(labels) == RHO1_CLASSES
    default = rho1_classes(ds)
    pooled = np.concatenate([_done_loss(ds, m)[[0, -1]].ravel() for m in range(2)])
    assert default.attrs["threshold"] == pytest.approx(np.median(pooled), rel=1e-6)


def _sigmoid(x, k, x0, lo, chance):
    return lo + (chance - lo) / (1 + np.exp(k * (x - x0)))


def test_age_of_acquisition_recovers_planted_midpoints(tmp_path):
    rng = np.random.default_rng(4)
    steps = np.concatenate([[0], np.geomspace(10, 1e5, 25)])
    x = np.log10(steps[1:])
    n_seq, n_pos, chance = 4, 9, 6.0
    x0 = rng.uniform(2.0, 4.0, (n_seq, n_pos))
    k = rng.uniform(2, 6, (n_seq, n_pos))
    lo = rng.uniform(0.5, 2.5, (n_seq, n_pos))
    curves = _sigmoid(x[:, None, None], k, x0, lo, chance) + rng.normal(0, 0.03, (len(x), n_seq, n_pos))
    loss = np.concatenate([np.full((1, n_seq, n_pos), 99.0), curves])[None]  # step 0 is ignored
    loss[0, :, 0, 1] = np.linspace(1, 3, 26)  # rising: never acquired
    loss[0, :, 0, 2] = chance + 0.5  # never below chance
    ds = write_store(tmp_path / "aoa.zarr", loss, steps[None])
    got = age_of_acquisition(ds, chance=chance).values[0]  # (token,): the grid's positions 1.. of every row
    ok = np.ones((n_seq, n_pos), bool)
    ok[0, 1] = ok[0, 2] = False
    assert np.abs(got[flat(ok)] - flat(x0)[flat(ok)]).max() < 0.05
    assert np.isnan(got[:2]).all()
    # The same least-squares problem solved token by token with scipy.
    for s, t in [(1, 1), (2, 5), (3, 8)]:
        token = s * (n_pos - 1) + t - 1
        y = ds["loss"].values[0, 1:, token]
        (_, ref_x0, _), _ = scipy.optimize.curve_fit(lambda x, k, x0, lo: _sigmoid(x, k, x0, lo, chance), x, y,
                                                     p0=[3, 3, 1.5])
        assert got[token] == pytest.approx(ref_x0, abs=1e-3)


def test_curve_measures_gathers_everything(random_store):
    out = curve_measures(random_store, last=2)
    assert set(out.data_vars) == {"final_loss", "final_variability", "age_of_acquisition", "forgettability",
                                  "confidence", "variability"}
    assert all(out[name].dims == ("model", "token") for name in out.data_vars)

"""Per-token curve measures (methods.md §5) against direct numpy/scipy computations and planted curves."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import scipy.optimize

import aoa_numpy
from planted_stores import flat, write_store
from tokendyn.analysis.curves import (
    MEASURES,
    RHO1_CLASSES,
    _exp32,
    _measures,
    _rows,
    _sigmoid_midpoint,
    _solve3,
    _upward_moves,
    age_of_acquisition,
    cartography,
    curve_measures,
    final_loss,
    forgettability,
    rho1_classes,
    uniform_loss,
)
from tokendyn.analysis.labels import flag_names, label_share


@pytest.fixture(scope="module")
def random_store(tmp_path_factory):
    """Two models, the first with only 5 of 7 checkpoints."""
    rng = np.random.default_rng(3)
    loss = rng.uniform(0.5, 4, (2, 7, 4, 6))
    steps = np.array([[0, 10, 20, 40, 80, np.nan, np.nan], [0, 10, 20, 40, 80, 160, 320]])
    return write_store(tmp_path_factory.mktemp("curves") / "r.zarr", loss, steps, vocab=[f"t{i}" for i in range(50)])


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
        smooth = np.array([y[max(0, i - 1) : i + 2].mean(axis=0) for i in range(len(y))])
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
        high_a, high_b = y[1] > 2.0, y[-1] > 2.0  # the first trained checkpoint (step 10) and the last
        expected = np.select([high_a & high_b, ~high_a & high_b, high_a & ~high_b], [0, 1, 2], 3)
        assert np.array_equal(codes[m], expected)
    assert flag_names(labels) == RHO1_CLASSES
    default = rho1_classes(ds)
    pooled = np.concatenate([_done_loss(ds, m)[[1, -1]].ravel() for m in range(2)])
    assert default.attrs["threshold"] == pytest.approx(np.median(pooled), rel=1e-6)
    assert default.attrs["first_step"] == [10, 10] and default.attrs["last_step"] == [80, 320]
    from_init = rho1_classes(ds, first=0, threshold=2.0).values  # step 0, asked for explicitly
    y = _done_loss(ds, 0)
    assert np.array_equal(from_init[0] == 2, (y[0] > 2.0) & (y[-1] <= 2.0))


def test_defaults_do_not_depend_on_step_0(tmp_path):
    """The same suite with and without its random-initialisation checkpoint: the same Rho-1 classes and
    threshold, the same chance level and ages of acquisition, the same default perplexity levels."""
    from tokendyn.analysis.trajectories import perplexity_range

    rng = np.random.default_rng(5)
    steps = np.array([[0, 10, 20, 40, 80, 160]] * 2, dtype=float)
    x = np.log10(np.maximum(steps[0], 1))
    falling = 1 + 3 / (1 + np.exp(4 * (x[:, None, None] - rng.uniform(1.2, 2, (1, 3, 8)))))
    kind = rng.integers(0, 4, (1, 3, 8))  # falling, flat high, flat low, rising
    trained = np.select(
        [kind == 0, kind == 1, kind == 2], [falling, 3.5 + 0 * falling, 1.2 + 0 * falling], 1.5 + 0.4 * x[:, None, None]
    )
    loss = np.stack([trained + rng.normal(0, 0.05, trained.shape) for _ in range(2)])
    loss[:, 0] = np.log(50) + rng.normal(0, 0.05, loss[:, 0].shape)  # random init: near uniform over 50 tokens
    vocab = [f"t{i}" for i in range(50)]
    with_init = write_store(tmp_path / "a.zarr", loss, steps, vocab=vocab)
    without = write_store(tmp_path / "b.zarr", loss[:, 1:], steps[:, 1:], vocab=vocab)
    assert uniform_loss(with_init) == uniform_loss(without) == pytest.approx(np.log(50))
    a, b = rho1_classes(with_init), rho1_classes(without)
    assert a.attrs["threshold"] == b.attrs["threshold"]
    np.testing.assert_array_equal(a.values, b.values)
    assert (label_share(a).values < 60).all()  # no class swallows the others ...
    from_init = label_share(rho1_classes(with_init, first=0)).sel(category="H->L").values
    assert (from_init > 70).all()  # ... as H->L does against random initialisation
    np.testing.assert_allclose(age_of_acquisition(with_init).values, age_of_acquisition(without).values)
    assert np.isfinite(age_of_acquisition(without).values).mean() > 0.1
    assert perplexity_range(with_init) == pytest.approx(perplexity_range(without))


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
        (_, ref_x0, _), _ = scipy.optimize.curve_fit(
            lambda x, k, x0, lo: _sigmoid(x, k, x0, lo, chance), x, y, p0=[3, 3, 1.5]
        )
        assert got[token] == pytest.approx(ref_x0, abs=1e-3)


def _scipy_midpoint(y, x, chance):
    """Per-token least squares with scipy from several starts; the best fit's x0 and sum of squares."""
    best = (np.nan, np.inf)
    for k0, x00 in itertools.product((1, 5, 30), np.linspace(x.min(), x.max(), 4)):
        try:
            params, _ = scipy.optimize.curve_fit(
                lambda x, k, x0, lo: _sigmoid(x, k, x0, lo, chance), x, y, p0=[k0, x00, y.min()], maxfev=2000
            )
        except RuntimeError:
            continue
        sse = float(((_sigmoid(x, *params, chance) - y) ** 2).sum())
        if sse < best[1]:
            best = (params[1], sse)
    return best


def _noisy_tokens(rng, n, n_ckpt=30, chance=10.8):
    """x and (ckpt, token) curves: sigmoids of every width, midpoint and floor with noise; 1/6 flat."""
    x = np.log10(np.geomspace(1000, 143000, n_ckpt))
    k, x0, lo = rng.uniform(1, 20, n), rng.uniform(3.1, 5.1, n), rng.uniform(0.5, 8, n)
    y = _sigmoid(x[:, None], k, x0, lo, chance) + rng.normal(0, 0.3, (len(x), n))
    y[:, : n // 6] = rng.uniform(1, 10, n // 6) + rng.normal(0, 0.5, (len(x), n // 6))  # flat: mostly no age
    return x, y


def test_compiled_fit_matches_scipy_token_by_token():
    """A few hundred noisy tokens (sigmoids of all widths and flat curves): the same optimum as scipy."""
    chance = 10.8
    x, y = _noisy_tokens(np.random.default_rng(7), 240, chance=chance)
    got = _sigmoid_midpoint(y, x, chance, n_iter=3)
    ref = np.array([_scipy_midpoint(y[:, t], x, chance)[0] for t in range(y.shape[1])])
    both = np.isfinite(got) & (ref > x.min()) & (ref < x.max())
    assert both.sum() > 150
    assert np.abs(got[both] - ref[both]).max() < 0.02
    assert np.median(np.abs(got[both] - ref[both])) < 1e-3


def test_curve_measures_gathers_everything(random_store):
    out = curve_measures(random_store, last=2)
    assert set(out.data_vars) == {
        "final_loss",
        "final_variability",
        "age_of_acquisition",
        "forgettability",
        "confidence",
        "variability",
    }
    assert all(out[name].dims == ("model", "token") for name in out.data_vars)


def test_curve_measures_in_one_pass_equal_the_separate_measures(random_store):
    """The fused kernel gives each measure's own function's numbers (model 0 has checkpoints not done)."""
    together = curve_measures(random_store, last=2, chance=5.0).compute()
    apart = [
        final_loss(random_store, last=2),
        age_of_acquisition(random_store, chance=5.0).to_dataset(),
        forgettability(random_store).to_dataset(),
        cartography(random_store),
    ]
    for measures in apart:
        for name, expected in measures.compute().data_vars.items():
            np.testing.assert_allclose(together[name].values, expected.values, rtol=1e-5, atol=1e-6, err_msg=name)


def test_compiled_fit_matches_the_numpy_vectorised_fit():
    """The same method as the numpy code it replaced (tests/aoa_numpy.py), float32 sums in another
    order: the same tokens with an age, the same ages to float32 rounding through three steps."""
    chance = 10.8
    x, y = _noisy_tokens(np.random.default_rng(11), 600, n_ckpt=50, chance=chance)
    y[5, 7] = np.nan  # a gap: no age
    got = _sigmoid_midpoint(y.astype(np.float16), x, chance, n_iter=3)
    ref = aoa_numpy.sigmoid_midpoint(y.astype(np.float16).astype(np.float32), x, chance, n_iter=3)
    assert np.isnan(got[7]) and np.isnan(ref[7])
    assert (np.isfinite(got) != np.isfinite(ref)).sum() <= 3  # at most a borderline token or so
    both = np.isfinite(got) & np.isfinite(ref)
    assert both.sum() > 400
    assert np.abs(got[both] - ref[both]).max() < 2e-3
    assert np.median(np.abs(got[both] - ref[both])) < 1e-5


def test_float16_rows_and_fast_exp():
    rng = np.random.default_rng(1)
    block = (rng.uniform(0, 12, (7, 33))).astype(np.float16)
    block[2, 3], block[4, 5], block[6, 1] = np.nan, np.inf, 65504
    columns = np.array([0, 2, 3, 6])
    np.testing.assert_array_equal(_rows(block, columns), block[columns].T.astype(np.float32))
    a = np.linspace(-87, 88, 20001, dtype=np.float32)
    got = np.array([_exp32(v) for v in a], dtype=np.float64)
    assert np.abs(got / np.exp(a.astype(np.float64)) - 1).max() < 2.5 * np.finfo(np.float32).eps


@pytest.mark.parametrize("fitted", [np.arange(1, 9), np.array([1, 2, 3, 5, 6, 7, 8])])
def test_fused_measures_across_gaps(fitted):
    """A block with checkpoints not done in the middle and tokens with NaN at done checkpoints: the fused
    kernel equals the numpy computations (means skip NaN; no rise across a gap), whether the fitted
    checkpoints are a run of the done ones or not."""
    rng = np.random.default_rng(9)
    loss = rng.uniform(0.5, 4, (12, 64)).astype(np.float32)
    done = np.array([0, 1, 2, 4, 5, 8, 9, 10, 11])
    loss[np.setdiff1d(np.arange(12), done)] = np.nan
    loss[[1, 9], 3] = np.nan
    loss[:, 5] = np.nan
    trained = done[fitted]
    x = np.log10(10.0 * np.arange(1, 13))[trained]
    got = _measures(loss[done].T, done, 4, fitted, x, chance=5.0, n_iter=3, window=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        prob = np.exp(-loss[done].astype(np.float64))
        expected = {
            "final_loss": np.nanmean(loss[done[-4:]], axis=0),
            "final_variability": np.nanstd(loss[done[-4:]], axis=0),
            "forgettability": _upward_moves(loss, 3),
            "confidence": np.nanmean(prob, axis=0),
            "variability": np.nanstd(prob, axis=0),
            "age_of_acquisition": _sigmoid_midpoint(loss[trained], x, 5.0, 3),
        }
    expected["forgettability"][5] = 0  # no loss at all: nothing rises (nansum)
    assert np.isfinite(expected["age_of_acquisition"]).sum() >= 3
    for name, values in expected.items():
        np.testing.assert_allclose(got[:, MEASURES.index(name)], values, rtol=1e-5, atol=1e-6, err_msg=name)


def test_a_model_without_done_checkpoints_has_no_measures(tmp_path):
    """A suite still being extracted: model 0 has no checkpoint done, model 1 only two trained ones."""
    rng = np.random.default_rng(3)
    steps = np.array([[np.nan] * 4, [0, 10, 20, np.nan]])
    ds = write_store(tmp_path / "s.zarr", rng.uniform(0.5, 4, (2, 4, 2, 5)), steps, vocab=[f"t{i}" for i in range(50)])
    out = curve_measures(ds).compute()
    for name in MEASURES:
        if name == "forgettability":
            assert (out[name].values[0] == 0).all()  # as from a curve of NaN: nothing rises
        else:
            assert np.isnan(out[name].values[0]).all()
    assert np.isfinite(out["final_loss"].values[1]).all() and np.isnan(out["age_of_acquisition"].values[1]).all()
    assert np.isnan(age_of_acquisition(ds).values).all()


def test_closed_form_solve_matches_lapack():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(50, 3, 3))
    a = a @ a.transpose(0, 2, 1) + 0.1 * np.eye(3)  # symmetric positive definite, like damped normal equations
    b = rng.normal(size=(50, 3))
    got = [_solve3(m[0, 0], m[0, 1], m[0, 2], m[1, 1], m[1, 2], m[2, 2], *v) for m, v in zip(a, b)]
    np.testing.assert_allclose(got, np.linalg.solve(a, b[..., None])[..., 0], rtol=1e-9, atol=1e-12)
    assert np.isnan(_solve3(1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 2.0, 3.0)).all()  # singular

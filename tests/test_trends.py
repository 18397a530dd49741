"""Trend categories (methods.md §1.2): closed-form OLS against scipy, planted trends, an independent
per-token implementation, step-0 handling, and a run under a worker memory cap smaller than the data."""

from __future__ import annotations

import warnings

import dask
import numpy as np
import pytest
import scipy.stats
import xarray as xr

from planted_stores import KINDS, planted_loss, write_store, write_tiled_store
from tokendyn.analysis.labels import label_mask, label_share, label_text
from tokendyn.analysis.trends import CATEGORIES, TrendWarning, _loss_and_ppl, ols, trend_categories, trend_fit
from tokendyn.errors import TokendynError


def test_ols_matches_linregress_on_random_trajectories():
    rng = np.random.default_rng(1)
    for n in (3, 7, 30):
        x = np.sort(rng.uniform(0, 5, n))
        y = rng.normal(size=(200, n)) + rng.normal(size=(200, 1)) * x  # slopes of every size
        slope, stderr, pvalue = ols(y, x)
        for i in range(len(y)):
            ref = scipy.stats.linregress(x, y[i])
            assert slope[i] == pytest.approx(ref.slope, rel=1e-9, abs=1e-12)
            assert stderr[i] == pytest.approx(ref.stderr, rel=1e-9, abs=1e-12)
            assert pvalue[i] == pytest.approx(ref.pvalue, rel=1e-7, abs=1e-12)


def test_ols_flat_trajectory_is_not_significant():
    slope, _, pvalue = ols(np.full((1, 6), 1.1), np.arange(6.0))
    assert slope[0] == 0 and pvalue[0] == 1


def test_a_perplexity_on_an_exact_line_is_a_trend():
    """Perplexity on a line, to rounding: the compiled kernel's standard error is 0 for many such
    tokens, so t = +-inf (`compiled.ols_t`), a trend with the line's sign, as `ols` has p-value 0."""
    rng = np.random.default_rng(0)
    n_tokens, steps = 400, np.arange(1.0, 8.0)
    slope = rng.uniform(-0.1, 0.1, n_tokens)
    ppl = rng.uniform(3, 5, n_tokens) + slope * np.arange(len(steps))[:, None]
    ds = xr.Dataset(
        {"loss": (("model", "ckpt", "token"), np.log(ppl)[None])}, coords={"step": (("model", "ckpt"), steps[None])}
    )
    codes = trend_categories(ds, start=0.0, x="index").values[0, 0]
    expected = np.where(slope > 0, CATEGORIES.index("upward"), CATEGORIES.index("downward"))
    np.testing.assert_array_equal(codes, expected)


@pytest.fixture(scope="module")
def planted(planted_store):
    return planted_store  # the shared planted store (conftest.py)


def test_planted_trends_are_recovered(planted):
    ds, truth = planted
    cats = trend_categories(ds, start=[0.1, 0.4, 0.7])
    codes = cats.values
    kind = truth["kind"]
    expected = {"stagnating": "stagnated", "downward": "downward", "upward": "upward"}
    for name, category in expected.items():
        recovered = (codes[:, :, kind == KINDS.index(name)] == CATEGORIES.index(category)).mean(axis=-1)
        # Stagnating tokens are noise: a 5% test flags about 5% of them as trends by chance.
        assert recovered.min() >= (0.88 if name == "stagnating" else 0.99), (name, recovered)
    assert (codes[:, :, kind < 0] == -1).all()
    share = label_share(cats)
    assert share.sum("category").values == pytest.approx(100)
    labelled = (kind >= 0).sum()
    for category in CATEGORIES:
        count = (codes == CATEGORIES.index(category)).sum(axis=-1)
        assert share.sel(category=category).values == pytest.approx(100 * count / labelled)


def test_mask_from_categories(planted):
    ds, truth = planted
    cats = trend_categories(ds, start=0.2)
    mask = label_mask(cats.sel(model="large", start=0.2), "upward")
    assert mask.dims == ("token",) and mask.dtype == bool
    assert mask.values.sum() == (cats.sel(model="large", start=0.2).values == 1).sum()
    with pytest.raises(TokendynError, match="unknown label 'sideways'"):
        label_mask(cats, "sideways")


def _reference_categories(loss, steps, p, x_kind, var_condition):
    """One token at a time with scipy.stats.linregress: the straightforward reading of §1.2."""
    keep = steps > 0 if x_kind == "log_step" else np.ones(len(steps), bool)
    steps, loss = steps[keep], loss[keep]
    j = np.flatnonzero(steps >= p * steps[-1])[0]
    x = np.log(steps[j:]) if x_kind == "log_step" else np.flatnonzero(keep)[j:].astype(float)
    ppl = np.exp(loss[j:].astype(np.float64))
    fit = scipy.stats.linregress(x, ppl / ppl[0])
    if fit.pvalue < 0.05:
        return "upward" if fit.slope > 0 else "downward"
    geo = np.exp(np.mean(loss[j:].astype(np.float64)))
    stagnated = all(0.95 * geo <= v <= 1.05 * geo for v in (ppl[0], ppl[-1]))
    if var_condition:
        stagnated = stagnated and ppl.var() < ppl.mean()
    return "stagnated" if stagnated else "uncategorised"


@pytest.mark.parametrize("x_kind,var_condition", [("log_step", False), ("index", False), ("log_step", True)])
def test_categories_match_a_per_token_reference(tmp_path, x_kind, var_condition):
    rng = np.random.default_rng(2)
    steps = np.array([[0, 100, 200, 400, 800, 1600, 2400, 3200, 4800, 6400]], float)
    walk = np.cumsum(rng.normal(0, 0.03, (1, 10, 6, 10)), axis=1) + rng.uniform(0.5, 2.5, (1, 1, 6, 10))
    ds = write_store(tmp_path / "s.zarr", walk, steps)
    cats = trend_categories(ds, start=[0.0, 0.3], x=x_kind, var_condition=var_condition)
    loss = ds["loss"].values[0]
    for s, p in enumerate([0.0, 0.3]):
        got = label_text(cats).values[0, s]
        for token in range(6 * 9):  # 6 rows of 10 positions: positions 1.. are stored
            assert got[token] == _reference_categories(loss[:, token], steps[0], p, x_kind, var_condition)


def test_step_zero_is_left_out_of_log_step_fits(tmp_path):
    steps = np.array([[0, 10, 20, 30, 40]], float)
    loss = np.broadcast_to(np.array([9.0, 3.0, 2.0, 1.5, 1.2])[None, :, None, None], (1, 5, 2, 4))
    ds = write_store(tmp_path / "s.zarr", loss, steps)
    fit = trend_fit(ds, start=0.0)
    ppl = np.exp(np.array([3.0, 2.0, 1.5, 1.2]))
    ref = scipy.stats.linregress(np.log([10, 20, 30, 40]), ppl / ppl[0])
    assert float(fit["slope"][0, 0]) == pytest.approx(ref.slope)  # (model, token)
    assert float(fit["pvalue"][0, 0]) == pytest.approx(ref.pvalue) and float(fit["stderr"][0, 0]) == pytest.approx(
        ref.stderr
    )
    assert fit.attrs == {"x": "log_step", "start": 0.0} and "nats" not in str(fit["slope"].attrs)
    assert fit["slope"].attrs["long_name"].startswith("slope of ppl_i / ppl_first against log_step")
    fit_index = trend_fit(ds, start=0.0, x="index")
    ppl0 = np.exp(np.array([9.0, 3.0, 2.0, 1.5, 1.2]))
    ref_index = scipy.stats.linregress(np.arange(5.0), ppl0 / ppl0[0])
    assert float(fit_index["slope"][0, 0]) == pytest.approx(ref_index.slope)


def test_too_few_checkpoints_give_no_label_and_a_warning(tmp_path):
    steps = np.array([[10, 20, 30, 40, 50]], float)
    ds = write_store(tmp_path / "s.zarr", np.ones((1, 5, 2, 4)), steps)
    with pytest.warns(TrendWarning, match="fewer than 3 checkpoints"):
        cats = trend_categories(ds, start=[0.1, 0.7])
    codes = cats.values
    assert (codes[0, 1] == -1).all() and (codes[0, 0] == 0).all()
    assert np.isnan(label_share(cats).sel(start=0.7).values).all()


def _peak_rss() -> int:
    """Peak resident memory of this process since it started (bytes; Linux)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM"))


def test_categories_out_of_core_under_a_worker_memory_cap(tmp_path):
    """loss is larger than the worker's memory limit; a worker going over it is killed and the test fails."""
    distributed = pytest.importorskip("distributed")
    cap = 420 * 2**20  # an idle worker takes ~175 MB, numba ~100 MB once a kernel ran; the computation ~110 MB
    kinds = np.array(["stagnating", "downward", "upward", "downward"] * 256)  # 1024 positions
    steps = np.array([np.linspace(1000, 10000, 12)] * 2)
    h = steps / 10000
    rows = np.stack(
        [
            np.stack(
                [
                    np.where(
                        kinds == "stagnating",
                        planted_loss("stagnating", 2.0, 0, hc),
                        np.where(
                            kinds == "downward",
                            planted_loss("downward", 2.0, 2.0, hc),
                            planted_loss("upward", 2.0, 1.0, hc),
                        ),
                    )
                    for hc in hm
                ]
            )
            for hm in h
        ]
    )
    ds = write_tiled_store(tmp_path / "big.zarr", rows, steps, n_seq=5632, seq_chunk=512)
    assert ds["loss"].nbytes > 1.15 * cap
    config = {
        "distributed.worker.memory.target": False,
        "distributed.worker.memory.spill": False,
        "distributed.worker.memory.pause": False,
        "distributed.worker.memory.terminate": 0.95,
        "distributed.scheduler.allowed-failures": 0,
    }
    with dask.config.set(config), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with (
            distributed.LocalCluster(
                n_workers=1, threads_per_worker=1, memory_limit=cap, processes=True, dashboard_address=None
            ) as cluster,
            distributed.Client(cluster) as client,
        ):
            share = label_share(trend_categories(ds, start=0.2, chunk_mb=4))
            peak = max(client.run(_peak_rss).values())
    assert peak < cap
    expected = {name: 100 * np.mean(kinds[1:] == name) for name in ("stagnating", "downward", "upward")}
    got = share.sel(start=0.2)
    assert got.sel(category="stagnated").values == pytest.approx(expected["stagnating"])
    assert got.sel(category="downward").values == pytest.approx(expected["downward"])
    assert got.sel(category="upward").values == pytest.approx(expected["upward"])


def test_float16_rows_are_looked_up_as_numpy_computes_them():
    every = np.arange(2**16, dtype=np.uint16).view(np.float16)  # every float16 value, NaN and inf too
    loss, ppl = _loss_and_ppl(every)
    with np.errstate(over="ignore", invalid="ignore"):
        np.testing.assert_array_equal(loss, every.astype(np.float64))
        np.testing.assert_array_equal(ppl, np.exp(every.astype(np.float64)))

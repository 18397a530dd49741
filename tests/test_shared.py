"""Results shared between studies (`tokendyn.analysis.shared`) equal the direct computation; the
agreement's pair statistics equal scipy's on drops with ties and gaps."""

from __future__ import annotations

import inspect
import itertools

import numpy as np
import pytest
import scipy.stats

from tokendyn.analysis import shared
from tokendyn.analysis.ranks import average_ranks, pair_statistics
from tokendyn.analysis.shared import computed, sharing
from tokendyn.analysis.trajectories import double_descent, load_small, subset_curve
from tokendyn.analysis.trends import trend_categories


@pytest.fixture(scope="module")
def planted(planted_store):
    return planted_store[0]  # the shared planted store (conftest.py)


def test_shared_results_equal_direct_ones_and_are_computed_once(planted, monkeypatch):
    calls = []
    real = trend_categories

    def counting(ds, *args, **kwargs):
        calls.append(kwargs.get("start"))
        return real(ds, *args, **kwargs)

    counting.__signature__ = inspect.signature(real)  # computed() binds the real parameters
    direct = real(planted, [0.2, 0.4]).compute()
    direct_dd = double_descent(planted, tol=0.3).compute()
    with sharing():
        both = computed(counting, planted, along="start", start=[0.2, 0.4])
        # a shallow copy of the dataset (what studies make with load_small) shares the result
        one = computed(counting, load_small(planted), along="start", start=[0.4])
        assert len(calls) == 1
        assert computed(counting, planted, along="start", start=[0.2, 0.4], x="index") is not both
        assert len(calls) == 2  # other parameters: computed again
        dd = computed(double_descent, planted, tol=0.3)
        again = computed(double_descent, planted, tol=0.3)
        assert again is not dd and again.identical(dd)  # a copy, read back from disk
    np.testing.assert_array_equal(both.values, direct.values)
    np.testing.assert_array_equal(one.values, direct.sel(start=[0.4]).values)
    assert list(one["start"].values) == [0.4] and one.attrs.keys() == direct.attrs.keys()
    np.testing.assert_array_equal(dd.values, direct_dd.values)
    assert shared._RESULTS.get() is None  # nothing is kept after the run
    computed(counting, planted, along="start", start=[0.4])
    computed(counting, planted, along="start", start=[0.4])
    assert len(calls) == 4  # outside sharing() every call computes


def test_alongside_keeps_results_computed_in_the_same_pass(planted):
    calls = []

    def counting(ds, *args, **kwargs):
        calls.append(kwargs)
        return double_descent(ds, *args, **kwargs)

    counting.__signature__ = inspect.signature(double_descent)
    mask = planted["token_id"].isin([40, 41, 42])
    direct = double_descent(planted, tol=0.3).compute()
    with sharing():
        curve = subset_curve(planted, mask, also=[(counting, {"tol": 0.3})])
        assert len(calls) == 1
        flags = computed(counting, load_small(planted), tol=0.3)  # served from the pass above
        assert len(calls) == 1
        subset_curve(planted, mask, also=[(counting, {"tol": 0.3})])
        assert len(calls) == 1  # held: not computed again
    np.testing.assert_array_equal(flags.values, direct.values)
    np.testing.assert_array_equal(curve.values, subset_curve(planted, mask).values)
    subset_curve(planted, mask, also=[(counting, {"tol": 0.3})])
    assert len(calls) == 1  # outside sharing() nothing is kept, so nothing extra is computed


def _scipy_rows(drops, top):
    rows = []
    for a, b in itertools.combinations(range(len(drops)), 2):
        both = np.isfinite(drops[a]) & np.isfinite(drops[b])
        da, db = drops[a][both], drops[b][both]
        k = max(1, round(top * len(da)))
        top_a, top_b = set(np.argsort(-da, kind="stable")[:k]), set(np.argsort(-db, kind="stable")[:k])
        rows.append((scipy.stats.spearmanr(da, db).statistic, len(top_a & top_b) / len(top_a | top_b)))
    return rows


def test_pair_statistics_equal_scipy_with_ties_and_gaps():
    rng = np.random.default_rng(3)
    base = rng.normal(size=2000)
    # float16-like drops: many ties; distinct values at the top so that the top k is unambiguous
    drops = np.stack([np.round(base + rng.normal(0, s, 2000), 1) for s in (0.3, 0.5, 0.8)])
    drops[:, :100] = 10 + np.arange(100)[::-1] + rng.normal(0, 0.01, (3, 100))
    drops[1, 500:520] = np.nan  # model 1 lacks some tokens: its pairs rank their common tokens only
    expected = _scipy_rows(drops, 0.05)
    # in one window and one sort, and in windows of 300 tokens and sorts of at most 256 values
    # (ranges that split between equal values would give wrong average ranks)
    for blocks, sizes in (([drops], {}), (np.array_split(drops, 9, axis=1), dict(window=300, group=256))):
        rows = pair_statistics(blocks, ["a", "b", "c"], top=0.05, **sizes)
        for row, (spearman, jaccard) in zip(rows, expected):
            assert row["spearman"] == pytest.approx(spearman, rel=1e-12)
            assert row["jaccard"] == pytest.approx(jaccard)
        assert [r["n_tokens"] for r in rows] == [1980, 2000, 1980]


def test_top_k_takes_the_later_tokens_among_equal_values_at_the_boundary():
    values = np.array([[0.0, 1.0, 1.0, 1.0, 2.0, -0.0], [0.0, 1.0, 1.0, 1.0, 2.0, 0.0]])
    (row,) = pair_statistics([values], ["a", "b"], top=3, group=1)
    assert row["jaccard"] == 1.0 and row["spearman"] == pytest.approx(1.0)  # -0.0 ties with 0.0


def test_average_ranks_equal_scipy():
    rng = np.random.default_rng(5)
    for values in (rng.normal(size=1000), np.round(rng.normal(size=1000), 1), np.zeros(7), np.array([3.0])):
        ranks = average_ranks(values, np.argsort(values, kind="stable"))
        np.testing.assert_array_equal(ranks, scipy.stats.rankdata(values))


def test_shared_results_are_held_on_disk_until_the_run_ends(planted):
    with sharing():
        flags = computed(double_descent, planted)
        (kept,) = [k for held in shared._RESULTS.get().results.values() for k in held]
        folder = kept.path.parent
        assert kept.shell.values.strides == (0,) * flags.ndim  # no values in memory: one, broadcast
        np.testing.assert_array_equal(np.load(kept.path), flags.values)
        del flags
        served = computed(double_descent, planted)
        assert served.identical(kept.load()) and served.values.flags.writeable  # the caller's own copy
    assert not folder.exists()  # removed with the run


def test_shared_results_leave_the_token_coordinates_on_disk(planted):
    """A shared result is held in memory, its per-token coordinates (token_id, doc, ...) are not:
    computing the DataArray whole would load them, 8 bytes per token each."""
    lazy = [name for name, c in planted.coords.items() if "token" in c.dims and c.chunks is not None]
    assert lazy  # the store's token coordinates are lazy to begin with
    with sharing():
        flags = computed(double_descent, planted)
        assert set(lazy) <= set(flags.coords)  # the flags carry the token coordinates ...
        for result in (flags, computed(trend_categories, planted, along="start")):
            assert isinstance(result.data, np.ndarray)
            assert all(result[name].chunks is not None for name in lazy if name in result.coords)  # ... lazily

"""Trajectory clustering: planted shapes are recovered and named, the stated k criterion, the naming
rules, stability, and the dominant tokens of each cluster."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from planted_stores import KIND_TOKENS, KINDS, flat, write_store
from tokendyn.analysis.clusters import cluster, detector_agreement, name_shape


@pytest.fixture(scope="module")
def planted(planted_store):
    return planted_store  # the shared planted store (conftest.py)


def _majority(codes, kind, names):
    """For each planted kind: (name of the cluster most of its tokens fall in, that fraction)."""
    out = {}
    for k, kind_name in enumerate(KINDS):
        members = codes[kind == k]
        best = np.bincount(members, minlength=len(names)).argmax()
        out[kind_name] = (names[best], np.mean(members == best))
    return out


def test_planted_shapes_on_the_matched_perplexity_grid(planted):
    ds, truth = planted
    result = cluster(
        ds,
        n_clusters=4,
        on="perplexity",
        normalize="center",
        change_weight=0,
        token_text=lambda ids: [f"<{i}>" for i in ids],
    )
    kind = truth["kind"]
    codes = result.labels.values
    for m in range(3):
        assert adjusted_rand_score(kind[kind >= 0], codes[m][kind >= 0]) > 0.95
    majority = _majority(codes[2], kind, result.names)
    # On the common grid the small model stops at the double-descent peak (a U shape), but the names
    # use the change features over each model's own checkpoints, where the detector sees the descent.
    assert majority["stagnating"][0] == "stagnating"
    assert majority["upward"][0] == "rising"
    assert majority["double_descent"][0] == "double descent"
    assert "falling" in majority["downward"][0]
    assert result.stability > 0.9
    assert (codes[:, kind < 0] == -1).all()
    share = result.share()
    assert share.sum("category").values == pytest.approx(100)
    # Dominant tokens: the planted ids of each kind, decoded by the callable.
    tokens = result.top_tokens
    stagnating = tokens[tokens["name"] == "stagnating"]
    assert set(stagnating["token_id"]) == set(KIND_TOKENS["stagnating"])
    assert set(stagnating["text"]) == {f"<{i}>" for i in KIND_TOKENS["stagnating"]}
    assert stagnating["token_share"].min() > 95


def test_double_descent_cluster_on_one_models_checkpoints(planted):
    ds, truth = planted
    result = cluster(ds, n_clusters=5, on="checkpoints", model="large", normalize="center")
    assert result.labels.dims == ("model", "token")
    codes, kind = result.labels.values[0], truth["kind"]
    majority = _majority(codes, kind, result.names)
    assert majority["stagnating"][0] == "stagnating" and majority["upward"][0] == "rising"
    # k-means splits the double-descent tokens by the depth of their final fall into two clusters, both
    # named "double descent" (with their total change appended); together they hold the planted ones.
    in_cluster = np.isin(codes, [k for k, name in enumerate(result.names) if name.startswith("double descent")])
    planted_dd = kind == KINDS.index("double_descent")
    assert (in_cluster & planted_dd).sum() / in_cluster.sum() > 0.95
    assert (in_cluster & planted_dd).sum() / planted_dd.sum() > 0.6


def test_auto_k_picks_the_planted_number_by_silhouette(tmp_path):
    rng = np.random.default_rng(5)
    steps = np.linspace(100, 1000, 10)
    shapes = [np.zeros(10), -np.linspace(0, 2, 10), np.linspace(0, 2, 10)]
    kind = rng.integers(0, 3, (20, 8))
    loss = 3 + np.stack([shapes[k] for k in kind.ravel()], axis=-1).reshape(10, 20, 8)
    loss = loss[None] + rng.normal(0, 0.02, (1, 10, 20, 8))  # flat tokens' ends within the 5% band
    ds = write_store(tmp_path / "s.zarr", loss, steps[None])
    result = cluster(ds, "auto", on="checkpoints", normalize="center", k_range=range(2, 7))
    assert result.criterion == "silhouette"
    assert max(result.scores, key=result.scores.get) == 3 == len(result.names)
    assert sorted(result.names) == ["rising", "stagnating", "steadily falling"]
    gmm = cluster(ds, "auto", on="checkpoints", normalize="center", method="gmm", k_range=range(2, 7))
    assert sorted(cluster(ds, on="checkpoints").names) == sorted(result.names)  # "shapes" finds the same three
    assert gmm.criterion == "bic" and min(gmm.scores, key=gmm.scores.get) == len(gmm.names)


@pytest.mark.parametrize(
    "curve,name",
    [
        ([0, 0.02, -0.03, 0.01], "stagnating"),
        ([0, -1, -0.2, -1.2], "double descent"),
        ([0, -1, -1.2, -0.3], "falling then rising"),
        ([0, 0.8, 0.9, 0.1], "rising then falling"),
        ([0, 0.4, 0.8, 1.2], "rising"),
        ([0, -0.9, -1.0, -1.05], "early-falling"),
        ([0, -0.05, -0.1, -1.0], "late-falling"),
        ([0, -0.5, -0.8, -1.05], "steadily falling"),
        ([0, 0.15, -0.15, 0.2], "wavy"),
    ],
)
def test_naming_rules(curve, name):
    assert name_shape(np.array(curve), tol=0.25) == name


@pytest.fixture(scope="module")
def full_range(tmp_path_factory):
    """Two sizes that both train through the whole double descent (h from 0 to 1), step 0 included,
    with the planted kinds of `planted_stores`; returns (dataset, kind per token)."""
    from planted_stores import FINAL_STEP, PROPORTIONS, planted_loss, progress

    rng = np.random.default_rng(1)
    n_seq, n_pos = 24, 24
    schedules = [
        [0, 10, 30, 100, 300, 1000, 2000, 4000, 6000, 8000],  # log-spaced early, like real suites
        [0, 10, 20, 50, 100, 200, 500, 1000, 2000, 3000, 4000, 5000, 6000, 7000, 8000, 9000],
    ]
    kind = rng.choice(len(KINDS), size=(n_seq, n_pos), p=PROPORTIONS)
    base = rng.uniform(1, 4, kind.shape)
    amp = np.where(kind == 0, 0, rng.uniform(1.5, 2.5, kind.shape))
    steps = np.full((2, max(map(len, schedules)) + 1), np.nan)
    loss = np.zeros((2, steps.shape[1], n_seq, n_pos))
    for m, schedule in enumerate(schedules):
        count = len(schedule) + 1
        steps[m, :count] = [*schedule, FINAL_STEP]
        h = progress(steps[m, :count], 1.0)[:, None, None]
        for k, name in enumerate(KINDS):
            loss[m, :count] = np.where(kind == k, planted_loss(name, base, amp, h), loss[m, :count])
    loss += rng.normal(0, 0.005, loss.shape)
    ds = write_store(tmp_path_factory.mktemp("full") / "f.zarr", loss, steps, models=["small", "large"])
    kind = flat(kind)  # the stored tokens (position 0 has no prediction and is not stored)
    return ds, kind


def test_shape_clusters_find_stagnating_rising_and_double_descent(full_range):
    from tokendyn.analysis.clusters import detector_agreement

    ds, kind = full_range
    result = cluster(ds)  # the default: fine clusters merged by shape name, on the trained part
    assert result.criterion.startswith("shape names")
    for name in ("stagnating", "rising", "double descent"):
        assert name in result.names
    assert len(set(result.names)) == len(result.names)  # one cluster per shape
    codes = result.labels.values
    for m in range(2):
        majority = _majority(codes[m], kind, result.names)
        assert majority["stagnating"][0] == "stagnating" and majority["stagnating"][1] > 0.9
        assert majority["upward"] == ("rising", pytest.approx(1.0))
        assert "falling" in majority["downward"][0]
    agreement = detector_agreement(ds, result)
    assert set(agreement["cluster"]) == {"stagnating", "rising", "double descent"}
    simple = agreement[agreement.cluster != "double descent"]
    assert (simple["precision"] > 0.9).all() and (simple["recall"] > 0.9).all()
    # The smoothed per-token detector misses double descents on a sparse schedule (none in the small
    # model's 11 checkpoints): the cluster, named from the detector's own statistic, follows it.
    dd = agreement[agreement.cluster == "double descent"].set_index("model")
    assert dd.loc["small", "detector_tokens"] == 0 == dd.loc["small", "cluster_tokens"]
    assert dd.loc["large", "detector_tokens"] > 10
    assert dd.loc["large", "recall"] > 0.9 and dd.loc["large", "precision"] > 0.9
    # the same for one model's own checkpoints
    own = cluster(ds, on="checkpoints", model="large")
    assert {"stagnating", "rising", "double descent"} <= set(own.names)


def test_study_falls_back_to_training_progress_without_a_shared_perplexity_range(tmp_path):
    """Two models whose validation perplexities never meet: clustering on the matched-perplexity
    grid is impossible, so the study clusters on each model's own checkpoints and says so."""
    from tokendyn.studies import clusters as study

    rng = np.random.default_rng(3)
    steps = np.array([[0, 10, 20, 40, 80, 100, 120, 140, 160.0]] * 2)  # 5 checkpoints in the trend window
    shapes = [np.zeros(9), -np.linspace(0, 1, 9), np.linspace(0, 1, 9)]
    kind = rng.integers(0, 3, (12, 10))
    loss = np.stack([shapes[k] for k in kind.ravel()], axis=-1).reshape(9, 12, 10)
    loss = np.stack([3 + loss, 6 + loss]) + rng.normal(0, 0.01, (2, 9, 12, 10))  # 6 nats apart
    ds = write_store(tmp_path / "apart.zarr", loss, steps)
    result = study.run(ds, on="perplexity")
    assert any("share no validation-perplexity range" in f for f in result.findings)
    assert any("each model's own trained checkpoints" in f for f in result.findings)
    shares = result.tables["clusters"]
    assert {"stagnating", "rising"} <= set(shares["cluster"])


TOY_STEPS = [0, 1, 2, 3, 5, 7, 12, 20, 34, 56, 92, *np.linspace(151, 919, 14).round()]  # the built-in suite's


def _toy_like_loss(kind: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Losses (ckpt, *kind.shape) shaped like the built-in suite's: every token falls from the random
    initial loss (~6.7 nats) over the first ~100 steps to its own level; then falling tokens keep
    falling, stagnating ones stay, rising ones rise late, double-descent ones rise and fall again
    early (learning that rare words are rare, then the fact), all with noise."""
    s = np.asarray(TOY_STEPS, float).reshape(-1, *[1] * kind.ndim)
    level = rng.uniform(0.5, 3.0, kind.shape)
    shared = 6.7 + (level - 6.7) * (1 - np.exp(-s / 30))
    late = np.clip((s - 300) / 619, 0, 1)
    bump = np.exp(-(((np.log(np.maximum(s, 1)) - np.log(150)) / 0.5) ** 2))
    extra = [
        -rng.uniform(0.4, 1.0, kind.shape) * late,  # falling
        0 * s,  # stagnating
        rng.uniform(0.4, 1.0, kind.shape) * late,  # rising
        rng.uniform(1.5, 2.5, kind.shape) * bump - 0.3 * late,  # double descent
    ]
    loss = shared + np.select([kind == k for k in range(4)], np.broadcast_arrays(*extra))
    return loss + rng.normal(0, 0.01, loss.shape)


def test_toy_like_suite_gives_named_clusters_that_agree_with_the_detectors(tmp_path):
    """The built-in suite's difficulty, planted: a shared fall from random initialisation dominates
    every trajectory. The default clustering still names stagnating, rising and double-descent
    clusters, and their members are the tokens the per-token detectors flag."""
    from tokendyn.analysis.clusters import detector_agreement

    rng = np.random.default_rng(7)
    kind = rng.choice(4, size=(2, 40, 26), p=[0.55, 0.2, 0.13, 0.12])
    loss = np.stack([_toy_like_loss(kind[m], rng) for m in range(2)])
    steps = np.array([TOY_STEPS] * 2, float)
    ds = write_store(tmp_path / "toy_like.zarr", loss, steps, models=["S", "L"])
    result = cluster(ds)
    assert {"stagnating", "rising", "double descent"} <= set(result.names)
    agreement = detector_agreement(ds, result).set_index("cluster")
    assert (agreement["detector_tokens"] > 10).all()
    trends = agreement.loc[["stagnating", "rising"]]
    assert (trends["precision"] >= 0.9).all() and (trends["recall"] >= 0.9).all()
    # The smoothed detector (tol 0.5) flags only the deepest planted double descents (~2% of the
    # tokens): every one is in the cluster, which holds other planted double descents besides.
    dd = agreement.loc[["double descent"]]
    assert (dd["recall"] >= 0.9).all() and (dd["precision"] > 5 * dd["base_rate"]).all()


def test_agreement_without_a_detected_shape_is_an_empty_table_with_its_columns(planted):
    ds, _ = planted
    result = cluster(ds, n_clusters=5, on="checkpoints", model="large", normalize="center")
    n = len(result.names)
    result.labels.attrs["flag_meanings"] = " ".join(f"falling_{i}" for i in range(n))
    agreement = detector_agreement(ds, result)
    assert agreement.empty
    assert {"model", "cluster", "detector", "precision", "recall", "base_rate"} <= set(agreement.columns)
    assert list(agreement.groupby("cluster")) == []


def test_agreement_with_a_detector_that_could_not_run_is_nan(tmp_path):
    """Checkpoints 0, 10, 20, 40, 80: the clustering's late window (from 40%) has 2 checkpoints, too few
    for a trend category, so no token is labelled stagnated or not: NA counts and NaN rates, not 0."""
    steps = np.array([[0, 10, 20, 40, 80.0]] * 2)
    loss = np.random.default_rng(0).normal(3, 0.3, (2, 5, 6, 10))
    ds = write_store(tmp_path / "few.zarr", loss, steps)
    result = cluster(ds, n_clusters=2)
    result.labels.attrs["flag_meanings"] = "stagnating falling"  # cluster 0 checked against "stagnated"
    agreement = detector_agreement(ds, result)
    assert list(agreement["model"]) == ["m0", "m1"] and (agreement["cluster_tokens"] > 0).all()
    assert agreement["detector_tokens"].isna().all() and agreement["both"].isna().all()
    assert agreement[["precision", "recall", "base_rate"]].isna().all().all()


@pytest.mark.parametrize(
    "curve,depth",
    [
        ([3, 1, 2.5, 0.5], 1.5),  # falls 2, rises 1.5, falls 2
        ([3, 1, 2, 1.8], 0.2),  # the last fall is the shallowest
        ([5, 2, 2.4, 2.1, 4, 0], 2.0),  # the deeper of two rises
        ([0, 1, 2, 3], 0.0),  # no fall first
        ([3, 2, 1, 0], 0.0),  # no rise
    ],
)
def test_descent_depth_by_hand(curve, depth):
    from tokendyn.analysis.clusters import descent_depth

    assert descent_depth(np.array(curve, float)) == pytest.approx(depth)


def test_descent_depth_is_the_detectors_test_as_a_number():
    """depth >= tol exactly where the double-descent detector's test (`_double_descent_flags`) holds."""
    from tokendyn.analysis.clusters import descent_depth
    from tokendyn.analysis.trajectories import _double_descent_flags, moving_average

    y = np.cumsum(np.random.default_rng(0).normal(0, 0.4, (500, 12)), axis=1)
    depth = descent_depth(y)
    for tol in (0.2, 0.5, 1.0):
        np.testing.assert_array_equal(depth >= tol, _double_descent_flags(y.T, tol))
    # with the detector's smoothing, on float32 rows (the store's precision after reading)
    smoothed = descent_depth(y.astype(np.float32), smooth=3)
    for tol in (0.2, 0.5, 1.0):
        flagged = _double_descent_flags(moving_average(y.T.astype(np.float32), 3), tol)
        np.testing.assert_array_equal(smoothed >= tol, flagged)


def test_descent_depth_against_brute_force():
    """The depth is max over a <= b < c <= e of min(y[a] - y[b], y[c] - y[b], y[c] - y[e]), written out."""
    from tokendyn.analysis.clusters import descent_depth

    y = np.cumsum(np.random.default_rng(1).normal(0, 0.4, (60, 9)), axis=1)
    n = y.shape[1]
    for row, depth in zip(y, descent_depth(y)):
        pairs = [
            min(row[a] - row[b], row[c] - row[b], row[c] - row[e])
            for a in range(n)
            for b in range(a, n)
            for c in range(b + 1, n)
            for e in range(c, n)
        ]
        assert depth == pytest.approx(max(0.0, *pairs), abs=1e-12)
    assert np.isnan(descent_depth(np.array([[3.0, 1.0, np.nan, 2.0, 0.0]]))[0])


def test_change_features_read_float16_as_its_float32_values():
    """A float16 store's values are converted inside the kernels: the same features as from float32."""
    from tokendyn.analysis.clusters import change_statistics, descent_depth

    y = np.cumsum(np.random.default_rng(2).normal(0, 0.4, (300, 20)), axis=1).astype(np.float16)
    y[5, 3] = np.nan
    wide = y.astype(np.float32)
    np.testing.assert_array_equal(descent_depth(y, smooth=3), descent_depth(wide, smooth=3))
    x = np.log(np.arange(1, 9) * 1000.0)
    np.testing.assert_array_equal(change_statistics(y, x, smooth=3), change_statistics(wide, x, smooth=3))
    assert np.isnan(change_statistics(y, x, smooth=3)[5, 0])  # the depth; the NaN is before the late window


def test_change_statistics_against_scipy():
    import scipy.stats

    from tokendyn.analysis.clusters import TREND_CLIP, change_statistics

    rng = np.random.default_rng(4)
    y = 2 + rng.normal(0, 0.1, (20, 9)) + np.linspace(0, 0.3, 9) * rng.uniform(-1, 1, (20, 1))
    x = np.log([300, 400, 500, 600, 700.0])  # the trend window: the last 5 points
    stats = change_statistics(y, x, smooth=1)
    for row, (descent, trend, spread) in zip(y, stats):
        window = row[-5:]
        fit = scipy.stats.linregress(x, np.exp(window - window[0]))
        expected = np.clip(fit.slope / fit.stderr / scipy.stats.t.isf(0.025, 3), -TREND_CLIP, TREND_CLIP)
        assert trend == pytest.approx(expected, rel=1e-6)
        assert spread == pytest.approx(max(abs(window[0] - window.mean()), abs(window[-1] - window.mean())))
        assert descent >= 0


def test_change_features_reproduce_the_detectors(planted):
    """On a store: descent >= the detector's tol where `double_descent` flags, |late_trend| >= 1 with
    its sign where the trend categories say upward / downward."""
    from tokendyn.analysis.clusters import change_features
    from tokendyn.analysis.labels import label_mask
    from tokendyn.analysis.trajectories import double_descent
    from tokendyn.analysis.trends import trend_categories

    ds, _ = planted
    changes = change_features(ds).compute()
    flagged = double_descent(ds).compute()
    assert flagged.values.any()
    np.testing.assert_array_equal(changes.sel(change="descent").values >= 0.5, flagged.values)
    trends = trend_categories(ds, [0.4]).isel(start=0)
    trend = changes.sel(change="late_trend").values
    np.testing.assert_array_equal(trend >= 1, label_mask(trends, "upward").values)
    np.testing.assert_array_equal(trend <= -1, label_mask(trends, "downward").values)


def test_fit_sample_reads_few_chunks_of_a_long_store():
    """Many token chunks: the sample comes from whole chunks holding SAMPLE_POOL x its size; few: from all."""
    import xarray as xr

    from tokendyn.analysis.clusters import SAMPLE_POOL, fit_sample

    def store(n_tokens, chunk):
        loss = xr.DataArray(np.zeros((2, 3, n_tokens), np.float16), dims=("model", "ckpt", "token"))
        return xr.Dataset({"loss": loss.chunk({"token": chunk})})

    picked = fit_sample(store(10_000, 100), 50, np.random.default_rng(0))
    assert len(picked) == len(np.unique(picked)) == 50 and np.all(np.diff(picked) > 0)
    assert len(np.unique(picked // 100)) <= SAMPLE_POOL * 50 // 100  # from 2 of the 100 chunks
    spread = fit_sample(store(10_000, 5_000), 2_000, np.random.default_rng(0))
    assert len(np.unique(spread // 5_000)) == 2  # a pool of every chunk: drawn from all tokens
    np.testing.assert_array_equal(fit_sample(store(30, 10), 40, np.random.default_rng(0)), np.arange(30))


def test_top_token_counts_by_window_equal_numpy_unique():
    """The top tokens per cluster are counted a window of tokens at a time (bincount per window);
    the counts equal np.unique's over every labelled token at once."""
    from tokendyn.analysis import clusters as module

    rng = np.random.default_rng(2)
    n = 3 * module.WINDOW_TOKENS // 2 + 17  # two windows, the second partial
    codes = rng.integers(-1, 4, (2, n)).astype(np.int8)
    token_id = rng.integers(0, 300, n)
    token_id[: n // 3] = rng.integers(0, 20, n // 3)  # frequent ids
    per_cluster, corpus = module._id_counts(codes, token_id, 4)
    ids = np.broadcast_to(token_id, codes.shape)
    expected_ids, expected = np.unique(ids[codes >= 0], return_counts=True)
    np.testing.assert_array_equal(np.flatnonzero(corpus), expected_ids)
    np.testing.assert_array_equal(corpus[expected_ids], expected)
    for k in range(4):
        member_ids, counts = np.unique(ids[codes == k], return_counts=True)
        np.testing.assert_array_equal(np.flatnonzero(per_cluster[k]), member_ids)
        np.testing.assert_array_equal(per_cluster[k][member_ids], counts)

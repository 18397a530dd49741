"""Trajectory clustering: planted shapes are recovered and named, the stated k criterion, the naming
rules, stability, and the dominant tokens of each cluster."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from planted_stores import KIND_TOKENS, KINDS, flat, write_store
from tokendyn.analysis.clusters import cluster, name_shape


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
        ds, n_clusters=4, on="perplexity", normalize="center", token_text=lambda ids: [f"<{i}>" for i in ids]
    )
    kind = truth["kind"]
    codes = result.labels.values
    for m in range(3):
        assert adjusted_rand_score(kind[kind >= 0], codes[m][kind >= 0]) > 0.95
    majority = _majority(codes[2], kind, result.names)
    # On the common grid the small model stops at the double-descent peak: a U shape, whose late
    # window rises as the upward tokens' does, so both are "rising", told apart by their total change.
    assert majority["stagnating"][0] == "stagnating"
    assert majority["upward"][0].startswith("rising (+")
    assert majority["double_descent"][0].startswith("rising (")
    assert majority["double_descent"][0] != majority["upward"][0]
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
    # k-means splits the falling tokens by depth; the double-descent cluster holds only planted
    # double-descent tokens, though the shallowest of them join a falling cluster.
    in_cluster = codes == result.names.index("double descent")
    planted_dd = kind == KINDS.index("double_descent")
    assert (in_cluster & planted_dd).sum() / in_cluster.sum() > 0.95
    assert (in_cluster & planted_dd).sum() / planted_dd.sum() > 0.6


def test_auto_k_picks_the_planted_number_by_silhouette(tmp_path):
    rng = np.random.default_rng(5)
    steps = np.linspace(100, 1000, 10)
    shapes = [np.zeros(10), -np.linspace(0, 2, 10), np.linspace(0, 2, 10)]
    kind = rng.integers(0, 3, (20, 8))
    loss = 3 + np.stack([shapes[k] for k in kind.ravel()], axis=-1).reshape(10, 20, 8)
    loss = loss[None] + rng.normal(0, 0.05, (1, 10, 20, 8))
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
        ([0, 0.15, -0.15, 0.05], "wavy"),
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
        assert majority["stagnating"] == ("stagnating", pytest.approx(1.0))
        assert majority["upward"] == ("rising", pytest.approx(1.0))
        assert majority["double_descent"][0] == "double descent" and majority["double_descent"][1] > 0.9
        assert "falling" in majority["downward"][0]
    agreement = detector_agreement(ds, result)
    assert set(agreement["cluster"]) == {"stagnating", "rising", "double descent"}
    simple = agreement[agreement.cluster != "double descent"]
    assert (simple["precision"] > 0.9).all() and (simple["recall"] > 0.9).all()
    # The smoothed per-token detector misses double descents on a sparse schedule (none in the small
    # model's 11 checkpoints), but every token it flags is in the double-descent cluster.
    dd = agreement[agreement.cluster == "double descent"].set_index("model")
    assert dd.loc["large", "detector_tokens"] > 0 and dd.loc["large", "recall"] == 1.0
    # the same for one model's own checkpoints
    own = cluster(ds, on="checkpoints", model="large")
    assert {"stagnating", "rising", "double descent"} <= set(own.names)

"""Trajectory clustering: planted shapes are recovered and named, the stated k criterion, the naming
rules, stability, and the dominant tokens of each cluster."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from planted_stores import KIND_TOKENS, KINDS, write_store
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
    result = cluster(ds, n_clusters=4, token_text=lambda ids: [f"<{i}>" for i in ids])
    kind = truth["kind"]
    codes = result.labels.values
    for m in range(3):
        assert adjusted_rand_score(kind[kind >= 0], codes[m][kind >= 0]) > 0.95
    majority = _majority(codes[2], kind, result.names)
    # On the common grid the small model stops at the double-descent peak: a U shape.
    assert majority["stagnating"][0] == "stagnating"
    assert majority["upward"][0] == "rising"
    assert majority["double_descent"][0] == "falling then rising"
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
    result = cluster(ds, n_clusters=5, on="checkpoints", model="large")
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
    result = cluster(ds, on="checkpoints", k_range=range(2, 7))
    assert result.criterion == "silhouette"
    assert max(result.scores, key=result.scores.get) == 3 == len(result.names)
    assert sorted(result.names) == ["rising", "stagnating", "steadily falling"]
    gmm = cluster(ds, on="checkpoints", method="gmm", k_range=range(2, 7))
    assert gmm.criterion == "bic" and min(gmm.scores, key=gmm.scores.get) == len(gmm.names)


@pytest.mark.parametrize("curve,name", [
    ([0, 0.02, -0.03, 0.01], "stagnating"),
    ([0, -1, -0.2, -1.2], "double descent"),
    ([0, -1, -1.2, -0.3], "falling then rising"),
    ([0, 0.8, 0.9, 0.1], "rising then falling"),
    ([0, 0.4, 0.8, 1.2], "rising"),
    ([0, -0.9, -1.0, -1.05], "early-falling"),
    ([0, -0.05, -0.1, -1.0], "late-falling"),
    ([0, -0.5, -0.8, -1.05], "steadily falling"),
    ([0, 0.15, -0.15, 0.05], "wavy"),
])
def test_naming_rules(curve, name):
    assert name_shape(np.array(curve), tol=0.25) == name

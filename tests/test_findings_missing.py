"""Findings say "not testable" where the data cannot answer, instead of a number that looks like an answer."""

from __future__ import annotations

import numpy as np
import pytest

from planted_stores import write_store
from tokendyn.studies import (
    agreement,
    clusters,
    curve_measures,
    double_descent,
    perplexity,
    token_view,
    trend_categories,
)
from tokendyn.studies.findings import SAME_SIZE


@pytest.fixture(scope="module")
def same_size(tmp_path_factory):
    """Two models of the same parameter count on 5 checkpoints (0 to 80): flat, falling and rising tokens,
    the second model 0.5 nats lower throughout. Only 2 checkpoints from 40% of the final step (40, 80)."""
    rng = np.random.default_rng(3)
    shapes = [np.zeros(5), -np.linspace(0, 1, 5), np.linspace(0, 1, 5)]
    kind = rng.integers(0, 3, (12, 10))
    loss = np.stack([shapes[k] for k in kind.ravel()], axis=-1).reshape(5, 12, 10)
    loss = np.stack([3 + loss, 2.5 + loss]) + rng.normal(0, 0.01, (2, 5, 12, 10))
    steps = np.array([[0, 10, 20, 40, 80.0]] * 2)
    return write_store(tmp_path_factory.mktemp("same") / "s.zarr", loss, steps, n_params=[1e6, 1e6])


def test_models_of_the_same_size_get_no_size_order(same_size):
    findings = perplexity.run(same_size).findings
    assert f"Whether larger models end lower is not testable ({SAME_SIZE})." in findings
    assert not any("Larger models end lower" in f or "neighbouring sizes" in f for f in findings), findings
    trend = trend_categories.run(same_size).findings[-1]
    assert trend.endswith(f"with model size; this is not testable here ({SAME_SIZE})."), trend
    findings = clusters.run(same_size).findings
    assert f"Cluster shares against model size: not testable ({SAME_SIZE})." in findings
    assert f"Paper: more tokens stagnate in larger models; this is not testable here ({SAME_SIZE})." in findings
    assert not any("with model size (" in f or "reproduce" in f for f in findings), findings
    medians = [f for f in curve_measures.run(same_size, chance=6.0).findings if f.startswith("Median")]
    assert medians and all(f.endswith(f"; by size not testable ({SAME_SIZE}).") for f in medians)


def test_tied_sizes_are_left_out_of_the_size_order(tmp_path):
    """Sizes 1, 1, 10 (millions): the tied models are not compared, each is compared with the larger."""
    steps = np.array([[0, 50, 100.0]] * 3)
    loss = np.array([4.0, 4.5, 3.5])[:, None, None, None] + np.linspace(1, 0, 3)[None, :, None, None]
    ds = write_store(tmp_path / "s.zarr", np.broadcast_to(loss, (3, 3, 2, 8)), steps, n_params=[1e6, 1e6, 1e7])
    findings = perplexity.run(ds).findings
    assert "Larger models end lower, as expected from scaling." in findings
    assert any("lower there in 2 of 2 pairs" in f for f in findings), findings


def test_cluster_against_a_detector_that_labelled_nothing_is_not_testable(same_size):
    """The clustering's late window starts at 40%: too few checkpoints for a trend category there."""
    result = clusters.run(same_size)
    line = next(f for f in result.findings if f.startswith("Cluster 'stagnating' against"))
    assert line.endswith(
        ": not testable in m0, m1 (the detector labelled none of the tokens: too few checkpoints in its window)."
    )
    assert "precision" not in line
    table = result.tables["cluster_agreement"]
    assert table["detector_tokens"].isna().all() and table["precision"].isna().all()


def test_double_descent_does_not_count_a_model_with_too_few_checkpoints(tmp_path):
    rng = np.random.default_rng(0)
    steps = np.array([[100, 200, 300, 400, 500, 600.0], [100, 200, np.nan, np.nan, np.nan, np.nan]])
    loss = rng.uniform(1, 3, (2, 6, 4, 8))
    loss[0, :, :, :4] = np.array([4.0, 1.0, 3.0, 0.5, 0.5, 0.5])[:, None, None]  # falls, rises, falls again
    ds = write_store(tmp_path / "s.zarr", loss, steps)
    findings = double_descent.run(ds, window=1).findings
    assert "m1" not in findings[0] and "m0" in findings[0], findings[0]
    assert "Not testable in m1 (fewer than" in findings[1], findings


def test_token_view_with_one_checkpoint_shows_no_change(tmp_path):
    ds = write_store(tmp_path / "s.zarr", np.random.default_rng(0).uniform(1, 3, (1, 1, 2, 8)), np.array([[100.0]]))
    findings = token_view.run(ds).findings
    assert "m0: one checkpoint only, so no change to show." in findings
    assert not any("largest fall" in f for f in findings)


def test_agreement_without_shared_steps_is_not_testable(tmp_path):
    rng = np.random.default_rng(0)
    steps = np.array([[100, 200, 300, 400, 500.0], [1000, 2000, 3000, 4000, 5000.0]])  # no step in common
    loss = np.linspace(3, 1, 5)[None, :, None, None] + rng.uniform(0, 0.5, (2, 5, 4, 8))
    findings = agreement.run(write_store(tmp_path / "s.zarr", loss, steps)).findings
    assert "matched step nan" in findings[0]
    assert "not testable here" in findings[1] and "reproduce" not in findings[1], findings


def test_agreement_with_two_checkpoints_is_not_testable(tmp_path):
    """With two checkpoints the drops at matched perplexity and at matched step are the same fraction of
    one drop: equal by construction, no evidence either way."""
    rng = np.random.default_rng(0)
    loss = np.array([3.0, 2.0])[None, :, None, None] + rng.uniform(0, 0.5, (2, 2, 4, 8))
    findings = agreement.run(write_store(tmp_path / "s.zarr", loss, np.array([[0, 100.0]] * 2))).findings
    assert "not testable here (needs two models with >= 3 done checkpoints; the models have 2, 2" in findings[1]
    assert "reproduce" not in findings[1], findings


def test_agreement_leaves_out_the_pairs_of_a_model_with_two_checkpoints(tmp_path):
    rng = np.random.default_rng(0)
    steps = np.array([[0, 100, np.nan, np.nan, np.nan], *[[0, 25, 50, 75, 100.0]] * 2])
    loss = np.linspace(3, 1, 5)[None, :, None, None] + rng.uniform(0, 0.5, (3, 5, 4, 8))
    loss[0, 1] = loss[0, 4]  # m0 ends where the others do: the perplexity range they share
    findings = agreement.run(write_store(tmp_path / "s.zarr", loss, steps)).findings
    assert "over the model pairs that can tell them apart: >= 3 done checkpoints each" in findings[1], findings


def test_agreement_read_between_the_same_two_checkpoints_is_not_testable(tmp_path):
    """Five checkpoints, but the loss falls only between steps 1 and 10: both matched levels, in
    perplexity and in step, lie in that one interval in every model, so the axes rank alike by
    construction (was: "does not reproduce")."""
    rng = np.random.default_rng(0)
    curve = np.array([[3.0, 1.0, 0.99, 0.98, 0.97], [3.0, 0.9, 0.89, 0.88, 0.87]])[:, :, None, None]
    first, later = rng.uniform(0, 0.5, (2, 1, 4, 8)), rng.uniform(0, 0.5, (2, 1, 4, 8))
    loss = curve + np.where(np.arange(5)[None, :, None, None] == 0, first, later)
    ds = write_store(tmp_path / "s.zarr", loss, np.array([[1, 10, 20, 40, 80.0]] * 2))
    table = ds.tokendyn.agreement()
    assert (
        table.loc[table.axis == "step", "as_at_val_ppl"].all()
        and not table.loc[table.axis == "val_ppl", "as_at_val_ppl"].any()
    )
    findings = agreement.run(ds).findings
    assert "not testable here (every pair reads both levels" in findings[1] and "reproduce" not in findings[1], findings


def test_one_checkpoint_has_no_matched_perplexity_levels(tmp_path):
    ds = write_store(tmp_path / "s.zarr", np.random.default_rng(0).uniform(1, 3, (1, 1, 2, 8)), np.array([[0.0]]))
    result = perplexity.run(ds)
    assert result.findings[0].startswith("Matched-perplexity levels: not testable (the models share one validation")
    assert "perplexity_levels" not in result.tables and "matched_perplexity" not in result.labels


def test_trend_shares_leave_out_models_without_categories(tmp_path):
    steps = np.array([[0, 100.0], [0, 100.0]])
    ds = write_store(tmp_path / "s.zarr", np.random.default_rng(0).uniform(1, 3, (2, 2, 2, 8)), steps)
    findings = trend_categories.run(ds).findings
    assert not any("nan" in f for f in findings), findings
    assert findings[0].startswith("No categories at start 10% in m0, m1: fewer than 3 checkpoints")


def test_token_view_compares_a_single_trained_checkpoint_with_step_0(tmp_path):
    loss = np.random.default_rng(0).uniform(1, 3, (1, 2, 2, 8))
    result = token_view.run(write_store(tmp_path / "s.zarr", loss, np.array([[0, 100.0]])))
    assert set(result.tables["token_view"]["step_a"]) == {0} and set(result.tables["token_view"]["step_b"]) == {100}
    assert "m0 step 0 to 100" in result.findings[0]
    assert "m0: one trained checkpoint only, so its change is from step 0, the untrained model" in result.findings[1]
    assert result.findings[2].startswith("m0: ") and "shown tokens fell" in result.findings[2]

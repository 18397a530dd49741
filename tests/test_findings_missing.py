"""Findings say "not testable" where the data cannot answer, instead of a number that looks like an answer."""

from __future__ import annotations

import numpy as np

from planted_stores import write_store
from tokendyn.studies import agreement, double_descent, token_view


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

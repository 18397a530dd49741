"""Loss threshold of emergence: planted thresholds, the leaves-random rule, the collapse score."""

import numpy as np
import pytest

from tokendyn.analysis.emergence import (
    collapse_score,
    emergence_threshold,
    fit_segmented,
    leaves_random,
    unexplained_variance,
)
from tokendyn.errors import TokendynError

N_PARAMS = np.array([1e6, 4e6, 1.6e7, 6.4e7])
STEPS = np.geomspace(10, 1e4, 30)


def suite_losses():
    """(model, ckpt) validation losses: bigger models reach lower floors; all start near 6 nats."""
    floors = np.array([3.6, 3.2, 2.8, 2.5])
    rates = np.arange(1, 5)[:, None] / 2000
    return floors[:, None] + (6 - floors[:, None]) * np.exp(-STEPS[None, :] * rates)


def planted(eta=3.4, b=0.25, g=0.4, noise=0.02, seed=1):
    loss = suite_losses()
    perf = b + g * np.maximum(eta - loss, 0) + np.random.default_rng(seed).normal(0, noise, loss.shape)
    return loss, perf


def test_segmented_fit_recovers_a_planted_threshold():
    loss, perf = planted()
    fit = fit_segmented(loss, perf, n_boot=300)
    assert fit.eta == pytest.approx(3.4, abs=0.03)
    assert fit.eta_low <= 3.4 <= fit.eta_high
    assert fit.eta_high - fit.eta_low < 0.2
    assert fit.baseline == pytest.approx(0.25, abs=0.01)
    assert fit.slope == pytest.approx(0.4, abs=0.04)
    np.testing.assert_allclose(fit.predict([4.0, 3.0]), [fit.baseline, fit.baseline + fit.slope * (fit.eta - 3.0)])


def test_segmented_fit_is_the_least_squares_optimum():
    """No threshold on a fine independent grid (refit with lstsq) beats the fitted one by more than grid resolution."""
    loss, perf = planted(noise=0.05, seed=3)
    loss, perf = loss.ravel(), perf.ravel()
    fit = fit_segmented(loss, perf, n_grid=400, n_boot=10)
    best = np.inf
    for eta in np.linspace(np.sort(loss)[2], np.sort(loss)[-3], 2000):
        design = np.column_stack([np.ones_like(loss), np.maximum(eta - loss, 0)])
        coef = np.linalg.lstsq(design, perf, rcond=None)[0]
        best = min(best, float(((design @ coef - perf) ** 2).sum()))
    sse = float(((fit.predict(loss) - perf) ** 2).sum())
    assert sse == pytest.approx(best, rel=2e-3)


def test_tasks_that_never_leave_random_are_not_fitted():
    loss = suite_losses()
    perf = 0.25 + np.random.default_rng(0).normal(0, 0.01, loss.shape)
    result = emergence_threshold(loss, perf, baseline=0.25, margin=0.05, n_boot=50)
    assert not result.leaves_random and result.fit is None
    emerged = emergence_threshold(*planted(), baseline=0.25, margin=0.05, n_boot=50)
    assert emerged.leaves_random and emerged.fit is not None
    assert emerged.spearman < -0.3


def test_leaves_random_rule_counts_checkpoints_in_the_better_direction():
    assert not leaves_random([0.5, 0.6, 0.9], 0.5, 0.1, min_beyond=2)  # only one beyond the margin
    assert leaves_random([0.5, 0.7, 0.9], 0.5, 0.1, min_beyond=2)
    brier = [0.75, 0.5, 0.4]  # lower is better
    assert leaves_random(brier, 0.75, 0.1, higher_is_better=False, min_beyond=2)
    assert not leaves_random(brier, 0.75, 0.1, higher_is_better=True, min_beyond=1)


def test_unexplained_variance_matches_a_hand_isotonic_fit():
    # pooling adjacent violators on y = [1, 3, 2, 4] gives [1, 2.5, 2.5, 4]: residual MSE 0.125, variance 1.25
    assert unexplained_variance([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.1)
    assert unexplained_variance([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(0.0)  # decreasing is found too


def test_points_collapse_on_loss_not_on_compute_or_step():
    loss, perf = planted()
    compute = 6 * N_PARAMS[:, None] * STEPS[None, :] * 1e3
    step = np.broadcast_to(STEPS, loss.shape)
    score = collapse_score(loss, perf, compute, step)
    assert score.unexplained_loss < 0.1
    assert score.ratio_compute < 0.8 and score.ratio_step < 0.2
    assert score.unexplained_compute == pytest.approx(unexplained_variance(compute, perf))


def test_missing_checkpoints_are_dropped_and_shapes_checked():
    loss, perf = planted()
    loss[0, -5:] = np.nan  # a model with fewer checkpoints
    fit = fit_segmented(loss, perf, n_boot=20)
    assert fit.n_points == loss.size - 5
    with pytest.raises(TokendynError, match="same shape"):
        fit_segmented(loss, perf[:, :3])


def test_segmented_fit_keeps_min_side_points_where_the_slope_acts():
    """docs/methods.md §2: each side of eta keeps min_side points; a point at eta adds nothing to the slope
    (was: the lowest candidate was the min_side-th loss itself, leaving min_side - 1 points below)."""
    loss = np.arange(1.0, 9.0)
    fit = fit_segmented(loss, [10.0, 5.0, 0, 0, 0, 0, 0, 0], min_side=3, n_boot=10)
    assert (loss < fit.eta).sum() >= 3 and (loss >= fit.eta).sum() >= 3

"""PassUntil: the sampling loop, the estimators on simulated samplers with known pass rates, and the
task scaling law fit on planted laws."""

import numpy as np
import pytest

from tokendyn.analysis.passuntil import fit_task_scaling, instance_rates, log_neg_log, pass_until, task_rate
from tokendyn.errors import TokendynError

N_PARAMS = np.array([1e7, 3e7, 1e8, 3e8, 1e9])


def bernoulli_sampler(p):
    """A 'model' whose completions pass with probability p: completions are the pass flags."""
    return lambda n, rng: list(rng.random(n) < p)


def simulate_runs(p, target, cap, rng):
    """Vectorised PassUntil outcomes with the loop's semantics: K = index of the target-th pass if
    within the cap; otherwise K = cap and the passes are Binomial(cap, p) conditioned below target."""
    p = np.array(p, dtype=float)
    samples = rng.negative_binomial(target, p) + target
    capped = samples > cap
    passes = np.full(p.shape, target)
    drawn = rng.binomial(cap, p[capped])
    while np.any(redraw := drawn >= target):
        drawn[redraw] = rng.binomial(cap, p[capped][redraw])
    passes[capped] = drawn
    return passes, np.where(capped, cap, samples)


def test_loop_counts_samples_up_to_the_target_pass():
    flags = iter([False, False, True, False, True, True, False, True])
    run = pass_until(
        lambda n, rng: [next(flags) for _ in range(n)],
        bool,
        passes=3,
        max_samples=100,
        batch_size=3,
        rng=np.random.default_rng(0),
    )
    # batches [F F T] [F T T]: the third pass is sample 6; all 6 drawn samples are the cost
    assert (run.passes, run.samples, run.drawn, run.batches) == (3, 6, 6, 2)
    assert not run.capped and not run.censored


def test_loop_stops_at_the_cap_and_reports_censoring():
    run = pass_until(
        bernoulli_sampler(0.0), bool, passes=2, max_samples=1000, batch_size=300, rng=np.random.default_rng(0)
    )
    assert (run.passes, run.samples, run.drawn, run.batches) == (0, 1000, 1000, 4)
    assert run.capped and run.censored
    rates = instance_rates(run.passes, run.samples, run.target)
    assert np.isnan(rates.rate) and rates.censored
    assert rates.upper == pytest.approx(1 - 0.05 ** (1 / 1000))  # Clopper-Pearson with no pass
    with pytest.raises(TokendynError, match="passes >= 2"):
        pass_until(bernoulli_sampler(0.5), bool, passes=1, max_samples=10, batch_size=5, rng=np.random.default_rng(0))


def test_estimator_is_unbiased_with_and_without_the_cap():
    rng = np.random.default_rng(1)
    for p, target, cap in [(0.02, 3, 10**6), (0.002, 3, 1000)]:  # the second hits the cap in ~2/3 of runs
        passes, samples = simulate_runs(np.full(8000, p), target, cap, rng)
        est = task_rate(passes, samples, target, n_boot=300)
        assert est.ci_low <= p <= est.ci_high
        assert est.estimate == pytest.approx(p, rel=0.05)
    assert est.n_censored > 1000  # r < 2 at the cap in about 40% of runs
    rates = instance_rates(passes, samples, target)
    assert np.all(np.isnan(rates.rate[rates.censored])) and np.all(rates.upper[rates.censored] >= p)


def test_task_estimate_from_the_sampling_loop_covers_the_true_mean():
    rng = np.random.default_rng(2)
    p = np.concatenate([rng.uniform(0.02, 0.3, 120), np.full(30, 1e-5)])  # the last 30 always hit the cap
    runs = [pass_until(bernoulli_sampler(pi), bool, passes=3, max_samples=2000, batch_size=256, rng=rng) for pi in p]
    passes = np.array([r.passes for r in runs])
    samples = np.array([r.samples for r in runs])
    est = task_rate(passes, samples, 3, n_boot=1000)
    assert est.ci_low <= p.mean() <= est.ci_high
    assert est.n_censored >= 30 and not est.censored
    assert est.upper > est.estimate
    assert sum(r.drawn for r in runs) >= samples.sum()


def test_task_with_no_pass_at_all_is_censored_not_zero():
    est = task_rate(np.zeros(10, int), np.full(10, 500), 2)
    assert est.censored and est.upper == pytest.approx(1 - 0.05 ** (1 / 500))


def planted_law(q, c=5 * 1e7**0.5, alpha=0.5):
    """Pass rates with F = log c - alpha log N + q (log N - mean)^2 (q = 0: the scaling law)."""
    u = np.log(N_PARAMS)
    return np.exp(-np.exp(np.log(c) - alpha * u + q * (u - u.mean()) ** 2))


def test_scaling_fit_recovers_planted_c_and_alpha_and_predicts_the_held_out_model():
    p = planted_law(0.0)
    passes, samples = simulate_runs(np.repeat(p[:, None], 300, 1), 4, 10**5, np.random.default_rng(3))
    fit = fit_task_scaling(passes, samples, 4, N_PARAMS, n_boot=300)
    assert fit.alpha == pytest.approx(0.5, abs=0.02)
    assert np.log(fit.c) == pytest.approx(np.log(5 * 1e7**0.5), abs=0.4)
    assert fit.shape == "linear"
    assert abs(fit.holdout_log10_ratio[0]) < 0.05
    assert fit.holdout_observed[0] == pytest.approx(p[-1], rel=0.05)


@pytest.mark.parametrize("q, shape", [(-0.1, "accelerated"), (0.1, "sub-scaling")])
def test_scaling_fit_classifies_planted_curvature(q, shape):
    passes, samples = simulate_runs(np.repeat(planted_law(q)[:, None], 300, 1), 4, 10**5, np.random.default_rng(4))
    fit = fit_task_scaling(passes, samples, 4, N_PARAMS, n_boot=300)
    assert fit.shape == shape
    assert fit.curvature_low <= q <= fit.curvature_high


def test_scaling_against_excess_loss_flips_the_sign_of_alpha():
    excess = 2.0 * N_PARAMS**-0.1  # a power law in N: the law stays linear, with exponent -0.5/0.1
    passes, samples = simulate_runs(np.repeat(planted_law(0.0)[:, None], 300, 1), 4, 10**5, np.random.default_rng(5))
    fit = fit_task_scaling(passes, samples, 4, N_PARAMS, excess_loss=excess, n_boot=100)
    assert fit.alpha == pytest.approx(-5.0, abs=0.2)


def test_instance_fits_leave_out_censored_points():
    rng = np.random.default_rng(6)
    p = np.repeat(planted_law(0.0)[:, None], 40, 1)
    p[0, :10] = 1e-9  # the smallest model never passes on ten instances
    passes, samples = simulate_runs(p, 4, 10**4, rng)
    fit = fit_task_scaling(passes, samples, 4, N_PARAMS, n_boot=50).instances
    rates = instance_rates(passes, samples, 4)
    for i in range(40):
        f = log_neg_log(rates.rate[:, i])
        used = np.isfinite(f)
        slope, intercept = np.polyfit(np.log(N_PARAMS[used]), f[used], 1)
        assert fit.n_points[i] == used.sum()
        assert fit.slope[i] == pytest.approx(slope) and fit.intercept[i] == pytest.approx(intercept)
    assert np.all(rates.censored[0, :10]) and not np.any(rates.censored[:, 10:])
    # the other sizes follow the law, whose rate at the smallest size (~0.007) exceeds the censored bound (~3e-4)
    fitted_smallest = np.exp(-np.exp(fit.intercept + fit.slope * np.log(N_PARAMS[0])))
    np.testing.assert_array_equal(fit.bound_violations, rates.censored[0] & (fitted_smallest > rates.upper[0]))
    assert fit.bound_violations[:10].sum() >= 8

"""Skills: the loss law fit, Theorem 8 against a brute-force random skill graph, measured competence
and the slingshot prediction."""

import math

import numpy as np
import pytest
import xarray as xr

from tokendyn.analysis.skills import (
    competent_fraction_bound,
    fit_loss_law,
    skill_competence,
    skill_curves,
    slingshot_prediction,
    theorem8_lhs,
)
from tokendyn.errors import TokendynError


def planted_suite(noise=0.003, seed=0):
    """(model, ckpt) losses of L = 2 + 400 N^-0.3 + 300 D^-0.35 with a little noise."""
    n_params = np.array([1e6, 4e6, 1.6e7, 6.4e7])[:, None]
    tokens = np.geomspace(1e7, 1e10, 25)[None, :]
    loss = 2.0 + 400 * n_params**-0.3 + 300 * tokens**-0.35
    return loss + np.random.default_rng(seed).normal(0, noise, loss.shape), tokens, n_params


def test_joint_loss_law_recovers_the_irreducible_loss():
    loss, tokens, n_params = planted_suite()
    law = fit_loss_law(loss, tokens, n_params)
    assert law.irreducible == pytest.approx(2.0, abs=0.05)
    assert law.params["a"] == pytest.approx(0.3, abs=0.05) and law.params["b"] == pytest.approx(0.35, abs=0.05)
    assert law.rmse < 0.005
    np.testing.assert_allclose(law.excess(loss), loss - law.irreducible)
    np.testing.assert_allclose(law.predict(tokens, n_params), loss, atol=0.02)


def test_tokens_law_on_one_model_and_bad_inputs():
    tokens = np.geomspace(1e6, 1e10, 30)
    loss = 2.5 + 40 * tokens**-0.25
    tokens_with_start = np.concatenate([[0.0], tokens])  # step 0 has seen no tokens: dropped
    law = fit_loss_law(np.concatenate([[10.0], loss]), tokens_with_start, law="tokens")
    assert law.irreducible == pytest.approx(2.5, abs=0.02) and law.n_points == 30
    with pytest.raises(TokendynError, match="two model sizes"):
        fit_loss_law(loss, tokens, np.full(30, 1e6))
    with pytest.raises(TokendynError, match="unknown loss law"):
        fit_loss_law(loss, tokens, law="compute")


def kl(p, q):
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def test_theorem8_condition_is_entropy_minus_k_theta_kl():
    for theta, k, alpha, beta in [(0.05, 8, 0.3, 2.0), (0.01, 4, 0.1, 5.0), (0.2, 3, 0.02, 10.0)]:
        h = -theta * math.log(theta) - (1 - theta) * math.log(1 - theta)
        assert theorem8_lhs(theta, k, alpha, beta) == pytest.approx(h - k * theta * kl(beta * alpha, alpha))


def test_bound_is_the_largest_one_minus_alpha_that_satisfies_the_condition():
    theta = np.array([0.02, 0.05, 0.1])
    bound = competent_fraction_bound(theta, 8, 2.0)
    assert np.all(bound > 0)
    alpha = 1 - bound
    assert np.all(theorem8_lhs(theta, 8, alpha, 2.0) < 0)
    assert np.all(theorem8_lhs(theta, 8, alpha * 0.995, 2.0) >= 0)
    assert competent_fraction_bound(0.01, 2, 2.0) == 0.0  # no alpha works: nothing guaranteed
    with pytest.raises(TokendynError, match="beta > 1"):
        competent_fraction_bound(0.1, 4, 1.0)


def random_skill_graph(n_skills, n_pieces, k, rng):
    """Each text piece uses k distinct skills drawn uniformly: (piece, k) skill indices."""
    return np.argsort(rng.random((n_pieces, n_skills)), axis=1)[:, :k]


def competent_fraction(pieces, failed, n_skills, level):
    """Share of skills whose text pieces are failed at most a `level` fraction of the time."""
    degree = np.bincount(pieces.ravel(), minlength=n_skills)
    failures = np.bincount(pieces[failed].ravel(), minlength=n_skills)
    return float(np.mean(failures <= level * degree))


def adversarial_failures(pieces, n_skills, theta, level, rng):
    """Greedy adversary: for target sets Z of the z lowest-degree skills, fail the theta fraction
    of text pieces with the most skills in Z; keep the worst outcome over z."""
    n_failed = round(theta * len(pieces))
    degree = np.bincount(pieces.ravel(), minlength=n_skills)
    worst = 1.0
    for z in range(1, n_skills + 1):
        target = np.isin(np.arange(n_skills), np.argsort(degree)[:z])
        order = np.argsort(-target[pieces].sum(1) + 0.5 * rng.random(len(pieces)))
        failed = np.zeros(len(pieces), bool)
        failed[order[:n_failed]] = True
        worst = min(worst, competent_fraction(pieces, failed, n_skills, level))
    return worst


@pytest.mark.parametrize(
    "n_skills, n_pieces, k, theta, beta",
    [(30, 3000, 8, 0.05, 2.0), (40, 4000, 4, 0.05, 5.0), (40, 4000, 16, 0.01, 2.0), (25, 2000, 6, 0.05, 3.0)],
)
def test_theorem8_bound_holds_on_random_skill_graphs(n_skills, n_pieces, k, theta, beta):
    rng = np.random.default_rng(7)
    bound = float(competent_fraction_bound(theta, k, beta))
    assert bound > 0.5  # a regime where the theorem says something
    level = beta * theta  # competence >= 1 - beta theta
    for _ in range(3):
        pieces = random_skill_graph(n_skills, n_pieces, k, rng)
        at_random = competent_fraction(pieces, rng.random(n_pieces) < theta, n_skills, level)
        adversarial = adversarial_failures(pieces, n_skills, theta, level, rng)
        assert at_random >= bound and adversarial >= bound
        assert adversarial < 1.0  # the adversary does make skills fail: the check is not vacuous


def test_skill_competence_by_hand():
    items = [("a",), ("a",), ("b",), ("a", "b"), ("b", "c"), ("a", "b", "c")]
    correct = xr.DataArray([[1, 0, 1, 1, 0, np.nan], [1, 1, 0, 0, 0, 1]], dims=["ckpt", "item"])
    got = skill_competence(correct, items)
    np.testing.assert_allclose(got["by_k"].sel(k=1), [2 / 3, 2 / 3])
    np.testing.assert_allclose(got["by_k"].sel(k=2), [0.5, 0.0])
    np.testing.assert_allclose(got["by_k"].sel(k=3), [np.nan, 1.0])
    np.testing.assert_allclose(got["by_skill"].sel(skill="a"), [0.5, 1.0])
    np.testing.assert_allclose(got["by_skill"].sel(skill="b"), [1.0, 0.0])
    assert np.isnan(got["by_skill"].sel(skill="c")).all()  # no single-skill item for c
    with pytest.raises(TokendynError, match="entries"):
        skill_competence(correct, items[:-1])


def test_slingshot_prediction_reads_the_single_curve_at_k_times_the_excess():
    excess = np.linspace(0.05, 0.6, 12)
    single = 1 - excess  # competence falls linearly with excess loss
    pred = slingshot_prediction(excess, single, [1, 2, 3])
    np.testing.assert_allclose(pred[:, 0], single)
    inside = 2 * excess <= 0.6
    np.testing.assert_allclose(pred[inside, 1], 1 - 2 * excess[inside])
    assert np.all(np.isnan(pred[3 * excess > 0.6, 2]))  # never extrapolated


def test_skill_curves_put_measured_k_tuples_next_to_the_prediction():
    """Items whose pass chance follows the slingshot exactly (1 - k * excess) are predicted well."""
    rng = np.random.default_rng(8)
    excess = xr.DataArray(np.linspace(0.02, 0.3, 10).reshape(2, 5), dims=["model", "ckpt"])
    items = [(f"s{i % 20}",) for i in range(400)] + [(f"s{i % 20}", f"s{(i + 1) % 20}") for i in range(400)]
    k = xr.DataArray([len(t) for t in items], dims=["item"])
    chance = (1 - k * excess).transpose("model", "ckpt", "item")
    correct = chance.copy(data=(rng.random(chance.shape) < chance.values).astype(float))
    curves = skill_curves(correct, items, excess, ks=[1, 2])
    assert curves["measured"].dims == ("model", "ckpt", "k")
    assert curves["predicted"].dims == ("model", "ckpt", "k")
    both = curves["predicted"].sel(k=2).notnull()
    assert int(both.sum()) >= 4
    diff = (curves["measured"].sel(k=2) - curves["predicted"].sel(k=2)).where(both)
    assert float(abs(diff).max()) < 0.08

"""Multiple-choice metrics against a hand computation on a tiny example."""

import math

import numpy as np
import pytest
import xarray as xr

from tokendyn.analysis.choices import chance_margin, choice_metrics, choice_scores, option_probabilities
from tokendyn.errors import TokendynError

NAN = float("nan")
# item 0: three options; item 1: two options (the third is padding)
LOGPROB = [[-2.0, -3.0, -6.0], [-1.0, -1.5, NAN]]
LENGTH = [[1, 2, 4], [1, 1, 1]]
ANSWER = [1, 1]


def hand_metrics(logprob, length, answer, per_token=False, chars=None):
    """Plain-Python version of the definitions, item by item (acc_norm by `chars`, default = length)."""
    chars = length if chars is None else chars
    acc, ccp, brier, r_acc, r_brier = [], [], [], [], []
    for lp, ln, ch, a in zip(logprob, length, chars, answer):
        opts = [j for j in range(len(lp)) if not math.isnan(lp[j])]
        norm = {j: lp[j] / ch[j] for j in opts}
        best = max(opts, key=lambda j: (norm[j], -j))  # first of the highest
        if per_token:
            norm = {j: lp[j] / ln[j] for j in opts}
        score = norm if per_token else {j: lp[j] for j in opts}
        z = sum(math.exp(score[j]) for j in opts)
        p = {j: math.exp(score[j]) / z for j in opts}
        acc.append(float(best == a))
        ccp.append(p[a])
        brier.append(sum(((j == a) - p[j]) ** 2 for j in opts))
        r_acc.append(1 / len(opts))
        r_brier.append(1 - 1 / len(opts))
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    return dict(
        accuracy=mean(acc),
        correct_prob=mean(ccp),
        brier=mean(brier),
        random_accuracy=mean(r_acc),
        random_brier=mean(r_brier),
    )


@pytest.mark.parametrize("per_token", [False, True])
def test_metrics_match_hand_computation(per_token):
    got = choice_metrics(LOGPROB, ANSWER, chars=LENGTH, tokens=LENGTH, prob_per_token=per_token)
    want = hand_metrics(LOGPROB, LENGTH, ANSWER, per_token)
    for name, value in want.items():
        assert got[name] == pytest.approx(value, abs=1e-12), name
    # the tie in item 0 (-3/2 == -6/4) goes to the first option, which is the answer
    assert got["accuracy"] == 0.5
    assert got["random_accuracy"] == pytest.approx(5 / 12)


def test_uniform_guessing_brier_is_one_minus_one_over_c():
    logprob = np.zeros((4, 5))  # equal scores: uniform probabilities over 5 options
    got = choice_metrics(logprob, [0, 1, 2, 3], chars=1)
    assert got["brier"] == pytest.approx(1 - 1 / 5)
    assert got["correct_prob"] == pytest.approx(1 / 5)


def test_padded_options_get_no_probability():
    prob = option_probabilities(LOGPROB)
    assert prob[1, 2] == 0
    np.testing.assert_allclose(prob.sum(-1), 1)


def test_labelled_scores_match_per_slice():
    rng = np.random.default_rng(0)
    logprob = rng.normal(-5, 2, (2, 3, 6, 4))  # (model, ckpt, item, option)
    length = rng.integers(1, 5, (6, 4))
    answer = rng.integers(0, 4, 6)
    da = xr.DataArray(logprob, dims=["model", "ckpt", "item", "option"], coords={"model": ["a", "b"]})
    ds = choice_scores(da, answer, chars=xr.DataArray(length, dims=["item", "option"]))
    assert ds.attrs["convention"] == "acc_norm"
    assert set(ds.data_vars) == {"accuracy", "correct_prob", "brier", "random_accuracy", "random_brier"}
    assert ds["brier"].dims == ("model", "ckpt")
    for m in range(2):
        for c in range(3):
            want = hand_metrics(logprob[m, c].tolist(), length.tolist(), answer.tolist())
            for name, value in want.items():
                assert float(ds[name][m, c]) == pytest.approx(value, abs=1e-12)


def test_invalid_inputs_name_the_problem():
    with pytest.raises(TokendynError, match="padded"):
        choice_metrics(LOGPROB, [1, 2], chars=LENGTH)
    with pytest.raises(TokendynError, match="two options"):
        choice_metrics([[-1.0, NAN]], [0], chars=1)
    with pytest.raises(TokendynError, match="integer"):
        choice_metrics(LOGPROB, [1.0, 0.0], chars=LENGTH)
    with pytest.raises(TokendynError, match="unknown accuracy convention"):
        choice_metrics(LOGPROB, ANSWER, convention="accuracy")
    with pytest.raises(TokendynError, match="characters"):
        choice_metrics(LOGPROB, ANSWER)
    with pytest.raises(TokendynError, match="highest target score"):
        choice_metrics(LOGPROB, ANSWER, convention="acc", target_scores=[[1, 0, 0], [0, 1, 0]])


# BIG-Bench partial credit, by hand. Item 0: options scored 1, 0.5, 0 (answer 0); item 1: two acceptable
# answers (1, 1, 0; answer 0). Summed log-probs and option lengths in characters:
BB_LOGPROB = [[-6.0, -4.0, -9.0], [-3.0, -2.0, -1.0]]
BB_CHARS = [[6, 2, 3], [1, 1, 1]]
BB_TARGETS = [[1.0, 0.5, 0.0], [1.0, 1.0, 0.0]]


def test_bigbench_grade_gives_partial_credit():
    # argmax of the summed log-prob: item 0 -> option 1 (score 0.5), item 1 -> option 2 (score 0)
    got = choice_metrics(BB_LOGPROB, [0, 0], convention="grade", target_scores=BB_TARGETS)
    assert got["accuracy"] == pytest.approx((0.5 + 0.0) / 2)
    assert got["random_accuracy"] == pytest.approx((1.5 / 3 + 2 / 3) / 2)  # the mean target score


def test_acc_and_acc_norm_credit_any_top_scored_option():
    acc = choice_metrics(BB_LOGPROB, [0, 0], convention="acc", target_scores=BB_TARGETS)
    assert acc["accuracy"] == 0.0  # option 1 of item 0 is not top-scored; option 2 of item 1 is wrong
    # per character: item 0: -1, -2, -3 -> option 0 (correct); item 1: -3, -2, -1 -> option 2 (wrong)
    norm = choice_metrics(BB_LOGPROB, [0, 0], convention="acc_norm", chars=BB_CHARS, target_scores=BB_TARGETS)
    assert norm["accuracy"] == 0.5
    assert norm["random_accuracy"] == pytest.approx((1 / 3 + 2 / 3) / 2)
    # the probability mass on every acceptable answer of item 1 counts as correct
    p1 = np.exp(BB_LOGPROB[1]) / np.exp(BB_LOGPROB[1]).sum()
    p0 = np.exp(BB_LOGPROB[0]) / np.exp(BB_LOGPROB[0]).sum()
    assert norm["correct_prob"] == pytest.approx((p0[0] + p1[0] + p1[1]) / 2)
    brier1 = (1 - p1[0]) ** 2 + (1 - p1[1]) ** 2 + p1[2] ** 2
    brier0 = (1 - p0[0]) ** 2 + p0[1] ** 2 + p0[2] ** 2
    assert norm["brier"] == pytest.approx((brier0 + brier1) / 2)


def test_chance_margin_is_z_standard_errors():
    assert chance_margin(100, 4, z=2) == pytest.approx(2 * math.sqrt(0.25 * 0.75 / 100))

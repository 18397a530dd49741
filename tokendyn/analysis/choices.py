"""Multiple-choice metrics from per-option log-probabilities (methods.md §1.5 and §2).

Each option of an item is scored by the summed log-probability of its tokens given the prompt.
Items may have different numbers of options: pad the option axis with NaN, and a padded option
counts as absent everywhere (in the argmax, in the normalisation and in the random baseline).
Every option carries a target score (BIG-Bench's `target_scores`; 1 for the correct option and 0
for the others in a task with one answer); the *correct* options of an item are those with its
highest target score, so an item may have several.

Accuracy conventions (`CONVENTIONS`, default `DEFAULT_CONVENTION`), per item, ties to the first option:
- "acc" (lm-eval's `acc`): the option with the highest summed log-probability is chosen; 1 if it
  is a correct option, else 0;
- "acc_norm" (lm-eval's `acc_norm`): the option with the highest summed log-probability divided
  by the option's length in characters (the option text without the delimiter before it, as
  lm-eval counts `len(choice)`) is chosen; 1 if it is a correct option, else 0;
- "grade" (BIG-Bench's `multiple_choice_grade`): the option with the highest summed
  log-probability (no length normalisation) is chosen, and the item scores that option's target
  score (partial credit: choosing an option scored 0.5 gives 0.5).
The default is "acc_norm": Xia et al. 2023 (methods.md §1.5) choose by length-normalised
log-probability, and lm-eval's characters are the field's reference for that normalisation.

Other metrics, per item i with options j, averaged over items:
- correct-choice probability: the probability mass on the correct options after normalising over
  the item's options, yhat_ij = exp(s_ij) / sum_j' exp(s_ij'), s_ij the summed log-probability
  (`prob_per_token=True` uses the log-probability per token instead);
- Brier score: sum_j (y_ij - yhat_ij)^2 with y_ij = 1 on the correct options (lower is better);
- random baselines: the expected accuracy of a uniform guess (correct options / C_i; for "grade"
  the mean target score) and the Brier score of uniform probabilities (1 - 1/C_i with one answer).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr
from numpy.typing import ArrayLike
from scipy.special import softmax

from tokendyn.errors import TokendynError

METRICS = ("accuracy", "correct_prob", "brier", "random_accuracy", "random_brier")
CONVENTIONS = ("acc", "acc_norm", "grade")
DEFAULT_CONVENTION = "acc_norm"


def check_convention(convention: str) -> str:
    """The convention itself, or a TokendynError naming the valid ones."""
    if convention not in CONVENTIONS:
        raise TokendynError(f"unknown accuracy convention {convention!r}; use one of {', '.join(CONVENTIONS)}")
    return convention


def _validate(logprob, answer, lengths: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    logprob = np.asarray(logprob, dtype=float)
    if logprob.ndim < 2:
        raise TokendynError(f"logprob has shape {logprob.shape}; pass (..., item, option) summed log-probabilities")
    answer = np.broadcast_to(np.asarray(answer), logprob.shape[:-1])
    if not np.issubdtype(answer.dtype, np.integer):
        raise TokendynError("answer must hold integer option indices; convert target scores with argmax first")
    present = ~np.isnan(logprob)
    out = {}
    for name, value in lengths.items():
        if value is None:
            continue
        value = np.broadcast_to(np.asarray(value, dtype=float), logprob.shape)
        if np.any(present & ~(value > 0)):
            raise TokendynError(f"every present option needs a positive length in {name}; fix the lengths")
        out[name] = value
    if np.any(present.sum(-1) < 2):
        raise TokendynError("every item needs at least two options (pad missing ones with NaN, not whole items)")
    if np.any((answer < 0) | (answer >= logprob.shape[-1])):
        raise TokendynError(f"answer indices must lie in [0, {logprob.shape[-1]}); fix the answer column")
    if not np.all(np.take_along_axis(present, answer[..., None], -1)):
        raise TokendynError("an answer points at a padded (NaN) option; fix the answer or the option scores")
    return logprob, answer, out


def _targets(target_scores, answer: np.ndarray, shape: tuple) -> np.ndarray:
    """Target score of every option (..., item, option): given, or 1 on the answer and 0 elsewhere."""
    if target_scores is None:
        return (np.arange(shape[-1]) == answer[..., None]).astype(float) * np.ones(shape)
    scores = np.broadcast_to(np.asarray(target_scores, dtype=float), shape)
    best = np.take_along_axis(scores, answer[..., None], -1)
    if np.any(best < np.nanmax(scores, axis=-1, keepdims=True)):
        raise TokendynError("the answer of an item must be one of its options with the highest target score")
    return scores


def option_probabilities(logprob: ArrayLike, length: ArrayLike | None = None) -> np.ndarray:
    """Probabilities over an item's options (..., item, option): softmax of the summed log-prob,
    or of the length-normalised score when `length` is given; 0 on padded (NaN) options."""
    logprob = np.asarray(logprob, dtype=float)
    score = logprob if length is None else logprob / np.asarray(length, dtype=float)
    return softmax(np.where(np.isnan(score), -np.inf, score), axis=-1)


def choice_metrics(
    logprob: ArrayLike,
    answer: ArrayLike,
    *,
    convention: str = DEFAULT_CONVENTION,
    chars: ArrayLike | None = None,
    tokens: ArrayLike | None = None,
    target_scores: ArrayLike | None = None,
    prob_per_token: bool = False,
) -> dict[str, np.ndarray]:
    """Accuracy (by `convention`), correct-choice probability, Brier score and random baselines,
    averaged over items.

    logprob: (..., item, option) summed log-probability of each option's tokens (NaN = no option).
    answer: (item,) or (..., item) integer index of a correct option (one with the highest target score).
    convention: "acc", "acc_norm" or "grade" (see the module docstring).
    chars: broadcastable to logprob; each option's length in characters, needed by "acc_norm".
    tokens: broadcastable to logprob; each option's length in tokens, needed by prob_per_token.
    target_scores: broadcastable to logprob; each option's target score (default 1 on the answer, 0 elsewhere).
    prob_per_token: softmax over the log-probabilities per token (instead of the summed ones) for
        correct_prob and brier.
    Returns a dict of arrays with the leading (...) shape, keys METRICS.
    """
    check_convention(convention)
    if convention == "acc_norm" and chars is None:
        raise TokendynError("the acc_norm convention needs each option's length in characters (chars=)")
    if prob_per_token and tokens is None:
        raise TokendynError("prob_per_token needs each option's length in tokens (tokens=)")
    logprob, answer, lengths = _validate(logprob, answer, {"characters": chars, "tokens": tokens})
    present = ~np.isnan(logprob)
    targets = np.where(present, _targets(target_scores, answer, logprob.shape), np.nan)
    correct = present & (targets == np.nanmax(targets, axis=-1, keepdims=True))
    score = logprob / lengths["characters"] if convention == "acc_norm" else logprob
    chosen = np.argmax(np.where(present, score, -np.inf), axis=-1)[..., None]
    credit = np.take_along_axis(targets if convention == "grade" else correct.astype(float), chosen, -1)[..., 0]
    prob = option_probabilities(logprob, lengths["tokens"] if prob_per_token else None)
    n_options = present.sum(-1)
    random_accuracy = np.nanmean(targets, axis=-1) if convention == "grade" else correct.sum(-1) / n_options
    per_item = {
        "accuracy": credit,
        "correct_prob": np.where(correct, prob, 0.0).sum(-1),
        "brier": np.where(present, (correct - prob) ** 2, 0.0).sum(-1),
        "random_accuracy": random_accuracy,
        "random_brier": np.where(present, (correct - 1.0 / n_options[..., None]) ** 2, 0.0).sum(-1),
    }
    return {name: values.mean(-1) for name, values in per_item.items()}


def choice_scores(
    logprob: xr.DataArray,
    answer: xr.DataArray | ArrayLike,
    *,
    item_dim: str = "item",
    option_dim: str = "option",
    **options: Any,
) -> xr.Dataset:
    """`choice_metrics` on labelled arrays: logprob with dims (..., item_dim, option_dim), e.g.
    (task, model, ckpt, item, option); answer with dims (..., item_dim); options as in
    `choice_metrics` (chars, tokens and target_scores as DataArrays broadcastable to logprob).
    Returns a Dataset with the variables METRICS over the remaining dims (e.g. task, model, ckpt);
    its attribute `convention` says which accuracy convention was used."""
    answer = answer if isinstance(answer, xr.DataArray) else xr.DataArray(np.asarray(answer), dims=[item_dim])
    core = [item_dim, option_dim]
    arrays = {k: options.pop(k) for k in ("chars", "tokens", "target_scores") if options.get(k) is not None}
    arrays = {
        k: (v if isinstance(v, xr.DataArray) else xr.DataArray(v)).broadcast_like(logprob) for k, v in arrays.items()
    }
    names = list(arrays)

    def metrics(lp, an, *values):
        return tuple(choice_metrics(lp, an, **options, **dict(zip(names, values))).values())

    out = xr.apply_ufunc(
        metrics,
        logprob,
        answer,
        *arrays.values(),
        input_core_dims=[core, [item_dim]] + [core] * len(arrays),
        output_core_dims=[[] for _ in METRICS],
    )
    convention = options.get("convention", DEFAULT_CONVENTION)
    return xr.Dataset(dict(zip(METRICS, out)), attrs={"convention": convention})


def chance_margin(n_items: int, n_choices: float, z: float = 3.0) -> float:
    """How far above the random baseline an accuracy must lie to count as above chance: z binomial
    standard errors of accuracy under uniform guessing, z * sqrt(p (1 - p) / n_items), p = 1/n_choices."""
    if n_items < 1 or n_choices < 2:
        raise TokendynError("chance_margin needs at least one item and two choices")
    p = 1.0 / n_choices
    return float(z * np.sqrt(p * (1 - p) / n_items))

"""Multiple-choice metrics from per-option log-probabilities (methods.md §1.5 and §2).

Each option of an item is scored by the summed log-probability of its tokens given the prompt.
Items may have different numbers of options: pad the option axis with NaN, and a padded option
counts as absent everywhere (in the argmax, in the normalisation and in the random baseline).

Metrics, per item i with C_i options and correct option a_i, averaged over items:
- accuracy: the option with the highest length-normalised log-probability (summed log-prob over
  its length) is a_i; ties go to the first option;
- correct-choice probability: the probability mass on a_i after normalising over the item's
  options, yhat_ij = exp(s_ij) / sum_j' exp(s_ij'), where s_ij is the summed log-probability
  (`prob_per_token=True` uses the length-normalised score instead);
- Brier score: sum_j (y_ij - yhat_ij)^2 with y one-hot on a_i (lower is better);
- random baselines: 1/C_i for accuracy and correct-choice probability, 1 - 1/C_i for the Brier
  score of uniform guessing.
"""

from __future__ import annotations

import numpy as np
import xarray as xr
from scipy.special import softmax

from tokendyn.errors import TokendynError

METRICS = ("accuracy", "correct_prob", "brier", "random_accuracy", "random_brier")


def _validate(logprob, length, answer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    logprob = np.asarray(logprob, dtype=float)
    if logprob.ndim < 2:
        raise TokendynError(f"logprob has shape {logprob.shape}; pass (..., item, option) summed log-probabilities")
    length = np.broadcast_to(np.asarray(length, dtype=float), logprob.shape)
    answer = np.broadcast_to(np.asarray(answer), logprob.shape[:-1])
    if not np.issubdtype(answer.dtype, np.integer):
        raise TokendynError("answer must hold integer option indices; convert target scores with argmax first")
    present = ~np.isnan(logprob)
    if np.any(present & ~(length > 0)):
        raise TokendynError("every present option needs a positive length (tokens or characters); fix the lengths")
    if np.any(present.sum(-1) < 2):
        raise TokendynError("every item needs at least two options (pad missing ones with NaN, not whole items)")
    if np.any((answer < 0) | (answer >= logprob.shape[-1])):
        raise TokendynError(f"answer indices must lie in [0, {logprob.shape[-1]}); fix the answer column")
    if not np.all(np.take_along_axis(present, answer[..., None], -1)):
        raise TokendynError("an answer points at a padded (NaN) option; fix the answer or the option scores")
    return logprob, length, answer


def option_probabilities(logprob, length=None) -> np.ndarray:
    """Probabilities over an item's options (..., item, option): softmax of the summed log-prob,
    or of the length-normalised score when `length` is given; 0 on padded (NaN) options."""
    logprob = np.asarray(logprob, dtype=float)
    score = logprob if length is None else logprob / np.asarray(length, dtype=float)
    return softmax(np.where(np.isnan(score), -np.inf, score), axis=-1)


def choice_metrics(logprob, length, answer, *, prob_per_token: bool = False) -> dict[str, np.ndarray]:
    """Accuracy, correct-choice probability, Brier score and random baselines, averaged over items.

    logprob: (..., item, option) summed log-probability of each option's tokens (NaN = no option).
    length: broadcastable to logprob; option length used for length normalisation (tokens, or
        characters/bytes if preferred). Must be > 0 on present options.
    answer: (item,) or (..., item) integer index of the correct option.
    prob_per_token: normalise the length-normalised scores (instead of the summed log-probs) when
        computing the option probabilities for correct_prob and brier.
    Returns a dict of arrays with the leading (...) shape, keys METRICS.
    """
    logprob, length, answer = _validate(logprob, length, answer)
    normalised = np.where(np.isnan(logprob), -np.inf, logprob / length)
    prob = option_probabilities(logprob, length if prob_per_token else None)
    onehot = np.arange(logprob.shape[-1]) == answer[..., None]
    n_options = (~np.isnan(logprob)).sum(-1)
    per_item = {
        "accuracy": (np.argmax(normalised, axis=-1) == answer).astype(float),
        "correct_prob": np.take_along_axis(prob, answer[..., None], -1)[..., 0],
        "brier": ((onehot - prob) ** 2).sum(-1),
        "random_accuracy": 1.0 / n_options,
        "random_brier": 1.0 - 1.0 / n_options,
    }
    return {name: values.mean(-1) for name, values in per_item.items()}


def choice_scores(logprob: xr.DataArray, length, answer, *, item_dim: str = "item", option_dim: str = "option",
                  prob_per_token: bool = False) -> xr.Dataset:
    """`choice_metrics` on labelled arrays: logprob with dims (..., item_dim, option_dim), e.g.
    (task, model, ckpt, item, option); length broadcastable to it; answer with dims (..., item_dim).
    Returns a Dataset with the variables METRICS over the remaining dims (e.g. task, model, ckpt)."""
    length = xr.DataArray(length) if not isinstance(length, xr.DataArray) else length
    answer = answer if isinstance(answer, xr.DataArray) else xr.DataArray(np.asarray(answer), dims=[item_dim])
    core = [item_dim, option_dim]
    out = xr.apply_ufunc(
        lambda lp, ln, an: tuple(choice_metrics(lp, ln, an, prob_per_token=prob_per_token).values()),
        logprob, length.broadcast_like(logprob), answer,
        input_core_dims=[core, core, [item_dim]],
        output_core_dims=[[] for _ in METRICS],
    )
    return xr.Dataset(dict(zip(METRICS, out)))


def chance_margin(n_items: int, n_choices: float, z: float = 3.0) -> float:
    """How far above the random baseline an accuracy must lie to count as above chance: z binomial
    standard errors of accuracy under uniform guessing, z * sqrt(p (1 - p) / n_items), p = 1/n_choices."""
    if n_items < 1 or n_choices < 2:
        raise TokendynError("chance_margin needs at least one item and two choices")
    p = 1.0 / n_choices
    return float(z * np.sqrt(p * (1 - p) / n_items))

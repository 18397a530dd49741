"""Skills and their composition (methods.md §3, after Arora & Goyal, arXiv 2307.15936).

The theory: text pieces each use a random k-tuple of skills (a random bipartite graph of skills
and text pieces); the model fails on a set Y of text pieces of measure theta, which the excess
cross-entropy (loss minus the irreducible loss) bounds. Theorem 8 holds for *every* Y of measure
theta, adversarial ones included: it is a union bound over all such sets (the H(theta) term)
against the chance that a fixed set of skills gets too many of Y's edges (the KL term). The union
over skill sets is left out, which is sound when text pieces far outnumber skills (the
brute-force check in tests/test_skills.py uses about 100 pieces per skill).

This module gives:
- `fit_loss_law` / `LossLaw`: the irreducible loss E from a suite's loss curve, and the excess loss;
- `theorem8_lhs`, `competent_fraction_bound`: the theorem's condition and the lower bound on the
  fraction of skills with competence >= 1 - beta * theta;
- `skill_competence`: measured competence from per-item correctness of items labelled with skills;
- `slingshot_prediction`, `skill_curves`: measured k-tuple competence against the prediction
  "competence on k-tuples at theta / k equals single-skill competence at theta".
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import xarray as xr
from numpy.typing import ArrayLike
from scipy.optimize import curve_fit
from scipy.special import entr
from sklearn.isotonic import IsotonicRegression

from tokendyn.errors import TokendynError

LAWS = ("joint", "tokens")
ITEM_DIM = "item"  # the dimension of per-item correctness (`skill_competence`, `skill_curves`)


@dataclass(frozen=True)
class LossLaw:
    """A fitted loss law. law "joint": L(N, D) = E + A (N/N0)^-a + B (D/D0)^-b (Hoffmann et al.);
    law "tokens": L(D) = E + B (D/D0)^-b. N0, D0 are the geometric means of the fitted N and D
    (they only keep A and B well scaled). `irreducible` is E; rmse is on the fitted points."""

    law: str
    irreducible: float
    params: dict[str, float]
    rmse: float
    n_points: int

    def predict(self, tokens: ArrayLike, n_params: ArrayLike | None = None) -> np.ndarray:
        p = self.params
        d = np.asarray(tokens, dtype=float) / p["D0"]
        loss = self.irreducible + p["B"] * d ** -p["b"]
        if self.law == "joint":
            loss = loss + p["A"] * (np.asarray(n_params, dtype=float) / p["N0"]) ** -p["a"]
        return loss

    def excess(self, loss: ArrayLike) -> np.ndarray:
        """Excess loss = loss - E (negative where a checkpoint lies below the fitted E)."""
        return np.asarray(loss, dtype=float) - self.irreducible


def fit_loss_law(
    loss: ArrayLike, tokens: ArrayLike, n_params: ArrayLike | None = None, *, law: str = "joint"
) -> LossLaw:
    """Fit the irreducible loss of a suite by nonlinear least squares (scipy curve_fit).

    loss: validation loss per checkpoint, e.g. log(val_ppl) of shape (model, ckpt).
    tokens: tokens seen, same shape. n_params: parameter count, broadcastable (numpy: (model, 1);
        DataArrays are aligned by dims, so ds.n_params works); law "joint" needs two sizes or more.
    Points with a NaN or tokens <= 0 (the initial checkpoint) are dropped. Bounds: 0 <= E <= min
    loss, A, B >= 0, exponents in [0.01, 3]; the best of several starting exponents is kept.
    """
    if law not in LAWS:
        raise TokendynError(f"unknown loss law {law!r}; choose one of {', '.join(LAWS)}")
    if isinstance(loss, xr.DataArray):  # align labelled inputs by dimension name, e.g. n_params (model,)
        tokens, n_params = (
            v.broadcast_like(loss).transpose(*loss.dims) if isinstance(v, xr.DataArray) else v
            for v in (tokens, n_params)
        )
    loss = np.asarray(loss, dtype=float)
    tokens = np.broadcast_to(np.asarray(tokens, dtype=float), loss.shape)
    size = np.broadcast_to(np.asarray(n_params if n_params is not None else 1.0, dtype=float), loss.shape)
    keep = np.isfinite(loss) & (tokens > 0) & np.isfinite(size)
    loss, tokens, size = loss[keep], tokens[keep], size[keep]
    n_free = 5 if law == "joint" else 3
    if loss.size <= n_free:
        raise TokendynError(f"the {law} loss law needs more than {n_free} checkpoints with a loss and tokens seen > 0")
    if law == "joint" and (n_params is None or np.unique(size).size < 2):
        raise TokendynError(
            "the joint loss law needs n_params for at least two model sizes; use law='tokens' otherwise"
        )
    d0, n0 = np.exp(np.log(tokens).mean()), np.exp(np.log(size).mean())
    d, n = tokens / d0, size / n0
    spread = max(float(np.ptp(loss)), 1e-3)

    if law == "joint":

        def model(_, e, a_coef, a, b_coef, b):
            return e + a_coef * n**-a + b_coef * d**-b

        lower, upper = [0, 0, 0.01, 0, 0.01], [loss.min(), np.inf, 3, np.inf, 3]
        starts = [[0.5 * loss.min(), spread, s, spread, s] for s in (0.1, 0.3, 0.7)]
    else:

        def model(_, e, b_coef, b):
            return e + b_coef * d**-b

        lower, upper = [0, 0, 0.01], [loss.min(), np.inf, 3]
        starts = [[0.5 * loss.min(), spread, s] for s in (0.1, 0.3, 0.7)]

    best, best_sse = None, np.inf
    for start in starts:
        try:
            popt, _ = curve_fit(model, None, loss, p0=start, bounds=(lower, upper), maxfev=20000)
        except RuntimeError:  # this start did not converge; the others may
            continue
        sse = float(((model(None, *popt) - loss) ** 2).sum())
        if sse < best_sse:
            best, best_sse = popt, sse
    if best is None:
        raise TokendynError("the loss law fit did not converge; check that the loss falls with tokens seen")
    names = ["E", "A", "a", "B", "b"] if law == "joint" else ["E", "B", "b"]
    params = dict(zip(names, map(float, best)), D0=float(d0), N0=float(n0))
    return LossLaw(
        law=law,
        irreducible=params["E"],
        params=params,
        rmse=float(np.sqrt(best_sse / loss.size)),
        n_points=int(loss.size),
    )


def binary_entropy(p: ArrayLike) -> np.ndarray:
    """H(p) = -p ln p - (1 - p) ln(1 - p), in nats."""
    p = np.asarray(p, dtype=float)
    return entr(p) + entr(1 - p)


def theorem8_lhs(theta: ArrayLike, k: float, alpha: ArrayLike, beta: float) -> np.ndarray:
    """Left side of Theorem 8's condition (broadcasts over theta and alpha):
    H(theta) + k theta (H(beta alpha) - beta alpha ln(1/alpha) - (1 - beta alpha) ln(1/(1 - alpha))).
    The bracket equals -KL(beta alpha || alpha). The theorem applies where this is < 0."""
    theta, alpha = np.asarray(theta, dtype=float), np.asarray(alpha, dtype=float)
    ba = beta * alpha
    bracket = binary_entropy(ba) + ba * np.log(alpha) + (1 - ba) * np.log1p(-alpha)
    return binary_entropy(theta) + k * theta * bracket


def competent_fraction_bound(theta: ArrayLike, k: float, beta: float, *, n_grid: int = 20000) -> np.ndarray:
    """Theorem 8's lower bound on the fraction of skills with competence >= 1 - beta * theta.

    The largest 1 - alpha such that the condition holds, searched over alpha on a geometric grid
    of `n_grid` points in [1e-9, 1/beta) (alpha beta < 1 is required); the smallest alpha on the
    grid that satisfies the condition is used, so the grid can only make the bound more
    conservative. 0 where no alpha satisfies it (the theorem then guarantees nothing).
    theta: failure measure(s) in (0, 1), any shape; k >= 1 skills per text piece; beta > 1.
    """
    theta = np.asarray(theta, dtype=float)
    if not (beta > 1 and k >= 1) or np.any((theta <= 0) | (theta >= 1)):
        raise TokendynError("Theorem 8 needs beta > 1, k >= 1 and 0 < theta < 1")
    alphas = np.geomspace(1e-9, (1 / beta) * (1 - 1e-9), n_grid)
    holds = theorem8_lhs(theta[..., None], k, alphas, beta) < 0
    first = np.argmax(holds, axis=-1)
    return np.where(holds.any(-1), 1 - alphas[first], 0.0)


def skill_competence(
    correct: xr.DataArray, item_skills: Sequence[Sequence[Hashable]], *, item_dim: str = ITEM_DIM
) -> xr.Dataset:
    """Measured competence from per-item correctness.

    correct: DataArray (..., item_dim) of 0/1 (or NaN where not scored), e.g. (model, ckpt, item).
    item_skills: for every item, the skills it needs (a tuple of hashable labels; k = its length).
    Returns a Dataset with `by_k` (..., k): mean correctness over the items that need k skills,
    and `by_skill` (..., skill): mean correctness over the single-skill items of each skill (NaN
    for skills with no single-skill item).
    """
    if len(item_skills) != correct.sizes[item_dim]:
        raise TokendynError(f"item_skills has {len(item_skills)} entries for {correct.sizes[item_dim]} items")
    arity = np.array([len(s) for s in item_skills])
    if np.any(arity < 1):
        raise TokendynError("every item must name at least one skill")
    by_k = correct.groupby(xr.DataArray(arity, dims=[item_dim], name="k")).mean(item_dim)
    skills = sorted({s for tup in item_skills for s in tup}, key=str)
    single = xr.DataArray(
        np.array([[len(tup) == 1 and tup[0] == s for s in skills] for tup in item_skills], dtype=float),
        dims=[item_dim, "skill"],
        coords={"skill": skills},
    )
    scored = correct.notnull()
    by_skill = (correct.fillna(0) * single).sum(item_dim) / (scored * single).sum(item_dim)
    return xr.Dataset({"by_k": by_k, "by_skill": by_skill})


def slingshot_prediction(excess: ArrayLike, single: ArrayLike, ks: Sequence[int]) -> np.ndarray:
    """Predicted k-tuple competence at each point: the single-skill competence curve evaluated at
    k times the point's excess loss (theta is taken proportional to excess loss, so "k-tuples at
    theta / k equal single skills at theta" needs no constant).

    excess: (point,) excess loss; single: (point,) measured single-skill competence.
    The curve is the decreasing isotonic fit of single against excess, interpolated linearly; NaN
    where k * excess lies outside the observed range of excess (never extrapolated).
    Returns (point, len(ks)).
    """
    excess, single = np.asarray(excess, dtype=float), np.asarray(single, dtype=float)
    keep = np.isfinite(excess) & np.isfinite(single)
    if keep.sum() < 2:
        raise TokendynError("the slingshot prediction needs single-skill competence at two or more checkpoints")
    order = np.argsort(excess[keep])
    xs = excess[keep][order]
    ys = IsotonicRegression(increasing=False).fit_transform(xs, single[keep][order])
    return np.stack([np.interp(k * excess, xs, ys, left=np.nan, right=np.nan) for k in ks], axis=-1)


def skill_curves(
    correct: xr.DataArray,
    item_skills: Sequence[Sequence[Hashable]],
    excess: xr.DataArray,
    ks: Sequence[int] = (1, 2, 3),
    *,
    item_dim: str = ITEM_DIM,
) -> xr.Dataset:
    """Measured k-tuple competence next to the slingshot prediction from single skills.

    correct: (..., item_dim) per-item correctness, e.g. (model, ckpt, item); excess: excess loss
    with the leading dims (e.g. (model, ckpt), from `LossLaw.excess`); items labelled as in
    `skill_competence`, which must include single-skill items.
    Returns a Dataset over (..., k): `measured`, `predicted`, and `excess`.
    """
    by_k = skill_competence(correct, item_skills, item_dim=item_dim)["by_k"]
    if 1 not in by_k["k"]:
        raise TokendynError("skill_curves needs single-skill items (k = 1) to predict k-tuple competence")
    single = by_k.sel(k=1, drop=True)
    excess = excess.broadcast_like(single).transpose(*single.dims)
    predicted = slingshot_prediction(excess.values.ravel(), single.values.ravel(), ks)
    predicted = xr.DataArray(
        predicted.reshape(single.shape + (len(ks),)), dims=single.dims + ("k",), coords={**single.coords, "k": list(ks)}
    )
    return xr.Dataset(
        {"measured": by_k.reindex(k=list(ks)).transpose(*predicted.dims), "predicted": predicted, "excess": excess}
    )

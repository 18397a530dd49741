"""Downstream ability against loss (methods.md §1.5, §2, §3, §4): turn what a store holds into the
inputs of the estimators in `tokendyn.analysis.choices`, `emergence`, `passuntil` and `skills`.

A store holds multiple-choice tasks as evaluation sets `task.<name>` (see `tokendyn.models.tasks`) and
PassUntil runs in groups `passuntil/<name>` (see `tokendyn.models.sampling`). Every function takes the
store's path or a dataset opened from it (`ds.encoding["source"]` gives the path).

- `option_scores`, `task_scores`, `item_correct`: per-option log-probabilities, per-task metrics
  (accuracy, correct-choice probability, Brier score, random baselines, correct and incorrect
  option perplexity) and per-item correctness for every (model, ckpt).
- `emergence`: the §2 analysis of one task: performance against the checkpoint's validation loss
  log(val_ppl), all models and steps together; compute = 6 N D with N = `n_params`.
- `pass_until`: per-instance and per-task PassUntil rates with censoring.
- `excess_loss`, `task_scaling_fit`: the task scaling law on each model's final checkpoint against
  log N or log excess loss.
- `skill_curves`: measured k-tuple competence of skill-labelled items next to the slingshot
  prediction and Theorem 8's bound.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from tokendyn.analysis import choices, passuntil, skills, trajectories
from tokendyn.analysis import emergence as emergence_module
from tokendyn.analysis.trajectories import default_of
from tokendyn.errors import TokendynError
from tokendyn.store import (
    CHECKPOINT_COORDS,
    ITEM_FIELDS,
    OPTION_FIELD,
    TASK_SET_PREFIX,
    list_sets,
    metadata_stamp,
    open_store,
    within_selection,
)
from tokendyn.store import passuntil as runs_store

METRICS = (*choices.METRICS, "correct_ppl", "incorrect_ppl")
LAWS = ("auto", "joint", "tokens")


def source_path(source: str | Path | xr.Dataset) -> Path:
    """The store path of a source: the path itself, or the store a dataset was opened from (an error for a
    dataset built in memory; `tokendyn.store.store_path` returns None there)."""
    if not isinstance(source, xr.Dataset):
        return Path(source)
    path = source.encoding.get("source")
    if not path:
        raise TokendynError("this dataset was not opened from a store on disk; open it with tokendyn.open_store(path)")
    return Path(path)


def _main(source) -> xr.Dataset:
    return within_selection(open_store(source_path(source)), source)


def task_names(source: str | Path | xr.Dataset) -> list[str]:
    """The multiple-choice tasks of a store (its sets named task.<name>)."""
    return [
        name.removeprefix(TASK_SET_PREFIX)
        for name in list_sets(source_path(source))
        if name.startswith(TASK_SET_PREFIX)
    ]


def _check_task(source, task: str) -> None:
    names = task_names(source)
    if task not in names:
        raise TokendynError(
            f"store {source_path(source)} has no task '{task}'; it has: {', '.join(names) or 'none'} "
            "(add tasks with tokendyn tasks)"
        )


def option_scores(source: str | Path | xr.Dataset, task: str) -> xr.Dataset:
    """Per-option scores of one task: `logprob` (model, ckpt, item, option), the summed log-probability
    of the option's tokens (NaN where the checkpoint is not done or the item has fewer options);
    `length` (item, option) in tokens; `chars` (item, option), the option's length in characters;
    `target_score` (item, option), the option's target score; `answer` (item); `done` (model, ckpt);
    item fields as coordinates."""
    _check_task(source, task)
    path = source_path(source)
    # The task, emergence and skill studies all read every task: read each once per store state.
    scores = _option_scores(str(path), task, metadata_stamp(path))
    return within_selection(scores, source).copy(deep=True)  # the caller may change it


@functools.lru_cache(maxsize=32)
def _option_scores(path: str, task: str, stamp: tuple[int, int] | None) -> xr.Dataset:
    ds = trajectories.load_if_small(open_store(path, set=TASK_SET_PREFIX + task))
    in_option = ds[OPTION_FIELD].values == 1
    doc = ds["doc"].values
    loss = ds["loss"].where(ds["done"]).astype(np.float64).values[..., in_option]  # (model, ckpt, option tokens)
    n_docs = int(doc.max()) + 1
    logprob = -np.stack(
        [np.bincount(doc[in_option], weights=row, minlength=n_docs) for row in loss.reshape(-1, loss.shape[-1])]
    ).reshape(loss.shape[:2] + (n_docs,))
    docs, first = np.unique(doc, return_index=True)  # every (item, option) document and its first token
    logprob, length = logprob[..., docs], np.bincount(doc[in_option], minlength=n_docs)[docs]
    item, option = ds["item"].values[first], ds["option"].values[first]
    shape = (int(item.max()) + 1, int(ds["n_options"].values.max()))
    lp = np.full(logprob.shape[:2] + shape, np.nan)
    lp[:, :, item, option] = logprob
    per_option = {}
    for name, values in (
        ("length", length),
        ("chars", ds["option_chars"].values[first]),
        ("target_score", ds["target_score"].values[first]),
    ):
        per_option[name] = np.full(shape, np.nan)
        per_option[name][item, option] = values
    answer = np.zeros(shape[0], dtype=np.int64)
    answer[item] = ds["answer"].values[first]
    first = first[np.unique(item, return_index=True)[1]]  # the first token of every item
    per_token = (*ITEM_FIELDS, OPTION_FIELD, "doc", "token_id", "offset", "n_context")
    fields = {
        k: ("item", ds[k].values[first]) for k, v in ds.coords.items() if v.dims == ("token",) and k not in per_token
    }
    dims = ("model", "ckpt", "item", "option")
    return xr.Dataset(
        {
            "logprob": (dims, lp),
            **{k: (dims[2:], v) for k, v in per_option.items()},
            "answer": ("item", answer),
            "done": (dims[:2], ds["done"].values),
        },
        coords={
            "model": ds["model"].values,
            "ckpt": ds["ckpt"].values,
            **{k: (("model", "ckpt"), ds[k].values) for k in CHECKPOINT_COORDS},
            **fields,
        },
        attrs={"task": task},
    )


def _metrics_on_done(
    scores: xr.Dataset, per_item: bool, convention: str, prob_per_token: bool
) -> dict[str, np.ndarray]:
    """`choices.choice_metrics` on the done checkpoints only (NaN elsewhere); per_item keeps the item axis."""
    lp, answer, done = (scores[k].values for k in ("logprob", "answer", "done"))
    lengths = {
        "tokens": scores["length"].values,
        "chars": scores["chars"].values,
        "target_scores": scores["target_score"].values,
    }
    if per_item:  # every item its own one-item average
        lp, answer = lp[..., None, :], answer[:, None]
        lengths = {k: v[:, None, :] for k, v in lengths.items()}
    values = (
        choices.choice_metrics(lp[done], answer, convention=convention, prob_per_token=prob_per_token, **lengths)
        if done.any()
        else {}
    )
    out = {}
    for name in choices.METRICS:
        full = np.full(done.shape + (lp.shape[2:-2] if per_item else ()), np.nan)
        if done.any():
            full[done] = values[name]
        out[name] = full
    return out


def _option_ppl(scores: xr.Dataset) -> dict[str, np.ndarray]:
    """Token-weighted geometric-mean perplexity of the correct and of the incorrect options."""
    lp, length = scores["logprob"].values, scores["length"].values
    target = scores["target_score"].values
    correct = target == np.nanmax(target, axis=1, keepdims=True)  # every option with the item's top score
    out = {}
    for name, mask in (("correct_ppl", correct), ("incorrect_ppl", ~correct & ~np.isnan(length))):
        nll = -np.where(mask, lp, 0.0).sum((-2, -1)) / np.where(mask, length, 0.0).sum()
        out[name] = np.exp(nll)
    return out


def task_scores(
    source: str | Path | xr.Dataset,
    tasks: Sequence[str] | None = None,
    *,
    convention: str = choices.DEFAULT_CONVENTION,
    prob_per_token: bool = False,
) -> xr.Dataset:
    """Metrics of every task (default: all of the store's) per (task, model, ckpt): `accuracy` by
    `convention` ("acc", "acc_norm" or "grade"), `correct_prob`, `brier`, `random_accuracy`,
    `random_brier` (see `tokendyn.analysis.choices`; prob_per_token as there), `correct_ppl` and
    `incorrect_ppl` (exp of the mean loss over the tokens of the correct, resp. incorrect, options;
    correct = the options with the item's highest target score). NaN where a checkpoint is not done.
    Coordinates: step, val_ppl, tokens_seen; per task `n_items` and `n_options` (mean options per
    item). The attribute `convention` (on the dataset and on `accuracy`) names the convention."""
    choices.check_convention(convention)
    names = task_names(source) if tasks is None else list(tasks)
    if not names:
        raise TokendynError(f"store {source_path(source)} has no multiple-choice tasks; add some with tokendyn tasks")
    per_task = []
    for name in names:
        scores = option_scores(source, name)
        values = {**_metrics_on_done(scores, False, convention, prob_per_token), **_option_ppl(scores)}
        done = scores["done"].values
        for key in ("correct_ppl", "incorrect_ppl"):
            values[key] = np.where(done, values[key], np.nan)
        per_task.append(
            xr.Dataset(
                {k: (("model", "ckpt"), v) for k, v in values.items()}, coords=scores["done"].coords
            ).assign_coords(
                n_items=scores.sizes["item"], n_options=float((~np.isnan(scores["length"])).sum("option").mean())
            )
        )
    out = xr.concat(per_task, dim=pd.Index(names, name="task"), coords="different", compat="equals")
    out["accuracy"].attrs["convention"] = convention
    return out.assign_attrs(convention=convention)


def item_correct(
    source: str | Path | xr.Dataset,
    task: str,
    *,
    convention: str = choices.DEFAULT_CONVENTION,
    prob_per_token: bool = False,
) -> xr.DataArray:
    """Per-item credit (model, ckpt, item) by `convention` (see `task_scores`): 1 or 0 for "acc" and
    "acc_norm", the chosen option's target score for "grade"; NaN where the checkpoint is not done;
    item fields as coordinates; the attribute `convention`."""
    choices.check_convention(convention)
    scores = option_scores(source, task)
    values = _metrics_on_done(scores, True, convention, prob_per_token)["accuracy"]
    return xr.DataArray(
        values,
        dims=("model", "ckpt", "item"),
        coords={k: v for k, v in scores.coords.items() if k != "option"},
        name="correct",
        attrs={"convention": convention},
    )


def _loss_axes(curve: xr.Dataset | xr.DataArray, params: str) -> dict[str, xr.DataArray]:
    loss = np.log(curve["val_ppl"])
    compute = trajectories.training_compute(curve[params], curve["tokens_seen"])
    return {"loss": loss, "compute": compute if bool(np.isfinite(compute).any()) else None, "step": curve["step"]}


def emergence(
    source: str | Path | xr.Dataset,
    task: str,
    metric: str = "accuracy",
    *,
    margin: float | None = None,
    params: str = default_of(trajectories.x_axis, "params"),
    scores: xr.Dataset | None = None,
    convention: str = choices.DEFAULT_CONVENTION,
    **options: float,
) -> emergence_module.EmergenceResult:
    """The loss threshold of one task (methods.md §2): `metric` ("accuracy", "correct_prob" or "brier")
    of every done checkpoint of every model against log(val_ppl); compute = 6 N D with N = `params`
    ("n_params" or "n_params_nonembed", default as in `trajectories.x_axis`) and D = tokens seen (left
    out when tokens seen are unknown).

    The random baseline is the scores' own: the mean `random_accuracy` (1/C), or for the Brier score
    the mean `random_brier` (1 - 1/C; lower is better there).
    margin: how far beyond the baseline counts as leaving random; default `choices.chance_margin(n_items, C)`,
        z = 3 binomial standard errors of chance accuracy, used for every metric.
    scores: `task_scores` output that holds the task (saves reading the store again).
    convention: the accuracy convention when scores are computed here (see `task_scores`).
    options: as in `tokendyn.analysis.emergence.emergence_threshold` (min_beyond, n_grid, n_boot, seed, ...).
    """
    if metric not in ("accuracy", "correct_prob", "brier"):
        raise TokendynError(f"unknown metric '{metric}'; use accuracy, correct_prob or brier")
    scores = (task_scores(source, [task], convention=convention) if scores is None else scores).sel(task=task)
    main = _main(source)
    scores = scores.assign_coords({params: main[params]})
    random = "random_brier" if metric == "brier" else "random_accuracy"
    baseline = float(scores[random].mean())
    if margin is None:
        margin = choices.chance_margin(int(scores["n_items"]), float(1 / scores["random_accuracy"].mean()))
    axes = _loss_axes(scores, params)
    return emergence_module.emergence_threshold(
        axes["loss"].values,
        scores[metric].values,
        baseline=baseline,
        margin=margin,
        compute=None if axes["compute"] is None else axes["compute"].values,
        step=axes["step"].values,
        higher_is_better=metric != "brier",
        **options,
    )


def pass_until_tasks(source: str | Path | xr.Dataset) -> list[str]:
    """The PassUntil tasks of a store."""
    return runs_store.list_tasks(source_path(source))


def _runs(source, task: str) -> xr.Dataset:
    return within_selection(runs_store.read_runs(source_path(source), task), source)


def _one_pass_until(source, task: str, confidence: float, n_boot: int, ci: float, seed: int) -> xr.Dataset:
    runs = _runs(source, task)
    target = int(runs.attrs["params"]["passes"])
    done = runs["done"].values
    passes, samples = runs["passes"].values, runs["samples"].values
    instance = {k: np.full(passes.shape, np.nan) for k in ("rate", "upper")}
    censored = np.zeros(passes.shape, dtype=bool)
    if done.any():
        rates = passuntil.instance_rates(passes[done], samples[done], target, confidence=confidence)
        instance["rate"][done], instance["upper"][done], censored[done] = rates.rate, rates.upper, rates.censored
    fields = ("estimate", "ci_low", "ci_high", "upper", "censored", "n_censored")
    task_level = {k: np.full(done.shape, np.nan) for k in fields}
    for m, c in zip(*np.nonzero(done)):
        result = passuntil.task_rate(
            passes[m, c], samples[m, c], target, confidence=confidence, n_boot=n_boot, ci=ci, seed=seed
        )
        for k in fields:
            task_level[k][m, c] = getattr(result, k)
    per_ckpt = ("model", "ckpt")
    out = xr.Dataset(
        {
            "rate": runs["passes"].copy(data=instance["rate"]),
            "upper": runs["passes"].copy(data=instance["upper"]),
            "censored": runs["passes"].copy(data=censored).where(runs["done"]),
            "passes": runs["passes"].where(runs["done"]),
            "samples": runs["samples"].where(runs["done"]),
            "drawn": runs["drawn"].where(runs["done"]),
            "seconds": runs["seconds"].where(runs["done"]),
            **{f"task_{k}": (per_ckpt, v) for k, v in task_level.items()},
            "task_drawn": runs["drawn"].where(runs["done"]).sum("instance", min_count=1),
            "task_seconds": runs["seconds"].where(runs["done"]).sum("instance", min_count=1),
        },
        attrs={"task": task, "target": target, **{k: v for k, v in runs.attrs["params"].items() if k != "task"}},
    )
    return out


def pass_until(
    source: str | Path | xr.Dataset,
    task: str | None = None,
    *,
    confidence: float = default_of(passuntil.task_rate, "confidence"),
    n_boot: int = default_of(passuntil.task_rate, "n_boot"),
    ci: float = default_of(passuntil.task_rate, "ci"),
    seed: int = default_of(passuntil.task_rate, "seed"),
) -> xr.Dataset:
    """PassUntil estimates of one task, or of every task of the store along a `task` dimension.

    Per (model, ckpt, instance): `rate` (unbiased; NaN where censored), `upper` (one-sided
    Clopper-Pearson bound at `confidence` where censored), `censored`, and the raw `passes`,
    `samples`, `drawn`, `seconds`. Per (model, ckpt): `task_estimate` with its percentile bootstrap
    interval `task_ci_low`/`task_ci_high` (level `ci`, `n_boot` resamples over instances, `seed`),
    `task_upper` (censored instances at their bound), `task_censored` (no instance passed),
    `task_n_censored`, and the cost `task_drawn` (completions generated) and `task_seconds`.
    NaN where a checkpoint is not done. See `tokendyn.analysis.passuntil` for the estimators (the
    defaults of confidence, n_boot, ci and seed are `passuntil.task_rate`'s).
    """
    names = pass_until_tasks(source) if task is None else [task]
    if not names:
        raise TokendynError(f"store {source_path(source)} has no PassUntil runs; add some with tokendyn passuntil")
    results = [_one_pass_until(source, name, confidence, n_boot, ci, seed) for name in names]
    if task is not None:
        return results[0]
    stripped = [
        r.drop_vars([k for k, v in r.coords.items() if "instance" in v.dims and k != "instance"]) for r in results
    ]
    return xr.concat(stripped, dim=pd.Index(names, name="task"), join="outer", combine_attrs="drop")


def excess_loss(
    source: str | Path | xr.Dataset, *, law: str = "auto", irreducible: float | None = None
) -> xr.DataArray:
    """Excess loss log(val_ppl) - E per (model, ckpt), E from `skills.fit_loss_law` fitted on every
    done checkpoint (law "joint" = E + A N^-a + B D^-b with N = n_params, D = tokens seen; "tokens" =
    E + B D^-b; "auto" = joint when the suite has two or more sizes), or E = `irreducible` when given.
    The attribute `irreducible` holds E."""
    if law not in LAWS:
        raise TokendynError(f"unknown loss law '{law}'; use one of {', '.join(LAWS)}")
    main = _main(source)
    loss = np.log(main["val_ppl"]).reset_coords(drop=True).compute()
    if irreducible is None:
        if law == "auto":
            law = "joint" if np.unique(main["n_params"].values).size >= 2 else "tokens"
        fitted = skills.fit_loss_law(
            loss, main["tokens_seen"].reset_coords(drop=True), main["n_params"].reset_coords(drop=True), law=law
        )
        irreducible = fitted.irreducible
    excess = (loss - irreducible).assign_coords({k: (("model", "ckpt"), main[k].values) for k in CHECKPOINT_COORDS})
    excess.attrs["irreducible"] = float(irreducible)
    return excess.rename("excess_loss")


def task_scaling_fit(
    source: str | Path | xr.Dataset,
    task: str | None = None,
    *,
    x: str = "n_params",
    points: str = "final",
    law: str = default_of(excess_loss, "law"),
    irreducible: float | None = None,
    confidence: float = default_of(passuntil.fit_task_scaling, "confidence"),
    n_boot: int = default_of(passuntil.fit_task_scaling, "n_boot"),
    ci: float = default_of(passuntil.fit_task_scaling, "ci"),
    seed: int = default_of(passuntil.fit_task_scaling, "seed"),
) -> passuntil.ScalingFit:
    """The task scaling law F = log(-log PU) of one PassUntil task (the store's only one by default).

    x: "n_params" or "n_params_nonembed" (log N), or "excess_loss" (log of `excess_loss` with `law`
        and `irreducible`); points: "final" (each model's last done checkpoint) or "all" (every done
        checkpoint). The largest model is held out for the prediction error. Other options: as in
        `tokendyn.analysis.passuntil.fit_task_scaling`.
    """
    if x not in ("n_params", "n_params_nonembed", "excess_loss"):
        raise TokendynError(f"unknown scaling axis '{x}'; use n_params, n_params_nonembed or excess_loss")
    if points not in ("final", "all"):
        raise TokendynError(f"points must be 'final' or 'all', not '{points}'")
    names = pass_until_tasks(source)
    if task is None:
        if len(names) != 1:
            raise TokendynError(f"name the PassUntil task to fit; the store has: {', '.join(names) or 'none'}")
        task = names[0]
    runs = _runs(source, task)
    done = runs["done"].values
    if points == "final":
        last = np.where(done.any(1), done.shape[1] - 1 - np.argmax(done[:, ::-1], axis=1), -1)
        chosen = [(m, c) for m, c in enumerate(last) if c >= 0]
    else:
        chosen = list(zip(*np.nonzero(done)))
    if not chosen:
        raise TokendynError(f"PassUntil task '{task}' has no done checkpoint yet; run tokendyn passuntil")
    m, c = (np.asarray(v) for v in zip(*chosen))
    size_axis = "n_params" if x == "excess_loss" else x
    n_params = runs[size_axis].values[m]
    excess = None
    if x == "excess_loss":
        excess = excess_loss(source, law=law, irreducible=irreducible).values[m, c]
    return passuntil.fit_task_scaling(
        runs["passes"].values[m, c],
        runs["samples"].values[m, c],
        int(runs.attrs["params"]["passes"]),
        n_params,
        excess_loss=excess,
        confidence=confidence,
        n_boot=n_boot,
        ci=ci,
        seed=seed,
    )


def skill_tasks(source: str | Path | xr.Dataset) -> list[str]:
    """The multiple-choice tasks whose items name the skills they need (an item field `skills`)."""
    path = source_path(source)
    return [t for t in task_names(path) if "skills" in open_store(path, set=TASK_SET_PREFIX + t).coords]


def skill_curves(
    source: str | Path | xr.Dataset,
    k: Sequence[int] = default_of(skills.skill_curves, "ks"),
    tasks: Sequence[str] | None = None,
    *,
    beta: float = 2.0,
    text_k: Sequence[int] | None = None,
    law: str = default_of(excess_loss, "law"),
    irreducible: float | None = None,
    convention: str = choices.DEFAULT_CONVENTION,
) -> xr.Dataset:
    """Skill composition (methods.md §3) on items labelled with skills.

    Two different k's:
    - `k` (dimension "k"): the number of skills an *item* needs ("|"-separated skill labels in the
      item field `skills`). `measured`: mean credit (`convention`, see `task_scores`) of the k-skill
      items per (model, ckpt, k); `predicted`: the slingshot prediction from the single-skill items
      (`skills.skill_curves`, whose `ks` default k takes).
    - `text_k` (dimension "text_k", default the values of k): Theorem 8's k, the number of skills per
      *training text piece*, a property of the training data the theory assumes, not of the items.
      `bound` (model, ckpt, text_k): Theorem 8's lower bound on the fraction of skills with
      competence >= 1 - beta theta, theta = the excess loss (NaN where it lies outside (0, 1)).
    `excess`: excess loss (see `excess_loss`, which takes law and irreducible). Items come from
    `tasks` (default: every task with a `skills` field). The attributes say which k is which.
    """
    names = skill_tasks(source) if tasks is None else list(tasks)
    if not names:
        raise TokendynError(
            f"store {source_path(source)} has no task with skill-labelled items (an item field "
            "'skills'); score such a task with tokendyn tasks"
        )
    text_k = list(k) if text_k is None else list(text_k)
    if not text_k or min(text_k) < 1:
        raise TokendynError("text_k (Theorem 8's skills per training text piece) must be positive integers")
    correct = [item_correct(source, name, convention=convention) for name in names]
    labels = [s.split("|") for c in correct for s in c["skills"].values]
    correct = xr.concat([c.reset_coords(drop=True).drop_vars("item", errors="ignore") for c in correct], dim="item")
    excess = excess_loss(source, law=law, irreducible=irreducible)
    curves = skills.skill_curves(correct, labels, excess.reset_coords(drop=True), ks=list(k))
    theta = curves["excess"].where((curves["excess"] > 0) & (curves["excess"] < 1))
    bound = np.full(theta.shape + (len(text_k),), np.nan)
    valid = np.isfinite(theta.values)
    for j, size in enumerate(text_k):
        bound[..., j][valid] = skills.competent_fraction_bound(theta.values[valid], size, beta)
    curves["bound"] = xr.DataArray(
        bound,
        dims=theta.dims + ("text_k",),
        coords={"text_k": text_k},
        attrs={"k": "text_k: skills per training text piece (Theorem 8)"},
    )
    curves["measured"].attrs["k"] = curves["predicted"].attrs["k"] = "k: skills per item"
    curves = curves.assign_coords({name: excess[name].variable for name in CHECKPOINT_COORDS})
    curves.attrs.update(
        irreducible=excess.attrs["irreducible"],
        beta=beta,
        tasks=list(names),
        convention=convention,
        k="skills per item (measured, predicted)",
        text_k="skills per training text piece, Theorem 8's k (bound)",
    )
    return curves

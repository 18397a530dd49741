"""Analysis steps for downstream ability against loss (methods.md §1.5, §2, §3, §4): task metrics and
the loss threshold of emergence, PassUntil rates and the task scaling law, skill composition.
They read the store's task sets and PassUntil groups, so they run when the main set of a store on
disk is analysed.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

from tokendyn.analysis import downstream, sequences
from tokendyn.pipelines.analyze import Output, Skip, require
from tokendyn.errors import TokendynError

EMERGENCE_METRICS = ("accuracy", "correct_prob", "brier")


def _store(ds: xr.Dataset):
    require(ds, "loss", "val_ppl")
    path = sequences.store_path(ds)
    if path is None or sequences.set_params(ds)["name"] != "main":
        raise Skip("reads the store's tasks; runs when the main set of a store on disk is analysed")
    return path


def _table(data: xr.Dataset, columns: list[str]) -> pd.DataFrame:
    frame = data.reset_coords().to_dataframe().reset_index()
    return frame[[c for c in columns if c in frame.columns]]


def tasks_step(ds: xr.Dataset, out: Output) -> list[str]:
    """Multiple-choice metrics per task, model and checkpoint (task_scores.csv) and the loss threshold
    of emergence per task and metric against log(val_ppl) (emergence.csv)."""
    path = _store(ds)
    if not downstream.task_names(path):
        raise Skip("the store has no multiple-choice tasks (add some with tokendyn tasks)")
    scores = downstream.task_scores(path)
    columns = ["task", "model", "ckpt", "step", "tokens_seen", "val_ppl", *downstream.METRICS, "convention", "n_items",
               "n_options"]
    out.write_table("task_scores", _table(scores.assign(convention=scores.attrs["convention"]), columns)
                    .dropna(subset=["accuracy"]))
    rows, lines = [], []
    for task in scores["task"].values:
        for metric in EMERGENCE_METRICS:
            try:
                result = downstream.emergence(path, str(task), metric, scores=scores)
            except TokendynError as err:
                lines.append(f"task {task}: no emergence fit for {metric} ({err})")
                continue
            fit = result.fit
            rows.append({"task": task, "metric": metric, "leaves_random": result.leaves_random,
                         "eta": fit.eta if fit else np.nan, "eta_low": fit.eta_low if fit else np.nan,
                         "eta_high": fit.eta_high if fit else np.nan, "baseline": fit.baseline if fit else np.nan,
                         "slope": fit.slope if fit else np.nan, "r2": fit.r2 if fit else np.nan,
                         "spearman": result.spearman, "spearman_p": result.spearman_p,
                         "unexplained_loss": result.collapse.unexplained_loss,
                         "unexplained_compute": result.collapse.unexplained_compute,
                         "unexplained_step": result.collapse.unexplained_step,
                         "ratio_compute": result.collapse.ratio_compute, "ratio_step": result.collapse.ratio_step,
                         "n_points": result.n_points})
            if metric == "accuracy":
                lines.append(_emergence_line(str(task), result, scores.sel(task=task)))
    if rows:
        out.write_table("emergence", pd.DataFrame(rows))
    return lines


def _emergence_line(task: str, result, scores: xr.Dataset) -> str:
    best = float(scores["accuracy"].max())
    chance = float(scores["random_accuracy"].mean())
    collapse = f"collapse vs compute {result.collapse.ratio_compute:.2f}, vs step {result.collapse.ratio_step:.2f}"
    if not result.leaves_random:
        return f"task {task}: never leaves random (best accuracy {best:.2f}, chance {chance:.2f}); {collapse}"
    fit = result.fit
    return (f"task {task}: leaves random below loss eta = {fit.eta:.3f} [{fit.eta_low:.3f}, {fit.eta_high:.3f}] "
            f"nats (best accuracy {best:.2f}, chance {chance:.2f}); Spearman with loss {result.spearman:.2f}; "
            f"{collapse} (< 1: the points collapse onto loss)")


def passuntil_step(ds: xr.Dataset, out: Output) -> list[str]:
    """PassUntil per task, model and checkpoint with censoring and cost (passuntil.csv), and the task
    scaling law on each model's final checkpoint against log N and log excess loss (passuntil_scaling.csv)."""
    path = _store(ds)
    tasks = downstream.pass_until_tasks(path)
    if not tasks:
        raise Skip("the store has no PassUntil runs (add some with tokendyn passuntil)")
    frames, rows, lines = [], [], []
    for task in tasks:
        result = downstream.pass_until(path, task)
        per_ckpt = result[[k for k in result.data_vars if k.startswith("task_")]]
        frame = _table(per_ckpt, ["model", "ckpt", "step", "tokens_seen", "val_ppl", *per_ckpt.data_vars])
        frames.append(frame.dropna(subset=["task_estimate"]).assign(task=task))
        drawn, seconds = float(result["task_drawn"].sum()), float(result["task_seconds"].sum())
        lines.append(f"task {task}: {int(result['task_censored'].sum())} of {int(result['task_estimate'].count())} "
                     f"checkpoints with no instance passing; cost {drawn:,.0f} completions, {seconds:.1f} s")
        for x in ("n_params", "excess_loss"):
            try:
                fit = downstream.task_scaling_fit(path, task, x=x)
            except TokendynError as err:
                lines.append(f"task {task}: no scaling fit against {x} ({err})")
                continue
            rows.append({"task": task, "x": x, "slope": fit.slope, "intercept": fit.intercept, "c": fit.c,
                         "alpha": fit.alpha, "curvature": fit.curvature, "curvature_low": fit.curvature_low,
                         "curvature_high": fit.curvature_high, "shape": fit.shape, "n_points": fit.n_points,
                         "holdout_predicted": _first(fit.holdout_predicted),
                         "holdout_observed": _first(fit.holdout_observed),
                         "holdout_log10_ratio": _first(fit.holdout_log10_ratio)})
            lines.append(f"task {task}: log(-log PU) vs log {x}: alpha {fit.alpha:.3g}, {fit.shape} "
                         f"(curvature {fit.curvature:.3g} [{fit.curvature_low:.3g}, {fit.curvature_high:.3g}]); "
                         f"largest model held out: predicted PU {_first(fit.holdout_predicted):.3g}, "
                         f"observed {_first(fit.holdout_observed):.3g}")
    columns = ["task", *frames[0].columns.drop("task")]
    out.write_table("passuntil", pd.concat(frames)[columns])
    if rows:
        out.write_table("passuntil_scaling", pd.DataFrame(rows))
    return lines


def _first(values) -> float:
    values = np.atleast_1d(values)
    return float(values[0]) if values.size else float("nan")


def skills_step(ds: xr.Dataset, out: Output) -> list[str]:
    """Skill composition (skill_curves.csv): measured k-tuple competence of skill-labelled items,
    the slingshot prediction from single skills and Theorem 8's bound, per model, checkpoint and k."""
    path = _store(ds)
    if not downstream.skill_tasks(path):
        raise Skip("the store has no task with skill-labelled items")
    try:
        curves = downstream.skill_curves(path)
    except TokendynError as err:
        raise Skip(str(err)) from err
    table = _table(curves.drop_vars("bound"), ["model", "ckpt", "step", "val_ppl", "k", "excess", "measured",
                                               "predicted"])
    out.write_table("skill_curves", table.dropna(subset=["measured"]))
    out.write_table("skill_bound", _table(curves[["bound"]], ["model", "ckpt", "step", "val_ppl", "text_k", "bound"]))
    lines = [f"irreducible loss E = {curves.attrs['irreducible']:.3f} nats (tasks: {', '.join(curves.attrs['tasks'])})",
             "k in skill_curves.csv = skills per item (measured and predicted competence, "
             f"{curves.attrs['convention']} credit); text_k in skill_bound.csv = skills per training text piece, "
             "the k of Theorem 8's bound"]
    gap = (curves["measured"] - curves["predicted"]).sel(k=curves["k"] > 1)
    for k in gap["k"].values:
        values = gap.sel(k=k).values
        if np.isfinite(values).any():
            lines.append(f"k = {k}: measured - predicted competence, mean {np.nanmean(values):+.3f} over "
                         f"{int(np.isfinite(values).sum())} checkpoints")
    return lines


STEPS = [tasks_step, passuntil_step, skills_step]

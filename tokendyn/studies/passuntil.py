"""PassUntil: each generation task's pass rate per model and checkpoint, with censoring and cost, and
the task scaling law on each model's final checkpoint against log N and log excess loss
(Hu et al. 2024; methods.md §4; `tokendyn.analysis.passuntil`)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from tokendyn.analysis import downstream
from tokendyn.errors import TokendynError
from tokendyn.studies.study import Result, Skip, Source, main_set_path, models_by_size, open_source, require
from tokendyn.studies.style import (
    ZOOM_FINDING,
    envelope_findings,
    log_scale,
    model_colors,
    model_legend,
    new_figure,
    on_envelope,
    perplexity_axis,
    zoom_perplexity,
)

TITLE = "PassUntil rates over training and the task scaling law"
SCALING_AXES = ("n_params", "excess_loss")


def _first(values) -> float:
    values = np.atleast_1d(values)
    return float(values[0]) if values.size else float("nan")


def scaling_rows(source: Source, task: str) -> tuple[list[dict], list[str]]:
    """The scaling fit of one task against each of SCALING_AXES (a row each), and a finding per axis."""
    rows, lines = [], []
    for x in SCALING_AXES:
        try:
            fit = downstream.task_scaling_fit(source, task, x=x)
        except TokendynError as err:
            lines.append(f"Task {task}: no scaling fit against {x} ({err}).")
            continue
        rows.append(
            {
                "task": task,
                "x": x,
                "slope": fit.slope,
                "intercept": fit.intercept,
                "c": fit.c,
                "alpha": fit.alpha,
                "curvature": fit.curvature,
                "curvature_low": fit.curvature_low,
                "curvature_high": fit.curvature_high,
                "shape": fit.shape,
                "n_points": fit.n_points,
                "holdout_predicted": _first(fit.holdout_predicted),
                "holdout_observed": _first(fit.holdout_observed),
                "holdout_log10_ratio": _first(fit.holdout_log10_ratio),
            }
        )
        lines.append(
            f"Task {task}: log(-log PU) vs log {x}: alpha {fit.alpha:.3g}, {fit.shape} "
            f"(curvature {fit.curvature:.3g} [{fit.curvature_low:.3g}, {fit.curvature_high:.3g}]); "
            f"largest model held out: predicted PU {_first(fit.holdout_predicted):.3g}, "
            f"observed {_first(fit.holdout_observed):.3g}."
        )
    return rows, lines


def run(source: Source, max_panels: int = 8) -> Result:
    """PassUntil estimates (see `tokendyn.analysis.downstream.pass_until`) of every task of the store
    against validation perplexity, and the task scaling fits; at most `max_panels` tasks are drawn."""
    ds = open_source(source)
    require(ds, "loss", "val_ppl")
    path = main_set_path(ds, "PassUntil runs")
    tasks = downstream.pass_until_tasks(path)
    if not tasks:
        raise Skip("the store has no PassUntil runs (add some with tokendyn passuntil)")
    frames, scaling, findings = [], [], []
    for task in tasks:
        result = downstream.pass_until(ds, task)
        per_ckpt = result[[k for k in result.data_vars if k.startswith("task_")]]
        frame = per_ckpt.to_dataframe().reset_index()
        columns = ["model", "ckpt", "step", "tokens_seen", "val_ppl", *per_ckpt.data_vars]
        frames.append(
            frame[[c for c in columns if c in frame.columns]].dropna(subset=["task_estimate"]).assign(task=task)
        )
        drawn, seconds = float(result["task_drawn"].sum()), float(result["task_seconds"].sum())
        n_run, present = int(result["task_drawn"].count()), int(np.isfinite(result["step"]).sum())
        findings.append(
            f"Task {task}: {int(result['task_censored'].sum())} of {int(result['task_estimate'].count())} "
            "checkpoints with no instance passing"
            + (f" (run at {n_run} of the {present} checkpoints)" if n_run < present else "")
            + f"; cost {drawn:,.0f} completions, {seconds:.1f} s."
        )
        rows, lines = scaling_rows(ds, task)
        scaling += rows
        findings += lines
    table = pd.concat(frames)
    table = table[["task", *table.columns.drop("task")]]
    tables = {"passuntil": table}
    if scaling:
        tables["passuntil_scaling"] = pd.DataFrame(scaling)

    models = models_by_size(ds)
    colors = model_colors(ds)
    shown = tasks[:max_panels]
    fig, panels = new_figure(len(shown))
    zoomed = False
    for ax, task in zip(panels, shown):
        drawn = []
        for model in models:
            rows = on_envelope(table[(table.task == task) & (table.model == model)])  # no zig-zag
            value = np.where(rows["task_censored"] > 0, rows["task_upper"], rows["task_estimate"])
            ax.plot(rows["val_ppl"], value, "-", color=colors[model])
            drawn.append((rows["val_ppl"].to_numpy(), value))
            ax.plot(
                rows["val_ppl"][rows["task_censored"] == 0],
                rows["task_estimate"][rows["task_censored"] == 0],
                "o",
                ms=4,
                color=colors[model],
            )
            ax.plot(
                rows["val_ppl"][rows["task_censored"] > 0],
                rows["task_upper"][rows["task_censored"] > 0],
                "v",
                ms=5,
                mfc="none",
                color=colors[model],
            )
        perplexity_axis(ax)
        zoomed |= zoom_perplexity(ax, drawn)
        if (table.loc[table.task == task, ["task_estimate", "task_upper"]].max(axis=1) > 0).any():
            log_scale(ax, "y")
        ax.set_ylabel("pass rate (PU)")
        ax.set_title(task, fontsize="medium")
        ax.grid(alpha=0.3)
    model_legend(fig, colors, title="model (▽ upper bound)")
    fig.suptitle(TITLE)
    if len(tasks) > len(shown):
        findings.append(f"The figure shows the first {len(shown)} of {len(tasks)} tasks; the tables have all.")
    findings += envelope_findings(ds) + ([ZOOM_FINDING] if zoomed else [])
    return Result(TITLE, tables, fig, findings)

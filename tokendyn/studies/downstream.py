"""Task performance against validation loss, all sizes and checkpoints together, with the fitted loss
threshold of emergence (Du et al. 2024; methods.md §1.5, §2; `tokendyn.analysis.downstream`)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

from tokendyn.analysis import downstream
from tokendyn.errors import TokendynError
from tokendyn.studies.findings import verdict
from tokendyn.studies.study import Result, Skip, Source, default_of, main_set_path, models_by_size, open_source, require
from tokendyn.studies.style import model_colors, model_legend, new_figure, on_envelope, zoom_start

TITLE = "Task performance against validation loss"
LABELS = {
    "accuracy": "accuracy ({convention})",
    "correct_prob": "correct-option probability",
    "brier": "Brier score (lower is better)",
}
ZOOM_REL = 0.1  # share of a panel's score range a model must depart from chance by before the x axis starts
COLLAPSE = ("unexplained_loss", "unexplained_compute", "unexplained_step", "ratio_compute", "ratio_step")


def emergence_table(source: Source, scores: xr.Dataset) -> tuple[pd.DataFrame, dict, list[str]]:
    """One row per task and metric of LABELS with the §2 fit; the results by (task, metric) (for
    drawing the fit); one line per fit that failed."""
    rows, results, failed = [], {}, []
    for task in scores["task"].values:
        for metric in LABELS:
            try:
                result = downstream.emergence(source, str(task), metric, scores=scores)
            except TokendynError as err:
                failed.append(f"Task {task}: no emergence fit for {metric} ({err}).")
                continue
            results[str(task), metric] = result
            fit = result.fit
            rows.append(
                {
                    "task": str(task),
                    "metric": metric,
                    "convention": scores.attrs["convention"],
                    "leaves_random": result.leaves_random,
                    **{
                        k: getattr(fit, k) if fit else np.nan
                        for k in ("eta", "eta_low", "eta_high", "baseline", "slope", "r2")
                    },
                    "spearman": result.spearman,
                    "spearman_p": result.spearman_p,
                    **{k: getattr(result.collapse, k) for k in COLLAPSE},
                    "n_points": result.n_points,
                }
            )
    return pd.DataFrame(rows), results, failed


def run(
    source: Source,
    metric: str = "accuracy",
    max_panels: int = 8,
    convention: str = default_of(downstream.task_scores, "convention"),
) -> Result:
    """`metric` ("accuracy", "correct_prob" or "brier") of every task, model and checkpoint against
    the checkpoint's validation loss log(val_ppl), with the segmented fit of `tokendyn.analysis.emergence`
    where a task leaves random; at most `max_panels` tasks are drawn (the tables hold all). convention:
    the accuracy convention ("acc", "acc_norm" or "grade"; `tokendyn.analysis.choices`), named in the
    tables' `convention` column, the axis label and the findings."""
    ds = open_source(source)
    require(ds, "loss", "val_ppl")
    path = main_set_path(ds, "tasks")
    if not downstream.task_names(path):
        raise Skip("the store has no multiple-choice tasks (add some with tokendyn tasks)")
    if metric not in LABELS:
        raise TokendynError(f"unknown metric {metric!r}; choose one of {', '.join(LABELS)}")
    scores = downstream.task_scores(ds, convention=convention)
    every, results, failed = emergence_table(ds, scores)
    if every.empty:  # e.g. a selection of checkpoints at which the tasks were not scored
        raise Skip(f"no task could be fitted ({len(failed)} fits failed; the first: {failed[0]})")
    fits = every[every.metric == metric]
    models = models_by_size(ds)
    colors = model_colors(ds)
    table = scores.reset_coords().to_dataframe().reset_index().dropna(subset=[metric])
    table["loss"] = np.log(table["val_ppl"])
    table["convention"] = convention
    columns = [
        "task",
        "model",
        "ckpt",
        "step",
        "tokens_seen",
        "val_ppl",
        "loss",
        *downstream.METRICS,
        "convention",
        "n_items",
        "n_options",
    ]
    table = table[[c for c in columns if c in table.columns]]

    tasks = list(fits["task"])[:max_panels]
    fig, panels = new_figure(len(tasks))
    zoomed = False
    for ax, task in zip(panels, tasks):
        rows = table[table.task == task]
        chance = rows["random_brier" if metric == "brier" else "random_accuracy"].mean()
        drawn = [(rows["val_ppl"].to_numpy(), np.full(len(rows), chance))]  # chance: where a task leaves it
        for model in models:
            r = rows[rows.model == model]
            ax.plot(r["loss"], r[metric], "o", ms=4, color=colors[model])
            on = on_envelope(r)
            drawn.append((on["val_ppl"].to_numpy(), on[metric].to_numpy()))
        ax.axhline(chance, color="black", ls=":", lw=0.8)
        fit = results[task, metric].fit
        if fit is not None:
            x = np.linspace(rows["loss"].min(), rows["loss"].max(), 200)
            ax.plot(x, fit.predict(x), color="black", lw=1.2)
            ax.axvspan(fit.eta_low, fit.eta_high, color="grey", alpha=0.2)
            ax.axvline(fit.eta, color="black", ls="--", lw=0.8)
        ax.invert_xaxis()
        start = zoom_start(drawn, ZOOM_REL)
        if start is not None and np.log(start) < ax.get_xlim()[0]:
            ax.set_xlim(np.log(start), ax.get_xlim()[1])
            zoomed = True
        ax.set_xlabel("validation loss (nats, training →)")
        ax.set_ylabel(LABELS[metric].format(convention=convention))
        ax.set_title(task + ("" if fit is not None else " (stays at chance)"), fontsize="medium")
        ax.grid(alpha=0.3)
    model_legend(fig, colors, ls="none")
    fig.suptitle(
        f"{TITLE}\n(dotted: chance; solid: segmented fit; dashed: its threshold eta, shaded: 95% interval)",
        fontsize="medium",
    )

    findings = [
        f'Accuracy uses the {convention} convention (see docs/analyses.md, "Multiple-choice conventions").',
        *failed,
    ]
    for row in fits.itertuples():
        best = table[table.task == row.task][metric]
        best = best.min() if metric == "brier" else best.max()
        if row.leaves_random:
            findings.append(
                f"Task {row.task}: leaves chance once the validation loss falls below eta = {row.eta:.3f} "
                f"nats (95% interval {row.eta_low:.3f} to {row.eta_high:.3f}); best {metric} {best:.2f}; "
                f"Spearman with loss {row.spearman:.2f}."
            )
        else:
            findings.append(f"Task {row.task}: never leaves chance (best {metric} {best:.2f}).")
    ratios = fits[fits.leaves_random]["ratio_compute"].dropna()
    if len(ratios):
        holds = list(ratios < 1)
        findings.append(
            f"Du et al.: performance collapses onto one curve against loss better than against compute "
            f"(unexplained-variance ratio loss/compute < 1); here this {verdict(holds)} "
            f"({sum(holds)} of {len(holds)} tasks that leave chance; ratios "
            + ", ".join(f"{v:.2f}" for v in ratios)
            + ")."
        )
    elif len(models) > 1:
        findings.append("No task leaves chance, so Du et al.'s collapse onto loss cannot be checked here.")
    if len(fits) > len(tasks):
        findings.append(f"The figure shows the first {len(tasks)} of {len(fits)} tasks; the tables have all.")
    if zoomed:
        findings.append(
            "The x axis starts shortly before the first checkpoints whose score departs from chance (the "
            "early checkpoints at chance are cut off; the tables and the fit use every checkpoint)."
        )
    return Result(TITLE, {"task_scores": table, "emergence": every}, fig, findings)

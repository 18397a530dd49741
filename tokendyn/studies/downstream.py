"""Task performance against validation loss, all sizes and checkpoints together, with the fitted loss
threshold of emergence (Du et al. 2024; methods.md §1.5, §2; `tokendyn.analysis.downstream`)."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd

from tokendyn.studies.findings import verdict
from tokendyn.store import TASK_SET_PREFIX
from tokendyn.studies.study import Result, Skip, main, models_by_size, open_source, require
from tokendyn.studies.style import model_colors, model_legend, new_figure
from tokendyn.analysis import downstream
from tokendyn.analysis.sequences import store_path
from tokendyn.store import list_sets

TITLE = "Task performance against validation loss"
LABELS = {"accuracy": "accuracy (share of items)", "correct_prob": "correct-option probability",
          "brier": "Brier score (lower is better)"}


def emergence_table(path, scores, metric: str) -> tuple[pd.DataFrame, dict]:
    """One row per task with the §2 fit; and the results themselves by task (for drawing the fit)."""
    rows, results = [], {}
    for task in scores["task"].values:
        result = downstream.emergence(path, str(task), metric, scores=scores)
        results[str(task)] = result
        fit = result.fit
        rows.append({"task": str(task), "metric": metric, "leaves_random": result.leaves_random,
                     **{k: getattr(fit, k) if fit else np.nan for k in ("eta", "eta_low", "eta_high", "baseline",
                                                                       "slope", "r2")},
                     "spearman": result.spearman, "ratio_compute": result.collapse.ratio_compute,
                     "ratio_step": result.collapse.ratio_step, "n_points": result.n_points})
    return pd.DataFrame(rows), results


def run(source, metric: str = "accuracy", max_panels: int = 8) -> Result:
    """`metric` ("accuracy", "correct_prob" or "brier") of every task, model and checkpoint against
    the checkpoint's validation loss log(val_ppl), with the segmented fit of `tokendyn.analysis.emergence`
    where a task leaves random; at most `max_panels` tasks are drawn (the tables hold all)."""
    ds = open_source(source)
    require(ds, "loss", "val_ppl")
    path = store_path(ds)
    if path is None or not any(name.startswith(TASK_SET_PREFIX) for name in list_sets(path)):
        raise Skip("the store has no multiple-choice tasks (add some with tokendyn tasks)")
    scores = downstream.task_scores(path)
    fits, results = emergence_table(path, scores, metric)
    models = models_by_size(ds)
    colors = model_colors(ds)
    table = scores.reset_coords().to_dataframe().reset_index().dropna(subset=[metric])
    table["loss"] = np.log(table["val_ppl"])
    columns = ["task", "model", "ckpt", "step", "tokens_seen", "val_ppl", "loss", *downstream.METRICS, "n_items",
               "n_options"]
    table = table[[c for c in columns if c in table.columns]]

    tasks = list(fits["task"])[:max_panels]
    fig, panels = new_figure(len(tasks))
    for ax, task in zip(panels, tasks):
        rows = table[table.task == task]
        for model in models:
            r = rows[rows.model == model]
            ax.plot(r["loss"], r[metric], "o", ms=4, color=colors[model])
        chance = rows["random_brier" if metric == "brier" else "random_accuracy"].mean()
        ax.axhline(chance, color="black", ls=":", lw=0.8)
        fit = results[task].fit
        if fit is not None:
            x = np.linspace(rows["loss"].min(), rows["loss"].max(), 200)
            ax.plot(x, fit.predict(x), color="black", lw=1.2)
            ax.axvspan(fit.eta_low, fit.eta_high, color="grey", alpha=0.2)
            ax.axvline(fit.eta, color="black", ls="--", lw=0.8)
        ax.invert_xaxis()
        ax.set_xlabel("validation loss (nats, training →)")
        ax.set_ylabel(LABELS[metric])
        ax.set_title(task + ("" if fit is not None else " (stays at chance)"), fontsize="medium")
        ax.grid(alpha=0.3)
    model_legend(fig, colors, ls="none")
    fig.suptitle(f"{TITLE}\n(dotted: chance; solid: segmented fit; dashed: its threshold eta, shaded: 95% interval)",
                 fontsize="medium")

    findings = []
    for row in fits.itertuples():
        best = table[table.task == row.task][metric]
        best = best.min() if metric == "brier" else best.max()
        if row.leaves_random:
            findings.append(f"Task {row.task}: leaves chance once the validation loss falls below eta = {row.eta:.3f} "
                            f"nats (95% interval {row.eta_low:.3f} to {row.eta_high:.3f}); best {metric} {best:.2f}; "
                            f"Spearman with loss {row.spearman:.2f}.")
        else:
            findings.append(f"Task {row.task}: never leaves chance (best {metric} {best:.2f}).")
    ratios = fits[fits.leaves_random]["ratio_compute"].dropna()
    if len(ratios):
        holds = list(ratios < 1)
        findings.append(f"Du et al.: performance collapses onto one curve against loss better than against compute "
                        f"(unexplained-variance ratio loss/compute < 1); here this {verdict(holds)} "
                        f"({sum(holds)} of {len(holds)} tasks that leave chance; ratios " +
                        ", ".join(f"{v:.2f}" for v in ratios) + ").")
    elif len(models) > 1:
        findings.append("No task leaves chance, so Du et al.'s collapse onto loss cannot be checked here.")
    if len(fits) > len(tasks):
        findings.append(f"The figure shows the first {len(tasks)} of {len(fits)} tasks; the tables have all.")
    return Result(TITLE, {"task_scores": table, "emergence": fits}, fig, findings)


if __name__ == "__main__":
    sys.exit(main(run, "downstream"))

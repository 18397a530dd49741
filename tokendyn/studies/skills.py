"""Skill composition: measured competence on items needing k skills against the slingshot prediction
from single skills and Theorem 8's bound, over excess loss (Arora & Goyal 2023; methods.md §3;
`tokendyn.analysis.skills`)."""

from __future__ import annotations

import numpy as np

from tokendyn.analysis import downstream
from tokendyn.errors import TokendynError
from tokendyn.studies.study import Result, Skip, Source, main_set_path, models_by_size, open_source, require
from tokendyn.studies.style import category_colors, new_figure

TITLE = "Skill composition against excess loss"


def run(source: Source) -> Result:
    """Measured, predicted and bound competence per model, checkpoint and k (see
    `tokendyn.analysis.downstream.skill_curves`), drawn against the excess loss."""
    ds = open_source(source)
    require(ds, "loss", "val_ppl")
    path = main_set_path(ds, "tasks")
    if not downstream.skill_tasks(path):
        raise Skip("the store has no task with skill-labelled items")
    try:
        curves = downstream.skill_curves(ds)
    except TokendynError as err:
        raise Skip(str(err)) from err
    frame = curves.drop_vars("bound").to_dataframe().reset_index()
    columns = ["model", "ckpt", "step", "val_ppl", "k", "excess", "measured", "predicted"]
    table = frame[[c for c in columns if c in frame.columns]].dropna(subset=["measured"])
    table["model"] = table["model"].astype(str)
    bound = curves[["bound", "excess"]].to_dataframe().reset_index()
    bound = bound[[c for c in ("model", "ckpt", "step", "val_ppl", "text_k", "excess", "bound") if c in bound.columns]]
    bound["model"] = bound["model"].astype(str)

    findings = [
        f"Irreducible loss E = {curves.attrs['irreducible']:.3f} nats (tasks: {', '.join(curves.attrs['tasks'])}).",
        "k in skill_curves = skills per item (measured and predicted competence, "
        f"{curves.attrs['convention']} credit); text_k in skill_bound = skills per training text piece, "
        "the k of Theorem 8's bound (drawn with text_k = k).",
    ]
    gap = (curves["measured"] - curves["predicted"]).sel(k=curves["k"] > 1)
    for k in gap["k"].values:
        values = gap.sel(k=k).values
        if np.isfinite(values).any():
            findings.append(
                f"k = {k}: measured - predicted competence, mean {np.nanmean(values):+.3f} over "
                f"{int(np.isfinite(values).sum())} checkpoints."
            )

    ks = [int(k) for k in curves["k"].values]
    colors = category_colors([f"k = {k}" for k in ks])
    fig, panels = new_figure(len(ks))
    for ax, k in zip(panels, ks):
        rows = table[table.k == k].sort_values("excess")
        color = colors[f"k = {k}"]
        ax.plot(rows["excess"], rows["measured"], "o", ms=4, color=color, label="measured")
        ax.plot(rows["excess"], rows["predicted"], "-", color="black", lw=1, label="predicted (slingshot)")
        theorem = bound[bound.text_k == k].sort_values("excess") if "text_k" in bound else bound.iloc[:0]
        if theorem["bound"].notna().any():
            ax.plot(theorem["excess"], theorem["bound"], ":", color="grey", label="Theorem 8 bound (text_k = k)")
        ax.invert_xaxis()
        ax.set_xlabel("excess loss (nats, training →)")
        ax.set_ylabel("competence")
        ax.set_title(f"items needing k = {k} skill{'s' if k > 1 else ''}", fontsize="medium")
        ax.grid(alpha=0.3)
    panels[0].legend(fontsize="x-small")
    fig.suptitle(f"{TITLE} ({len(models_by_size(ds))} models, all checkpoints)")
    return Result(TITLE, {"skill_curves": table, "skill_bound": bound}, fig, findings)

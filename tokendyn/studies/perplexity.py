"""Validation perplexity of every model against training step, tokens seen and training FLOPs (methods.md §1.1)."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import xarray as xr

from tokendyn.studies.findings import listing
from tokendyn.studies.study import Result, Skip, main, models_by_size, open_source, require
from tokendyn.studies.style import log_scale, model_colors, model_legend, new_figure
from tokendyn.errors import TokendynError
from tokendyn.analysis.trajectories import done_checkpoints, load_small, x_axis

TITLE = "Validation perplexity over training"
AXES = {"step": "training step", "tokens_seen": "tokens seen", "flops": "training compute in FLOPs (6 N D)"}


def _available_axes(ds: xr.Dataset, params: str) -> list[str]:
    axes = ["step"]
    for axis in ("tokens_seen", "flops"):
        try:
            x_axis(ds, axis, params)
            axes.append(axis)
        except TokendynError:
            continue  # unknown tokens seen or parameter counts: that panel is left out
    return axes


def checkpoint_table(ds: xr.Dataset, axes: list[str], params: str) -> pd.DataFrame:
    """One row per done checkpoint: model, ckpt and the x axes with val_ppl."""
    values = {axis: x_axis(ds, axis, params).values for axis in [*axes, "val_ppl"]}
    rows = []
    for m, model in enumerate(ds["model"].values):
        for c in done_checkpoints(ds, m):
            rows.append({"model": str(model), "ckpt": int(c), **{a: float(v[m, c]) for a, v in values.items()}})
    return pd.DataFrame(rows)


def _at_common_step(table: pd.DataFrame, models: list[str]) -> tuple[float, dict[str, float]]:
    """The largest step every model has reached, and each model's val_ppl there (linear in log val_ppl)."""
    step = min(table.loc[table.model == m, "step"].max() for m in models)
    values = {}
    for model in models:
        rows = table[table.model == model]
        values[model] = float(np.exp(np.interp(step, rows["step"], np.log(rows["val_ppl"]))))
    return step, values


def run(source, params: str = "n_params") -> Result:
    """Validation perplexity vs step, tokens seen and FLOPs (6 x params x tokens) per model.

    params: "n_params" (default) or "n_params_nonembed" (Kaplan's N) for the FLOPs axis.
    """
    ds = load_small(open_source(source))
    require(ds, "val_ppl", "step")
    axes = _available_axes(ds, params)
    table = checkpoint_table(ds, axes, params)
    if table.empty:
        raise Skip("no checkpoint is done; run tokendyn extract first")
    models = [m for m in models_by_size(ds) if m in set(table.model)]
    colors = model_colors(ds)

    fig, panels = new_figure(len(axes))
    for ax, axis in zip(panels, axes):
        for model in models:
            rows = table[table.model == model]
            ax.plot(rows[axis], rows["val_ppl"], "o-", ms=3, color=colors[model], label=model)
        # step 0 and 0 tokens have no place on a log axis: linear up to the first positive value
        positive = table[axis][table[axis] > 0]
        if len(positive) and (table[axis] == 0).any():
            ax.set_xscale("symlog", linthresh=float(positive.min()))
        elif len(positive):
            log_scale(ax, "x")
        log_scale(ax, "y")
        ax.set_xlabel(AXES[axis] + (" (log scale)" if len(positive) else ""))
        ax.set_ylabel("validation perplexity (log scale)")
        ax.set_title(f"against {AXES[axis].split(' in ')[0]}")
        ax.grid(alpha=0.3)
    model_legend(fig, {m: colors[m] for m in models})
    fig.suptitle(TITLE)

    final = {m: table[table.model == m].sort_values("step")["val_ppl"].iloc[-1] for m in models}
    findings = [f"Validation perplexity at each model's last done checkpoint: {listing(final.items(), '{:.4g}')}."]
    if len(models) > 1:
        ordered = all(a > b for a, b in zip(list(final.values()), list(final.values())[1:]))
        findings.append(("Larger models end lower, as expected from scaling." if ordered else
                         "Final perplexity does not fall monotonically with model size (the expected "
                         "scaling order does not reproduce here)."))
        step, at_step = _at_common_step(table, models)
        lower = [a > b for a, b in zip(list(at_step.values()), list(at_step.values())[1:])]
        findings.append(f"At step {step:g}, the last step every model reached: {listing(at_step.items(), '{:.4g}')}; "
                        f"the larger of two neighbouring sizes is lower there in {sum(lower)} of {len(lower)} pairs.")
    worse = []
    for model in models:
        rows = table[table.model == model].sort_values("step")
        rises = rows["step"].values[1:][np.diff(rows["val_ppl"].values) > 0]
        if len(rises):
            worse.append(f"{model} at step{'s' if len(rises) > 1 else ''} {', '.join(f'{s:g}' for s in rises)}")
    if worse:
        findings.append("Validation perplexity rose from one checkpoint to the next in " + "; ".join(worse) +
                        " (matched-perplexity analyses skip such checkpoints: they use the running minimum).")
    return Result(TITLE, {"checkpoints": table}, fig, findings)


if __name__ == "__main__":
    sys.exit(main(run, "perplexity"))

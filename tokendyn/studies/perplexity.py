"""Validation perplexity of every model against training step, tokens seen and training FLOPs, and
the matched validation-perplexity levels every model reaches (methods.md §1.1)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import xarray as xr

from tokendyn.analysis.checkpoints import mislabelled
from tokendyn.analysis.trajectories import at_perplexity, load_small, perplexity_grid, reach, x_axis
from tokendyn.errors import TokendynError
from tokendyn.studies.findings import SAME_SIZE, listing, size_pairs
from tokendyn.studies.study import (
    Result,
    Skip,
    Source,
    default_of,
    model_sizes,
    models_by_size,
    open_source,
    require,
    step_text,
)
from tokendyn.studies.style import log_scale, model_colors, model_legend, new_figure

TITLE = "Validation perplexity over training"
AXES = {"step": "training step", "tokens_seen": "tokens seen", "flops": "training compute in FLOPs (6 N D)"}


def available_axes(ds: xr.Dataset, params: str = default_of(x_axis, "params")) -> list[str]:
    """The checkpoint x axes this store has values for: step, val_ppl, and tokens_seen and flops
    where the store knows tokens seen and parameter counts."""
    axes = ["step", "val_ppl"]
    for axis in ("tokens_seen", "flops"):
        try:
            x_axis(ds, axis, params)
            axes.append(axis)
        except TokendynError:
            continue  # unknown tokens seen or parameter counts: that column and panel are left out
    return axes


def checkpoint_table(ds: xr.Dataset, axes: list[str], params: str) -> pd.DataFrame:
    """One row per (model, ckpt): the x axes and whether the checkpoint is done."""
    table = xr.Dataset({axis: x_axis(ds, axis, params) for axis in axes})
    table = table.assign(done=ds["done"].reset_coords(drop=True)).to_dataframe().reset_index()
    table["model"] = table["model"].astype(str)
    return table[["model", "ckpt", *axes, "done"]]


def matched_levels(
    ds: xr.Dataset, axes: list[str], levels: Sequence[float] | None, n_levels: int
) -> tuple[np.ndarray, pd.DataFrame, xr.DataArray]:
    """The matched validation-perplexity levels, where each model reaches each on the other axes
    (one row per model and level), and every token's loss there (model, val_ppl, tokens).

    Raises TokendynError when the default levels would be one perplexity repeated (a model with a
    single checkpoint): nothing to match there.
    """
    if levels is None:
        levels = perplexity_grid(ds, n_levels)
        if len(levels) > 1 and np.isclose(levels[0], levels[-1], rtol=1e-6, atol=0):
            raise TokendynError(f"the models share one validation perplexity, {levels[0]:.4g}, not a range")
    levels = np.asarray(levels, dtype=float)
    grid = at_perplexity(ds, levels).astype(np.float32)
    grid = grid.drop_vars([c for c in grid.coords if c not in grid.dims and c != "step"])
    where = xr.Dataset({axis: reach(ds, "val_ppl", levels, axis) for axis in axes if axis != "val_ppl"})
    return levels, where.to_dataframe().reset_index(), grid


def _at_common_step(table: pd.DataFrame, models: list[str]) -> tuple[float, dict[str, float]]:
    """The largest step every model has reached, and each model's val_ppl there (linear in log val_ppl)."""
    step = min(table.loc[table.model == m, "step"].max() for m in models)
    values = {}
    for model in models:
        rows = table[table.model == model]
        values[model] = float(np.exp(np.interp(step, rows["step"], np.log(rows["val_ppl"]))))
    return step, values


def run(
    source: Source,
    params: str = default_of(x_axis, "params"),
    levels: Sequence[float] | None = None,
    n_levels: int = default_of(perplexity_grid, "n_levels"),
) -> Result:
    """Validation perplexity vs step, tokens seen and FLOPs (6 x params x tokens) per model, and the
    matched validation perplexities (`levels`; default `n_levels` levels every model reaches,
    `tokendyn.analysis.trajectories.perplexity_grid`) with every token's loss there.

    params: "n_params" or "n_params_nonembed" (Kaplan's N) for the FLOPs axis.
    """
    ds = load_small(open_source(source))
    require(ds, "val_ppl", "step")
    axes = available_axes(ds, params)
    checkpoints = checkpoint_table(ds, axes, params)
    done = checkpoints["done"].astype(bool) & np.isfinite(checkpoints["step"])
    table = checkpoints[done].drop(columns="done").sort_values("step", kind="stable")
    if table.empty:
        raise Skip("no checkpoint is done; run tokendyn extract first")
    tables, labels, findings = {"checkpoints": checkpoints}, {}, []
    if "loss" in ds:
        try:
            given = levels
            levels, tables["perplexity_levels"], labels["matched_perplexity"] = matched_levels(
                ds, axes, given, n_levels
            )
            span = f"{levels[0]:.4g} -> {levels[-1]:.4g}; {len(levels)} matched levels"
            findings.append(f"Common validation perplexity range {span}." if given is None else f"Levels given {span}.")
        except TokendynError as err:
            findings.append(f"Matched-perplexity levels: not testable ({err}).")
    axes = [axis for axis in axes if axis != "val_ppl"]
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
    findings.append(f"Validation perplexity at each model's last done checkpoint: {listing(final.items(), '{:.4g}')}.")
    if len(models) > 1:
        pairs = size_pairs(model_sizes(ds, models))
        step, at_step = _at_common_step(table, models)
        at_common = (
            f"At step {step_text(step)}, the last step every model reached: {listing(at_step.items(), '{:.4g}')}"
        )
        if pairs:
            ends, at = list(final.values()), list(at_step.values())
            findings.append(
                "Larger models end lower, as expected from scaling."
                if all(ends[small] > ends[large] for small, large in pairs)
                else "Final perplexity does not fall monotonically with model size (the expected "
                "scaling order does not reproduce here)."
            )
            lower = [at[small] > at[large] for small, large in pairs]
            findings.append(
                f"{at_common}; the larger of two neighbouring sizes is lower there in {sum(lower)} of "
                f"{len(lower)} pairs."
            )
        else:
            findings.append(f"{at_common}.")
            findings.append(f"Whether larger models end lower is not testable ({SAME_SIZE}).")
    worse = []
    for model in models:
        rows = table[table.model == model].sort_values("step")
        rises = rows["step"].values[1:][np.diff(rows["val_ppl"].values) > 0]
        if len(rises):
            worse.append(f"{model} at step{'s' if len(rises) > 1 else ''} {', '.join(step_text(s) for s in rises)}")
    if worse:
        findings.append(
            "Validation perplexity rose from one checkpoint to the next in "
            + "; ".join(worse)
            + " (matched-perplexity analyses skip such checkpoints: they use the running minimum)."
        )
    findings += mislabelled(ds)
    return Result(TITLE, tables, fig, findings, labels=labels)

"""Stagnated and upward tokens chosen on each model, tracked in every model against validation
perplexity: where the upward subset turns, and whether it descends again (methods.md §1.3). The
tables hold the subsets of every chooser; the figure and most findings show one (by default the
second-smallest model, as the paper)."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import xarray as xr

from tokendyn.analysis.labels import label_mask
from tokendyn.analysis.sequences import turning_points
from tokendyn.analysis.shared import computed
from tokendyn.analysis.trajectories import done_checkpoints, double_descent, load_small, model_index, token_share
from tokendyn.analysis.trends import START, TrendWarning, fit_points, ols, trend_categories, window_start
from tokendyn.studies.findings import verdict
from tokendyn.studies.study import Result, Skip, Source, default_of, models_by_size, open_source, require
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

TITLE = "Stagnated and upward tokens tracked across sizes"
CATEGORIES = ("stagnated", "upward")


def default_chooser(ds: xr.Dataset) -> str:
    """The second-smallest model (the paper chose on OPT-1.3B, the second-smallest of its suite), or the only one."""
    models = models_by_size(ds)
    return models[1] if len(models) > 1 else models[0]


def subsets(ds: xr.Dataset, choosers: list[str], start: float, x: str, band: float) -> dict[str, xr.DataArray]:
    """Per chooser: masks (category, tokens) of its stagnated and upward tokens at start fraction
    `start`; a model without trend categories there (too few checkpoints) is left out. The
    categories of every chooser come from one pass over the store."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrendWarning)
        labels = computed(trend_categories, ds, along="start", start=[start], x=x, band=band).isel(start=0)
    masks = {}
    for chooser in choosers:
        chosen = labels.isel(model=model_index(ds, chooser))
        if int((chosen >= 0).sum()):
            masks[chooser] = xr.concat([label_mask(chosen, c) for c in CATEGORIES], dim="category").assign_coords(
                category=list(CATEGORIES)
            )
    return masks


def curve_shapes(curves: xr.DataArray, tol: float) -> pd.DataFrame:
    """Per (category, model): the turn (minimum, then a rise of tol in log; `fall` = log drop before
    it), the peak after it, whether the curve later falls tol below that peak again (double descent
    of the subset) and the validation perplexity where it first has (`again_val_ppl`)."""
    turns = turning_points(curves, tol)
    rows = []
    for category in curves["category"].values:
        for m, model in enumerate(curves["model"].values):
            t = turns.sel(category=category, model=model)
            row = {
                "category": str(category),
                "model": str(model),
                "turns": bool(t["turns"]),
                "fall": float(t["fall"]),
                "turn_val_ppl": float(t["turn_val_ppl"]),
                "peak_val_ppl": np.nan,
                "descends_again": False,
                "again_val_ppl": np.nan,
            }
            if row["turns"]:
                step = curves["step"].values[m]
                order = np.flatnonzero(np.isfinite(step))
                order = order[np.argsort(step[order], kind="stable")]
                idx = order[np.flatnonzero(order == int(t["turn_ckpt"]))[0] + 1 :]  # checkpoints after the turn
                y = np.log(curves.sel(category=category).isel(model=m).values[idx])
                val_ppl = curves["val_ppl"].values[m, idx]
                peak = int(np.nanargmax(y))
                below = np.flatnonzero(y[peak:] <= y[peak] - tol)
                row.update(
                    peak_val_ppl=float(val_ppl[peak]),
                    descends_again=bool(len(below)),
                    again_val_ppl=float(val_ppl[peak + below[0]]) if len(below) else np.nan,
                )
            rows.append(row)
    return pd.DataFrame(rows)


def _upward_sentence(row) -> str:
    if not row.turns:
        return f"{row.model} never turns up"
    if row.fall > 0:
        text = f"{row.model} falls until validation perplexity {row.turn_val_ppl:.3g}, then rises"
    else:
        text = f"{row.model} rises from the start"
    if row.descends_again:
        text += (
            f" until validation perplexity {row.peak_val_ppl:.3g} and has fallen again by validation "
            f"perplexity {row.again_val_ppl:.3g}"
        )
    return text


def _stagnation(curves: xr.DataArray, ds: xr.Dataset, start: float, x: str) -> dict[str, tuple[float, float]]:
    """Per model: the stagnated subset's perplexity curve judged by the rule that made its tokens
    stagnated (docs/methods.md §1.2) over the same trend window: (the larger deviation of its two
    ends from the window's geometric mean, the p-value of its slope); NaN with fewer than 3 points."""
    out = {}
    for m, model in enumerate(curves["model"].values):
        idx = done_checkpoints(ds, m)
        keep, xs = fit_points(ds["step"].values[m, idx], x)
        j = window_start(ds["step"].values[m, idx[keep]], start) if len(xs) else 0
        ppl = curves.sel(category="stagnated").isel(model=m).values[idx[keep][j:]]
        if len(ppl) < 3 or not np.isfinite(ppl).all():
            out[str(model)] = (np.nan, np.nan)
            continue
        ends = np.exp(np.log(ppl[[0, -1]]) - np.log(ppl).mean())
        out[str(model)] = (float(np.abs(ends - 1).max()), float(ols(ppl / ppl[0], xs[j:])[2]))
    return out


def run(
    source: Source,
    start: float = START,
    chosen_on: str | None = None,
    x: str = default_of(trend_categories, "x"),
    tol: float = default_of(turning_points, "tol"),
    band: float = default_of(trend_categories, "band"),
) -> Result:
    """Subset perplexity of the stagnated and upward tokens of each model at start fraction `start`,
    in every model and checkpoint, against validation perplexity; the figure shows the subsets of
    `chosen_on` (default: the second-smallest model).

    tol: rise and fall (log units, 0.05 = 5% in perplexity) that count as a turn and a second
    descent. band: how close to its window mean a stagnated subset must stay (0.05 = ±5%).
    """
    ds = load_small(open_source(source))
    require(ds, "loss", "step", "val_ppl")
    chooser = chosen_on or default_chooser(ds)
    model_index(ds, chooser)
    models = models_by_size(ds)
    colors = model_colors(ds)
    tables, shapes_by, curves_by, percent_by = [], [], {}, {}
    masks_by = subsets(ds, [chooser, *(m for m in models if m != chooser)], start, x, band)
    if masks_by:  # every chooser's subsets tracked in every model in one pass over the store
        stacked = xr.concat(list(masks_by.values()), dim="chosen_on").assign_coords(chosen_on=list(masks_by))
        # the double-descent flags (default parameters) read every chunk too: computed in the same pass
        curves_all = ds.tokendyn.subset_curve(stacked.drop_vars("model", errors="ignore"), also=[(double_descent, {})])
    for name, masks in masks_by.items():
        percent = token_share(ds, masks)
        curves = curves_all.sel(chosen_on=name, drop=True)
        shapes_by.append(curve_shapes(curves, tol).assign(chosen_on=name))
        curves_by[name], percent_by[name] = curves, percent
        table = curves.to_dataframe().reset_index()
        tables.append(
            table.assign(
                chosen_on=name,
                start=start,
                subset_percent=table["category"].map({c: float(percent.sel(category=c)) for c in CATEGORIES}),
            ).dropna(subset=["subset_ppl"])
        )
    if chooser not in curves_by:
        raise Skip(
            f"model {chooser} has fewer than 3 checkpoints from {start:.0%} of its final step, "
            "so no trend categories to choose tokens by"
        )
    columns = ["chosen_on", "start", "category", "subset_percent", "model", "ckpt", "step", "val_ppl", "subset_ppl"]
    all_curves = pd.concat(tables)[columns]
    all_shapes = pd.concat(shapes_by)
    all_shapes = all_shapes[["chosen_on", *all_shapes.columns.drop("chosen_on")]]
    curves, percent = curves_by[chooser], percent_by[chooser]
    table = all_curves[all_curves.chosen_on == chooser]
    shapes = all_shapes[all_shapes.chosen_on == chooser]

    fig, panels = new_figure(len(CATEGORIES), ncols=2)
    zoomed = False
    for ax, category in zip(panels, CATEGORIES):
        drawn = []
        for model in models:
            rows = on_envelope(table[(table.category == category) & (table.model == model)])  # no zig-zag
            drawn.append((rows["val_ppl"].to_numpy(), rows["subset_ppl"].to_numpy()))
            ax.plot(rows["val_ppl"], rows["subset_ppl"], "o-", ms=3, color=colors[model], label=model)
            shape = shapes[(shapes.category == category) & (shapes.model == model)].iloc[0]
            for where, marker in (("turn_val_ppl", "v"), ("peak_val_ppl", "^")):
                hit = rows[np.isclose(rows["val_ppl"], shape[where])]
                ax.plot(hit["val_ppl"], hit["subset_ppl"], marker, ms=9, mfc="none", color=colors[model])
        perplexity_axis(ax)
        zoomed |= zoom_perplexity(ax, drawn)
        if (table.category == category).any():  # an empty subset has no curve to put on a log scale
            log_scale(ax, "y")
        ax.set_ylabel("subset perplexity (log scale)")
        ax.set_title(
            f"{category} tokens of {chooser} at {start:.0%}\n"
            f"({float(percent.sel(category=category)):.1f}% of tokens; ▽ turn, △ peak)",
            fontsize="medium",
        )
        ax.grid(alpha=0.3)
    model_legend(fig, colors)
    fig.suptitle(TITLE)

    upward = shapes[shapes.category == "upward"].set_index("model").loc[models]
    findings = [
        f"Chosen on {chooser} at start {start:.0%}: {float(percent.sel(category='stagnated')):.1f}% of tokens "
        f"stagnated, {float(percent.sel(category='upward')):.1f}% upward (the paper's OPT-1.3B: 9.4% upward "
        "at 20%).",
        "Upward subset: " + "; ".join(_upward_sentence(row) for row in upward.reset_index().itertuples()) + ".",
    ]
    larger = models[models.index(chooser) + 1 :]
    if larger:
        holds = [bool(upward.loc[m, "descends_again"]) for m in larger]
        findings.append(
            f"Paper: in models larger than the chooser the upward subset descends again (double descent); "
            f"here this {verdict(holds)} ({sum(holds)} of {len(holds)})."
        )
    if models[0] != chooser:
        stays = not upward.loc[models[0], "descends_again"]
        findings.append(
            f"Paper: the smallest model's upward subset stays up; here ({models[0]}) this {verdict([stays])}."
        )
    findings += envelope_findings(ds) + ([ZOOM_FINDING] if zoomed else [])
    alpha = default_of(trend_categories, "alpha")
    spread = _stagnation(curves, ds, start, x)
    findings.append(
        "The stagnated subset over the trend window (its ends against the window's geometric mean; "
        "its slope's p-value): " + ", ".join(f"{k} {d:.1%}, p {p:.2g}" for k, (d, p) in spread.items()) + "."
    )
    testable = [m for m in larger if np.isfinite(spread[m][0])]
    if testable:
        holds = [spread[m][0] <= band and spread[m][1] >= alpha for m in testable]
        findings.append(
            f"Paper: stagnated tokens chosen on a small model stay stagnated in larger ones (here: the "
            f"subset's curve stagnated by §1.2, ends within ±{band:.0%}, no slope at p < {alpha}); this "
            f"{verdict(holds)} ({sum(holds)} of {len(holds)} larger models)."
        )
    for name in curves_by:
        if name != chooser:
            again = all_shapes[(all_shapes.chosen_on == name) & (all_shapes.category == "upward")]
            again = [m for m in models if bool(again.set_index("model").loc[m, "descends_again"])]
            findings.append(
                f"Upward tokens of {name} at {start:.0%}: the subset descends again in "
                f"{', '.join(again) or 'no model'}."
            )
    missing = [m for m in models if m not in curves_by]
    if missing:
        findings.append(
            f"No subsets chosen on {', '.join(missing)}: fewer than 3 checkpoints from {start:.0%} of the final step."
        )
    return Result(TITLE, {"subset_curves": all_curves, "subset_shapes": all_shapes}, fig, findings)

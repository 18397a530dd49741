"""Analysis steps for token trajectories (methods.md §1.1-1.3, §5): x axes and matched perplexity,
trend categories with subset curves, double descent, cross-size agreement, curve measures, clusters.

Options read from `out.options` (defaults here; `tokendyn analyze --help`): start, trend_x,
subset_start, subset_tol, n_levels, levels, dd_tol, dd_window, top, last, n_clusters,
cluster_method.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from tokendyn.pipelines.analyze import Output, Skip, require
from tokendyn.errors import TokendynError
from tokendyn.analysis.labels import TokenLabels
from tokendyn.analysis.trajectories import (at_perplexity, detect_double_descent, load_small, perplexity_range, reach,
                                   token_share, x_axis)
from tokendyn.analysis.trends import STARTS

DEFAULTS = {"start": STARTS, "trend_x": "log_step", "subset_start": 0.2, "n_levels": 20, "levels": None,
            "dd_tol": 0.5, "dd_window": 3, "subset_tol": 0.02, "top": 0.1, "last": 5, "n_clusters": "auto",
            "cluster_method": "kmeans"}


def _option(out: Output, name: str):
    value = out.options.get(name)
    return DEFAULTS[name] if value is None else value


def _axes(ds: xr.Dataset) -> list[str]:
    """The x axes this store has values for."""
    axes = ["step", "val_ppl"]
    for axis in ("tokens_seen", "flops"):
        try:
            x_axis(ds, axis)
            axes.append(axis)
        except TokendynError:
            pass
    return axes


def perplexity_step(ds: xr.Dataset, out: Output) -> list[str]:
    """Checkpoint x axes (checkpoints.csv) and matched perplexity: where each model reaches each
    level (perplexity_levels.csv) and every token's loss there (labels group matched_perplexity)."""
    require(ds, "loss", "step", "val_ppl")
    ds = load_small(ds)
    axes = _axes(ds)
    table = xr.Dataset({axis: x_axis(ds, axis) for axis in axes}).assign(done=ds["done"].reset_coords(drop=True))
    table = table.to_dataframe()
    out.write_table("checkpoints", table.reset_index()[["model", "ckpt", *axes, "done"]])
    try:
        high, low = perplexity_range(ds)
    except TokendynError as err:
        raise Skip(str(err)) from err
    levels = _option(out, "levels") or np.geomspace(high, low, _option(out, "n_levels"))
    grid = at_perplexity(ds, levels).astype(np.float32)
    out.write_labels("matched_perplexity", grid.drop_vars([c for c in grid.coords if c not in grid.dims and
                                                           c != "step"]))
    where = xr.Dataset({axis: reach(ds, "val_ppl", levels, axis) for axis in axes if axis != "val_ppl"})
    out.write_table("perplexity_levels", where.to_dataframe().reset_index())
    return [f"common validation perplexity range {high:.4g} -> {low:.4g}; {len(levels)} matched levels"]


def trends_step(ds: xr.Dataset, out: Output) -> list[str]:
    """Trend categories per model and start fraction (labels group trends, trend_shares.csv), and
    subset curves of each model's stagnated and upward tokens tracked in every model
    (subset_curves.csv) with a double-descent check on each curve."""
    require(ds, "loss", "step", "val_ppl")
    cats = ds.tokendyn.trend_categories(_option(out, "start"), x=_option(out, "trend_x"))
    cats = TokenLabels.from_dataarray(out.write_labels("trends", cats.to_dataarray("trend"))["trend"])
    shares = cats.share()
    out.write_table("trend_shares", shares.rename("percent").reset_coords(drop=True).to_dataframe().reset_index())
    p = min(shares["start"].values, key=lambda s: abs(s - _option(out, "subset_start")))
    lines = [f"% stagnated/upward/downward/uncategorised at start {p:.0%}: " + "; ".join(
        f"{model} " + "/".join(f"{v:.1f}" for v in shares.sel(model=model, start=p).values)
        for model in shares["model"].values)]
    masks = xr.concat([xr.concat([cats.sel(model=chooser, start=p) == category for category in ("stagnated", "upward")],
                                 dim="category") for chooser in ds["model"].values], dim="chosen_on")
    masks = masks.assign_coords(chosen_on=[str(m) for m in ds["model"].values], category=["stagnated", "upward"])
    curves = ds.tokendyn.subset_curve(masks)
    rows = curves.to_dataframe().reset_index()
    out.write_table("subset_curves", rows[["chosen_on", "category", "model", "ckpt", "step", "val_ppl", "subset_ppl"]])
    twice = detect_double_descent(np.log(curves.sel(category="upward")), "ckpt", _option(out, "subset_tol"), 1)
    for chooser in twice["chosen_on"].values:
        descending = [str(m) for m in twice["model"].values if twice.sel(chosen_on=chooser, model=m)]
        lines.append(f"upward tokens of {chooser} at {p:.0%}: subset perplexity falls, rises and falls again "
                     f"(by >= {_option(out, 'subset_tol')} nats) in " + (", ".join(descending) or "no model"))
    return lines


def double_descent_step(ds: xr.Dataset, out: Output) -> list[str]:
    """Per-token double descent over each model's checkpoints (labels group double_descent,
    double_descent.csv with the share per model)."""
    require(ds, "loss", "step")
    flags = ds.tokendyn.double_descent(_option(out, "dd_tol"), _option(out, "dd_window"))
    flags = out.write_labels("double_descent", flags.rename("double_descent"))["double_descent"]
    percent = token_share(ds, flags)
    out.write_table("double_descent", percent.rename("percent").reset_coords(drop=True).to_dataframe().reset_index())
    return ["% tokens with double descent: " + ", ".join(f"{m} {v:.2f}" for m, v in
                                                          zip(percent["model"].values, percent.values))]


def agreement_step(ds: xr.Dataset, out: Output) -> list[str]:
    """Spearman and top-k Jaccard of per-token loss drops between model pairs, at matched
    perplexity and at matched steps / tokens seen (agreement.csv)."""
    require(ds, "loss", "step", "val_ppl")
    if ds.sizes["model"] < 2:
        raise Skip("needs at least two models")
    try:
        table = ds.tokendyn.agreement(top=_option(out, "top"))
    except TokendynError as err:
        raise Skip(str(err)) from err
    out.write_table("agreement", table)
    means = table.groupby("axis", sort=False)[["spearman", "jaccard"]].mean()
    return ["mean over model pairs, Spearman / top-k Jaccard of loss drops: " + "; ".join(
        f"matched {axis} {row.spearman:.2f} / {row.jaccard:.2f}" for axis, row in means.iterrows())]


def curves_step(ds: xr.Dataset, out: Output) -> list[str]:
    """Chang et al. curve measures and cartography (labels group curves), Rho-1 classes between the
    first and last checkpoint (labels group rho1), and per-model summaries (curve_summary.csv)."""
    require(ds, "loss", "step")
    measures = out.write_labels("curves", ds.tokendyn.curve_measures(last=_option(out, "last")).astype(np.float32))
    rho = ds.tokendyn.rho1_classes()
    rho = TokenLabels.from_dataarray(out.write_labels("rho1", rho.to_dataarray("rho1"))["rho1"])
    summary = measures.load().median("token").reset_coords(drop=True).to_dataframe()
    rho_shares = rho.share().to_pandas()
    table = summary.join(rho_shares.add_prefix("rho1 % ")).reset_index()
    out.write_table("curve_summary", table)
    return ["Rho-1 % H->H/L->H/H->L/L->L: " + "; ".join(
        f"{m} " + "/".join(f"{v:.0f}" for v in row) for m, row in rho_shares.iterrows())]


def clusters_step(ds: xr.Dataset, out: Output) -> list[str]:
    """Trajectory clusters on the matched-perplexity grid (one model: its checkpoints), named by
    shape (labels group clusters; clusters.csv, cluster_centroids.csv, cluster_tokens.csv)."""
    require(ds, "loss", "step", "val_ppl")
    on = "perplexity" if ds.sizes["model"] > 1 else "checkpoints"
    n_clusters = _option(out, "n_clusters")
    try:
        result = ds.tokendyn.cluster(n_clusters, on=on, method=_option(out, "cluster_method"))
    except TokendynError as err:
        raise Skip(str(err)) from err
    out.write_labels("clusters", result.labels.to_dataarray("cluster"))
    shares = result.share()
    out.write_table("clusters", shares.rename("percent").reset_coords(drop=True).to_dataframe().reset_index())
    centroids = result.centroids.to_dataframe(name="loss_change").reset_index()
    out.write_table("cluster_centroids", centroids)
    out.write_table("cluster_tokens", result.top_tokens)
    overall = shares.mean("model")
    chosen = f"chosen by {result.criterion}" if result.scores else "given"
    names = ", ".join(f"{name} {v:.0f}%" for name, v in zip(result.names, overall.values))
    return [f"{len(result.names)} clusters on {on} ({chosen}), stability (ARI across seeds) "
            f"{result.stability:.2f}: {names}"]


STEPS = [perplexity_step, trends_step, double_descent_step, agreement_step, curves_step, clusters_step]

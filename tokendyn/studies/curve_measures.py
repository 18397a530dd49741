"""Histograms of the per-token learning-curve measures of Chang, Tu & Bergen (2024) per model, with
the Rho-1 classes between the first and last checkpoint (methods.md §5; `tokendyn.analysis.curves`);
every token's measures and Rho-1 class as per-token labels (`curves`, `rho1`)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

from tokendyn.analysis.curves import RHO1_CLASSES, curve_measures, rho1_classes
from tokendyn.analysis.labels import label_share
from tokendyn.analysis.spill import Summary, spill, token_windows
from tokendyn.analysis.trajectories import load_small
from tokendyn.studies.findings import SAME_SIZE, WORDS, listing, size_trend
from tokendyn.studies.study import Result, Source, default_of, model_sizes, models_by_size, open_source, require
from tokendyn.studies.style import model_colors, model_legend, new_figure

TITLE = "Per-token learning-curve measures (Chang et al.)"
MEASURES = {
    "final_loss": "final loss (nats; mean over the last checkpoints)",
    "final_variability": "within-run variability (nats; std over the last checkpoints)",
    "age_of_acquisition": "age of acquisition (log10 step)",
    "forgettability": "forgettability (nats; sum of rises)",
}
RHO1_REFERENCE = dict(zip(RHO1_CLASSES, (11, 12, 26, 51)))  # Lin et al. 2024 (Rho-1), % of tokens; methods.md §5


def summaries(every: xr.Dataset, models: list[str], bins: int) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, int]]:
    """(histograms, summary, valid tokens per model) of the per-token measures, read a token window at
    a time in two passes.

    histograms: counts per model of each measure in MEASURES on bins shared by all models (numpy's
    `histogram_bin_edges` of their finite values): measure, model, bin_left, bin_right, count, percent.
    summary: per measure and model the median and mean (numpy's nanmedian and nanmean, exactly
    and summed in float64), n_tokens (finite values) and n_undefined (tokens with a prediction, a
    finite final loss, but no value).
    """
    names = [str(m) for m in every["model"].values]
    parts = {(measure, m): Summary() for measure in every.data_vars for m in models}
    valid, undefined = np.zeros(len(names), np.int64), dict.fromkeys(parts, 0)
    for window in token_windows(every):  # pass 1: counts, sums, ranges, the medians' upper bits
        final = np.isfinite(window["final_loss"].values.reshape(len(names), -1))
        valid += final.sum(axis=1)
        for (measure, model), part in parts.items():
            v = window[measure].values[names.index(model)].ravel()
            part.add(v)
            undefined[measure, model] += int((final[names.index(model)] & ~np.isfinite(v)).sum())
    edges = {}
    for measure in MEASURES:
        ranges = [parts[measure, m] for m in models if parts[measure, m].n_finite]
        finite = np.array([p.low for p in ranges] + [p.high for p in ranges], np.float32)
        edges[measure] = np.histogram_bin_edges(finite, bins) if len(finite) else np.array([0.0, 1.0])
    for window in token_windows(every):  # pass 2: histograms, the medians' lower bits
        for (measure, model), part in parts.items():
            part.refine(window[measure].values[names.index(model)].ravel(), edges.get(measure))
    hist, summary = [], []
    for (measure, model), part in parts.items():
        if measure in MEASURES:
            percent = 100 * part.counts / max(part.n_finite, 1)
            hist += [
                {"measure": measure, "model": model, "bin_left": lo, "bin_right": hi, "count": int(c), "percent": p}
                for lo, hi, c, p in zip(edges[measure][:-1], edges[measure][1:], part.counts, percent)
            ]
        summary.append(
            {
                "model": model,
                "measure": measure,
                "median": part.median() if part.n_finite else np.nan,
                "mean": part.mean(),
                "n_tokens": part.n_finite,
                "n_undefined": undefined[measure, model],
            }
        )
    return pd.DataFrame(hist), pd.DataFrame(summary), dict(zip(names, valid))


def run(
    source: Source,
    last: int = default_of(curve_measures, "last"),
    chance: float | None = default_of(curve_measures, "chance"),
    window: int = default_of(curve_measures, "window"),
    bins: int = 30,
) -> Result:
    """Final loss, variability, age of acquisition and forgettability of every token in every model
    (see `tokendyn.analysis.curves.curve_measures` for last, chance and window), as histograms with `bins`
    bins shared by the models; Rho-1 class shares beside Rho-1's reference."""
    ds = load_small(open_source(source))  # once here, not once in each analysis called
    require(ds, "loss", "step")
    # float32 (the labels' precision) from each block, computed to a temporary store a window of
    # tokens at a time and summarised from there: memory never holds every token's measures
    every = spill(curve_measures(ds, last=last, chance=chance, window=window).astype(np.float32))
    models = models_by_size(ds)
    colors = model_colors(ds)
    hist, summary, valid = summaries(every, models, bins)
    classes = rho1_classes(ds)
    rho = label_share(classes).rename("percent").reset_coords(drop=True).to_dataframe().reset_index()
    rho = rho.rename(columns={"category": "class"}).assign(model=lambda t: t["model"].astype(str))

    fig, panels = new_figure(len(MEASURES), ncols=2)
    for ax, (measure, label) in zip(panels, MEASURES.items()):
        rows = hist[hist.measure == measure]
        for model in models:
            r = rows[rows.model == model]
            ax.stairs(
                r["percent"],
                np.append(r["bin_left"].values, r["bin_right"].values[-1:]),
                color=colors[model],
                lw=1.5,
                label=model,
            )
        ax.set_xlabel(label)
        ax.set_ylabel("% of tokens")
        ax.set_title(label.split(" (")[0], fontsize="medium")
        ax.grid(alpha=0.3)
    model_legend(fig, colors)
    fig.suptitle(f"{TITLE}, last {last} checkpoints")

    medians = summary.set_index(["measure", "model"])["median"]
    findings = []
    for measure, label in MEASURES.items():
        values = [medians[(measure, m)] for m in models]
        trend = ""
        if len(models) > 1:
            by_size = size_trend(values, model_sizes(ds, models))
            trend = (
                f"; by size not testable ({SAME_SIZE})" if by_size is None else f"; it {WORDS[by_size]} with model size"
            )
        findings.append(f"Median {label.split(' (')[0]}: {listing(zip(models, values))}{trend}.")
    undefined = summary[summary.measure == "age_of_acquisition"].set_index("model")
    findings.append(
        "Tokens without an age of acquisition (never below chance, rising, or crossing halfway outside "
        "the checkpoints): "
        + listing(
            ((m, 100 * undefined.loc[m, "n_undefined"] / max(valid[m], 1)) for m in models),
            "{:.0f}%",
        )
        + "."
    )
    shares = rho.set_index(["model", "class"])["percent"]
    findings.append(
        "Rho-1 classes H->H / L->H / H->L / L->L between the first and last checkpoint (threshold: "
        "median loss): "
        + "; ".join(
            f"{m} not testable (one trained checkpoint)"
            if np.isnan(shares[(m, RHO1_CLASSES[0])])
            else f"{m} " + " / ".join(f"{shares[(m, c)]:.0f}" for c in RHO1_CLASSES)
            for m in models
        )
        + " % (Rho-1's reference: "
        + " / ".join(str(v) for v in RHO1_REFERENCE.values())
        + ")."
    )
    return Result(
        TITLE,
        {"curve_histograms": hist, "curve_summary": summary, "rho1": rho},
        fig,
        findings,
        labels={"curves": every, "rho1": classes.rename("rho1")},
    )

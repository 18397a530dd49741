"""Token trajectories clustered into named shapes: centroid curves with their names and shares per
model, and each cluster's most frequent tokens (methods.md §5; `tokendyn.analysis.clusters`); every
token's cluster per model as per-token labels (`clusters`)."""

from __future__ import annotations

import numpy as np

from tokendyn.analysis.clusters import DETECTED, cluster, detector_agreement
from tokendyn.analysis.tokens import show_whitespace
from tokendyn.analysis.trajectories import perplexity_range
from tokendyn.errors import TokendynError
from tokendyn.studies.findings import SAME_SIZE, listing, size_pairs, size_trend
from tokendyn.studies.study import Result, Skip, Source, default_of, model_sizes, models_by_size, open_source, require
from tokendyn.studies.style import category_colors, new_figure, perplexity_axis, perplexity_ticks

GRIDS = {
    "perplexity": "the matched-perplexity grid",
    "progress": "each model's own trained checkpoints (training progress)",
    "checkpoints": "the checkpoints",
}
TITLE = "Clusters of token loss trajectories"
MIN_CHANGE = 2.0  # percentage points across sizes before a share's trend with size is worth a sentence


def run(
    source: Source,
    n_clusters: int | str = default_of(cluster, "n_clusters"),
    on: str = default_of(cluster, "on"),
    method: str = default_of(cluster, "method"),
    n_levels: int = default_of(cluster, "n_levels"),
    top: int = default_of(cluster, "top"),
    seed: int = default_of(cluster, "random_state"),
) -> Result:
    """Cluster every (model, token) trajectory of the trained part: over each model's own
    checkpoints (on="progress", default), or on="perplexity", the matched-perplexity grid, which
    falls back to "progress" (and says so) when the models share no perplexity range; one model:
    over its checkpoints after step 0. See `tokendyn.analysis.clusters.cluster` for n_clusters
    ("shapes": one cluster per shape found), method and n_levels. top: tokens listed per cluster.
    The named clusters are compared with the per-token detectors (`detector_agreement`)."""
    ds = open_source(source)
    require(ds, "loss", "step", "val_ppl")
    notes = []
    if ds.sizes["model"] == 1:
        on = "checkpoints"
    elif on == "perplexity":
        try:
            perplexity_range(ds)
        except TokendynError as err:
            on = "progress"
            notes.append(
                f"The models share no validation-perplexity range ({err}), so the trajectories are "
                f"compared on {GRIDS[on]} instead."
            )
    try:
        result = ds.tokendyn.cluster(n_clusters, on=on, method=method, n_levels=n_levels, top=top, random_state=seed)
    except TokendynError as err:
        raise Skip(str(err)) from err
    models = models_by_size(ds)
    names = list(result.names)
    colors = category_colors(names)
    shares = result.share().rename("percent").reset_coords(drop=True).to_dataframe().reset_index()
    shares = shares.rename(columns={"category": "cluster"})
    shares["model"] = shares["model"].astype(str)
    centroids = result.centroids.to_dataframe(name="loss_change").reset_index()
    overall = shares.groupby("cluster", sort=False)["percent"].mean()
    percent = shares.pivot(index="model", columns="cluster", values="percent").loc[models]  # (model, cluster)

    fig, (curves, bars) = new_figure(2, ncols=2)
    grid = result.centroids["point"].values
    for k, name in enumerate(names):
        curves.plot(
            grid, result.centroids.values[k], "o-", ms=3, color=colors[name], label=f"{name} ({overall[name]:.0f}%)"
        )
    if on == "perplexity":
        perplexity_axis(curves, "matched validation perplexity (log scale, training →)")
        perplexity_ticks(curves)  # a few round values: the grid often spans less than a decade
    elif on == "progress":
        curves.set_xlabel("training progress (share of each model's trained checkpoints)")
    else:
        curves.set_xlabel("training step")
    curves.set_ylabel("loss change from the first point (nats)")
    curves.tick_params(axis="x", which="both", labelsize="small")
    curves.set_title("centroids (mean trajectory of each cluster)", fontsize="medium")
    curves.axhline(0, color="black", lw=0.6)
    curves.grid(alpha=0.3)
    left = np.zeros(len(models))
    for name in names:
        values = percent[name].to_numpy()
        bars.barh(models, values, left=left, color=colors[name], label=name)
        left += values
    bars.invert_yaxis()
    bars.set_xlabel("% of the model's tokens")
    bars.set_title("share of each cluster per model", fontsize="medium")
    fig.legend(
        *curves.get_legend_handles_labels(), title="cluster (mean share)", loc="outside right upper", fontsize="small"
    )
    fig.suptitle(TITLE)

    chosen = f"chosen by {result.criterion}" if result.scores or n_clusters == "shapes" else "given"
    findings = [
        f"{len(names)} clusters ({chosen}) of the trajectories on {GRIDS[on]}; "
        f"stability across seeds (adjusted Rand index) {result.stability:.2f}.",
        "Mean share over models: " + listing(overall.items(), "{:.1f}%") + ".",
        *notes,
    ]
    sizes = model_sizes(ds, models)
    if len(models) > 1 and not size_pairs(sizes):
        findings.append(f"Cluster shares against model size: not testable ({SAME_SIZE}).")
    elif len(models) > 1:
        for name in names:
            values = percent[name].to_numpy()
            trend = size_trend(values, sizes, threshold=0.9)
            if trend and np.ptp(values) >= MIN_CHANGE:
                findings.append(
                    f"The share of '{name}' {'grows' if trend > 0 else 'shrinks'} with model size "
                    f"({listing(zip(models, values), '{:.1f}%')})."
                )
    stagnant = [n for n in names if n.startswith("stagnating")]
    if len(models) > 1 and stagnant:
        trend = size_trend(percent[stagnant[0]].to_numpy(), sizes)
        findings.append(
            "Paper: more tokens stagnate in larger models; "
            + (
                f"this is not testable here ({SAME_SIZE})."
                if trend is None
                else "the stagnating cluster grows with size, so this reproduces."
                if trend > 0
                else "the stagnating cluster does not grow with size, so this does not reproduce."
            )
        )
    agreement = detector_agreement(ds, result)
    for name, rows in agreement.groupby("cluster", sort=False):
        ran, unlabelled = rows[rows["detector_tokens"].notna()], rows.loc[rows["detector_tokens"].isna(), "model"]
        parts = []
        if len(ran):
            parts.append(
                "precision "
                + listing(zip(ran["model"], ran["precision"]), "{:.2f}")
                + "; recall "
                + listing(zip(ran["model"], ran["recall"]), "{:.2f}")
                + " (chance precision "
                + listing(zip(ran["model"], ran["base_rate"]), "{:.2f}")
                + ")"
            )
        if len(unlabelled):
            parts.append(
                f"not testable in {', '.join(unlabelled)} (the detector labelled none of the tokens: "
                "too few checkpoints in its window)"
            )
        findings.append(
            f"Cluster '{name}' against the per-token detector '{rows['detector'].iloc[0]}': {'; '.join(parts)}."
        )
    missing = [shape for shape in DETECTED if shape not in names]
    if missing:
        findings.append(f"No cluster has the shape {', '.join(missing)} on these features.")
    tokens = result.top_tokens.assign(
        name=lambda t: t["name"].astype(str), text=lambda t: t["text"].map(show_whitespace)
    )
    return Result(
        TITLE,
        {"clusters": shares, "cluster_centroids": centroids, "cluster_tokens": tokens, "cluster_agreement": agreement},
        fig,
        findings,
        shown=["cluster_tokens"],
        labels={"clusters": result.labels.rename("cluster")},
    )

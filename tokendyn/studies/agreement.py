"""Do the same tokens drop most in every size? Rank correlation and top-k overlap of per-token loss
drops between model pairs at matched validation perplexity vs matched step (methods.md §1.3)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tokendyn.analysis.trajectories import agreement, done_checkpoints
from tokendyn.errors import TokendynError
from tokendyn.studies.study import Result, Skip, Source, default_of, open_source, require
from tokendyn.studies.style import category_colors, new_figure

TITLE = "Cross-size agreement of per-token loss drops"
# With two checkpoints every loss between them is a blend of the two: the drop between any two levels, at
# matched perplexity or step, is a fraction of the one drop, so the two rankings agree by construction.
MIN_CHECKPOINTS = 3
AXIS_NAMES = {"val_ppl": "matched validation perplexity", "step": "matched step", "tokens_seen": "matched tokens seen"}


def run(
    source: Source,
    levels: Sequence[float] | None = default_of(agreement, "levels"),
    top: float = default_of(agreement, "top"),
) -> Result:
    """Spearman correlation and top-`top` Jaccard overlap of every model pair's per-token loss drops
    between two validation perplexities (default: 10% and 90% of the way through the common range),
    and the same at the matched steps and tokens seen; see `tokendyn.analysis.trajectories.agreement`."""
    ds = open_source(source)
    require(ds, "loss", "step", "val_ppl")
    if ds.sizes["model"] < 2:
        raise Skip("needs at least two models")
    try:
        table = agreement(ds, levels, top)
    except TokendynError as err:
        raise Skip(str(err)) from err
    table["pair"] = table["model_a"] + " vs " + table["model_b"]
    pairs = list(dict.fromkeys(table["pair"]))
    axes = list(dict.fromkeys(table["axis"]))
    colors = category_colors(axes)

    fig, panels = new_figure(2, ncols=2)
    width = 0.8 / len(axes)
    x = np.arange(len(pairs))
    for ax, metric, label in (
        (panels[0], "spearman", "Spearman's ρ of the drops"),
        (panels[1], "jaccard", f"Jaccard overlap, top {top:g}"),
    ):
        for i, axis in enumerate(axes):
            rows = table[table.axis == axis].set_index("pair").loc[pairs]
            ax.bar(
                x + (i - (len(axes) - 1) / 2) * width, rows[metric], width, color=colors[axis], label=AXIS_NAMES[axis]
            )
            if metric == "jaccard" and i == 0:
                ax.plot(x, rows["jaccard_chance"], "k_", ms=18, mew=2, label="chance (independent choices)")
        ax.set_xticks(x, pairs, rotation=20 if len(pairs) > 3 else 0, fontsize="small")
        ax.set_ylabel(label)
        ax.set_title(label.split(",")[0] + " per model pair", fontsize="medium")
        ax.set_ylim(min(0, float(np.nanmin(table[metric])) - 0.05), 1.05)
        ax.axhline(0, color="black", lw=0.6)
        ax.grid(axis="y", alpha=0.3)
    fig.legend(
        *panels[1].get_legend_handles_labels(), loc="outside lower center", ncols=len(axes) + 1, fontsize="small"
    )
    ppl = table[table.axis == "val_ppl"].iloc[0]
    fig.suptitle(
        f"{TITLE}\n(loss drop from validation perplexity {ppl.from_level:.3g} to {ppl.to_level:.3g}, "
        "or between the steps / tokens where the models reach them on average)",
        fontsize="medium",
    )

    means = table.groupby("axis", sort=False)[["spearman", "jaccard", "jaccard_chance"]].mean()
    n_done = {str(m): len(done_checkpoints(ds, str(m))) for m in ds["model"].values}
    few = ~(table["model_a"].map(n_done).ge(MIN_CHECKPOINTS) & table["model_b"].map(n_done).ge(MIN_CHECKPOINTS))
    # a pair whose step drops rank as at matched perplexity by construction is evidence neither way
    index = table.set_index(["model_a", "model_b"]).index
    alike = index.isin(index[(table["axis"] == "step") & table["as_at_val_ppl"]])
    enough = ~few & ~alike
    tested = table[enough].groupby("axis", sort=False)["spearman"].mean()
    findings = [
        "Mean over model pairs, Spearman / top-k Jaccard (chance): "
        + "; ".join(
            f"{AXIS_NAMES[a]} {r.spearman:.2f} / {r.jaccard:.2f} ({r.jaccard_chance:.2f})" for a, r in means.iterrows()
        )
        + "."
    ]
    claim = "Paper: a similar subset of tokens sees the largest loss drop at a given perplexity; "
    if "step" in means.index and not enough.any():
        why = (
            f"needs two models with >= {MIN_CHECKPOINTS} done checkpoints; the models have "
            f"{', '.join(str(n) for n in n_done.values())}: with two, the drops at matched perplexity and at "
            "matched step are the same fraction of the one drop, equal by construction"
            if few.all()
            else "every pair reads both levels, at matched perplexity and at matched step, between the same two "
            "checkpoints, so its drops rank alike on both by construction"
        )
        findings.append(claim + f"not testable here ({why}).")
    elif "step" in means.index and tested[["val_ppl", "step"]].isna().any():
        findings.append(
            claim + "not testable here (no Spearman correlation at matched perplexity or step: too few shared "
            "levels or steps)."
        )
    elif "step" in means.index:
        higher = tested["val_ppl"] > tested["step"]
        pairs = (
            ""
            if enough.all()
            else f" over the model pairs that can tell them apart: >= {MIN_CHECKPOINTS} done checkpoints each, "
            "and not both levels between the same two checkpoints"
        )
        findings.append(
            claim + "measured here, the drops agree " + ("more" if higher else "no more") + " at matched perplexity "
            f"than at matched step (Spearman {tested['val_ppl']:.2f} vs {tested['step']:.2f}{pairs}), so the claim "
            + ("reproduces" if higher else "does not reproduce")
            + "."
        )
    return Result(TITLE, {"agreement": table.drop(columns="pair")}, fig, findings)

"""True vs false statements: the share of pairs where the true text has the lower loss, and the loss
margin on the tokens where the two differ, over training in every model (methods.md §1.4)."""

from __future__ import annotations

import numpy as np

from tokendyn.analysis.sequences import pair_margin, pair_preference
from tokendyn.errors import TokendynError
from tokendyn.studies.sequence_perplexity import values_at
from tokendyn.studies.study import Result, Skip, Source, default_of, main_set_path, models_by_size, open_source, require
from tokendyn.studies.style import (
    ZOOM_FINDING,
    envelope_findings,
    model_colors,
    model_legend,
    new_figure,
    on_envelope,
    perplexity_axis,
    zoom_perplexity,
)

TITLE = "Preference for the true statement of true/false pairs"
Z = 3.0  # binomial standard errors from 50% before a preference counts as above chance
LINESTYLES = ("-", "--", ":", "-.")


def run(source: Source, reduce: str = default_of(pair_preference, "reduce")) -> Result:
    """Pair preference (see `tokendyn.analysis.sequences.pair_preference` for reduce) and margin of every
    pairs set of the store, per model and checkpoint, against validation perplexity."""
    ds = open_source(source)
    require(ds, "loss", "step", "val_ppl")
    main_set_path(ds, "pairs sets")  # Skip unless the main set of a store on disk
    try:
        preference = pair_preference(ds, reduce=reduce)
    except TokendynError as err:
        raise Skip(str(err)) from err
    margin = pair_margin(ds)
    models = models_by_size(ds)
    colors = model_colors(ds)
    sets = [str(s) for s in preference["set"].values]
    frame = preference.to_dataset().assign(pair_margin=margin).to_dataframe().reset_index()
    columns = ["set", "n_pairs", "model", "ckpt", "step", "val_ppl", "pair_preference", "pair_margin"]
    table = frame[[c for c in columns if c in frame.columns]].dropna(subset=["pair_preference"])

    fig, (left, right) = new_figure(2, ncols=2)
    drawn = {left: [], right: []}
    for s, name in enumerate(sets):
        for model in models:
            rows = on_envelope(table[(table.set == name) & (table.model == model)])  # no zig-zag
            style = dict(ls=LINESTYLES[s % len(LINESTYLES)], marker="o", ms=3, color=colors[model])
            left.plot(rows["val_ppl"], 100 * rows["pair_preference"], **style)
            right.plot(rows["val_ppl"], rows["pair_margin"], **style)
            drawn[left].append((rows["val_ppl"].to_numpy(), 100 * rows["pair_preference"].to_numpy()))
            drawn[right].append((rows["val_ppl"].to_numpy(), rows["pair_margin"].to_numpy()))
    left.axhline(50, color="black", lw=0.8, ls=":")
    right.axhline(0, color="black", lw=0.8, ls=":")
    zoomed = False
    for ax in (left, right):
        perplexity_axis(ax)
        zoomed |= zoom_perplexity(ax, drawn[ax])
        ax.grid(alpha=0.3)
    left.set_ylabel("true text wins (% of pairs)")
    left.set_title(
        f"preference ({'total' if reduce == 'sum' else 'mean per-token'} loss; chance 50%)", fontsize="medium"
    )
    right.set_ylabel("margin (nats)")
    right.set_title("loss(false) - loss(true) where they differ", fontsize="medium")
    model_legend(fig, colors)
    styles = "; ".join(f"{LINESTYLES[s % len(LINESTYLES)]} {name}" for s, name in enumerate(sets))
    fig.suptitle(f"{TITLE}\n" + (f"line style: {styles}" if len(sets) > 1 else f"set {sets[0]}"), fontsize="medium")

    findings = []
    for name in sets:
        n = int(preference["n_pairs"].sel(set=name))
        final = values_at(preference.sel(set=name), models)
        first = values_at(preference.sel(set=name), models, at=0)
        above = [m for m, v in zip(models, final) if v - 0.5 > Z * np.sqrt(0.25 / n)]
        findings.append(
            f"Set {name} ({n} pairs): the true text wins in "
            + ", ".join(f"{m} {100 * v:.0f}%" for m, v in zip(models, final))
            + " of the pairs at the last checkpoint (first checkpoint: "
            + ", ".join(f"{100 * v:.0f}%" for v in first)
            + "); "
            + (
                f"above chance by more than {Z:g} standard errors in {', '.join(above)}."
                if above
                else f"no model is above chance by {Z:g} standard errors."
            )
        )
        margins = values_at(margin.sel(set=name), models)
        findings.append(
            f"Set {name}: final margin " + ", ".join(f"{m} {v:+.3f}" for m, v in zip(models, margins)) + " nats."
        )
    findings += envelope_findings(ds) + ([ZOOM_FINDING] if zoomed else [])
    return Result(TITLE, {"pair_preference": table}, fig, findings)

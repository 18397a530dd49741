"""Shares of stagnated, upward and downward tokens against the start fraction of the trend window,
per model, next to the paper's OPT numbers (Xia et al. 2023, Fig. 2; methods.md §1.2); every token's
category per model and start fraction as per-token labels (`trends`).


Testability: a trend window needs >= 3 checkpoints (`tokendyn.analysis.trends`); the trend of a share
with the start fraction needs categories in >= 2 different windows of that model (start fractions
that select the same checkpoints count once), and the trend with model size needs >= 2 models of
different sizes (parameter counts) with categories at that start fraction. Cases short of that are
"not testable here", never "does not reproduce"."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from tokendyn.analysis.labels import flag_names, label_share
from tokendyn.analysis.shared import computed
from tokendyn.analysis.trends import START, TrendWarning, trend_categories
from tokendyn.studies.findings import SAME_SIZE, counted, direction, size_pairs, size_trend, verdict
from tokendyn.studies.study import Result, Source, default_of, model_sizes, models_by_size, open_source, require
from tokendyn.studies.style import model_colors, model_legend, new_figure

TITLE = "Token trend categories against the start of the trend window"
SHOWN = ("stagnated", "upward", "downward", "uncategorised")
MIN_WINDOW = 3  # checkpoints a trend window needs (tokendyn.analysis.trends)

PAPER_SOURCE = (
    "Xia et al. 2023 (arXiv 2212.09803), Fig. 2: OPT on PG-19 validation, read off the figure "
    "(about ±1 point), as tabulated in methods.md §1.2"
)
PAPER_MODELS = ("OPT-125M", "OPT-1.3B", "OPT-6.7B", "OPT-13B", "OPT-30B", "OPT-175B")
PAPER_SHARES = {  # (category, start fraction): % of tokens for each of PAPER_MODELS
    ("stagnated", 0.1): (5.2, 7.3, 8.6, 9.6, 11.3, 7.4),
    ("stagnated", 0.4): (7.4, 10.5, 13.4, 17.9, 21.2, 17.0),
    ("stagnated", 0.7): (11.5, 15.9, 20.0, 24.3, 26.6, 29.6),
    ("upward", 0.1): (12.5, 9.5, 9.6, 8.3, 7.8, 11.1),
    ("upward", 0.4): (9.8, 7.5, 7.3, 5.5, 5.2, 9.3),
    ("upward", 0.7): (4.6, 3.4, 3.6, 3.0, 3.9, 6.3),
    ("downward", 0.1): (38.3, 36.7, 38.5, 36.6, 32.6, 50.6),
    ("downward", 0.4): (23.7, 23.8, 24.1, 14.7, 10.6, 28.5),
    ("downward", 0.7): (8.9, 6.3, 8.0, 4.7, 4.2, 11.2),
}


def paper_reference() -> pd.DataFrame:
    """The paper's shares as a tidy table: model, start, category, percent, source."""
    rows = [
        {"model": model, "start": start, "category": category, "percent": percent, "source": PAPER_SOURCE}
        for (category, start), values in PAPER_SHARES.items()
        for model, percent in zip(PAPER_MODELS, values)
    ]
    for start in sorted({start for _, start in PAPER_SHARES}):  # the rest of the tokens, as the paper leaves it
        rest = 100 - sum(np.array(PAPER_SHARES[(c, start)]) for c in ("stagnated", "upward", "downward"))
        rows += [
            {
                "model": model,
                "start": start,
                "category": "uncategorised",
                "percent": round(float(p), 1),
                "source": PAPER_SOURCE + "; uncategorised = 100 - the other three",
            }
            for model, p in zip(PAPER_MODELS, rest)
        ]
    return pd.DataFrame(rows)


def _claims(shares: pd.DataFrame, windows: pd.DataFrame, models: list[str], sizes: Sequence[float]) -> list[str]:
    """Check the paper's shape (methods.md §1.2) on the store's shares, models in size order with
    their sizes (parameter counts); untestable cases say so. windows: the first step of each model's
    window per start fraction; start fractions that select a window already seen count once."""
    labelled = shares.dropna(subset=["percent"])

    def series(category: str, model: str) -> np.ndarray:
        rows = labelled[(labelled.category == category) & (labelled.model == model)].sort_values("start")
        rows = rows[~windows.loc[model, rows["start"]].duplicated().to_numpy()]
        return rows["percent"].to_numpy()

    lines = []
    need_starts = f">= {MIN_WINDOW} checkpoints in >= 2 different trend windows of a model"
    for category, sign, word in (("stagnated", 1, "grows"), ("upward", -1, "shrinks"), ("downward", -1, "shrinks")):
        holds = [direction(series(category, m)) == sign if len(series(category, m)) >= 2 else None for m in models]
        lines.append(
            f"Paper: the {category} share {word} with the start fraction; this "
            f"{verdict(holds, need_starts)} ({counted(holds)} models)."
        )
    if len(models) >= 2 and not size_pairs(sizes):
        lines.append(f"Paper: the stagnated share grows with model size; this is not testable here ({SAME_SIZE}).")
    elif len(models) >= 2:
        holds = []
        for start in sorted(shares["start"].unique()):
            at = labelled[(labelled.category == "stagnated") & (labelled.start == start)].set_index("model")["percent"]
            trend = size_trend([at.get(m, np.nan) for m in models], sizes)
            holds.append(None if trend is None else trend == 1)
        need = f">= 2 models of different sizes with >= {MIN_WINDOW} checkpoints in the trend window"
        lines.append(
            f"Paper: the stagnated share grows with model size; this {verdict(holds, need)} "
            f"({counted(holds)} start fractions)."
        )
    return lines


def run(
    source: Source,
    start: Sequence[float] = default_of(trend_categories, "start"),
    x: str = default_of(trend_categories, "x"),
    alpha: float = default_of(trend_categories, "alpha"),
    band: float = default_of(trend_categories, "band"),
) -> Result:
    """Trend-category shares per model and start fraction (see `tokendyn.analysis.trends.trend_categories`
    for start, x, alpha and band) with the paper's OPT shares alongside."""
    ds = open_source(source)
    require(ds, "loss", "step")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrendWarning)  # the findings name the starts without categories
        # computed once (int8 per token) for the shares and the labels: lazy, each would read the store
        cats = computed(trend_categories, ds, along="start", start=start, x=x, alpha=alpha, band=band)
    shares = label_share(cats).rename("percent").reset_coords(drop=True).to_dataframe().reset_index()
    shares["model"] = shares["model"].astype(str)
    models = models_by_size(ds)
    colors = model_colors(ds)
    reference = paper_reference()

    fig, panels = new_figure(2 * len(SHOWN), ncols=len(SHOWN), sharey="col")  # uncategorised too: shares add to 100
    grey = np.linspace(0.75, 0.1, len(PAPER_MODELS))
    for col, category in enumerate(SHOWN):
        top, bottom = panels[col], panels[len(SHOWN) + col]
        for model in models:
            rows = shares[(shares.category == category) & (shares.model == model)].dropna(subset=["percent"])
            top.plot(100 * rows["start"], rows["percent"], "o-", color=colors[model], label=model)
        for model, level in zip(PAPER_MODELS, grey):
            rows = reference[(reference.category == category) & (reference.model == model)]
            bottom.plot(100 * rows["start"], rows["percent"], "s--", color=str(level), label=model)
        top.set_title(f"{category}: this store")
        bottom.set_title(f"{category}: paper (OPT, PG-19)")
        for ax in (top, bottom):
            ax.set_xlabel("window start (% of the final step)")
            ax.set_ylabel("% of tokens")
            ax.grid(alpha=0.3)
            ax.set_ylim(bottom=0)
            ax.set_xlim(5, 75)
    model_legend(fig, colors)
    panels[len(SHOWN)].legend(title="paper", fontsize="x-small")
    fig.suptitle(TITLE)

    p = min(shares["start"].unique(), key=lambda s: abs(s - START))
    at_p = shares[shares.start == p].set_index(["model", "category"])["percent"]
    # models without categories at p are named by the not-testable lines below, not listed as nan
    categorised = [m for m in models if np.isfinite([at_p.get((m, c), np.nan) for c in flag_names(cats)]).any()]
    findings = []
    if categorised:
        findings.append(
            f"At start {p:.0%}, % stagnated / upward / downward / uncategorised: "
            + "; ".join(
                f"{m} " + " / ".join(f"{at_p.get((m, c), np.nan):.1f}" for c in flag_names(cats)) for m in categorised
            )
            + "."
        )
    missing = shares[(shares.category == SHOWN[0]) & shares["percent"].isna()]
    for value, rows in missing.groupby("start"):
        findings.append(
            f"No categories at start {value:.0%} in {', '.join(rows['model'])}: fewer than {MIN_WINDOW} "
            "checkpoints in the window (not testable there)."
        )
    windows = cats["window_step"].to_pandas()
    windows.index = windows.index.astype(str)
    findings += _claims(shares, windows, models, model_sizes(ds, models))
    return Result(
        TITLE,
        {"trend_shares": shares, "paper_reference": reference},
        fig,
        findings,
        labels={"trends": cats.rename("trend")},
    )

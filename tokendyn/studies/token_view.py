"""The evaluation text with every token shaded by its loss change or its trend category: a report
section (safe HTML), per model, for the first documents of the main set.

For each model (smallest first) and each of the first documents, the text is drawn token by token.
By loss change (the default view), a token's background is blue where its loss fell between the two
compared steps and red where it rose, stronger for a larger change (full strength at the 95th
percentile of |change| over the shown tokens of all models). By trend category (the other view, a
switch above the text), it has the colour of its category at the trend window's start fraction
(`tokendyn.analysis.trends`). Hovering a token shows its text, its loss at both steps and its
category. The text keeps its spaces and line breaks (a newline also shows as ⏎); every token string
is HTML-escaped.

The study's table (`token_view`: one row per shown token and model) is what `tokendyn analyze`
writes; the HTML is drawn from that table, so the report shows the same numbers.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import xarray as xr
from markupsafe import Markup, escape
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LinearSegmentedColormap, Normalize

from tokendyn.analysis.tokens import show_whitespace, steps_between
from tokendyn.analysis.trajectories import load_small, model_index
from tokendyn.analysis.trends import CATEGORIES, TrendWarning, trend_categories
from tokendyn.data.corpus import PAD
from tokendyn.studies import subset_curves
from tokendyn.studies.study import Result, Skip, Source, default_of, models_by_size, open_source, require, step_text
from tokendyn.studies.style import model_colors, new_figure

TITLE = "The text, token by token: loss change and trend category"
FELL, ROSE = "40,90,220", "220,50,40"  # RGB of a falling and a rising token
MAX_ALPHA = 0.75  # background opacity of the largest change
# Background of each trend category in the category view; names are tokendyn's own (CATEGORIES), never store text.
CATEGORY_RGBA = {
    "stagnated": "150,150,150,0.55",
    "upward": "230,120,20,0.6",
    "downward": "30,150,80,0.5",
    "uncategorised": "255,255,255,0",
}
NO_CATEGORY = "none"  # a token whose model has too few checkpoints in the trend window
STYLE = (
    "<style>.token-view{font-family:ui-monospace,monospace;font-size:0.85em;white-space:pre-wrap;"
    "line-height:1.6;border:1px solid #ccc;padding:0.5em;margin:0.3em 0 1em}"
    ".token-view span{border-radius:2px;background:var(--c);unicode-bidi:isolate}"
    ".tv-legend-category{display:none}"
    "#tv-category:checked~.tv-legend-category{display:block}#tv-category:checked~.tv-legend-change{display:none}"
    + "".join(
        f"#tv-category:checked~div .token-view span.tv-{name}{{background:rgba({rgba})}}"
        for name, rgba in {**CATEGORY_RGBA, NO_CATEGORY: "255,255,255,0"}.items()
    )
    + "</style>"
)


def _document_tokens(ds: xr.Dataset, n_docs: int, max_tokens: int) -> list[np.ndarray]:
    """Flat token indices of the first `n_docs` documents (at most `max_tokens` each), in text order.

    The token ids and documents are read a stored chunk at a time: no per-token array is held.
    """
    ids, doc = ds["token_id"], ds["doc"] if "doc" in ds.variables else None
    step = max(ids.chunks[0]) if ids.chunks else ids.size
    firsts: list[int] = []  # documents in order of their first real token
    found: dict[int, list[np.ndarray]] = {}
    for begin in range(0, ids.size, step):
        part = slice(begin, begin + step)
        real = np.asarray(ids[part].values) != PAD
        docs = np.asarray(doc[part].values) if doc is not None else np.zeros(real.shape, np.int64)
        values, first = np.unique(docs[real], return_index=True)
        for d in values[np.argsort(first, kind="stable")].tolist():
            if d >= 0 and d not in found and len(firsts) < n_docs:
                firsts.append(d)
                found[d] = []
        for d in firsts:
            have = sum(len(i) for i in found[d])
            if have < max_tokens:
                found[d].append(begin + np.flatnonzero(real & (docs == d))[: max_tokens - have])
    return [np.concatenate(found[d]) if found[d] else np.zeros(0, np.int64) for d in firsts]


def _categories(ds: xr.Dataset, shown: np.ndarray, start: float, x: str) -> np.ndarray:
    """Trend category names (model, shown token) at start fraction `start`, fitted on the shown tokens
    only (the fit is per token); NO_CATEGORY where a model's window has too few checkpoints."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrendWarning)  # a finding names the models without categories
        codes = trend_categories(ds.isel(token=shown), start, x=x).isel(start=0).values
    names = np.array([*CATEGORIES, NO_CATEGORY], dtype=object)
    return names[np.where(codes >= 0, codes, len(CATEGORIES))]


def token_table(
    source: Source,
    between: tuple[float, float] | None = None,
    n_docs: int = 3,
    max_tokens: int = 150,
    models: list[str] | None = None,
    start: float = default_of(subset_curves.run, "start"),
    x: str = default_of(trend_categories, "x"),
) -> pd.DataFrame:
    """One row per model and shown token of the first `n_docs` documents (at most `max_tokens` each):
    model, doc (its number among the shown documents), token_index (along the store's token dim),
    token (its text as in the running text, not escaped), step_a and step_b (the compared steps:
    `between`, default each model's first trained checkpoint and its last, step 0 and the last with
    one trained checkpoint; see `tokendyn.analysis.tokens.steps_between`), loss_a, loss_b, change
    (nats) and category (trend category at start fraction `start` with x axis `x`;
    `tokendyn.analysis.trends.trend_categories`)."""
    ds = load_small(open_source(source))
    docs = _document_tokens(ds, n_docs, max_tokens)
    shown = np.concatenate(docs) if docs else np.zeros(0, np.int64)
    if not shown.size:
        raise Skip("the main set has no scored tokens to show")
    vocab = ds["vocab_text"].values if "vocab_text" in ds.variables else None
    ids = np.asarray(ds["token_id"].isel(token=shown).values)
    texts = [str(vocab[i]) if vocab is not None and 0 <= i < len(vocab) else f"#{i} " for i in ids]
    categories = _categories(ds, shown, start, x)
    frames = []
    for name in models or models_by_size(ds):
        m = model_index(ds, name)
        a, b = steps_between(ds, m, between)
        loss = ds["loss"].isel(model=m, token=shown)
        first, last = (np.asarray(loss.isel(ckpt=c).values, dtype=float) for c in (a, b))
        frames.append(
            pd.DataFrame(
                {
                    "model": str(name),
                    "doc": np.repeat(np.arange(len(docs)), [len(d) for d in docs]),
                    "token_index": shown,
                    "token": texts,
                    "step_a": ds["step"].values[m, a],
                    "step_b": ds["step"].values[m, b],
                    "loss_a": first,
                    "loss_b": last,
                    "change": last - first,
                    "category": categories[m],
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def colour_scale(table: pd.DataFrame) -> float:
    """|change| at full colour: the 95th percentile over the table's tokens (0 without any)."""
    change = np.abs(table["change"].to_numpy(dtype=float))
    change = change[np.isfinite(change)]
    return float(np.percentile(change, 95)) if change.size else 0.0


def _span(row, scale: float) -> str:
    colour = "255,255,255,0"
    if np.isfinite(row.change) and scale > 0:
        colour = f"{FELL if row.change < 0 else ROSE},{min(1.0, abs(row.change) / scale) * MAX_ALPHA:.2f}"
    losses = (
        f"step {step_text(row.step_a)}: {row.loss_a:.2f} nats → step {step_text(row.step_b)}: {row.loss_b:.2f} "
        f"nats ({row.change:+.2f})"
        if np.isfinite(row.change)
        else "not scored (no left context)"
    )
    title = f"{show_whitespace(row.token)} · {losses} · {row.category}"
    shown = row.token.replace("\n", "⏎\n").replace("\t", "→\t")
    return (
        f'<span class="tv-{escape(row.category)}" style="--c:rgba({colour})" title="{escape(title)}">'
        f"{escape(shown)}</span>"
    )


def shading_html(table: pd.DataFrame) -> Markup:
    """The HTML (markupsafe.Markup) of a `token_table`: a switch between the loss-change and the
    trend-category view (plain CSS, no script), their legends, then per model its documents, one
    span per token with a tooltip. Every token string and name is escaped."""
    scale = colour_scale(table)
    swatch = '<span style="background:rgba({})">{}</span>'
    parts = [
        STYLE,
        '<div class="token-views">',
        '<input type="radio" name="tv-mode" id="tv-change" checked><label for="tv-change">loss change</label> '
        '<input type="radio" name="tv-mode" id="tv-category"><label for="tv-category">trend category</label>',
        '<p class="tv-legend-change">Each token shaded by its loss change between the two steps: '
        f"{swatch.format(FELL + ',0.6', 'fell')} / {swatch.format(ROSE + ',0.6', 'rose')}, full colour at "
        f"{scale:.2f} nats (the 95th percentile of |change| over the shown tokens); hover for the losses. "
        "⏎ marks a line break.</p>",
        '<p class="tv-legend-category">Each token coloured by its trend category: '
        + " / ".join(swatch.format(CATEGORY_RGBA[c], c) for c in CATEGORIES)
        + f" ({NO_CATEGORY}: too few checkpoints in the trend window); hover for the losses.</p>",
    ]
    for name, rows in table.groupby("model", sort=False):
        first = rows.iloc[0]
        parts.append(f"<div><h4>{escape(name)}: step {step_text(first.step_a)} → {step_text(first.step_b)}</h4>")
        for number, doc in rows.groupby("doc", sort=True):
            spans = "".join(_span(row, scale) for row in doc.itertuples())
            parts.append(f'<div class="token-view" data-doc="{int(number)}">{spans}</div>')
        parts.append("</div>")
    parts.append("</div>")
    return Markup("\n".join(parts))


def token_shading(
    source: Source,
    between: tuple[float, float] | None = None,
    n_docs: int = default_of(token_table, "n_docs"),
    max_tokens: int = default_of(token_table, "max_tokens"),
    models: list[str] | None = None,
) -> Markup:
    """HTML (markupsafe.Markup) of the first `n_docs` documents per model, each token shaded by its loss
    change between two training steps (`between`, default each model's first trained checkpoint and
    its last; see `token_table`), with the trend-category view one click away; at most `max_tokens` tokens per document.
    models: which models, default all (smallest first). The token texts come from the store's
    vocabulary (`#<id>` without one) and are escaped."""
    return shading_html(token_table(source, between, n_docs, max_tokens, models))


def _figure(table: pd.DataFrame, models: list[str], colors: dict, scale: float):
    """Left: the distribution of the shown tokens' loss change per model over the colour scale of the
    view; right: the share of each trend category among them."""
    fig, (hist, bars) = new_figure(2, ncols=2)
    change = table["change"].to_numpy(dtype=float)
    finite = change[np.isfinite(change)]
    limit = max(scale, float(np.abs(finite).max()) if finite.size else 1.0, 1e-6)
    bins = np.linspace(-limit, limit, 41)
    for model in models:
        values = table.loc[table.model == model, "change"].dropna()
        hist.hist(values, bins=bins, histtype="step", lw=1.5, color=colors[model], label=model)
    cmap = LinearSegmentedColormap.from_list(
        "token_view",
        [tuple(int(v) / 255 for v in FELL.split(",")), (1, 1, 1), tuple(int(v) / 255 for v in ROSE.split(","))],
    )
    fig.colorbar(
        ScalarMappable(Normalize(-max(scale, 1e-6), max(scale, 1e-6)), cmap),
        ax=hist,
        orientation="horizontal",
        label="shade in the text view (nats)",
    )
    hist.set_xlabel("loss change (nats)")
    hist.set_ylabel("tokens")
    hist.set_title("loss change of the shown tokens", fontsize="medium")
    hist.legend(title="model", fontsize="small")
    hist.grid(alpha=0.3)
    shares = (
        table.groupby("model")["category"]
        .value_counts(normalize=True)
        .mul(100)
        .unstack(fill_value=0.0)
        .reindex(index=models, columns=[*CATEGORIES, NO_CATEGORY], fill_value=0.0)
    )
    left = np.zeros(len(models))
    for category in shares.columns:
        rgba = [float(v) for v in {**CATEGORY_RGBA, NO_CATEGORY: "255,255,255,0"}[category].split(",")]
        colour = (*[v / 255 for v in rgba[:3]], max(rgba[3], 0.15))
        bars.barh(models, shares[category], left=left, color=colour, edgecolor="grey", lw=0.5, label=category)
        left += shares[category].to_numpy()
    bars.invert_yaxis()
    bars.set_xlabel("% of the shown tokens")
    bars.set_title("trend category of the shown tokens", fontsize="medium")
    bars.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.0, 1.0), title="category")
    fig.suptitle(TITLE)
    return fig


def run(
    source: Source,
    between: tuple[float, float] | None = None,
    n_docs: int = default_of(token_table, "n_docs"),
    max_tokens: int = default_of(token_table, "max_tokens"),
    start: float = default_of(subset_curves.run, "start"),
    x: str = default_of(trend_categories, "x"),
) -> Result:
    """The first `n_docs` documents of the main set (at most `max_tokens` tokens each) with every token
    shaded per model by its loss change between two steps (`between`, default the first trained
    checkpoint and the last) or by its trend category at start fraction `start` (see `token_table`)."""
    ds = open_source(source)
    require(ds, "loss", "step", "token_id")
    models = models_by_size(ds)
    table = token_table(ds, between, n_docs, max_tokens, models, start, x)
    scale = colour_scale(table)
    fig = _figure(table, models, model_colors(ds), scale)
    n_docs_shown = table["doc"].nunique()
    per_model = table.groupby("model", sort=False)
    findings = [
        f"The first {n_docs_shown} documents of the main set ({per_model.size().iloc[0]} tokens, at most "
        f"{max_tokens} per document), shaded per model by the loss change from "
        + ", ".join(f"{m} step {step_text(r.step_a.iloc[0])} to {step_text(r.step_b.iloc[0])}" for m, r in per_model)
        + f" (full colour at {scale:.2f} nats), or by trend category at start {start:.0%}."
    ]
    for model, rows in per_model:
        change = rows["change"].dropna()
        if rows["step_a"].iloc[0] == rows["step_b"].iloc[0]:
            findings.append(f"{model}: one checkpoint only, so no change to show.")
            continue
        if between is None and rows["step_a"].iloc[0] == 0:
            findings.append(
                f"{model}: one trained checkpoint only, so its change is from step 0, the untrained model "
                "(the change training made, not a change during training)."
            )
        if change.empty:
            continue
        low, high = rows.loc[change.idxmin()], rows.loc[change.idxmax()]
        findings.append(
            f"{model}: {int((change < 0).sum())} of the {len(change)} shown tokens fell; the largest fall "
            f"{show_whitespace(low.token)!r} ({low.change:+.2f} nats), "
            + ("the largest rise" if high.change > 0 else "the smallest fall (none rose)")
            + f" {show_whitespace(high.token)!r} ({high.change:+.2f} nats)."
        )
    without = [m for m, rows in per_model if (rows["category"] == NO_CATEGORY).all()]
    if without:
        findings.append(
            f"No trend categories in {', '.join(without)}: fewer than 3 checkpoints from {start:.0%} of the final "
            "step (not testable there)."
        )
    return Result(TITLE, {"token_view": table}, fig, findings, html=shading_html(table))

"""Per-token double descent: how many tokens fall, rise and fall again in each model, and examples
with their decoded context (methods.md §1.3); every token's flag as per-token labels (`double_descent`).

Testability: a fall, a rise and a fall again need >= MIN_CHECKPOINTS done checkpoints in a model;
models with fewer are "not testable here", and the trend with size uses the testable models only.
The examples are drawn against validation perplexity on each model's running-minimum envelope
(the checkpoints that set a new lowest perplexity), so a loss spike does not fold a curve back."""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

from tokendyn.analysis.shared import computed
from tokendyn.analysis.tokens import show_whitespace
from tokendyn.analysis.trajectories import (
    done_checkpoints,
    double_descent,
    envelope,
    load_small,
    model_index,
    token_loss,
    token_share,
)
from tokendyn.store import TOKEN_DIMS
from tokendyn.studies.findings import listing, size_trend, verdict
from tokendyn.studies.study import (
    Result,
    Skip,
    Source,
    context,
    default_of,
    model_sizes,
    models_by_size,
    open_source,
    require,
    token_texts,
)
from tokendyn.studies.style import (
    ZOOM_FINDING,
    envelope_findings,
    model_colors,
    model_legend,
    new_figure,
    perplexity_axis,
    plain,
    zoom_perplexity,
)

TITLE = "Per-token double descent"
CANDIDATES = 256  # flagged tokens whose trajectories are read to pick the clearest examples
MIN_CHECKPOINTS = 4  # a fall, a rise and a fall again need four points


def rise(curves: np.ndarray) -> np.ndarray:
    """Largest rise of each curve (ckpt, token) above its earlier running minimum, ignoring NaN."""
    running_min = np.fmin.accumulate(np.where(np.isnan(curves), np.inf, curves), axis=0)
    return np.nanmax(curves - running_min, axis=0)


def examples(ds: xr.Dataset, flags: xr.DataArray, model: str, n: int, width: int, seed: int) -> pd.DataFrame:
    """Up to n flagged tokens of `model` with the largest rise, one per token id where possible."""
    m = model_index(ds, model)
    token = np.flatnonzero(flags.isel(model=m).values)
    token = token[np.random.default_rng(seed).permutation(len(token))[:CANDIDATES]]
    idx = done_checkpoints(ds, m)
    loss = token_loss(ds).isel(model=m, ckpt=idx)
    curves = loss.isel(token=token).transpose("ckpt", "token").values
    ids = ds["token_id"].values[token]
    score = rise(curves)
    order = np.argsort(-score, kind="stable")
    best_of_each_id = order[np.sort(np.unique(ids[order], return_index=True)[1])]
    chosen = np.concatenate([best_of_each_id, order[~np.isin(order, best_of_each_id)]])[:n]
    return pd.DataFrame(
        {
            "model": model,
            "token_index": token[chosen],
            "doc": ds["doc"].values[token[chosen]],
            "offset": ds["offset"].values[token[chosen]],
            "token_id": ids[chosen],
            "token": [show_whitespace(t) for t in token_texts(ds, ids[chosen])],
            "rise_nats": score[chosen],
            "context": [context(ds, int(t), width) for t in token[chosen]],
        }
    )


def run(
    source: Source,
    tol: float = default_of(double_descent, "tol"),
    window: int = default_of(double_descent, "window"),
    min_fall: float | None = default_of(double_descent, "min_fall"),
    n_examples: int = 6,
    width: int = 12,
    seed: int = 0,
) -> Result:
    """Share of tokens with double descent per model (see `tokendyn.analysis.trajectories.double_descent` for
    tol and min_fall, in nats, and window, in checkpoints) and n_examples tokens of the largest model that has
    any, drawn against validation perplexity in every model, with `width` tokens of left context."""
    ds = load_small(open_source(source))
    require(ds, "loss", "step", "val_ppl")
    flags = computed(double_descent, ds, tol=tol, window=window, min_fall=min_fall).rename("double_descent")
    percent = token_share(ds, flags)
    models = models_by_size(ds)
    colors = model_colors(ds)
    shares = pd.DataFrame(
        {
            "model": [str(m) for m in percent["model"].values],
            "percent": percent.values,
            "n_tokens": flags.sum(list(TOKEN_DIMS)).values,
        }
    )
    shares = shares.set_index("model").loc[models].reset_index()
    n_done = {m: len(done_checkpoints(ds, m)) for m in models}
    testable = [m for m in models if n_done[m] >= MIN_CHECKPOINTS]
    if not testable:
        raise Skip(
            f"not testable here (needs >= {MIN_CHECKPOINTS} done checkpoints in a model; the models have "
            f"{', '.join(str(n) for n in n_done.values())})"
        )
    with_any = [m for m in testable if shares.set_index("model").loc[m, "n_tokens"] > 0]
    testable_shares = shares.set_index("model").loc[testable, "percent"]
    first = "fall" if min_fall is None or min_fall == tol else f"fall (by at least {min_fall} nats)"
    findings = [
        f"Tokens that {first}, rise and fall again by at least {tol} nats ({window}-checkpoint moving average): "
        f"{listing(zip(testable_shares.index, testable_shares.to_numpy()), '{:.2f}%')}."
    ]
    untestable = [m for m in models if m not in testable]
    if untestable:  # a curve of fewer checkpoints cannot fall, rise and fall: its 0% says nothing
        findings.append(f"Not testable in {', '.join(untestable)} (fewer than {MIN_CHECKPOINTS} done checkpoints).")
    tables = {"double_descent_share": shares}
    if not with_any:
        fig, (ax,) = new_figure(1)
        ax.bar(shares["model"], shares["percent"], color=[colors[m] for m in shares["model"]])
        ax.set_ylabel("% of tokens")
        fig.suptitle(f"{TITLE}: no token double-descends")
        return Result(TITLE, tables, fig, findings, labels={"double_descent": flags})
    chosen = with_any[-1]
    table = tables["double_descent_examples"] = examples(ds, flags, chosen, n_examples, width, seed)

    fig, panels = new_figure(len(table), ncols=min(3, len(table)))
    # every example's trajectory in every model in one read (a token at a time would read each chunk again)
    loss = token_loss(ds).isel(token=table["token_index"].to_numpy()).values  # (model, ckpt, example)
    zoomed = False
    for ax, (i, row) in zip(panels, enumerate(table.itertuples())):
        drawn = []
        for model in models:
            m = model_index(ds, model)
            idx = done_checkpoints(ds, m)
            idx = idx[envelope(ds["val_ppl"].values[m, idx])]
            drawn.append((ds["val_ppl"].values[m, idx], loss[m, idx, i]))
            ax.plot(*drawn[-1], "o-", ms=3, lw=2.2 if model == chosen else 1, color=colors[model])
        perplexity_axis(ax)
        zoomed |= zoom_perplexity(ax, drawn)
        ax.set_ylabel("token loss (nats)")
        ax.set_title(plain(row.context, 34), fontsize="small")
        ax.grid(alpha=0.3)
    model_legend(fig, colors)
    fig.suptitle(f"{TITLE}: examples from {chosen} (bold), the token in [[ ]]")

    if len(models) > 1:
        values = shares.set_index("model").loc[testable, "percent"].to_numpy()
        trend = size_trend(values, model_sizes(ds, testable)) if len(testable) >= 2 else None
        holds = [None if trend is None else trend == 1]
        need = f">= 2 models of different sizes with >= {MIN_CHECKPOINTS} checkpoints"
        findings.append(
            "Paper: double descent is a larger-model phenomenon, so the share grows with model size; "
            f"here this {verdict(holds, need)} "
            f"({listing(zip(testable, values), '{:.2f}%')})."
        )
    findings.append(
        f"Examples: the {len(table)} flagged tokens of {chosen} with the largest rise (one per token "
        f"where possible), up to {table['rise_nats'].max():.2f} nats."
    )
    findings += envelope_findings(ds) + ([ZOOM_FINDING] if zoomed else [])
    return Result(TITLE, tables, fig, findings, shown=["double_descent_examples"], labels={"double_descent": flags})

"""What the built-in suite is designed to show, measured on an extracted store of it.

Three findings (issue 3), each a tidy table per model (models in the suite's order, smallest first):

- `pair_preference_table`: the share of true/false pairs where the true statement has the lower
  total loss, at the first, best and last checkpoint.
- `false_statement_table`: the loss per token of the false statements over training (nats): where
  it starts, its minimum, where it ends; `fall` = start - minimum, `rise` = end - minimum.
- `double_descent_table`: the share of attribute-value tokens whose loss falls, rises and falls
  again (`trajectories.double_descent`), for rare values (frequency rank above `rare_rank`) and
  frequent ones; and `completed`: of the value tokens whose loss fell then rose, the share that
  falls again by the last checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from tokendyn.analysis import sequences, trajectories
from tokendyn.store import open_store

PAIRS_SET = "facts"


def pair_preference_table(store: str | Path) -> pd.DataFrame:
    preference = sequences.pair_preference(store, sets=[PAIRS_SET]).squeeze(drop=True)
    rows = []
    for model in preference["model"].values:
        curve = _done(preference.sel(model=model))
        rows.append(
            {"model": str(model), "first": float(curve[0]), "best": float(np.max(curve)), "last": float(curve[-1])}
        )
    return pd.DataFrame(rows)


def false_statement_table(store: str | Path) -> pd.DataFrame:
    scores = sequences.pair_scores(open_store(store, set=PAIRS_SET)).sel(side="false")
    # min_count: a checkpoint at which the set was not scored stays NaN (a plain sum would make it 0 nats)
    false_loss = (scores["total"].sum("pair", min_count=1) / scores["n_tokens"].sum("pair")).compute()
    rows = []
    for model in false_loss["model"].values:
        curve = _done(false_loss.sel(model=model))
        low = float(np.min(curve))
        rows.append(
            {
                "model": str(model),
                "start": float(curve[0]),
                "minimum": low,
                "end": float(curve[-1]),
                "fall": float(curve[0]) - low,
                "rise": float(curve[-1]) - low,
            }
        )
    return pd.DataFrame(rows)


def double_descent_table(
    store: str | Path,
    rare_rank: int = 10,
    tol: float = trajectories.DESCENT_TOL,
    window: int = trajectories.DESCENT_WINDOW,
) -> pd.DataFrame:
    """Double descent of the attribute-value tokens (role "value") per model, rare and frequent values apart.

    rare_rank: a value is rare when its frequency rank within its attribute (`value_rank`, 1 = the
    most frequent) is above rare_rank, else frequent. tol, window: the detector's
    (`trajectories.double_descent`). Columns: model; rare_values and frequent_values (how many value
    tokens); rare_dd_share and frequent_dd_share (the share flagged, NaN for no tokens); completed (of
    the value tokens whose loss fell then rose, the share that also falls again).
    """
    ds = open_store(store)
    flagged = trajectories.double_descent(ds, tol=tol, window=window).compute()
    begun = trajectories.double_descent(ds, tol=tol, window=window, complete=False).compute()
    is_value = (ds["role"] == "value").compute()
    rare = (ds["value_rank"] > rare_rank).compute()
    rows = []
    for model in flagged["model"].values:
        dd = flagged.sel(model=model)
        row = {"model": str(model)}
        for name, group in (("rare", is_value & rare), ("frequent", is_value & ~rare)):
            row[f"{name}_values"] = int(group.sum())
            row[f"{name}_dd_share"] = float(dd.where(group).mean()) if bool(group.any()) else np.nan
        started = int((begun.sel(model=model) & is_value).sum())
        row["completed"] = int((dd & is_value).sum()) / started if started else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def _done(curve: xr.DataArray) -> np.ndarray:
    values = curve.values
    return values[np.isfinite(values)]


def summary(store: str | Path) -> list[str]:
    """The findings as sentences, each saying whether the design target holds."""
    prefs = pair_preference_table(store)
    small, large = prefs.iloc[0], prefs.iloc[-1]
    lines = [
        f"true/false pairs: the largest model ({large.model}) prefers the true statement in "
        f"{large.best:.0%} of pairs at best ({large['last']:.0%} at the end), the smallest ({small.model}) "
        f"in {small.best:.0%} at best (target: largest above 95%, smallest below 75%: "
        f"{'met' if large.best > 0.95 and small.best < 0.75 else 'NOT met'})"
    ]
    false = false_statement_table(store)
    falls = bool((false["fall"] > 0).all())
    grows = bool(false["rise"].iloc[-1] > 2 * false["rise"].iloc[:-1].max())
    lines.append(
        "false statements: loss per token falls first in every size ("
        + ", ".join(f"{r.model} -{r.fall:.2f}" for r in false.itertuples())
        + "), then rises by "
        + ", ".join(f"{r.model} +{r.rise:.2f}" for r in false.itertuples())
        + f" nats (target: falls everywhere, rises far most in the largest: "
        f"{'met' if falls and grows else 'NOT met'})"
    )
    dd = double_descent_table(store)
    concentrated = bool((dd["rare_dd_share"] > dd["frequent_dd_share"]).all())
    completes_more = bool(dd["completed"].iloc[-1] > dd["completed"].iloc[0])
    lines.append(
        "double descent among attribute values: rare "
        + ", ".join(f"{r.model} {r.rare_dd_share:.1%}" for r in dd.itertuples())
        + "; frequent "
        + ", ".join(f"{r.model} {r.frequent_dd_share:.1%}" for r in dd.itertuples())
        + "; of those that fell then rose, completed "
        + ", ".join(f"{r.model} {r.completed:.0%}" for r in dd.itertuples())
        + f" (target: concentrated on rare values, completed more often in larger models: "
        f"{'met' if concentrated and completes_more else 'NOT met'})"
    )
    return lines

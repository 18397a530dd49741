"""The look shared by every figure: one colour per model, figure sizes, the validation-perplexity axis.

Figures are made with `matplotlib.figure.Figure` (no pyplot): nothing global is touched, no GUI
backend is needed, and figures are freed when dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import (
    FixedLocator,
    LogFormatter,
    MaxNLocator,
    NullFormatter,
    ScalarFormatter,
    StrMethodFormatter,
)

from tokendyn.analysis.tokens import show_whitespace
from tokendyn.analysis.trajectories import done_checkpoints, envelope
from tokendyn.studies.study import models_by_size

MODEL_CMAP = "viridis"  # sequential: from the smallest model (dark) to the largest (yellow-green)
CATEGORY_CMAP = "tab10"  # for things that are not models (clusters, axes, sets)
PANEL_SIZE = (3.6, 2.9)  # inches per panel; figures stay a few hundred kB as PNG
MIN_WIDTH = 9.0  # inches: room for the title and a legend beside one or two panels
PPL_LABEL = "validation perplexity (log scale, training →)"


def model_colors(ds_or_models: xr.Dataset | Sequence[str]) -> dict[str, tuple]:
    """One colour per model, by size order (fewest parameters first): the same model has the same
    colour in every figure of a store."""
    models = models_by_size(ds_or_models) if isinstance(ds_or_models, xr.Dataset) else list(ds_or_models)
    cmap = matplotlib.colormaps[MODEL_CMAP]
    positions = np.linspace(0.0, 0.85, len(models)) if len(models) > 1 else [0.35]
    return {model: cmap(p) for model, p in zip(models, positions)}


def category_colors(names: Sequence[str]) -> dict[str, tuple]:
    """Distinct colours for named categories (clusters, sets, x axes)."""
    cmap = matplotlib.colormaps[CATEGORY_CMAP]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def new_figure(n_panels: int, ncols: int | None = None, **subplot_kw: Any) -> tuple[Figure, list[Axes]]:
    """A constrained-layout figure with n_panels axes in a grid (at most 4 per row); surplus axes hidden."""
    ncols = min(n_panels, 4) if ncols is None else ncols
    nrows = -(-n_panels // ncols)
    width = max(PANEL_SIZE[0] * ncols, MIN_WIDTH)
    fig = Figure(figsize=(width, PANEL_SIZE[1] * nrows + 0.4), layout="constrained")
    axes = list(np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False, **subplot_kw)).ravel())
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def log_scale(ax: Axes, which: str = "y") -> None:
    """A log axis labelled with plain numbers (30, 100) rather than powers of ten."""
    axis = ax.yaxis if which == "y" else ax.xaxis
    (ax.set_yscale if which == "y" else ax.set_xscale)("log")
    plain_numbers = ScalarFormatter()
    plain_numbers.set_powerlimits((-6, 9))  # no "1e6" multiplier above the axis: a perplexity of 1000000 reads as such
    axis.set_major_formatter(plain_numbers)
    axis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def perplexity_axis(ax: Axes, label: str = PPL_LABEL) -> None:
    """Log-scale validation perplexity on x, decreasing to the right (training goes left to right)."""
    log_scale(ax, "x")
    if not ax.xaxis_inverted():
        ax.invert_xaxis()
    ax.set_xlabel(label)


TICK_STEPS = ((1,), (1, 3), (1, 2, 5), (1, 1.5, 2, 3, 5, 7), (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 9))


def perplexity_ticks(ax: Axes, max_ticks: int = 6) -> None:
    """Legible labels on a log x axis over its current range: at most `max_ticks` round values
    (powers of ten, else 1-3, 1-2-5, ... steps, else evenly spaced round values), printed plainly,
    minor ticks unlabelled. Call it once the data are drawn and the range is set (a short range, e.g.
    matched perplexity 2-6, has no power of ten in it, and labelled minor ticks run into each other)."""
    lo, hi = sorted(ax.get_xlim())
    if not (lo > 0 and hi > lo):
        return
    decades = range(int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi))) + 1)
    ticks: list[float] = []
    for steps in TICK_STEPS:
        ticks = [float(f"{m * 10.0**e:.3g}") for e in decades for m in steps if lo <= m * 10.0**e <= hi]
        if len(ticks) >= 3:
            break
    if len(ticks) < 3:  # a range of less than a few tens of percent: round values, evenly spaced
        ticks = [float(f"{t:.6g}") for t in MaxNLocator(4, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi)]
        ticks = [t for t in ticks if lo <= t <= hi]
    ticks = ticks[:: -(-len(ticks) // max_ticks)]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(StrMethodFormatter("{x:g}"))  # not a lambda: figures are pickled to be drawn
    ax.xaxis.set_minor_formatter(NullFormatter())


def off_envelope(ds: xr.Dataset) -> list[str]:
    """Models whose validation perplexity does not fall monotonically over their done checkpoints
    (a finding should say that their curves are drawn on the envelope)."""
    out = []
    for m, name in enumerate(ds["model"].values):
        idx = done_checkpoints(ds, m)
        if not envelope(ds["val_ppl"].values[m, idx]).all():
            out.append(str(name))
    return out


def on_envelope(rows: pd.DataFrame, x: str = "val_ppl") -> pd.DataFrame:
    """The rows of one model's curve in step order, kept where `x` (validation perplexity) is on its
    running-minimum envelope (`trajectories.envelope`): what a line against validation perplexity is
    drawn through."""
    rows = rows.sort_values("step", kind="stable") if "step" in rows.columns else rows
    return rows[envelope(rows[x].to_numpy(dtype=float))]


def envelope_findings(ds: xr.Dataset) -> list[str]:
    """The sentence a study adds when it draws against validation perplexity and some model's
    validation perplexity does not fall monotonically (`off_envelope`); none otherwise."""
    bumpy = off_envelope(ds)
    if not bumpy:
        return []
    return [
        f"Validation perplexity of {', '.join(bumpy)} does not fall monotonically; curves against it are "
        "drawn on the running-minimum envelope (the checkpoints that set a new lowest perplexity; the "
        "tables have every checkpoint)."
    ]


ZOOM_FINDING = (
    "The x axis starts where the models' curves begin to differ (the shared early fall from random "
    "initialisation is cut off; the tables have every checkpoint)."
)


def zoom_start(curves: Sequence[tuple[np.ndarray, np.ndarray]], rel: float = 0.02) -> float | None:
    """The highest validation perplexity from which the curves differ, with a margin; None when they
    differ from the start (or there are fewer than two curves to compare).

    curves: (x = perplexities, y) per curve. Below the highest perplexity every curve reaches, the
    curves differ where their spread (max - min over curves, interpolated linearly in log x)
    exceeds `rel` of the overall y range, or where some curve has ended (one model trained further
    than another: what is left to see is there).
    """
    curves = [(np.asarray(x, float), np.asarray(y, float)) for x, y in curves]
    curves = [(x[np.isfinite(x) & np.isfinite(y)], y[np.isfinite(x) & np.isfinite(y)]) for x, y in curves]
    curves = [(x, y) for x, y in curves if len(x) >= 2 and np.all(x > 0)]
    if len(curves) < 2:
        return None
    lo = min(x.min() for x, _ in curves)
    hi = min(x.max() for x, _ in curves)
    if not hi > lo:
        return None
    grid = np.geomspace(hi, lo, 60)
    values = np.array(
        [
            np.where(grid >= x.min(), np.interp(np.log(grid), np.log(x[np.argsort(x)]), y[np.argsort(x)]), np.nan)
            for x, y in curves
        ]
    )
    spread = np.nanmax(values, 0) - np.nanmin(values, 0)
    span = np.nanmax(values) - np.nanmin(values)
    differ = np.flatnonzero((spread > rel * span) | np.isnan(values).any(0))
    if len(differ) == 0 or differ[0] == 0:
        return None
    return float(grid[max(0, differ[0] - 2)] * 1.05)


def zoom_perplexity(
    ax: Axes, curves: Sequence[tuple[np.ndarray, np.ndarray]], rel: float = 0.02, log_y: bool = False
) -> bool:
    """Limit a validation-perplexity x axis (log, decreasing to the right) to where the curves differ
    (`zoom_start`; left alone when they differ everywhere), fit the y range to what is left in view,
    and label the x axis legibly (`perplexity_ticks`). Call it after drawing, before a log y scale.
    curves: (x, y) as drawn. log_y: the y axis will be logarithmic, so the curves are compared and
    the y range padded in log y. Returns whether the axis was cut."""
    transform = np.log if log_y else np.asarray
    curves = [(np.asarray(x, float), np.asarray(y, float)) for x, y in curves]
    with np.errstate(divide="ignore", invalid="ignore"):
        start = zoom_start([(x, transform(y)) for x, y in curves], rel)
    left = ax.get_xlim()[0]  # inverted: left is the highest perplexity
    cut = start is not None and ax.xaxis_inverted() and start < left
    if cut:
        x = np.concatenate([x for x, _ in curves])
        y = np.concatenate([y for _, y in curves])
        seen = np.isfinite(x) & np.isfinite(y) & (x > 0) & ((y > 0) if log_y else True)
        ax.set_xlim(start, x[seen].min() / 1.05)
        shown = y[seen & (x <= start)]
        if shown.size:
            ax.set_ylim(*_padded(float(shown.min()), float(shown.max()), log_y))
    perplexity_ticks(ax)
    return cut


def _padded(lo: float, hi: float, log_y: bool) -> tuple[float, float]:
    """A y range around [lo, hi] with 8% of its span to spare each side (in log y when log_y)."""
    if log_y:
        pad = 0.08 * np.log(hi / lo) if hi > lo else 0.1
        return lo * float(np.exp(-pad)), hi * float(np.exp(pad))
    pad = 0.08 * (hi - lo) if hi > lo else 0.1 * max(abs(hi), 1e-9)
    return (lo - pad if lo - pad > 0 or lo <= 0 else lo / 1.1), hi + pad


def model_legend(fig: Figure, colors: dict[str, tuple], title: str = "model", **style: Any) -> None:
    """One legend of the models for the whole figure, outside the panels on the right."""
    handles = [Line2D([], [], color=color, marker="o", ms=4, **style) for color in colors.values()]
    fig.legend(handles, list(colors), title=title, loc="outside right upper", fontsize="small")


def plain(text: str, limit: int | None = None) -> str:
    """Token text for a figure: newlines, tabs and invisible characters shown (`show_whitespace`),
    cut to `limit` characters from the left (the end, where the token is, is kept). `save_figure`
    draws it literally (no mathtext)."""
    text = show_whitespace(text, spaces=False)
    return "…" + text[-limit:] if limit is not None and len(text) > limit else text

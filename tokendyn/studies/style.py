"""The look shared by every figure: one colour per model, figure sizes, the validation-perplexity axis.

Figures are made with `matplotlib.figure.Figure` (no pyplot): nothing global is touched, no GUI
backend is needed, and figures are freed when dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib
import numpy as np
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import LogFormatter, ScalarFormatter

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


def new_figure(n_panels: int, ncols: int | None = None, **subplot_kw) -> tuple[Figure, list[Axes]]:
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
    axis.set_major_formatter(ScalarFormatter())
    axis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def perplexity_axis(ax: Axes, label: str = PPL_LABEL) -> None:
    """Log-scale validation perplexity on x, decreasing to the right (training goes left to right)."""
    log_scale(ax, "x")
    if not ax.xaxis_inverted():
        ax.invert_xaxis()
    ax.set_xlabel(label)


def envelope(ppl: np.ndarray) -> np.ndarray:
    """Mask of the checkpoints (in step order) on the running-minimum envelope of validation
    perplexity: those that set a new lowest value. Curves against validation perplexity are drawn on
    these points, so a loss spike or a late rise does not fold a curve back into a zig-zag
    (the same envelope as matched perplexity, methods.md §1.1)."""
    ppl = np.asarray(ppl, dtype=float)
    previous = np.minimum.accumulate(np.concatenate([[np.inf], np.where(np.isnan(ppl), np.inf, ppl)[:-1]]))
    return np.isfinite(ppl) & (ppl < previous)


def off_envelope(ds: xr.Dataset) -> list[str]:
    """Models whose validation perplexity does not fall monotonically over their done checkpoints
    (a finding should say that their curves are drawn on the envelope)."""
    from tokendyn.analysis.trajectories import done_checkpoints

    out = []
    for m, name in enumerate(ds["model"].values):
        idx = done_checkpoints(ds, m)
        if not envelope(ds["val_ppl"].values[m, idx]).all():
            out.append(str(name))
    return out


def zoom_perplexity(ax: Axes, curves: Sequence[tuple[np.ndarray, np.ndarray]], rel: float = 0.02) -> None:
    """Limit a validation-perplexity x axis (decreasing to the right) to where the curves differ.

    curves: (x = perplexities, y) per model. The range starts at the highest perplexity where the
    curves' spread (max - min over curves, interpolated in log x) exceeds `rel` of the overall y
    range, with a margin; the axis is left alone when the curves differ everywhere.
    """
    curves = [(np.asarray(x, float), np.asarray(y, float)) for x, y in curves]
    curves = [(x[np.isfinite(x) & np.isfinite(y)], y[np.isfinite(x) & np.isfinite(y)]) for x, y in curves]
    curves = [(x, y) for x, y in curves if len(x) >= 2]
    if len(curves) < 2:
        return
    lo = max(x.min() for x, _ in curves)
    hi = min(x.max() for x, _ in curves)
    if not hi > lo:
        return
    grid = np.geomspace(hi, lo, 60)
    values = np.array([np.interp(np.log(grid), np.log(x[np.argsort(x)]), y[np.argsort(x)]) for x, y in curves])
    spread = values.max(0) - values.min(0)
    span = np.nanmax(values) - np.nanmin(values)
    differ = np.flatnonzero(spread > rel * span) if span > 0 else []
    if len(differ) == 0 or differ[0] == 0:
        return
    start = grid[max(0, differ[0] - 2)] * 1.05
    left, right = ax.get_xlim()  # inverted: left is the highest perplexity
    if ax.xaxis_inverted() and start < left:
        ax.set_xlim(start, right)


def model_legend(fig: Figure, colors: dict[str, tuple], title: str = "model", **style) -> None:
    """One legend of the models for the whole figure, outside the panels on the right."""
    handles = [Line2D([], [], color=color, marker="o", ms=4, **style) for color in colors.values()]
    fig.legend(handles, list(colors), title=title, loc="outside right upper", fontsize="small")


def plain(text: str, limit: int | None = None) -> str:
    """Text as matplotlib draws it literally: `$` escaped (no mathtext), newlines and tabs shown as
    symbols, cut to `limit` characters from the left (the end, where the token is, is kept)."""
    text = text.replace("\n", "⏎").replace("\t", "→")
    if limit is not None and len(text) > limit:
        text = "…" + text[-limit:]
    return text.replace("$", r"\$")

"""What every study shares: its result, how it skips, how it is saved.

A study is a function `run(source, ...) -> Result`; `source` is a store path or a dataset from
`tokendyn.open_store`. It raises `Skip("reason")` when the store lacks its data. A parameter that
a study passes on to an analysis function takes its default from that function's signature
(`default_of`), so every default is written once, where the parameter is defined.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeAlias

import numpy as np
import pandas as pd
import xarray as xr
from matplotlib import rc_context
from matplotlib.figure import Figure
from matplotlib.text import Text

import tokendyn  # noqa: F401  (registers the ds.tokendyn accessor)
from tokendyn.analysis.accessor import context_ids
from tokendyn.analysis.sequences import set_params
from tokendyn.analysis.trajectories import default_of  # a study's defaults are its analysis functions'
from tokendyn.store import open_store, store_path

__all__ = [
    "Result",
    "Skip",
    "Source",
    "require",
    "default_of",
    "open_source",
    "main_set_path",
    "models_by_size",
    "model_sizes",
    "token_texts",
    "context",
    "step_text",
    "save",
]

FIGURE_FORMATS = ("png", "svg")
PNG_DPI = 100

Source: TypeAlias = str | Path | xr.Dataset  # what a study reads: a store path or a dataset from open_store


class Skip(Exception):
    """Raised by a study when the store lacks what it needs; the message says what."""


@dataclass
class Result:
    """What a study returns.

    title: the figure's heading in the report. tables: tidy tables by name (written as CSV; a
    table name belongs to one study). figure: one matplotlib figure drawn from the tables.
    findings: sentences computed from the tables. shown: names of tables small enough to print in
    the report page (e.g. examples with their text). labels: per-token results by name, on the
    store's token grid (written by `tokendyn analyze` as groups of labels.zarr). html: a fragment the
    report shows below the figure, drawn from the tables; only a `markupsafe.Markup` (every piece of
    store text in it escaped by the study) is inserted as HTML, anything else is shown as text.
    """

    title: str
    tables: dict[str, pd.DataFrame]
    figure: Figure
    findings: list[str]
    shown: list[str] = field(default_factory=list)
    labels: dict[str, xr.Dataset | xr.DataArray] = field(default_factory=dict)
    html: str = ""


def require(ds: xr.Dataset, *names: str) -> None:
    """Raise Skip unless the dataset has all these variables or coordinates."""
    missing = [name for name in names if name not in ds.variables]
    if missing:
        raise Skip(f"the store has no {', '.join(missing)}")


def open_source(source: Source) -> xr.Dataset:
    """The main set of a store path, or the dataset itself."""
    return source if isinstance(source, xr.Dataset) else open_store(source)


def main_set_path(ds: xr.Dataset, what: str) -> Path:
    """The store path of ds, which must be the main set of a store on disk (studies that read the
    store's other sets, tasks or PassUntil groups); Skip saying `what` the study reads otherwise."""
    path = store_path(ds)
    if path is None or set_params(ds)["name"] != "main":
        raise Skip(f"reads the store's {what}; runs when the main set of a store on disk is analysed")
    return Path(path)


def models_by_size(ds: xr.Dataset) -> list[str]:
    """Model names from the fewest to the most parameters (store order without parameter counts)."""
    names = [str(m) for m in ds["model"].values]
    if "n_params" not in ds.coords:
        return names
    n_params = np.asarray(ds["n_params"].values, dtype=float)
    return [names[i] for i in np.argsort(n_params, kind="stable")]


def model_sizes(ds: xr.Dataset, models: Sequence[str]) -> np.ndarray:
    """Parameter counts of the named models; without parameter counts, their places in store order
    (the order `models_by_size` takes for size order then)."""
    names = [str(m) for m in ds["model"].values]
    if "n_params" not in ds.coords:
        return np.array([names.index(m) for m in models], dtype=float)
    n_params = np.asarray(ds["n_params"].values, dtype=float)
    return np.array([n_params[names.index(m)] for m in models])


def token_texts(ds: xr.Dataset, ids: Sequence[int]) -> list[str]:
    """Decoded text of token ids from the store's vocabulary ("#<id>" where the store has none)."""
    if "vocab_text" not in ds.variables:
        return [f"#{int(i)}" for i in ids]
    return [str(t) for t in ds.tokendyn.token_text(np.asarray(ids, dtype=np.int64)).values]


def context(ds: xr.Dataset, token: int, width: int = 12) -> str:
    """Up to `width` tokens of its document before `token`, then the token in [[ ]] (raw text, not escaped)."""
    if "vocab_text" in ds.variables:
        return ds.tokendyn.context(token, width)
    ids = context_ids(ds, token, width)
    return " ".join(f"#{i}" for i in ids[:-1]) + f" [[#{ids[-1]}]]"


def step_text(step: float) -> str:
    """A training step as printed in findings, tables and figures: an integer where it is one
    (143000, never 1.43e+05), else a short decimal."""
    step = float(step)
    return f"{step:.0f}" if np.isfinite(step) and step == round(step) else f"{step:g}"


def save(result: Result, folder: Path) -> dict[str, Path]:
    """Write the figure (figure.png, figure.svg), the tables (<name>.csv) and findings.txt into folder."""
    return {**save_figure(result.figure, folder), **save_tables(result, folder)}


def save_figure(figure: Figure, folder: Path) -> dict[str, Path]:
    """Draw the figure into folder as figure.png and figure.svg; returns {format: path}.

    Every text is drawn as written: a `$` in a model name or token is not mathtext (an unbalanced
    one would fail the drawing), also in the tick labels made while drawing.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for text in figure.findobj(Text):
        text.set_parse_math(False)
    paths = {}
    for fmt in FIGURE_FORMATS:
        paths[fmt] = folder / f"figure.{fmt}"
        # svg.hashsalt: SVG element ids the same on every drawing
        with rc_context({"svg.hashsalt": "tokendyn", "text.parse_math": False}):
            figure.savefig(paths[fmt], dpi=PNG_DPI, metadata={"Date": None} if fmt == "svg" else None)
        # The layout solved for the first format holds for the next: solving it again costs a third
        # of the drawing time, more than a fast figure takes to draw.
        figure.set_layout_engine("none")
    return paths


def save_tables(result: Result, folder: Path) -> dict[str, Path]:
    """Write the tables (<name>.csv) and findings.txt into folder; returns {table name or "findings": path}."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, table in result.tables.items():
        paths[name] = folder / f"{name}.csv"
        table.to_csv(paths[name], index=False)
    paths["findings"] = folder / "findings.txt"
    paths["findings"].write_text("\n".join(result.findings) + "\n")
    return paths

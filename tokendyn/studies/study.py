"""What every study shares: its result, how it skips, how it is saved and run from the command line.

A study is a function `run(source, **options) -> Result`; `source` is a store path or a dataset
from `tokendyn.open_store`. It raises `Skip("reason")` when the store lacks its data.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
from matplotlib.figure import Figure

import tokendyn
from tokendyn.pipelines.analyze import Skip, require
from tokendyn.analysis.accessor import context_ids
from tokendyn.errors import TokendynError

__all__ = ["Result", "Skip", "require", "open_source", "models_by_size", "token_texts", "context", "save", "main"]

FIGURE_FORMATS = ("png", "svg")
PNG_DPI = 100


@dataclass
class Result:
    """What a study returns.

    title: the figure's heading in the report. tables: tidy tables by name (written as CSV).
    figure: one matplotlib figure. findings: sentences computed from the data. shown: names of
    tables small enough to print in the report page (e.g. examples with their text).
    """

    title: str
    tables: dict[str, pd.DataFrame]
    figure: Figure
    findings: list[str]
    shown: list[str] = field(default_factory=list)


def open_source(source: str | Path | xr.Dataset) -> xr.Dataset:
    """The main set of a store path, or the dataset itself."""
    return source if isinstance(source, xr.Dataset) else tokendyn.open_store(source)


def models_by_size(ds: xr.Dataset) -> list[str]:
    """Model names from the fewest to the most parameters (store order without parameter counts)."""
    names = [str(m) for m in ds["model"].values]
    if "n_params" not in ds.coords:
        return names
    n_params = np.asarray(ds["n_params"].values, dtype=float)
    return [names[i] for i in np.argsort(n_params, kind="stable")]


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


def save(result: Result, folder: Path) -> dict[str, Path]:
    """Write the figure (figure.png, figure.svg), the tables (<name>.csv) and findings.txt into folder."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for fmt in FIGURE_FORMATS:
        paths[fmt] = folder / f"figure.{fmt}"
        result.figure.savefig(paths[fmt], dpi=PNG_DPI, metadata={"Date": None} if fmt == "svg" else None)
    for name, table in result.tables.items():
        paths[name] = folder / f"{name}.csv"
        table.to_csv(paths[name], index=False)
    paths["findings"] = folder / "findings.txt"
    paths["findings"].write_text("\n".join(result.findings) + "\n")
    return paths


def main(run: Callable[..., Result], name: str, argv: Sequence[str] | None = None) -> int:
    """`python -m analyses.<name> STORE [--out DIR]`: run one study, print its findings, save it."""
    parser = argparse.ArgumentParser(prog=f"python -m analyses.{name}", description=sys.modules[run.__module__].__doc__)
    parser.add_argument("store", type=Path, help="store path (from `tokendyn extract`)")
    parser.add_argument("--out", type=Path, help=f"output folder (default: STORE's stem + .report/{name})")
    args = parser.parse_args(argv)
    out = args.out or args.store.with_name(args.store.name.removesuffix(".zarr") + ".report") / name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # NaN arithmetic on padding and missing checkpoints
            result = run(args.store)
    except (Skip, TokendynError) as err:
        print(f"{name}: skipped ({err})", file=sys.stderr)
        return 2
    save(result, out)
    print("\n".join(result.findings))
    print(f"written to {out}")
    return 0

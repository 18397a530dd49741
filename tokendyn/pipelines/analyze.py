"""`tokendyn analyze STORE`: run every analysis the store has data for; write the results next to it.

Results go to one folder beside the store (`toy.zarr` -> `toy.analysis/`): tidy CSV tables, and
`labels.zarr`, a Zarr store with one group per analysis holding per-token results on the store's
(model, token) grid, so `xr.open_zarr(folder / "labels.zarr", group="trends")` lines up with the
store.

An analysis step is a function `step(ds, out) -> list[str]`: it reads the dataset, writes through
`out` (`out.write_table`, `out.write_labels`) and returns a few summary lines. When the store lacks
what it needs it raises `Skip("reason")`. Warnings of tokendyn's own classes (e.g.
`trends.TrendWarning`) are added to the summary. Steps are collected from the modules of the
`tokendyn.pipelines.steps` package, each exposing `STEPS` (a list of step functions), in module-name order,
so a new analysis adds a module there without editing this file.
"""

from __future__ import annotations

import importlib
import pkgutil
import shutil
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import xarray as xr
from tqdm import tqdm

import tokendyn.pipelines.steps
from tokendyn.errors import TokendynError

LABELS_STORE = "labels.zarr"


class Skip(Exception):
    """Raised by a step when the store lacks what it needs; the message says what."""


@dataclass
class Output:
    """Where a step writes. `options` holds the analysis options (see `tokendyn analyze --help`)."""

    folder: Path
    options: dict = field(default_factory=dict)

    def write_table(self, name: str, table: pd.DataFrame) -> Path:
        """Write a tidy table as `<folder>/<name>.csv`."""
        path = self.folder / f"{name}.csv"
        table.to_csv(path, index=False)
        return path

    def write_labels(self, name: str, data: xr.Dataset | xr.DataArray) -> xr.Dataset:
        """Write per-token results as group `name` of the labels store (chunk by chunk); return them reopened."""
        if isinstance(data, xr.DataArray):
            data = data.to_dataset(name=data.name or name)
        # Token coordinates (token_id, ...) stay in the store, which the labels line up with.
        data = data.drop_vars([n for n, c in data.coords.items() if n not in data.dims and set(c.dims) & {"token"}])
        # Zarr needs equal chunks (but the last): take each variable's largest chunk per dim.
        data = data.map(lambda v: v.chunk({d: max(c) for d, c in zip(v.dims, v.chunks)}) if v.chunks else v,
                        keep_attrs=True)
        for variable in data.variables.values():
            variable.encoding.pop("chunks", None)  # chunks come from dask, not from the source store
            variable.encoding.pop("preferred_chunks", None)
        # One variable at a time: computed together from the same loss chunks, the fast ones would
        # keep those chunks in memory until the slowest had used them.
        for i, variable in enumerate(data.data_vars):
            data[[variable]].to_zarr(self.folder / LABELS_STORE, group=name, mode="a" if i else "w",
                                     consolidated=False)
        return xr.open_zarr(self.folder / LABELS_STORE, group=name, consolidated=False)


Step = Callable[[xr.Dataset, Output], list[str]]


def require(ds: xr.Dataset, *names: str) -> None:
    """Raise Skip unless the dataset has all these variables or coordinates."""
    missing = [name for name in names if name not in ds.variables]
    if missing:
        raise Skip(f"the store has no {', '.join(missing)}")


def step_name(step: Step) -> str:
    return step.__name__.removesuffix("_step")


def collect_steps() -> list[Step]:
    """Every step of every module in the `tokendyn.pipelines.steps` package, in module-name order."""
    steps = []
    for module in sorted(pkgutil.iter_modules(tokendyn.pipelines.steps.__path__), key=lambda m: m.name):
        steps += importlib.import_module(f"tokendyn.pipelines.steps.{module.name}").STEPS
    return steps


def default_folder(store: Path, set: str = "main") -> Path:
    """`path/toy.zarr` -> `path/toy.analysis` (a named set: `path/toy.NAME.analysis`)."""
    stem = store.name.removesuffix(".zarr")
    return store.with_name(f"{stem}.analysis" if set == "main" else f"{stem}.{set}.analysis")


def analyze(ds: xr.Dataset, folder: Path, options: dict | None = None, only: Sequence[str] | None = None,
            progress: bool = True) -> list[str]:
    """Run the steps (all, or those named in `only`) on ds; write to `folder`; return summary lines.

    The folder's previous contents are replaced.
    """
    steps = collect_steps()
    names = [step_name(step) for step in steps]
    unknown = sorted(set(only or ()) - set(names))
    if unknown:
        raise TokendynError(f"unknown analysis step(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    out = Output(folder, dict(options or {}))
    lines = []
    bar = tqdm([s for s in steps if not only or step_name(s) in only], desc="analyze", unit="step",
               disable=not progress)
    for step in bar:
        bar.set_postfix_str(step_name(step))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warnings.simplefilter("ignore", RuntimeWarning)  # NaN arithmetic on padding and missing checkpoints
            try:
                result = step(ds, out)
            except Skip as skip:
                result = [f"skipped ({skip})"]
        notes = dict.fromkeys(str(w.message) for w in caught if w.category.__module__.startswith("tokendyn"))
        lines += [f"{step_name(step)}: {line}" for line in [*result, *(f"warning: {n}" for n in notes)]]
    return lines

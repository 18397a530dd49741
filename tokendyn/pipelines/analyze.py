"""`tokendyn analyze STORE`: run every study (`tokendyn.studies.STUDIES`) and write their results.

Results go to one folder beside the store (`toy.zarr` -> `toy.analysis/`):

    <table>.csv     every study's tidy tables (a table name belongs to one study)
    labels.zarr     per-token results, one group per name (trends, double_descent, ...) on the store's
                    token grid, so `xr.open_zarr(folder / "labels.zarr", group="trends")` lines up with it
    findings.txt    the summary printed: "<study>: <finding>" lines, skipped studies with the reason

The folder is written whole or not at all (see `tokendyn.pipelines.output`). This module also runs
the studies for the report (`run_studies`) and one study from the command line (`main_one`).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import xarray as xr
import zarr
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from tokendyn.analysis.shared import sharing
from tokendyn.analysis.spill import SPILLED, prepared, write_by_windows
from tokendyn.errors import TokendynError
from tokendyn.pipelines.output import mark, output_folder
from tokendyn.store import open_store
from tokendyn.studies import STUDIES
from tokendyn.studies.study import Result, Skip, save

LABELS_STORE = "labels.zarr"
FINDINGS = "findings.txt"
# Names of the analysis steps before the studies took them over, still accepted by --steps.
FORMER_STEPS = {
    "trends": ("trend_categories", "subset_curves"),
    "curves": ("curve_measures",),
    "sequence_ppl": ("sequence_perplexity",),
    "pairs": ("pair_preference",),
    "tasks": ("downstream",),
}


@dataclass
class Outcome:
    """One study's run: its result, or why it was skipped; warnings raised while it ran."""

    name: str
    result: Result | None = None
    skipped: str | None = None
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The summary: "<name>: <finding>" per finding (or the skip reason), then the warnings."""
        body = [f"skipped ({self.skipped})"] if self.result is None else self.result.findings
        return [f"{self.name}: {line}" for line in [*body, *(f"warning: {note}" for note in self.notes)]]


def select(names: Sequence[str] | None) -> list[str]:
    """The studies to run, in registry order: all, or those named (a former step name stands for its studies)."""
    if names is None:
        return list(STUDIES)
    chosen = {study for name in names for study in FORMER_STEPS.get(name, (name,))}
    unknown = sorted(chosen - set(STUDIES))
    if unknown:
        raise TokendynError(
            f"unknown stud{'ies' if len(unknown) > 1 else 'y'} {', '.join(unknown)}; choose from {', '.join(STUDIES)}"
        )
    return [name for name in STUDIES if name in chosen]


def run_study(name: str, ds: xr.Dataset, options: dict | None = None) -> Outcome:
    """Run one study; a `Skip` or a user-level `TokendynError` becomes a skipped outcome."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("ignore", RuntimeWarning)  # NaN arithmetic on padding and missing checkpoints
        warnings.filterwarnings("ignore", message="Glyph .* missing")  # token text the font cannot draw
        try:
            outcome = Outcome(name, result=STUDIES[name](ds, **(options or {})))
        except (Skip, TokendynError) as reason:
            outcome = Outcome(name, skipped=str(reason))
    outcome.notes = list(dict.fromkeys(str(w.message) for w in caught if w.category.__module__.startswith("tokendyn")))
    return outcome


def run_studies(
    ds: xr.Dataset,
    names: Sequence[str],
    options: dict[str, dict] | None = None,
    progress: bool = True,
    desc: str = "analyze",
) -> Iterator[Outcome]:
    """Run the named studies in turn (options: keyword arguments per study), yielding each outcome.

    Per-token results that several studies use (trend categories, double-descent flags) are computed
    once for the whole run (`tokendyn.analysis.shared`). BLAS runs one thread: the per-token kernels
    run in dask's threads, one per core, and BLAS threads of their own inside them only contend
    (measured: 1.7x the CPU time of the curve measures).
    """
    bar = tqdm(names, desc=desc, unit="study", disable=not progress)
    with sharing(), threadpool_limits(limits=1, user_api="blas"):
        for name in bar:
            bar.set_postfix_str(name)
            yield run_study(name, ds, (options or {}).get(name))


def write_labels(folder: Path, name: str, data: xr.Dataset | xr.DataArray) -> None:
    """Write per-token results as group `name` of the labels store, a token window at a time
    (`tokendyn.analysis.spill`); results a study spilled to a temporary store are copied as written."""
    store = folder / LABELS_STORE
    if isinstance(data, xr.Dataset) and SPILLED in data.encoding:
        source, group = data.encoding[SPILLED]
        zarr.open_group(store, mode="a")  # the root group, as a first write makes it
        shutil.rmtree(store / name, ignore_errors=True)
        shutil.copytree(source / group, store / name)
        return
    data = prepared(data, name)
    # One variable at a time: computed together from the same loss chunks, the fast ones would
    # keep those chunks in memory until the slowest had used them.
    for i, variable in enumerate(data.data_vars):
        write_by_windows(data[[variable]], store, name, mode="a" if i else "w")


def write_results(result: Result, folder: Path) -> None:
    """A study's tables as `<folder>/<table>.csv` and its labels as groups of labels.zarr."""
    for name, table in result.tables.items():
        table.to_csv(folder / f"{name}.csv", index=False)
    for name, data in result.labels.items():
        write_labels(folder, name, data)


def default_folder(store: Path, set: str = "main") -> Path:
    """`path/toy.zarr` -> `path/toy.analysis` (a named set: `path/toy.NAME.analysis`)."""
    stem = store.name.removesuffix(".zarr")
    return store.with_name(f"{stem}.analysis" if set == "main" else f"{stem}.{set}.analysis")


def analyze(
    ds: xr.Dataset,
    folder: Path,
    options: dict[str, dict] | None = None,
    only: Sequence[str] | None = None,
    progress: bool = True,
) -> list[str]:
    """Run the studies (all, or those named in `only`) on ds and write their results to `folder`;
    return the summary lines.

    options: keyword arguments per study, e.g. {"clusters": {"n_clusters": 4}}. `folder` is
    replaced whole when the run completes (a folder tokendyn did not write is refused), and kept
    as it was when every study was skipped (TokendynError with the reasons).
    """
    names = select(only)
    lines, produced = [], False
    with output_folder(folder) as tmp:
        for outcome in run_studies(ds, names, options, progress):
            if outcome.result is not None:
                write_results(outcome.result, tmp)
                produced = True
            lines += outcome.lines()
        if not produced:  # raised inside: the temporary folder goes, the earlier results stay
            raise TokendynError(f"no result to write, {'; '.join(lines)}; {folder} was left as it was")
        (tmp / FINDINGS).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return lines


def main_one(name: str, argv: Sequence[str] | None = None) -> int:
    """`python -m analyses.<name> STORE [--out DIR]`: run one study, print its findings, save it."""
    from tokendyn.pipelines.report import default_folder as report_folder  # report imports this module

    run: Callable[..., Result] = STUDIES[name]
    parser = argparse.ArgumentParser(prog=f"python -m analyses.{name}", description=sys.modules[run.__module__].__doc__)
    parser.add_argument("store", type=Path, help="store path (from `tokendyn extract`)")
    parser.add_argument(
        "--out",
        type=Path,
        help=f"output folder (default: STORE's stem + .report/{name}; replaced "
        f"whole, and refused if it holds files tokendyn did not write)",
    )
    args = parser.parse_args(argv)
    out = args.out or report_folder(args.store) / name
    try:
        outcome = run_study(name, open_store(args.store))
        if outcome.result is None:
            print(f"{name}: skipped ({outcome.skipped})", file=sys.stderr)
            return 2
        if args.out is None and not out.parent.exists():
            out.parent.mkdir(parents=True)
            mark(out.parent)  # the report folder, which `tokendyn report` may then replace
        with output_folder(out) as tmp:
            save(outcome.result, tmp)
    except TokendynError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(outcome.result.findings))
    print(f"written to {out}")
    return 0

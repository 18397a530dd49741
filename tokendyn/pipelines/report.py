"""`tokendyn report`: run the studies (`tokendyn.studies.STUDIES`) on a store and write one HTML page.

Layout of the output folder:

    index.html              the report: every figure embedded as base64 PNG, so the file alone can be mailed
    <study>/figure.png|svg  each study's figure
    <study>/<table>.csv     its tidy tables (the same tables `tokendyn analyze` writes)
    <study>/findings.txt    its findings

The report runs the studies itself (the same functions as `tokendyn analyze`, so the same tables
and findings); it does not read an analysis folder. A study whose data the store lacks raises
`Skip`; the page lists it with the reason. The page comes from the jinja2 template
`templates/report.html.j2` with autoescape on, so every piece of text from the store (token
text, set and model names, paths) is HTML-escaped. The folder is written whole or not at all
(see `tokendyn.pipelines.output`).
"""

from __future__ import annotations

import base64
import datetime
import os
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import jinja2
import numpy as np
import pandas as pd
import xarray as xr

import tokendyn
from tokendyn.errors import TokendynError
from tokendyn.pipelines.analyze import FINDINGS, Outcome, run_studies, select, write_results
from tokendyn.pipelines.draw import FigureDrawer, draw_here
from tokendyn.pipelines.output import mark, output_folder
from tokendyn.store import open_store
from tokendyn.studies.study import save_tables

INDEX = "index.html"
TEMPLATE = "report.html.j2"
MAX_ROWS = 60  # rows of a table printed in the page; the CSV has all


def default_folder(store: Path) -> Path:
    """`path/toy.zarr` -> `path/toy.report`."""
    return store.with_name(store.name.removesuffix(".zarr") + ".report")


def write_report(
    store: str | Path,
    out_dir: str | Path | None = None,
    studies: Sequence[str] | None = None,
    options: dict[str, dict] | None = None,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
    analysis: str | Path | None = None,
) -> Path:
    """Run the studies (all of `STUDIES`, or those named) on the store's main set and write the
    report into out_dir (default: beside the store, `<name>.report`). Returns the path of index.html.

    options: keyword arguments per study, e.g. {"trend_categories": {"x": "index"}}. out_dir is
    replaced whole when the report is complete (a folder tokendyn did not write is refused) and kept
    as it was when every study was skipped (TokendynError with the reasons). echo:
    called with one line per study (done, or skipped and why). analysis: also write the analysis
    folder there, as `tokendyn analyze` does (tables, labels.zarr, findings.txt), from the same run
    of the studies, so that a caller wanting both runs each study once.
    """
    store = Path(store)
    names = select(studies)
    ds = open_store(store)
    out = Path(out_dir) if out_dir is not None else default_folder(store)
    also = output_folder(Path(analysis)) if analysis is not None else nullcontext()
    with output_folder(out) as tmp, also as analysis_tmp, figure_drawer(len(names)) as drawer:
        sections, skipped, lines, drawn = [], [], [], []
        for outcome in run_studies(ds, names, options, progress, desc="report"):
            if echo:
                echo(
                    f"{outcome.name}: skipped ({outcome.skipped})"
                    if outcome.skipped
                    else f"{outcome.name}: {len(outcome.result.findings)} findings"
                )
                for note in outcome.notes:
                    echo(f"{outcome.name}: warning: {note}")
            lines += outcome.lines()
            if outcome.result is None:
                skipped.append(outcome)
            else:
                if analysis_tmp is not None:
                    write_results(outcome.result, analysis_tmp)
                drawn.append((outcome, drawer.draw(outcome.result.figure, tmp / outcome.name)))
        if not drawn:  # raised inside: the temporary folders go, the earlier report stays
            raise TokendynError(f"nothing to report, {'; '.join(lines)}; {out} was left as it was")
        for outcome, figure_paths in drawn:
            files = {**figure_paths(), **save_tables(outcome.result, tmp / outcome.name)}
            mark(tmp / outcome.name)  # so `python -m analyses.NAME` may replace it
            sections.append(section(outcome, files, tmp))
        if analysis_tmp is not None:
            (analysis_tmp / FINDINGS).write_text("\n".join(lines) + "\n", encoding="utf-8")
        (tmp / INDEX).write_text(render(store, ds, sections, skipped), encoding="utf-8")
    return out / INDEX


def figure_drawer(n_studies: int) -> FigureDrawer | nullcontext:
    """Figures drawn in a child process while the next study computes, when there are several and a core to spare."""
    if n_studies > 1 and (os.cpu_count() or 1) > 1:
        return FigureDrawer()
    return nullcontext(SimpleNamespace(draw=draw_here))


# --- HTML -------------------------------------------------------------------------------------------


def _cell(value: object) -> dict:
    """A table cell: its text and whether it is a number (right-aligned)."""
    if isinstance(value, (float, np.floating)):
        if np.isfinite(value) and value == round(value) and abs(value) < 1e15:  # steps, counts: 143000, not 1.43e+05
            return {"text": f"{value:.0f}", "number": True}
        return {"text": "" if np.isnan(value) else f"{value:.4g}", "number": True}
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return {"text": str(value), "number": True}
    return {"text": str(value), "number": False}


def table_view(table: pd.DataFrame, max_rows: int = MAX_ROWS) -> dict:
    """A DataFrame as the template shows it: column names, at most max_rows rows of cells, and the
    total row count when rows were left out."""
    return {
        "columns": [str(c) for c in table.columns],
        "rows": [[_cell(v) for v in row] for row in table.head(max_rows).itertuples(index=False)],
        "more": len(table) if len(table) > max_rows else 0,
    }


def models_table(ds: xr.Dataset) -> pd.DataFrame:
    """Model, parameters, checkpoints done, last done step and its validation perplexity."""
    rows = []
    for m, model in enumerate(ds["model"].values):
        done = np.asarray(ds["done"].values[m], bool)
        step = np.asarray(ds["step"].values[m], float)
        last = np.flatnonzero(done & np.isfinite(step))
        last = last[np.argmax(step[last])] if len(last) else None
        rows.append(
            {
                "model": str(model),
                "parameters": int(ds["n_params"].values[m]) if "n_params" in ds.coords else "",
                "checkpoints done": f"{int(done.sum())} of {int(np.isfinite(step).sum())}",
                "last done step": float(step[last]) if last is not None else np.nan,
                "validation perplexity there": float(ds["val_ppl"].values[m, last]) if last is not None else np.nan,
            }
        )
    return pd.DataFrame(rows)


def section(outcome: Outcome, files: dict[str, Path], folder: Path) -> dict:
    """What the template shows of one study that ran; `files` as written by `save` under folder."""
    result = outcome.result
    png = base64.b64encode(files["png"].read_bytes()).decode("ascii")
    return {
        "name": outcome.name,
        "title": result.title,
        "image": f"data:image/png;base64,{png}",
        "findings": result.findings,
        "notes": outcome.notes,
        "tables": [(name, table_view(result.tables[name])) for name in result.shown],
        "html": result.html,
        "files": [(path.name, path.relative_to(folder).as_posix()) for path in files.values()],
    }


def environment() -> jinja2.Environment:
    """The template environment: templates from the package, autoescape on for every template."""
    return jinja2.Environment(
        loader=jinja2.PackageLoader("tokendyn.pipelines", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )


def render(store: Path, ds: xr.Dataset, sections: list[dict], skipped: list[Outcome]) -> str:
    """The report page: header, model table, contents, one section per study that ran, the skipped ones."""
    return (
        environment()
        .get_template(TEMPLATE)
        .render(
            store=str(store),
            store_name=store.name,
            version=tokendyn.__version__,
            written=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            models=table_view(models_table(ds)),
            sections=sections,
            skipped=skipped,
        )
    )

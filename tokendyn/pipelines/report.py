"""`tokendyn report`: run the studies of the `analyses` package on a store and write one HTML page.

Layout of the output folder:

    index.html              the report: every figure embedded as base64 PNG, so the file alone can be mailed
    <study>/figure.png|svg  each study's figure
    <study>/<table>.csv     its tidy tables
    <study>/findings.txt    its findings

A study whose data the store lacks raises `Skip`; the page lists it with the reason. Every piece of
text that comes from the store (token text, set and model names, paths) is HTML-escaped.
"""

from __future__ import annotations

import base64
import datetime
import html
import importlib
import shutil
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
from tqdm import tqdm

import tokendyn.studies as analyses
import tokendyn
from tokendyn.studies.study import Result, save
from tokendyn.pipelines.analyze import Skip
from tokendyn.errors import TokendynError
from tokendyn.store import open_store

INDEX = "index.html"
MAX_ROWS = 60  # rows of a table printed in the page; the CSV has all

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1150px; margin: 2em auto; padding: 0 1em; color: #222;
       line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
.meta { color: #555; } code { background: #f3f3f3; padding: 0 0.2em; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 0.2em 0.5em; text-align: left; vertical-align: top; }
th { background: #f6f6f6; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.findings li { margin: 0.25em 0; } .notes { color: #8a5a00; font-size: 0.9em; } .files { font-size: 0.9em; }
details { margin: 0.5em 0; } summary { cursor: pointer; color: #225; }
"""


@dataclass
class Outcome:
    """One study's part of the report: its result, or why it was skipped; warnings raised while it ran."""

    name: str
    result: Result | None = None
    skipped: str | None = None
    notes: list[str] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)


def study_names() -> list[str]:
    """The studies a report runs, in order (`analyses.STUDIES`)."""
    return list(analyses.STUDIES)


def run_study(name: str, ds: xr.Dataset, folder: Path, options: dict | None = None) -> Outcome:
    """Run one study and save it into folder (replaced); a `Skip` or a user-level `TokendynError`
    becomes a skipped outcome (and no folder)."""
    module = importlib.import_module(f"tokendyn.studies.{name}")
    if folder.exists():
        shutil.rmtree(folder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("ignore", RuntimeWarning)  # NaN arithmetic on padding and missing checkpoints
        warnings.filterwarnings("ignore", message="Glyph .* missing")  # token text the font cannot draw
        try:
            outcome = Outcome(name, result=module.run(ds, **(options or {})))
            outcome.files = save(outcome.result, folder)
        except (Skip, TokendynError) as reason:
            outcome = Outcome(name, skipped=str(reason))
    outcome.notes = list(dict.fromkeys(str(w.message) for w in caught if w.category.__module__.startswith("tokendyn")))
    return outcome


def default_folder(store: Path) -> Path:
    """`path/toy.zarr` -> `path/toy.report`."""
    return store.with_name(store.name.removesuffix(".zarr") + ".report")


def write_report(store: str | Path, out_dir: str | Path | None = None, studies: Sequence[str] | None = None,
                 options: dict[str, dict] | None = None, progress: bool = True,
                 echo: Callable[[str], None] | None = None) -> Path:
    """Run the studies (all of `analyses.STUDIES`, or those named) on the store's main set and write
    the report into out_dir (default: beside the store, `<name>.report`). Returns the path of index.html.

    options: keyword arguments per study, e.g. {"trend_categories": {"x": "index"}}. The folders of
    the studies in out_dir are replaced; other files there are left alone. echo: called with one
    line per study (done, or skipped and why).
    """
    store = Path(store)
    names = study_names() if studies is None else list(studies)
    unknown = sorted(set(names) - set(study_names()))
    if unknown:
        raise TokendynError(f"unknown stud{'ies' if len(unknown) > 1 else 'y'} {', '.join(unknown)}; "
                            f"choose from {', '.join(study_names())}")
    ds = open_store(store)
    out = Path(out_dir) if out_dir is not None else default_folder(store)
    out.mkdir(parents=True, exist_ok=True)
    outcomes = []
    bar = tqdm(names, desc="report", unit="study", disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)
        outcome = run_study(name, ds, out / name, (options or {}).get(name))
        outcomes.append(outcome)
        if echo:
            echo(f"{name}: skipped ({outcome.skipped})" if outcome.skipped else
                 f"{name}: {len(outcome.result.findings)} findings")
            for note in outcome.notes:
                echo(f"{name}: warning: {note}")
    index = out / INDEX
    index.write_text(render(store, ds, outcomes, out), encoding="utf-8")
    return index


# --- HTML -------------------------------------------------------------------------------------------

def esc(value: object) -> str:
    """Any value as HTML text, escaped (quotes too, so it is safe inside attributes)."""
    return html.escape(str(value), quote=True)


def _cell(value: object) -> str:
    if isinstance(value, (float, np.floating)):
        return f'<td class="num">{"" if np.isnan(value) else esc(f"{value:.4g}")}</td>'
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return f'<td class="num">{esc(value)}</td>'
    return f"<td>{esc(value)}</td>"


def table_html(table: pd.DataFrame, max_rows: int = MAX_ROWS) -> str:
    """A DataFrame as an HTML table, every header and cell escaped; at most max_rows rows."""
    head = "".join(f"<th>{esc(c)}</th>" for c in table.columns)
    rows = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>"
                   for row in table.head(max_rows).itertuples(index=False))
    more = f"<p>First {max_rows} of {len(table)} rows; the CSV has all.</p>" if len(table) > max_rows else ""
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>{more}"


def models_table(ds: xr.Dataset) -> pd.DataFrame:
    """Model, parameters, checkpoints done, last done step and its validation perplexity."""
    rows = []
    for m, model in enumerate(ds["model"].values):
        done = np.asarray(ds["done"].values[m], bool)
        step = np.asarray(ds["step"].values[m], float)
        last = np.flatnonzero(done & np.isfinite(step))
        last = last[np.argmax(step[last])] if len(last) else None
        rows.append({"model": str(model),
                     "parameters": int(ds["n_params"].values[m]) if "n_params" in ds.coords else "",
                     "checkpoints done": f"{int(done.sum())} of {int(np.isfinite(step).sum())}",
                     "last done step": float(step[last]) if last is not None else np.nan,
                     "validation perplexity there": float(ds["val_ppl"].values[m, last]) if last is not None else np.nan})
    return pd.DataFrame(rows)


def _image(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{esc(alt)}">'


def _section(number: int, outcome: Outcome, out: Path) -> str:
    result = outcome.result
    parts = [f'<section id="{esc(outcome.name)}"><h2>{number}. {esc(result.title)}</h2>',
             _image(outcome.files["png"], result.title),
             '<ul class="findings">' + "".join(f"<li>{esc(line)}</li>" for line in result.findings) + "</ul>"]
    if outcome.notes:
        parts.append('<p class="notes">Warnings: ' + "; ".join(esc(n) for n in outcome.notes) + "</p>")
    for name in result.shown:
        parts.append(f"<details open><summary>{esc(name)}</summary>{table_html(result.tables[name])}</details>")
    links = [f'<a href="{esc(path.relative_to(out).as_posix())}">{esc(path.name)}</a>'
             for path in outcome.files.values()]
    parts.append(f'<p class="files">Files: {" · ".join(links)}</p></section>')
    return "\n".join(parts)


def render(store: Path, ds: xr.Dataset, outcomes: list[Outcome], out: Path) -> str:
    """The report page: header, model table, contents, one section per study that ran, the skipped ones."""
    done = [o for o in outcomes if o.result is not None]
    skipped = [o for o in outcomes if o.result is None]
    contents = "".join(f'<li><a href="#{esc(o.name)}">{esc(o.result.title)}</a></li>' for o in done)
    if skipped:
        contents += f'<li><a href="#skipped">Skipped studies ({len(skipped)})</a></li>'
    written = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    body = ["<h1>tokendyn report</h1>",
            f'<p class="meta">Store <code>{esc(store)}</code> · tokendyn {esc(tokendyn.__version__)} · '
            f"written {esc(written)} · methods: Xia et al. 2023 and related work (methods.md)</p>",
            table_html(models_table(ds)),
            f"<nav><h2>Contents</h2><ol>{contents}</ol></nav>",
            *(_section(i + 1, o, out) for i, o in enumerate(done))]
    if skipped:
        body.append('<section id="skipped"><h2>Skipped studies</h2><ul>' +
                    "".join(f"<li><b>{esc(o.name)}</b>: {esc(o.skipped)}</li>" for o in skipped) + "</ul></section>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>tokendyn report: {esc(store.name)}</title><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")

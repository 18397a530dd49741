"""`tokendyn report STORE --out DIR`: figures, tables and findings of every study the store has data for,
in one HTML page."""

from __future__ import annotations

import argparse
from pathlib import Path

from tokendyn import memory
from tokendyn.cli.analyze import StudyDefaults, add_study_options, comma_list, study_options
from tokendyn.cli.options import add_quiet, warn_if_damaged


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        help="write an HTML report with a figure and findings per study (one self-contained file)",
        formatter_class=StudyDefaults,
        description="Run the studies (tokendyn.studies.STUDIES, the same as tokendyn analyze) on the store's main "
        "set and write DIR/index.html with every figure embedded, so the one file can be mailed, plus "
        "each study's PNG/SVG figure, CSV tables and findings in DIR/<study>/. Studies whose data the "
        "store lacks are listed with the reason; when every study is skipped nothing is written. The "
        "folder is replaced only when the report is complete, and only if tokendyn wrote it. Methods: "
        "docs/methods.md.",
    )
    p.add_argument("store", type=Path, help="store path (from `tokendyn extract`)")
    p.add_argument(
        "--out",
        type=Path,
        help="output folder (default: beside the store, STORE.report); replaced "
        "whole, and refused if it holds files tokendyn did not write",
    )
    p.add_argument(
        "--studies",
        type=comma_list,
        help="only these studies, comma-separated (default: all; see tokendyn.studies.STUDIES)",
    )
    add_study_options(p)
    add_quiet(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from tokendyn.pipelines.report import write_report

    memory.use(memory.ANALYSIS)  # as `tokendyn analyze`: the studies' peak stays flat in the number of tokens
    warn_if_damaged(args.store)
    index = write_report(
        args.store, args.out, studies=args.studies, options=study_options(args), progress=not args.quiet, echo=print
    )
    print(f"report written: {index}")

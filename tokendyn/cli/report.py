"""`tokendyn report STORE --out DIR`: figures, tables and findings of every study the store has data for, in one HTML page."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="write an HTML report with a figure and findings per study (one self-contained file)",
        description="Run the studies of the analyses package on the store's main set (validation perplexity, "
                    "trend categories next to the paper's OPT numbers, subset curves, per-token double descent, "
                    "cross-size agreement, clusters, Chang et al.'s measures, the named sets' perplexity, pair "
                    "preference, task accuracy against loss) and write DIR/index.html with every figure embedded, "
                    "so the one file can be mailed, plus each study's PNG/SVG figure and CSV tables in DIR/<study>/. "
                    "Studies whose data the store lacks are listed with the reason.")
    p.add_argument("store", type=Path, help="store path (from `tokendyn extract`)")
    p.add_argument("--out", type=Path, help="output folder (default: beside the store, STORE.report); "
                                            "its study folders and index.html are replaced")
    p.add_argument("--studies", type=lambda t: [s for s in t.split(",") if s],
                   help="only these studies, comma-separated (default: all; see analyses.STUDIES)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from tokendyn.pipelines.report import write_report

    index = write_report(args.store, args.out, studies=args.studies, progress=not args.quiet, echo=print)
    print(f"report written: {index}")

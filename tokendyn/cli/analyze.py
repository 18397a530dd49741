"""`tokendyn analyze STORE`: run every study the store has data for and write its results next to it.

The analysis options of `analyze` and `report` (`add_study_options`) are study parameters: each
maps onto the parameters listed in `STUDY_OPTIONS`, and its default is the study's (shown in
`--help`, read from the study's signature), so no default is restated here.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from tokendyn import memory
from tokendyn.cli.options import add_quiet, warn_if_damaged

# option dest -> the (study, parameter) pairs it sets; the first one's default is shown in --help
STUDY_OPTIONS = {
    "start": [("trend_categories", "start")],
    "trend_x": [("trend_categories", "x"), ("subset_curves", "x"), ("token_view", "x")],
    "levels": [("perplexity", "levels"), ("sequence_perplexity", "levels")],
    "dd_tol": [("double_descent", "tol")],
    "dd_min_fall": [("double_descent", "min_fall")],
    "n_clusters": [("clusters", "n_clusters")],
    "cluster_method": [("clusters", "method")],
    "turn_tol": [("sequence_perplexity", "tol")],
    "sequence_by": [("sequence_perplexity", "by")],
}


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err


def _fractions(text: str) -> list[float]:
    values = _floats(text)
    if not values or not all(0 <= v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected fractions in [0, 1), e.g. 0.2,0.5, got {text!r}")
    return values


def _perplexities(text: str) -> list[float]:
    values = _floats(text)
    if not values or not all(math.isfinite(v) and v >= 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected perplexities of at least 1, e.g. 40,30,20, got {text!r}")
    return values


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from err
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _n_clusters(text: str) -> int | str:
    if text in ("auto", "shapes"):
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected 'shapes', 'auto' or a positive number, got {text!r}")
    return int(text)


def comma_list(text: str) -> list[str]:
    return [s for s in text.split(",") if s]


class StudyDefaults(argparse.HelpFormatter):
    """Help that shows a study option's default, read from the study's signature, and the study names
    after --studies, when help is printed (so the studies, and matplotlib, are imported only then)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.dest == "studies" and action.help is not None:
            from tokendyn.studies import STUDIES

            return action.help.replace("see tokendyn.studies.STUDIES", ", ".join(STUDIES))
        targets = STUDY_OPTIONS.get(action.dest)
        if not targets or action.help is None:
            return action.help
        from tokendyn.studies import STUDIES
        from tokendyn.studies.study import default_of

        default = default_of(STUDIES[targets[0][0]], targets[0][1])
        shown = ",".join(f"{v:g}" for v in default) if isinstance(default, (tuple, list)) else default
        where = ", ".join(f"{study}.{param}" for study, param in targets)
        text = f"{action.help} (study parameter {where}" + ("" if default is None else f"; default {shown}") + ")"
        return text.replace("%", "%%")


def add_study_options(p: argparse.ArgumentParser) -> None:
    """The options that set study parameters (see STUDY_OPTIONS); unset, each study uses its default."""
    p.add_argument("--start", type=_fractions, help="trend start fractions, comma-separated")
    p.add_argument(
        "--trend-x",
        choices=["log_step", "index"],
        help="trend regression x: log(step) (released code) or checkpoint index (paper text)",
    )
    p.add_argument(
        "--levels",
        type=_perplexities,
        help="matched validation perplexity levels, comma-separated (default: levels every model reaches)",
    )
    p.add_argument("--dd-tol", type=_tolerance, help="double-descent tolerance in nats: the least rise and second fall")
    p.add_argument(
        "--dd-min-fall",
        type=_tolerance,
        help="double descent's least first fall in nats (default: --dd-tol; 0: any fall, docs/methods.md §1.3)",
    )
    p.add_argument(
        "--n-clusters",
        type=_n_clusters,
        help="number of clusters, 'shapes' (one cluster per trajectory shape found) or 'auto' (k by silhouette or BIC)",
    )
    p.add_argument("--cluster-method", choices=["kmeans", "gmm"], help="clustering estimator")
    p.add_argument(
        "--turn-tol",
        type=_tolerance,
        help="a set's perplexity curve turns when it rises this much (in log) above its minimum",
    )
    p.add_argument(
        "--sequence-by",
        help="split a set's perplexity by this document field (mixture: one curve per "
        "generation mixture); 'none' to keep sets whole",
    )


def study_options(args: argparse.Namespace) -> dict[str, dict]:
    """Keyword arguments per study from the options given on the command line."""
    options: dict[str, dict] = {}
    for dest, targets in STUDY_OPTIONS.items():
        value = getattr(args, dest)
        if value is None:
            continue
        if dest == "sequence_by" and value == "none":
            value = None  # explicitly: sets kept whole
        for study, param in targets:
            options.setdefault(study, {})[param] = value
    return options


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "analyze",
        help="run every study the store has data for and write tables, labels and findings next to it",
        formatter_class=StudyDefaults,
        description="Run every study the store has data for (tokendyn.studies.STUDIES: validation perplexity and "
        "matched perplexity, trend categories, subset curves, double descent, cross-size agreement, "
        "clusters, per-token curve measures and Rho-1 classes; the perplexity of every evaluation set "
        "and true/false pairs; task metrics and emergence thresholds, PassUntil and skill curves) and "
        "write their results to a folder beside the store (toy.zarr -> toy.analysis/): tidy CSV "
        "tables, labels.zarr with one group of per-token results per analysis, and findings.txt. "
        "Prints the findings; studies whose data the store lacks are reported as skipped, and when "
        "every study is skipped nothing is written. The folder is replaced only when the run "
        "completes, and only if tokendyn wrote it. "
        "Methods: docs/methods.md; outputs: docs/analyses.md.",
    )
    p.add_argument("store", type=Path, help="store path (from `tokendyn extract`)")
    p.add_argument("--set", default="main", help="evaluation set to analyse (default: main)")
    p.add_argument(
        "--out",
        type=Path,
        help="output folder (default: beside the store, STORE.analysis); replaced "
        "whole, and refused if it holds files tokendyn did not write",
    )
    p.add_argument(
        "--studies",
        "--steps",
        dest="studies",
        type=comma_list,
        help="only these studies, comma-separated (default: all; see tokendyn.studies.STUDIES; the "
        "former step names trends, curves, sequence_ppl, pairs and tasks are accepted)",
    )
    add_study_options(p)
    add_quiet(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from tokendyn.pipelines.analyze import analyze, default_folder
    from tokendyn.store import open_store

    memory.use(memory.ANALYSIS)  # the peak stays flat in the number of tokens (tokendyn.memory)
    warn_if_damaged(args.store)
    ds = open_store(args.store, set=args.set)
    folder = args.out or default_folder(args.store, args.set)
    lines = analyze(ds, folder, study_options(args), only=args.studies, progress=not args.quiet)
    print("\n".join(lines))
    print(f"results written to {folder}")

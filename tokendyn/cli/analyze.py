"""`tokendyn analyze STORE`: every token-trajectory analysis the store has data for, written next to it."""

from __future__ import annotations

import argparse
from pathlib import Path


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err


def _n_clusters(text: str) -> int | str:
    if text in ("auto", "shapes"):
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected 'shapes', 'auto' or a positive number, got {text!r}")
    return int(text)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "analyze", help="run every analysis the store has data for and write tables and labels next to it",
        description="Run every analysis the store has data for (matched perplexity, trend categories and "
                    "subset curves, double descent, cross-size agreement, per-token curve measures, Rho-1 "
                    "classes, trajectory clusters; the perplexity of every evaluation set and true/false pairs; task metrics, "
                    "emergence thresholds, PassUntil and skill curves) and write them to a folder beside the store "
                    "(toy.zarr -> toy.analysis/): tidy CSV tables, and labels.zarr with one group of "
                    "per-token results per analysis. Prints a short summary; steps whose data the store "
                    "lacks are reported as skipped. Methods: docs/methods.md.")
    p.add_argument("store", type=Path, help="store path (from `tokendyn extract`)")
    p.add_argument("--set", default="main", help="evaluation set to analyse (default: main)")
    p.add_argument("--out", type=Path, help="output folder (default: beside the store, STORE.analysis; "
                                            "its previous contents are replaced)")
    p.add_argument("--steps", type=lambda t: [s for s in t.split(",") if s],
                   help="only these steps, comma-separated (perplexity, trends, double_descent, agreement, "
                        "curves, clusters, and any added by other analyses)")
    p.add_argument("--start", type=_floats, help="trend start fractions (default 0.1,0.2,0.4,0.7)")
    p.add_argument("--trend-x", choices=["log_step", "index"],
                   help="trend regression x: log(step) (released code, default) or checkpoint index (paper text)")
    p.add_argument("--levels", type=_floats,
                   help="matched validation perplexity levels (default: 20 levels every model reaches)")
    p.add_argument("--dd-tol", type=float, help="double-descent tolerance in nats (default 0.5)")
    p.add_argument("--n-clusters", type=_n_clusters, help="number of clusters, 'shapes' (one cluster per trajectory shape found; the default) "
                   "or 'auto' (k by silhouette or BIC)")
    p.add_argument("--cluster-method", choices=["kmeans", "gmm"], help="clustering estimator (default kmeans)")
    p.add_argument("--turn-tol", type=float,
                   help="a set's perplexity curve turns when it rises this much (in log) above its minimum "
                        "(default 0.05)")
    p.add_argument("--sequence-by", help="split a set's perplexity by this document field (default: mixture, "
                                         "one curve per generation mixture); 'none' to keep sets whole")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from tokendyn.pipelines.analyze import analyze, default_folder
    from tokendyn.store import open_store

    ds = open_store(args.store, set=args.set)
    folder = args.out or default_folder(args.store, args.set)
    options = {"start": args.start, "trend_x": args.trend_x, "levels": args.levels, "dd_tol": args.dd_tol,
               "n_clusters": args.n_clusters, "cluster_method": args.cluster_method, "turn_tol": args.turn_tol,
               "sequence_by": "" if args.sequence_by == "none" else args.sequence_by}
    lines = analyze(ds, folder, options, only=args.steps, progress=not args.quiet)
    print("\n".join(lines))
    print(f"results written to {folder}")

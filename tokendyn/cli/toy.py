"""`tokendyn toy build --out DIR`: train the built-in suite of tiny OPT models on a synthetic world."""

from __future__ import annotations

import argparse
from pathlib import Path

from tokendyn.cli.options import add_quiet, count, seed_value


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "toy",
        help="the built-in suite: tiny OPT models trained offline on a synthetic world",
        description="Work with the built-in suite: a seeded synthetic world of entities and facts, a word-level "
        "tokenizer and a few OPT sizes trained on it with the same data order, checkpointed "
        "along the way. No downloads.",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    b = actions.add_parser(
        "build",
        help="build (or reuse) the suite and print the path of its suite.toml",
        description="Generate the world and its evaluation sets, train every model size and write a suite "
        "directory that `tokendyn extract` reads. A finished build with the same parameters is "
        "reused; any change of parameters rebuilds. The 'default' preset takes minutes on a "
        "laptop CPU, 'quick' takes seconds.",
    )
    b.add_argument(
        "--out",
        type=Path,
        default=None,
        help="suite directory (default: cache/suites/<preset>-<key>, or under $TOKENDYN_CACHE)",
    )
    b.add_argument(
        "--preset",
        default="default",
        help="size of the build: default (the demo's) or quick (seconds; what the tests use)",
    )
    b.add_argument(
        "--sizes",
        nargs="+",
        default=None,
        metavar="SIZE",
        help="model sizes to train, e.g. S L (default: all sizes of the preset)",
    )
    b.add_argument("--seed", type=seed_value, default=0, help="seeds the world, the text and the weights (default: 0)")
    b.add_argument(
        "--threads", type=count, default=1, help="torch CPU threads while training; weights depend on it (default: 1)"
    )
    b.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_quiet(b)
    b.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from tokendyn.toy.build import build

    suite = build(
        args.out,
        preset=args.preset,
        sizes=args.sizes,
        seed=args.seed,
        progress=not (args.no_progress or args.quiet),
        threads=args.threads,
    )
    print(f"suite ready: {suite}  (score it with: tokendyn extract {suite} --out STORE.zarr)")

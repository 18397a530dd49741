"""`tokendyn verify STORE`: check that a store holds what its flags and metadata claim."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "verify",
        help="check a store: every done checkpoint has its chunks and values, metadata is consistent",
        description="Check every done checkpoint of every set and PassUntil task of STORE: all its chunks are on "
        "disk and it holds values (not NaN everywhere); every array's own zarr.json agrees with the "
        "consolidated metadata. Reads the whole store; never writes. Exit status 0 if the store is "
        "sound, 1 if not. Rerunning the extract command repairs what verify finds: damaged "
        "checkpoints are recomputed and lost metadata is restored.",
    )
    p.add_argument("store", type=Path, help="store path")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tokendyn.store import read_attrs, verify

    read_attrs(args.store)  # a one-line error for anything but a tokendyn store
    problems = verify(args.store, full=True)
    if not problems:
        print(f"store {args.store}: sound (every done checkpoint has all its chunks and values)")
        return 0
    for problem in problems:
        print(f"{args.store}/{problem}")
    fix = "rerun the extract command to repair it" if all(p.repairable for p in problems) else "write a new store"
    print(f"store {args.store}: {len(problems)} problem(s); {fix}")
    return 1

"""`tokendyn download SUITE`: fetch every hub revision of a suite into the Hugging Face cache in advance."""

from __future__ import annotations

import argparse
from pathlib import Path

from tokendyn.cli.options import add_quiet


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "download",
        help="fetch every hub revision of a suite in advance (for nodes without internet)",
        description="List the files `tokendyn extract` will fetch for every hub checkpoint of SUITE with their "
        "sizes (from the hub's metadata), print the total, then download what the Hugging Face "
        "cache lacks (HF_HOME / HF_HUB_CACHE). Interrupted downloads resume on a rerun; revisions "
        "with identical weight files are reported from the hub's hashes without reading them. "
        "Run extract on the compute nodes with HF_HUB_OFFLINE=1 and the same cache.",
    )
    p.add_argument("suite", type=Path, help="suite description (TOML)")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="also fetch pickle weights (pytorch_model*.bin) for checkpoints without safetensors",
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan and the total size; download nothing")
    add_quiet(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from tokendyn.config.suite import load_suite
    from tokendyn.models.download import download, identical, plan, unique_bytes

    revisions = plan(load_suite(args.suite), allow_pickle=args.allow_pickle)
    if not revisions:
        print("the suite has no hub checkpoints: nothing to download")
        return
    total, missing = sum(unique_bytes(revisions)), sum(unique_bytes(revisions, missing_only=True))
    print(f"{len(revisions)} hub revisions, {_size(total)} in all; {_size(missing)} still to download")
    for earlier, later in identical(revisions):
        print(f"identical weights: {later.source} = {earlier.source} (the cache stores them once)")
    if not args.dry_run:
        download(revisions, allow_pickle=args.allow_pickle, progress=not args.quiet)
        print(
            "done: every revision is in the Hugging Face cache; on the compute nodes run "
            f"HF_HUB_OFFLINE=1 tokendyn extract {args.suite} --out STORE"
        )


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"

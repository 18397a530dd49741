"""`tokendyn extract SUITE --out STORE`: score every checkpoint of a suite into a Zarr store."""

from __future__ import annotations

import argparse
from pathlib import Path

from tokendyn import store


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "extract", help="score every checkpoint of a suite into a Zarr store",
        description="Score the evaluation text of SUITE with every checkpoint of every model and write the "
                    "per-token loss (and optional metrics) into a Zarr store. Rerunning the same command "
                    "resumes: complete checkpoints are skipped, interrupted ones recomputed.")
    p.add_argument("suite", type=Path, help="suite description (TOML)")
    p.add_argument("--out", type=Path, required=True, help="store path (a directory ending in .zarr)")
    p.add_argument("--metrics", default=None,
                   help="comma-separated per-token metrics among loss,entropy,rank (default: the store's, else loss)")
    p.add_argument("--device", default="cpu", help="cpu, cuda[:N] or mps (default: cpu)")
    p.add_argument("--dtype", default="float32", help="model precision: float32, bfloat16 or float16 (default: float32)")
    p.add_argument("--store-dtype", default=None, choices=store.STORE_DTYPES,
                   help="on-disk precision (default: float32; float16 halves the store)")
    p.add_argument("--batch-tokens", type=int, default=8192, help="tokens per forward pass (default: 8192)")
    p.add_argument("--force", action="store_true", help="recompute checkpoints that are already complete")
    p.add_argument("--allow-pickle", action="store_true",
                   help="load pickle checkpoints (pytorch_model.bin); only for weights you trust")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run model code shipped with a hub checkpoint; only for code you trust")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from tokendyn.extract import extract

    metrics = None if args.metrics is None else [m.strip() for m in args.metrics.split(",") if m.strip()]
    out = extract(args.suite, args.out, metrics=metrics, device=args.device, dtype=args.dtype,
                  store_dtype=args.store_dtype, batch_tokens=args.batch_tokens, force=args.force,
                  allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
                  progress=not args.no_progress)
    print(f"store written: {out}  (inspect with: tokendyn info {out})")

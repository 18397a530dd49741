"""`tokendyn extract SUITE --out STORE`: score every checkpoint of a suite into a Zarr store."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from tokendyn import memory, store
from tokendyn.cli.options import add_batch_options, add_model_options, count, model_options, seed_value, window
from tokendyn.config.suite import EvalSet, Suite, load_suite, parse_set_table
from tokendyn.errors import TokendynError
from tokendyn.models import fingerprint

# --model without --seq-len: windows of the model's context, capped here (long windows cost memory)
QUICK_SEQ_LEN = 1024


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "extract",
        help="score every checkpoint of a suite into a Zarr store",
        description="Score the evaluation text of SUITE with every checkpoint of every model and write the "
        "per-token loss (and optional metrics) into a Zarr store. Rerunning the same command "
        "resumes: complete checkpoints are skipped, interrupted ones recomputed.",
    )
    p.add_argument("suite", type=Path, nargs="?", help="suite description (TOML); or use --model and --text")
    p.add_argument("--out", type=Path, required=True, help="store path (a directory ending in .zarr)")
    p.add_argument(
        "--model",
        action="append",
        default=[],
        dest="models",
        metavar="PATH_OR_HUB_ID[@REVISION]",
        help="score this model without a suite file: a checkpoint folder, a folder of checkpoint "
        "folders (checkpoint-N, stepN, global_stepN) or a glob, or a hub id with an optional "
        "revision or revision pattern (org/name@step1000, org/name@step*, org/name@all); "
        "repeatable; the generated suite is written next to the store (STORE.suite.toml)",
    )
    p.add_argument(
        "--text",
        action="append",
        default=[],
        dest="texts",
        metavar="FILE",
        help="the text --model scores (.txt or .jsonl, or a glob pattern); repeatable",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        metavar="PATH_OR_HUB_ID",
        help="the tokenizer --model scores with: a folder or a hub id (default: the checkpoints' own; "
        "without one, the run folder's: the --model folder or the folder around the checkpoints)",
    )
    p.add_argument(
        "--seq-len",
        type=window,
        default=None,
        help=f"tokens per sequence with --model (default: the model's context, at most {QUICK_SEQ_LEN})",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        dest="sets",
        metavar="NAME=FILE",
        help="also score FILE (.txt or .jsonl, or a glob pattern) as the named set NAME; "
        "NAME:R1,R2=FILE adds copies with a fraction R of the tokens replaced by random tokens, "
        "named NAME-R1, NAME-R2 (e.g. corrupted:0.2,0.4=valid.txt); repeatable",
    )
    p.add_argument(
        "--pairs",
        action="append",
        default=[],
        metavar="[NAME=]FILE",
        help='score a JSONL of true/false pairs ({"true": ..., "false": ...} per line) as the set NAME '
        "(default: the file name without extension); repeatable",
    )
    p.add_argument(
        "--corrupt-seed",
        type=seed_value,
        default=0,
        help="seed of the random token replacement of NAME:R sets (default: 0)",
    )
    p.add_argument(
        "--metrics",
        default=None,
        help="comma-separated per-token metrics among loss,entropy,rank (default: the store's, else loss)",
    )
    p.add_argument(
        "--store-dtype",
        default=None,
        choices=store.STORE_DTYPES,
        help="on-disk precision (default: float32; float16 halves the store)",
    )
    add_batch_options(p)
    p.add_argument("--force", action="store_true", help="recompute checkpoints that are already complete")
    p.add_argument(
        "--workers",
        type=count,
        default=None,
        help="score on a local dask cluster of N worker processes, one task per checkpoint (with "
        "--device cuda: one worker per GPU; dask-cuda's LocalCUDACluster when installed)",
    )
    p.add_argument(
        "--scheduler",
        default=None,
        metavar="ADDRESS",
        help="score on the existing dask cluster at ADDRESS (e.g. tcp://host:8786); every worker "
        "must see the store's path and the checkpoints; see docs/scale.md",
    )
    p.add_argument(
        "--prefetch",
        type=int,
        default=1,
        metavar="K",
        help="download the next K hub checkpoints while one is scored (default: 1; 0: no prefetch); "
        "on a cluster, K per worker (workers need the resources score=1 fetch=1; see docs/scale.md)",
    )
    p.add_argument(
        "--evict",
        action="store_true",
        help="delete each hub revision this run downloaded from the Hugging Face cache once it is "
        "scored (revisions cached before the run are kept); on a cluster, the workers must share one cache",
    )
    add_model_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    memory.use(memory.SCORING)  # every batch's activations stay on the heap (tokendyn.memory)
    metrics = None if args.metrics is None else [m.strip() for m in args.metrics.split(",") if m.strip()]
    if args.scheduler is not None and args.workers is not None:
        raise TokendynError("give --scheduler (an existing cluster) or --workers (a new local one), not both")
    suite, written, restore = _suite_argument(args)
    from tokendyn.models.extract import extract  # torch and transformers: after `_hash_ahead`

    before = _stamp(args.out)
    try:
        extra_sets = []
        if args.sets or args.pairs:
            seq_len = load_suite(suite).eval.seq_len
            extra_sets += [s for option in args.sets for s in parse_set_option(option, seq_len, args.corrupt_seed)]
            extra_sets += [parse_pairs_option(option, seq_len) for option in args.pairs]
        out = extract(
            suite,
            args.out,
            extra_sets=extra_sets,
            metrics=metrics,
            store_dtype=args.store_dtype,
            batch_tokens=args.batch_tokens,
            batch_size=args.batch_size,
            force=args.force,
            scheduler=args.scheduler,
            workers=args.workers,
            prefetch=args.prefetch,
            evict=args.evict,
            **model_options(args),
        )
    except TokendynError:
        restore()  # a refused run leaves the generated suite as it found it
        raise
    if written is not None:  # reported only now: a refused run takes the file back
        print(written)
    done = "store written" if _stamp(out) != before else "store up to date, nothing to score"
    print(f"{done}: {out}  (inspect with: tokendyn info {out})")


def _hash_ahead(suite: Suite, args: argparse.Namespace) -> None:
    """Start hashing the weights of the suite's first checkpoint before torch and transformers are imported
    (`fingerprint.hash_ahead`: mostly on the core the imports leave idle; a small measured gain), when it is
    the first this process scores: a local folder (a hub blob is named by its hash), a new store (a store being
    resumed or grown has mostly scored it) and no cluster (its workers hash what they score)."""
    first = suite.models[0].checkpoints[0]
    if first.path is not None and not args.out.exists() and args.scheduler is None and args.workers is None:
        fingerprint.hash_ahead(first.path)


def _stamp(store: Path) -> int | None:
    """When the store's root metadata last changed: every commit and repair rewrites it."""
    try:
        return (Path(store) / "zarr.json").stat().st_mtime_ns
    except OSError:
        return None


def _suite_argument(args: argparse.Namespace) -> tuple[Path, str | None, Callable[[], None]]:
    """The suite file (SUITE, or one generated from --model and --text next to the store), the line that
    reports a generated one (None for SUITE), and a function that undoes the generation."""
    if args.suite is not None:
        if args.models or args.texts:
            raise TokendynError("give a suite file or --model/--text, not both (add the models to the suite file)")
        if args.seq_len is not None:
            raise TokendynError("--seq-len applies only with --model; set seq_len in the suite file's [eval] table")
        if args.tokenizer is not None:
            raise TokendynError("--tokenizer applies only with --model; set tokenizer in the suite file's [eval] table")
        _hash_ahead(load_suite(args.suite), args)
        return args.suite, None, lambda: None
    from tokendyn.config.quick import quick_suite, restore_generated, write_generated
    from tokendyn.config.suite import parse_suite

    suite = quick_suite(args.models, args.texts, args.seq_len or QUICK_SEQ_LEN, args.tokenizer)
    parsed = parse_suite(suite, base=Path.cwd())
    _hash_ahead(parsed, args)
    if args.seq_len is None:
        from tokendyn.models.checkpoints import context_length

        first = parsed.models[0].checkpoints[0]
        suite["eval"]["seq_len"] = min(QUICK_SEQ_LEN, context_length(first) or QUICK_SEQ_LEN)
    path, previous = write_generated(args.out, suite)
    written = f"suite written: {path}"
    if args.tokenizer is None and "tokenizer" in suite["eval"]:
        written += f" ([eval] tokenizer = {suite['eval']['tokenizer']}: the checkpoints have no tokenizer files)"
    return path, written, lambda: restore_generated(path, previous)


def parse_set_option(option: str, seq_len: int, seed: int = 0) -> list[EvalSet]:
    """`NAME=FILE` -> one text set; `NAME:R1,R2=FILE` -> corrupted sets NAME-R1, NAME-R2.

    Files resolve against the current directory; the sets take the main set's seq_len and the
    defaults of a [[sets]] table, and are validated like one.
    """
    name, files = _split(option, "--set", "NAME=FILE")
    name, _, rates = name.partition(":")
    if not rates:
        return [_eval_set(option, {"name": name, "files": files}, seq_len)]
    try:
        values = [float(rate) for rate in rates.split(",")]
    except ValueError:
        raise TokendynError(
            f"--set '{option}': corruption rates must be numbers, as in corrupted:0.2,0.4=FILE"
        ) from None
    return [
        _eval_set(option, {"name": f"{name}-{rate:g}", "files": files, "corrupt": rate, "seed": seed}, seq_len)
        for rate in values
    ]


def parse_pairs_option(option: str, seq_len: int) -> EvalSet:
    """`[NAME=]FILE` -> a set of kind "pairs" (NAME defaults to the file's stem)."""
    name, files = _split(option, "--pairs", "NAME=FILE") if "=" in option else (Path(option).stem, option)
    return _eval_set(option, {"name": name, "files": files, "kind": "pairs"}, seq_len)


def _split(option: str, flag: str, form: str) -> tuple[str, str]:
    name, _, files = option.partition("=")
    if not name.strip() or not files.strip():
        raise TokendynError(f"{flag} '{option}' is not of the form {form}")
    return name.strip(), files.strip()


def _eval_set(option: str, table: dict, seq_len: int) -> EvalSet:
    # validated exactly like a [[sets]] table of a suite file, with paths relative to the current directory
    return parse_set_table(table, f"'{option}'", Path.cwd(), seq_len)

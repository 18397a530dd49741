"""`tokendyn passuntil SUITE --task GEN.jsonl --passes 2 --max-samples 100000 --out STORE`: PassUntil sampling."""

from __future__ import annotations

import argparse
from pathlib import Path

from tokendyn import memory
from tokendyn.cli.options import add_model_options, at_least_two, count, model_options, seed_value
from tokendyn.data.tasks import DEFAULT_STOP


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "passuntil",
        help="estimate tiny pass rates: sample per instance and checkpoint until r passes (PassUntil)",
        description='For every instance of a free-generation task (JSONL lines {"prompt", "answer"}) and every '
        "checkpoint of SUITE, sample completions in batches until --passes of them pass or "
        "--max-samples are drawn. A completion passes by exact match with the answer (surrounding "
        "whitespace stripped) or by --checker. The runs go to the group passuntil/<name> of the store "
        "(the main set is scored too where not done); a rerun resumes. Read them with "
        "tokendyn.open_store(STORE).tokendyn.pass_until() or tokendyn analyze STORE.",
    )
    p.add_argument("suite", type=Path, help="suite description (TOML)")
    p.add_argument("--task", type=Path, required=True, metavar="FILE", help='JSONL of {"prompt", "answer"} lines')
    p.add_argument("--out", type=Path, required=True, help="store path (a directory ending in .zarr)")
    p.add_argument("--name", default=None, help="the task's name in the store (default: the file name)")
    p.add_argument(
        "--passes", type=at_least_two, default=2, help="passes to reach per instance, r >= 2 (default: %(default)s)"
    )
    p.add_argument(
        "--max-samples",
        type=count,
        default=100_000,
        help="cap on samples per instance and checkpoint; runs that hit it with fewer than 2 passes "
        "are censored (default: %(default)s)",
    )
    p.add_argument("--batch-size", type=count, default=256, help="completions sampled together (default: %(default)s)")
    p.add_argument(
        "--top-p",
        type=float,
        default=None,
        help="nucleus sampling with this mass (default: temperature-1 sampling from the full distribution)",
    )
    p.add_argument(
        "--new-tokens",
        type=count,
        default=None,
        help="tokens per completion (default: as many as the answer takes, per instance)",
    )
    p.add_argument(
        "--stop",
        action="append",
        default=None,
        metavar="TEXT",
        help="cut completions at this string (\\n is a newline); repeatable (default: a newline)",
    )
    p.add_argument(
        "--checker",
        default=None,
        metavar="package.module:function",
        help="pass judge called as function(completion, instance) -> bool (default: exact match); "
        "imports and runs that Python code with your permissions: name only code you trust",
    )
    p.add_argument("--seed", type=seed_value, default=0, help="seed of the sampling (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="redo the task's runs if the store has them")
    p.add_argument(
        "--every",
        type=int,
        default=1,
        metavar="K",
        help="run only at every K-th checkpoint of each model and at its last; the others stay missing in "
        "the analyses until a rerun with --every 1 fills them in, keeping the runs done (default: %(default)s)",
    )
    add_model_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from tokendyn.models.sampling import read_generation_task, run_pass_until
    from tokendyn.store.passuntil import read_runs

    memory.use(memory.SCORING)  # as `tokendyn extract` (tokendyn.memory)
    task = read_generation_task(args.task, args.name)
    out = run_pass_until(
        args.suite,
        args.out,
        task,
        passes=args.passes,
        max_samples=args.max_samples,
        batch_size=args.batch_size,
        top_p=args.top_p,
        new_tokens=args.new_tokens,
        stop=stop_strings(args.stop),
        checker=args.checker,
        seed=args.seed,
        force=args.force,
        every=args.every,
        **model_options(args),
    )
    runs = read_runs(out, task.name)
    drawn = int(runs["drawn"].where(runs["done"]).sum())
    seconds = float(runs["seconds"].where(runs["done"]).sum())
    capped = int(((runs["passes"] < args.passes) & runs["done"]).sum())
    print(
        f"passuntil {task.name}: {len(task.records)} instances x {int(runs['done'].sum())} checkpoints, "
        f"{drawn:,} completions sampled in {seconds:.1f} s, {capped} runs hit the cap; "
        f"read them with: tokendyn analyze {out}"
    )


def stop_strings(given: list[str] | None) -> tuple[str, ...]:
    """The --stop strings, `\\n` read as a newline; DEFAULT_STOP when none is given."""
    return DEFAULT_STOP if given is None else tuple(s.replace("\\n", "\n") for s in given)

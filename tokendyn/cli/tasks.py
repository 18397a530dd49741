"""`tokendyn tasks SUITE --task TASK.json --shots 2 --out STORE`: score multiple-choice tasks in context."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from tokendyn import memory
from tokendyn.cli.options import add_batch_options, add_model_options, model_options, seed_value
from tokendyn.data.tasks import DEFAULT_DELIMITER, DEFAULT_SEED, DEFAULT_SHOTS, read_task
from tokendyn.errors import TokendynError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tasks",
        help="score multiple-choice tasks (BIG-Bench JSON or JSONL) with every checkpoint",
        description="Build k-shot prompts for every item of each task (demonstrations drawn at random from the "
        "other items, seeded), and score every option by the log-probability of its tokens with "
        "every checkpoint of SUITE. Each task becomes the evaluation set task.<name> of the store "
        "(the main set is scored too where not done), so a rerun resumes. Task files: BIG-Bench JSON "
        "(examples with input and target_scores, with BIG-Bench's prefixes) or JSONL lines "
        '{"question", "choices", "answer"}. Read the results with '
        "tokendyn.open_store(STORE).tokendyn.task_scores(), or run tokendyn analyze STORE.",
    )
    p.add_argument("suite", type=Path, help="suite description (TOML)")
    p.add_argument(
        "--task",
        action="append",
        required=True,
        type=Path,
        dest="tasks",
        metavar="FILE",
        help="task file (.json in BIG-Bench's format, or .jsonl); repeatable",
    )
    p.add_argument("--out", type=Path, required=True, help="store path (a directory ending in .zarr)")
    p.add_argument("--shots", type=int, default=DEFAULT_SHOTS, help="demonstrations per prompt (default: %(default)s)")
    p.add_argument(
        "--seed",
        type=seed_value,
        default=DEFAULT_SEED,
        help="seed of the demonstrations and choice orders (default: %(default)s)",
    )
    p.add_argument("--max-items", type=int, default=None, help="keep the first N items of each task (default: all)")
    p.add_argument(
        "--name", default=None, help="the task's name (one --task only; default: the BIG-Bench name or the file name)"
    )
    p.add_argument(
        "--delimiter", default=DEFAULT_DELIMITER, help="text between a prompt and an option (default: one space)"
    )
    add_batch_options(p)
    add_model_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from tokendyn.models.tasks import score_tasks

    memory.use(memory.SCORING)  # as `tokendyn extract` (tokendyn.memory)
    if args.name is not None and len(args.tasks) > 1:
        raise TokendynError("--name names a single task; give one --task, or leave --name out")
    if args.max_items is not None and args.max_items < 2:
        raise TokendynError(f"--max-items {args.max_items} leaves too few items; keep at least 2")
    tasks = [read_task(path, args.name) for path in args.tasks]
    if args.max_items is not None:
        tasks = [replace(t, items=t.items[: args.max_items]) for t in tasks]
    out = score_tasks(
        args.suite,
        args.out,
        tasks,
        shots=args.shots,
        seed=args.seed,
        delimiter=args.delimiter,
        batch_tokens=args.batch_tokens,
        batch_size=args.batch_size,
        **model_options(args),
    )
    names = ", ".join(f"task.{t.name} ({len(t.items)} items)" for t in tasks)
    print(f"scored {names} into {out}  (read them with: tokendyn analyze {out})")

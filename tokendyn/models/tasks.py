"""Multiple-choice tasks scored in context through the extraction loop (methods.md §1.5).

The task files and prompts are read by `tokendyn.data.tasks`. Every (item, option) is one document
of a JSONL written beside the store, with a character span over delimiter + option (the per-token
field `in_option`) and the fields `item`, `option`, `answer`, `n_options`. `score_tasks` adds one
evaluation set per task, named `task.<name>`, so results live in the store and resume like any
set. An option's log-probability is minus the summed loss of its tokens (those whose first
non-space character lies in the span; a token that straddles the prompt/option boundary counts for the prompt).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from tokendyn.atomic import write_atomically
from tokendyn.config.suite import EvalSet, Suite, load_suite
from tokendyn.data.corpus import prefix_ids
from tokendyn.data.tasks import DEFAULT_DELIMITER, DEFAULT_SEED, DEFAULT_SHOTS, ChoiceTask, choice_documents
from tokendyn.errors import TokendynError
from tokendyn.models import checkpoints
from tokendyn.store import TASK_SET_PREFIX, check_field_names, list_sets


def documents_dir(store: str | Path) -> Path:
    """Where the scored documents are written: beside the store (`x.zarr` -> `x.tasks/`)."""
    store = Path(store)
    return store.with_name(store.name.removesuffix(".zarr") + ".tasks")


def task_set(
    task: ChoiceTask,
    tokenizer: PreTrainedTokenizerBase,
    folder: str | Path,
    *,
    shots: int = DEFAULT_SHOTS,
    seed: int = DEFAULT_SEED,
    delimiter: str = DEFAULT_DELIMITER,
    prefix: str | int = "auto",
    max_context: int | None = None,
) -> EvalSet:
    """Write a task's documents to `folder/<name>.jsonl` and return the evaluation set that scores them.

    The set is "packed": one window per (item, option); seq_len is the longest document's model
    positions (its prefix tokens included, `corpus.prefix_ids`).
    shots, seed, delimiter: of the prompts and options (`tokendyn.data.tasks.choice_documents`).
    prefix: the context-only token before each document (`EvalSet.prefix`). max_context: the
    models' context in tokens (`suite_context`); prompts longer than that are refused (None: unchecked).
    """
    records = choice_documents(task, shots, seed, delimiter)
    encoded = tokenizer([r["text"] for r in records], add_special_tokens=False, return_offsets_mapping=True)
    for record, offsets in zip(records, encoded["offset_mapping"]):
        if not any(start >= record["spans"][0]["start"] for start, _ in offsets):
            raise TokendynError(
                f"task '{task.name}' item {record['item']}: option {record['option']} has no token "
                "of its own; give every choice some text"
            )
    seq_len = max(len(ids) for ids in encoded["input_ids"]) + len(prefix_ids(prefix, tokenizer)) - 1
    if max_context is not None and seq_len > max_context:
        raise TokendynError(
            f"task '{task.name}': prompts of {seq_len} tokens exceed the models' context "
            f"({max_context}); use fewer shots or shorter inputs"
        )
    folder = Path(folder)
    path = folder / f"{task.name}.jsonl"
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if path.exists() and path.read_text(encoding="utf-8", errors="replace") != text:
        raise TokendynError(
            f"{path} exists with other documents (another --seed, --shots, --delimiter or task file, or a file "
            "of yours); move it away, or write to a new --out"
        )
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        write_atomically(path, text)
    return EvalSet(
        name=TASK_SET_PREFIX + task.name, files=(path,), seq_len=max(seq_len, 2), context="packed", prefix=prefix
    )


def suite_context(suite: Suite, trust_remote_code: bool = False) -> int | None:
    """The shortest context (tokens) among the suite's models, from their configs (None if unknown)."""
    contexts = []
    for spec in suite.models:
        contexts.append(checkpoints.max_context(checkpoints.load_config(spec.checkpoints[0], trust_remote_code)))
    known = [c for c in contexts if c is not None]
    return min(known) if known else None


def score_tasks(
    suite: Suite | str | Path,
    out: str | Path,
    tasks: Sequence[ChoiceTask],
    *,
    shots: int = DEFAULT_SHOTS,
    seed: int = DEFAULT_SEED,
    delimiter: str = DEFAULT_DELIMITER,
    trust_remote_code: bool = False,
    extra_sets: Sequence[EvalSet] = (),
    **extract_options,
) -> Path:
    """Score every option of every task with every checkpoint of the suite into the store at `out`.

    Each task becomes the evaluation set `task.<name>` (its documents are written to
    `documents_dir(out)`); the main set, the suite's own sets and `extra_sets` are scored too where
    not done yet (each checkpoint is loaded once for all of them), and a rerun resumes.
    extract_options go to `tokendyn.models.extract.extract` (device, dtype, batch_tokens,
    allow_pickle, progress, every, ...). Rerunning a task with other shots, seed or items
    is refused by the store (its text differs): write to a new store.
    """
    from tokendyn.models.extract import extract

    suite = suite if isinstance(suite, Suite) else load_suite(suite)
    names = [t.name for t in tasks]
    if not tasks or len(set(names)) != len(names):
        raise TokendynError(f"give one or more tasks with distinct names (got {', '.join(names) or 'none'})")
    for task in tasks:
        check_field_names({key for item in task.items for key in item.fields}, f"task '{task.name}'")
    tokenizer = checkpoints.load_tokenizer(suite, trust_remote_code)
    context = suite_context(suite, trust_remote_code)
    folder = documents_dir(out)
    new_folder = not folder.exists()
    new_files = [folder / f"{t.name}.jsonl" for t in tasks if not (folder / f"{t.name}.jsonl").exists()]
    try:
        sets = [
            task_set(
                t,
                tokenizer,
                folder,
                shots=shots,
                seed=seed,
                delimiter=delimiter,
                prefix=suite.eval.prefix,
                max_context=context,
            )
            for t in tasks
        ]
        return extract(
            suite, out, extra_sets=[*extra_sets, *sets], trust_remote_code=trust_remote_code, **extract_options
        )
    except TokendynError:  # a refused run leaves no documents of sets the store does not hold
        try:
            held = set(list_sets(out)) if (Path(out) / "zarr.json").is_file() else set()
        except TokendynError:  # not a store this tokendyn reads: it holds none of the sets
            held = set()
        for path in new_files:
            if TASK_SET_PREFIX + path.stem not in held:
                path.unlink(missing_ok=True)
        if new_folder and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        raise

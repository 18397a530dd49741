"""Multiple-choice tasks in context (methods.md §1.5): read tasks, build k-shot prompts, score every option.

Two file formats:

- BIG-Bench JSON (`task.json`): `examples` with `input` and `target_scores` ({choice: score}; the
  correct choice is the one with the highest score, the first on ties), and BIG-Bench's formatting
  keys with BIG-Bench's defaults: `task_prefix` (""), `example_input_prefix` ("\\nQ: "),
  `example_output_prefix` ("\\nA: "), `few_shot_example_separator` ("\\n"), `choice_prefix`
  ("\\n  choice: ") and `append_choices_to_input` (true: the choices are listed after the input,
  in a seeded random order per item).
- JSONL: one item per line, `question`, `choices` (a list of strings) and `answer` (the index of the
  correct choice, or its text); no prefixes, demonstrations separated by a newline.

Other keys of an example or line are kept as per-item fields (lists joined by "|", e.g. the
`skills` an item needs; None and dict values are dropped).

Prompt of item i with k shots: task_prefix, then k demonstrations (other items drawn at random
without replacement, never i itself, seeded per item) and the item's own input, joined by the
separator. A demonstration or input is input_prefix + input (+ the listed choices) + output_prefix
with trailing whitespace removed; a demonstration continues with the delimiter (" ") and its correct
choice. Each option is scored as prompt + delimiter + option: the trailing whitespace of a
prefix like "\\nA: " moves in front of the option, where tokenizers attach it to the next word.

Scoring reuses the extraction loop: every (item, option) is one document of a JSONL written beside
the store, with a character span over delimiter + option (the per-token field `in_option`) and the
fields `item`, `option`, `answer`, `n_options`. `score_tasks` adds one evaluation set per task,
named `task.<name>`, so results live in the store and resume like any set. An option's log-probability
is minus the summed loss of its tokens (those whose first character lies in the span; a token that
straddles the prompt/option boundary counts for the prompt).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from transformers import AutoConfig

from tokendyn.models import checkpoints
from tokendyn.data.corpus import json_lines
from tokendyn.errors import TokendynError
from tokendyn.store import TASK_SET_PREFIX
from tokendyn.config.suite import EvalSet, Suite, load_suite

OPTION_FIELD = "in_option"
ITEM_FIELDS = ("item", "option", "answer", "n_options")
# Store coordinates an item field must not shadow.
RESERVED = {"model", "ckpt", "seq", "pos", "step", "tokens_seen", "val_ppl", "source", "n_params",
            "n_params_nonembed", "token_id", "token_doc", "doc", "done", "loss", "entropy", "rank",
            "vocab_text", "weights_hash", OPTION_FIELD, *ITEM_FIELDS}


@dataclass(frozen=True)
class ChoiceItem:
    """One question: its input text, the choices, the index of the correct one, and extra fields."""

    input: str
    choices: tuple[str, ...]
    answer: int
    fields: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ChoiceTask:
    """A multiple-choice task and how its prompts are formatted (see the module docstring)."""

    name: str
    items: tuple[ChoiceItem, ...]
    prefix: str = ""
    input_prefix: str = ""
    output_prefix: str = ""
    separator: str = "\n"
    choice_prefix: str | None = None  # None: the choices are not listed in the input


def read_task(path: str | Path, name: str | None = None) -> ChoiceTask:
    """Read a task file: `.json` in BIG-Bench's format, `.jsonl` with question/choices/answer lines.

    name: the task's name (default: the JSON's "name", else the file name without extension, or the
    folder name for BIG-Bench's `task.json`); characters other than letters, digits, `_`, `.`, `-`
    become `_`.
    """
    path = Path(path)
    if not path.is_file():
        raise TokendynError(f"task file {path} does not exist; fix the path")
    if path.suffix == ".json":
        task = read_bigbench(path)
    elif path.suffix == ".jsonl":
        task = read_jsonl_task(path)
    else:
        raise TokendynError(f"task file {path} is neither BIG-Bench .json nor .jsonl; convert it to one of them")
    return task if name is None else replace(task, name=clean_name(name))


def read_bigbench(path: str | Path) -> ChoiceTask:
    """A BIG-Bench JSON task with multiple-choice examples (`input` and `target_scores`)."""
    path = Path(path)
    data = _load_json(path)
    examples = data.get("examples") if isinstance(data, dict) else None
    if not isinstance(examples, list) or not examples:
        raise TokendynError(f"{path}: no \"examples\" list; a BIG-Bench task has examples with input and target_scores")
    items = []
    for number, example in enumerate(examples):
        scores = example.get("target_scores") if isinstance(example, dict) else None
        if not isinstance(example, dict) or not isinstance(example.get("input"), str) or not isinstance(scores, dict):
            raise TokendynError(f"{path}: example {number} needs a string \"input\" and a \"target_scores\" object "
                                "(only multiple-choice BIG-Bench tasks are supported)")
        values = list(scores.values())
        if len(values) < 2 or not all(isinstance(v, (int, float)) for v in values):
            raise TokendynError(f"{path}: example {number} needs at least two target_scores with numeric scores")
        extra = {k: v for k, v in example.items() if k not in ("input", "target_scores", "target")}
        items.append(ChoiceItem(example["input"], tuple(scores), int(np.argmax(values)),
                                _item_fields(extra, path, number)))
    name = data.get("name") if isinstance(data.get("name"), str) else (
        path.parent.name if path.stem == "task" else path.stem)
    append = data.get("append_choices_to_input", True)
    return ChoiceTask(name=clean_name(name), items=tuple(items), prefix=data.get("task_prefix", ""),
                      input_prefix=data.get("example_input_prefix", "\nQ: "),
                      output_prefix=data.get("example_output_prefix", "\nA: "),
                      separator=data.get("few_shot_example_separator", "\n"),
                      choice_prefix=data.get("choice_prefix", "\n  choice: ") if append else None)


def read_jsonl_task(path: str | Path) -> ChoiceTask:
    """A JSONL task: lines {"question": ..., "choices": [...], "answer": index or choice text}."""
    path = Path(path)
    items = []
    for number, record in json_lines(path):
        choices = record.get("choices")
        if (not isinstance(record.get("question"), str)
                or not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices)):
            raise TokendynError(f'{path}:{number}: needs "question" (a string) and "choices" (two or more strings)')
        answer = record.get("answer")
        if isinstance(answer, str) and answer in choices:
            answer = choices.index(answer)
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise TokendynError(f'{path}:{number}: "answer" must be the index of the correct choice or its text')
        extra = {k: v for k, v in record.items() if k not in ("question", "choices", "answer")}
        items.append(ChoiceItem(record["question"], tuple(choices), answer, _item_fields(extra, path, number)))
    if not items:
        raise TokendynError(f"{path} has no items; add question/choices/answer lines")
    return ChoiceTask(name=clean_name(path.stem), items=tuple(items))


def _load_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TokendynError(f"{path}: not a valid UTF-8 JSON file ({err}); fix it") from None


def _item_fields(extra: dict, path: Path, number: int) -> dict:
    fields = {}
    for key, value in extra.items():
        if value is None or isinstance(value, dict):
            continue
        if key in RESERVED:
            raise TokendynError(f"{path}: item {number} has a field '{key}', which is a name tokendyn uses; rename it")
        if isinstance(value, list):
            value = "|".join(str(v) for v in value)
        fields[key] = value
    return fields


def clean_name(name: str) -> str:
    """A task name usable as a set name: characters other than letters, digits, `_`, `.`, `-` become `_`."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "task"


def _input_text(task: ChoiceTask, item: ChoiceItem, rng: np.random.Generator) -> str:
    text = task.input_prefix + item.input
    if task.choice_prefix is not None:
        text += "".join(task.choice_prefix + item.choices[j] for j in rng.permutation(len(item.choices)))
    return (text + task.output_prefix).rstrip()


def prompts(task: ChoiceTask, shots: int = 2, seed: int = 0, delimiter: str = " ") -> list[str]:
    """The k-shot prompt of every item (see the module docstring); seeded per (seed, item)."""
    n = len(task.items)
    if shots < 0 or shots > n - 1:
        raise TokendynError(f"task '{task.name}' has {n} items, so it allows 0..{n - 1} shots, not {shots}")
    out = []
    for i, item in enumerate(task.items):
        rng = np.random.default_rng([seed, i])
        others = rng.choice(n - 1, shots, replace=False)
        demos = [task.items[j] for j in others + (others >= i)]  # skip item i itself
        parts = [_input_text(task, d, rng) + delimiter + d.choices[d.answer] for d in demos]
        out.append(task.prefix + task.separator.join(parts + [_input_text(task, item, rng)]))
    return out


def choice_documents(task: ChoiceTask, shots: int = 2, seed: int = 0, delimiter: str = " ") -> list[dict]:
    """One JSONL record per (item, option): text = prompt + delimiter + option, with a span over
    delimiter + option and the item fields (see the module docstring)."""
    records = []
    for i, (item, prompt) in enumerate(zip(task.items, prompts(task, shots, seed, delimiter))):
        for j, option in enumerate(item.choices):
            text = prompt + delimiter + option
            records.append({"text": text, "spans": [{"start": len(prompt), "end": len(text), OPTION_FIELD: 1}],
                            "item": i, "option": j, "answer": item.answer, "n_options": len(item.choices),
                            **item.fields})
    return records


def documents_dir(store: str | Path) -> Path:
    """Where the scored documents are written: beside the store (`x.zarr` -> `x.tasks/`)."""
    store = Path(store)
    return store.with_name(store.name.removesuffix(".zarr") + ".tasks")


def task_set(task: ChoiceTask, tokenizer, folder: str | Path, *, shots: int = 2, seed: int = 0,
             delimiter: str = " ", bos: bool = True, max_context: int | None = None) -> EvalSet:
    """Write a task's documents to `folder/<name>.jsonl` and return the evaluation set that scores them.

    The set holds one sequence per (item, option): seq_len is the longest document with its BOS.
    """
    records = choice_documents(task, shots, seed, delimiter)
    encoded = tokenizer([r["text"] for r in records], add_special_tokens=False, return_offsets_mapping=True)
    for record, offsets in zip(records, encoded["offset_mapping"]):
        if not any(start >= record["spans"][0]["start"] for start, _ in offsets):
            raise TokendynError(f"task '{task.name}' item {record['item']}: option {record['option']} has no token "
                                "of its own; give every choice some text")
    with_bos = bos and tokenizer.bos_token_id is not None
    seq_len = max(len(ids) for ids in encoded["input_ids"]) + with_bos
    if max_context is not None and seq_len > max_context:
        raise TokendynError(f"task '{task.name}': prompts of {seq_len} tokens exceed the models' context "
                            f"({max_context}); use fewer shots or shorter inputs")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{task.name}.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return EvalSet(name=TASK_SET_PREFIX + task.name, files=(path,), seq_len=max(seq_len, 2), bos=bos)


def suite_context(suite: Suite, trust_remote_code: bool = False) -> int | None:
    """The shortest context (tokens) among the suite's models, from their configs (None if unknown)."""
    contexts = []
    for spec in suite.models:
        config = AutoConfig.from_pretrained(checkpoints.resolve(spec.checkpoints[0], weights=False),
                                            trust_remote_code=trust_remote_code)
        contexts.append(checkpoints.max_context(config))
    known = [c for c in contexts if c is not None]
    return min(known) if known else None


def score_tasks(suite: Suite | str | Path, out: str | Path, tasks: Sequence[ChoiceTask], *, shots: int = 2,
                seed: int = 0, delimiter: str = " ", trust_remote_code: bool = False, **extract_options) -> Path:
    """Score every option of every task with every checkpoint of the suite into the store at `out`.

    Each task becomes the evaluation set `task.<name>` (its documents are written to
    `documents_dir(out)`); the main set and the suite's own sets are scored too where not done yet,
    and a rerun resumes. extract_options go to `tokendyn.models.extract.extract` (device, dtype,
    batch_tokens, allow_pickle, progress, ...). Rerunning a task with other shots, seed or items
    is refused by the store (its text differs): write to a new store.
    """
    from tokendyn.models.extract import extract

    suite = suite if isinstance(suite, Suite) else load_suite(suite)
    names = [t.name for t in tasks]
    if not tasks or len(set(names)) != len(names):
        raise TokendynError(f"give one or more tasks with distinct names (got {', '.join(names) or 'none'})")
    tokenizer = checkpoints.load_tokenizer(suite)
    context = suite_context(suite, trust_remote_code)
    sets = [task_set(t, tokenizer, documents_dir(out), shots=shots, seed=seed, delimiter=delimiter,
                     bos=suite.eval.bos, max_context=context) for t in tasks]
    return extract(suite, out, extra_sets=sets, trust_remote_code=trust_remote_code, **extract_options)

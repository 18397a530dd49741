"""Multiple-choice task files (methods.md §1.5): read tasks, build k-shot prompts and the documents that score
every option.

Two file formats:

- BIG-Bench JSON (`task.json`): `examples` with `input` and `target_scores` ({choice: score}; every
  choice keeps its score, so a task with several acceptable answers or partial credit keeps them
  all; the `answer` is the first choice with the highest score, used for demonstrations), and BIG-Bench's formatting
  keys with BIG-Bench's defaults: `task_prefix` (""), `example_input_prefix` ("\nQ: "),
  `example_output_prefix` ("\nA: "), `few_shot_example_separator` ("\n"), `choice_prefix`
  ("\n  choice: ") and `append_choices_to_input` (true: the choices are listed after the input,
  in a seeded random order per item).
- JSONL: one item per line, `question`, `choices` (a list of strings) and `answer` (the index of the
  correct choice, or its text; its target score is 1, the others' 0); no prefixes, demonstrations
  separated by a newline.

Other keys of an example or line are kept as per-item fields (lists joined by "|", e.g. the
`skills` an item needs; None and dict values are dropped).

Prompt of item i with k shots: task_prefix, then k demonstrations (other items drawn at random
without replacement, never i itself, seeded per item) and the item's own input, joined by the
separator. A demonstration or input is input_prefix + input (+ the listed choices) + output_prefix
with trailing whitespace removed; a demonstration continues with the delimiter (" ") and its correct
choice. Each option is scored as prompt + delimiter + option: the trailing whitespace of a
prefix like "\nA: " moves in front of the option, where tokenizers attach it to the next word.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from tokendyn.data.corpus import json_lines
from tokendyn.errors import TokendynError

# The per-token field marking an option's tokens, and the per-document fields of each (item, option):
# target_score is the option's BIG-Bench target score, option_chars its length in characters (lm-eval's
# acc_norm divides by it; see tokendyn.analysis.choices).
OPTION_FIELD = "in_option"
ITEM_FIELDS = ("item", "option", "answer", "n_options", "target_score", "option_chars")

# Fields the option documents get from tokendyn, which an item's own field must not replace (names the
# store uses are refused where tasks are scored: `tokendyn.store.check_field_names`).
GENERATED_FIELDS = {OPTION_FIELD, *ITEM_FIELDS}

# BIG-Bench's formatting keys (strings).
FORMAT_KEYS = (
    "task_prefix",
    "example_input_prefix",
    "example_output_prefix",
    "few_shot_example_separator",
    "choice_prefix",
)

# Defaults of the k-shot prompts, shared by every caller up to `tokendyn tasks`: demonstrations per prompt,
# the seed of their draw and of the listed choices' order, and the text between a prompt and an option.
DEFAULT_SHOTS = 2
DEFAULT_SEED = 0
DEFAULT_DELIMITER = " "
# Where a generation task's completions are cut by default (PassUntil, `tokendyn.models.sampling`): a newline.
DEFAULT_STOP = ("\n",)


@dataclass(frozen=True)
class ChoiceItem:
    """One question: its input text, the choices, the index of the correct one, extra fields, and
    each choice's target score (default: 1 for the answer, 0 for the others)."""

    input: str
    choices: tuple[str, ...]
    answer: int
    fields: dict = field(default_factory=dict)
    scores: tuple[float, ...] | None = None

    @property
    def target_scores(self) -> tuple[float, ...]:
        if self.scores is not None:
            return self.scores
        return tuple(float(j == self.answer) for j in range(len(self.choices)))


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
        raise TokendynError(f'{path}: no "examples" list; a BIG-Bench task has examples with input and target_scores')
    items = []
    for number, example in enumerate(examples):
        scores = example.get("target_scores") if isinstance(example, dict) else None
        if not isinstance(example, dict) or not isinstance(example.get("input"), str) or not isinstance(scores, dict):
            raise TokendynError(
                f'{path}: example {number} needs a string "input" and a "target_scores" object '
                "(only multiple-choice BIG-Bench tasks are supported)"
            )
        values = list(scores.values())
        if len(values) < 2 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in values
        ):
            raise TokendynError(
                f"{path}: example {number} needs at least two target_scores with finite numeric "
                "scores (not booleans, not NaN); fix its target_scores"
            )
        extra = {k: v for k, v in example.items() if k not in ("input", "target_scores", "target")}
        items.append(
            ChoiceItem(
                example["input"],
                tuple(scores),
                int(np.argmax(values)),
                _item_fields(extra, path, number),
                tuple(float(v) for v in values),
            )
        )
    name = (
        data.get("name")
        if isinstance(data.get("name"), str)
        else (path.parent.name if path.stem == "task" else path.stem)
    )
    for key in FORMAT_KEYS:
        if key in data and not isinstance(data[key], str):
            raise TokendynError(f'{path}: "{key}" must be a string, not {type(data[key]).__name__}; fix it')
    append = data.get("append_choices_to_input", True)
    if not isinstance(append, bool):
        raise TokendynError(f'{path}: "append_choices_to_input" must be true or false, not {append!r}; fix it')
    return ChoiceTask(
        name=clean_name(name),
        items=tuple(items),
        prefix=data.get("task_prefix", ""),
        input_prefix=data.get("example_input_prefix", "\nQ: "),
        output_prefix=data.get("example_output_prefix", "\nA: "),
        separator=data.get("few_shot_example_separator", "\n"),
        choice_prefix=data.get("choice_prefix", "\n  choice: ") if append else None,
    )


def read_jsonl_task(path: str | Path) -> ChoiceTask:
    """A JSONL task: lines {"question": ..., "choices": [...], "answer": index or choice text}."""
    path = Path(path)
    items = []
    for number, record in json_lines(path):
        choices = record.get("choices")
        if (
            not isinstance(record.get("question"), str)
            or not isinstance(choices, list)
            or len(choices) < 2
            or not all(isinstance(c, str) for c in choices)
        ):
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
        if key in GENERATED_FIELDS:
            raise TokendynError(f"{path}: item {number} has a field '{key}', which tokendyn sets itself; rename it")
        if isinstance(value, list):
            value = "|".join(str(v) for v in value)
        fields[key] = value
    return fields


def clean_name(name: str) -> str:
    """A task name usable as a set name: characters other than letters, digits, `_`, `.`, `-` become `_`;
    a name of dots only (a folder's `.` or `..`) becomes underscores."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "task"
    return "_" * len(name) if not name.strip(".") else name


def _input_text(task: ChoiceTask, item: ChoiceItem, rng: np.random.Generator) -> str:
    text = task.input_prefix + item.input
    if task.choice_prefix is not None:
        text += "".join(task.choice_prefix + item.choices[j] for j in rng.permutation(len(item.choices)))
    return (text + task.output_prefix).rstrip()


def prompts(
    task: ChoiceTask, shots: int = DEFAULT_SHOTS, seed: int = DEFAULT_SEED, delimiter: str = DEFAULT_DELIMITER
) -> list[str]:
    """The k-shot prompt of every item (see the module docstring).

    shots: demonstrations per prompt (0 to items - 1). seed: of the demonstrations drawn and of the
    order of listed choices, per (seed, item). delimiter: between a demonstration's prompt and its answer.
    """
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


def choice_documents(
    task: ChoiceTask, shots: int = DEFAULT_SHOTS, seed: int = DEFAULT_SEED, delimiter: str = DEFAULT_DELIMITER
) -> list[dict]:
    """One JSONL record per (item, option): text = prompt + delimiter + option, with a span over
    delimiter + option, the fields ITEM_FIELDS and the item's own fields (see the module docstring).

    shots, seed: of the prompts (`prompts`). delimiter: between a prompt and an option, in the
    demonstrations too.
    """
    records = []
    for i, (item, prompt) in enumerate(zip(task.items, prompts(task, shots, seed, delimiter))):
        for j, option in enumerate(item.choices):
            text = prompt + delimiter + option
            records.append(
                {
                    "text": text,
                    "spans": [{"start": len(prompt), "end": len(text), OPTION_FIELD: 1}],
                    "item": i,
                    "option": j,
                    "answer": item.answer,
                    "n_options": len(item.choices),
                    "target_score": item.target_scores[j],
                    "option_chars": len(option),
                    **item.fields,
                }
            )
    return records

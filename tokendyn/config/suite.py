"""Suite descriptions: parse and validate a suite TOML file (evaluation sets, models, checkpoints).

Only parsing and validation live here; nothing is loaded or downloaded (see `tokendyn.models.checkpoints`).
The format is documented in docs/suite.md. Every error is a
one-line `TokendynError` naming the file, the table and the key, the problem and the fix.
"""

from __future__ import annotations

import difflib
import glob
import os
import re
import unicodedata
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from tokendyn.config.discover import discover_folders, discover_revisions
from tokendyn.errors import TokendynError

CONTEXTS = ("rolling", "truncate", "packed", "concat")
SPLITS = ("none", "paragraph", "line")
PACKINGS = ("document", "concat")  # the format-1 key `packing`: document -> context rolling, concat -> concat
KINDS = ("text", "pairs")
PROTOCOL_KEYS = ("context", "stride", "max_tokens", "prefix", "split", "text_field")
CORPUS_SUFFIXES = (".txt", ".jsonl")

# Pythia (EleutherAI): 154 checkpoints per size, 1024 sequences x 2048 tokens per step.
PYTHIA_SIZES = ("14m", "31m", "70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b")
PYTHIA_STEPS = (0,) + tuple(2**k for k in range(10)) + tuple(range(1000, 143_001, 1000))
PYTHIA_TOKENS_PER_STEP = 2_097_152

EVAL_KEYS = ("files", "seq_len", "max_sequences", "packing", "bos", "tokenizer", *PROTOCOL_KEYS)
SET_KEYS = ("name", "files", "kind", "seq_len", "max_sequences", "packing", "bos", "corrupt", "seed", *PROTOCOL_KEYS)
LOCAL_MODEL_KEYS = ("name", "checkpoints", "hub_id", "tokens_per_step")
HUB_MODEL_KEYS = ("name", "hub_id", "revisions", "tokens_per_step")
PRESET_MODEL_KEYS = ("preset", "name", "size", "deduped", "hub_id", "steps", "tokens_per_step")
CHECKPOINT_KEYS = ("step", "path", "revision", "tokens_seen")
DISCOVER_KEYS = ("glob", "steps")
STEP_SELECTION_KEYS = ("every", "log", "min", "max")

_STEP_RE = re.compile(r"(?:^|[-_])step(\d+)(?=$|[-_])")
_TOKENS_RE = re.compile(r"(?:^|[-_])tokens(\d+(?:\.\d+)?)([KMBT]?)(?=$|[-_])")
_TOKEN_UNITS = {"": 1.0, "K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}
_SET_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
_REQUIRED = object()
_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list"}


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint of one model: a local Hugging Face directory or a hub revision."""

    model: str
    step: int
    path: Path | None
    hub_id: str | None
    revision: str | None
    tokens_seen: float | None

    @property
    def source(self) -> str:
        """Where the weights come from: the directory, or `hub_id@revision`."""
        return str(self.path) if self.path is not None else f"{self.hub_id}@{self.revision}"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    checkpoints: tuple[Checkpoint, ...]


@dataclass(frozen=True)
class EvalSet:
    """Text to score and how (docs/suite.md, methods.md §0). `name` is "main" for the [eval] table.

    Parameters
    ----------
    seq_len : model positions per window (the L of lm-eval's rolling windows).
    max_sequences : score at most this many windows, in document order (None: all).
    context : "rolling" (every token once, windows advancing by `stride`), "truncate" (the first
        `max_tokens` tokens of each document), "packed" (one window per short document) or
        "concat" (documents joined into one stream with EOS separators, then rolling).
    stride : new tokens per rolling window (default seq_len); every token then has at least
        seq_len - stride tokens of context.
    max_tokens : tokens scored per document with context "truncate" (default seq_len).
    prefix : the context-only token before each document: "auto" (what the tokenizer's
        add_special_tokens=True puts first, else EOS unless it is a chat-template token),
        "none", a token string or a token id.
    split : how a .txt file becomes documents: "none" (the file is one document), "paragraph"
        (blank-line separated blocks) or "line".
    text_field : the JSONL field holding a document's text.
    """

    name: str
    files: tuple[Path, ...]
    seq_len: int
    max_sequences: int | None = None
    kind: str = "text"
    corrupt: float | None = None
    seed: int = 0
    context: str = "rolling"
    stride: int | None = None
    max_tokens: int | None = None
    prefix: str | int = "auto"
    split: str = "none"
    text_field: str = "text"

    def __post_init__(self) -> None:
        if self.context not in CONTEXTS:
            raise TokendynError(
                f"set '{self.name}': unknown context '{self.context}'; use one of {', '.join(CONTEXTS)}"
            )
        if self.split not in SPLITS:
            raise TokendynError(f"set '{self.name}': unknown split '{self.split}'; use one of {', '.join(SPLITS)}")
        if self.stride is not None and not 1 <= self.stride <= self.seq_len:
            raise TokendynError(f"set '{self.name}': stride {self.stride} must be in [1, seq_len = {self.seq_len}]")
        if self.max_tokens is not None and not 1 <= self.max_tokens <= self.seq_len:
            raise TokendynError(
                f"set '{self.name}': max_tokens {self.max_tokens} must be in "
                f"[1, seq_len = {self.seq_len}]; raise seq_len or lower max_tokens"
            )


@dataclass(frozen=True)
class Suite:
    path: Path | None
    eval: EvalSet
    sets: tuple[EvalSet, ...]
    models: tuple[ModelSpec, ...]
    tokenizer: str | None = None

    def to_dict(self) -> dict:
        """The suite as plain JSON types (paths as strings, tuples as lists), in field order."""
        return _plain(asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value


def parse_step(revision: str) -> int:
    """The training step in a revision name: step1000, step1000-tokens4B, stage1-step1000-tokens4B..."""
    match = _STEP_RE.search(revision)
    if match is None:
        raise TokendynError(
            f"revision '{revision}' has no step number (expected a name like step1000, step1000-tokens4B "
            f'or stage1-step1000-tokens4B); list it as checkpoints = [{{ step = N, revision = "{revision}" }}]'
        )
    return int(match.group(1))


def parse_tokens(revision: str) -> float | None:
    """Tokens seen from a revision name such as step1000-tokens4B (4e9), or None if it has none."""
    match = _TOKENS_RE.search(revision)
    return None if match is None else float(match.group(1)) * _TOKEN_UNITS[match.group(2)]


def select_steps(schedule: tuple[int, ...] | list[int], selection: Any = None) -> list[int]:
    """Pick steps from a sorted training schedule.

    selection: None (all steps); a list of steps (each must be in the schedule); or a table with
    `every = N` (steps divisible by N) and/or `log = true` (step 0, powers of two, and 1000 x powers
    of two), and/or `min`, `max` (keep min <= step <= max; alone they keep every step in range).
    `every` and `log` always keep the last schedule step within [min, max], so the selected
    trajectory ends where training ends.
    """
    schedule = sorted(schedule)
    if selection is None:
        return schedule
    if isinstance(selection, list):
        return _listed_steps(schedule, selection)
    if not isinstance(selection, dict):
        raise TokendynError("steps must be a list of steps or a table like { every = 10000 }; fix its value")
    _check_keys(selection, STEP_SELECTION_KEYS, "the steps table")
    every = selection.get("every")
    log = selection.get("log", False)
    low, high = selection.get("min", schedule[0]), selection.get("max", schedule[-1])
    if every is not None and not (_is_int(every) and every > 0):
        raise TokendynError(f"steps.every = {every!r} must be a positive integer; fix it")
    if not isinstance(log, bool):
        raise TokendynError(f"steps.log = {log!r} must be true or false; fix it")
    if not (_is_int(low) and _is_int(high) and low <= high):
        raise TokendynError(f"steps.min = {low!r} and steps.max = {high!r} must be integers with min <= max; fix them")
    in_range = [step for step in schedule if low <= step <= high]
    if not in_range:
        raise TokendynError(f"no schedule step lies in [{low}, {high}]; widen steps.min / steps.max")
    if every is None and not log:
        return in_range
    chosen = {in_range[-1]}
    for step in in_range:
        if (every is not None and step % every == 0) or (log and _is_log_step(step)):
            chosen.add(step)
    return sorted(chosen)


def _is_log_step(step: int) -> bool:
    def power_of_two(n: int) -> bool:
        return n > 0 and n & (n - 1) == 0

    return step == 0 or power_of_two(step) or (step % 1000 == 0 and power_of_two(step // 1000))


def _listed_steps(schedule: list[int], steps: list) -> list[int]:
    allowed = set(schedule)
    for step in steps:
        if not _is_int(step):
            raise TokendynError(f"steps entry {step!r} is not an integer; list integer steps")
        if step not in allowed:
            below = max((s for s in schedule if s < step), default=None)
            above = min((s for s in schedule if s > step), default=None)
            nearest = ", ".join(str(s) for s in (below, above) if s is not None)
            raise TokendynError(f"step {step} is not in the schedule ({_describe(schedule)}); nearest: {nearest}")
    duplicates = sorted({step for step in steps if steps.count(step) > 1})
    if duplicates:
        raise TokendynError(f"step {duplicates[0]} is listed twice in steps; list each step once")
    if not steps:
        raise TokendynError("steps is empty; list at least one step or leave steps out for all of them")
    return sorted(steps)


def _describe(schedule: list[int]) -> str:
    shown = [str(s) for s in schedule]
    return ", ".join(shown) if len(shown) <= 8 else ", ".join(shown[:5] + ["..."] + shown[-2:])


def pythia_revisions(steps: Any = None) -> list[str]:
    """Revision names of the Pythia schedule (step0, step1, 2, 4 ... step512, step1000 ... step143000).

    `steps` selects from the schedule as in `select_steps`; None gives all 154.
    """
    return [f"step{step}" for step in select_steps(PYTHIA_STEPS, steps)]


def load_suite(path: str | Path) -> Suite:
    """Read and validate a suite TOML file; relative paths resolve against the file's folder."""
    path = Path(os.path.abspath(Path(path).expanduser()))
    if not path.is_file():
        raise TokendynError(f"suite file {path} does not exist; give the path of a suite TOML file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise TokendynError(f"{path}: invalid TOML ({err}); fix the syntax") from err
    return parse_suite(data, base=path.parent, path=path)


def parse_suite(data: dict, base: str | Path, path: Path | None = None) -> Suite:
    """Validate a suite given as a dict (the parsed TOML); relative paths resolve against `base`."""
    base = Path(os.path.abspath(base))
    origin = str(path) if path is not None else "suite"
    _check_keys(data, ("eval", "sets", "models"), origin)
    if "eval" not in data:
        raise TokendynError(f"{origin}: no [eval] table; add [eval] with files = [...] and seq_len = N")
    eval_table = _Table(data["eval"], f"{origin}: [eval]", EVAL_KEYS)
    main = _parse_set(eval_table, base, "main", default_seq_len=None)
    tokenizer = _parse_tokenizer(eval_table, base)

    sets = tuple(
        _parse_set(_Table(table, f"{origin}: [[sets]] #{i}", SET_KEYS), base, None, main.seq_len)
        for i, table in enumerate(_array_of_tables(data, "sets", origin, required=False), start=1)
    )
    names = [s.name for s in sets]
    for name in names:
        if name == "main" or names.count(name) > 1:
            raise TokendynError(
                f"{origin}: [[sets]] name '{name}' is used twice or is reserved ('main' is "
                "the [eval] set); give every set its own name"
            )

    models = tuple(
        _parse_model(table, f"{origin}: [[models]] #{i}", base)
        for i, table in enumerate(_array_of_tables(data, "models", origin, required=True), start=1)
    )
    model_names = [m.name for m in models]
    for name in model_names:
        if model_names.count(name) > 1:
            raise TokendynError(f"{origin}: two [[models]] are named '{name}'; give every model its own name")
    return Suite(path=path, eval=main, sets=sets, models=models, tokenizer=tokenizer)


def parse_set_table(table: dict, where: str, base: Path, seq_len: int) -> EvalSet:
    """A named set from a [[sets]]-style table (as the command line builds it), validated like one.

    where: how errors name the table; base: the folder relative paths resolve against; seq_len:
    the default sequence length (the main set's).
    """
    return _parse_set(_Table(table, where, SET_KEYS), base, None, seq_len)


class _Table:
    """One TOML table being read: typed access by key; errors say where; unknown keys are refused."""

    def __init__(self, data: Any, where: str, allowed: tuple[str, ...]) -> None:
        if not isinstance(data, dict):
            raise TokendynError(f"{where}: expected a table, got {data!r}; fix its syntax")
        _check_keys(data, allowed, where)
        self.data, self.where = data, where

    def fail(self, key: str, problem: str) -> NoReturn:
        raise TokendynError(f"{self.where} key '{key}': {problem}")

    def get(self, key: str, kind: type, default: Any = _REQUIRED) -> Any:
        if key not in self.data:
            if default is _REQUIRED:
                self.fail(key, f"is missing; add {key} = ...")
            return default
        value = self.data[key]
        if kind is int:
            ok = _is_int(value)
        elif kind is float:
            ok = _is_int(value) or isinstance(value, float)
        else:
            ok = isinstance(value, kind)
        if not ok:
            self.fail(key, f"{value!r} is not {_KIND_NAMES.get(kind, kind.__name__)}; fix its value")
        return float(value) if kind is float else value

    def positive(self, key: str, kind: type, default: Any = _REQUIRED) -> Any:
        value = self.get(key, kind, default)
        if value is not None and value <= 0:
            self.fail(key, f"{value!r} must be positive; fix its value")
        return value

    def non_negative(self, key: str, kind: type, default: Any = _REQUIRED) -> Any:
        value = self.get(key, kind, default)
        if value is not None and value < 0:
            self.fail(key, f"{value!r} must be 0 or more; fix its value")
        return value

    def choice(self, key: str, choices: tuple[str, ...]) -> str:
        value = self.get(key, str, choices[0])
        if value not in choices:
            self.fail(key, f"'{value}' is not one of {', '.join(choices)}; pick one of them")
        return value


def _check_keys(data: dict, allowed: tuple[str, ...], where: str) -> None:
    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"allowed keys: {', '.join(allowed)}"
            raise TokendynError(f"{where}: unknown key '{key}'; {hint}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _array_of_tables(data: dict, key: str, origin: str, required: bool) -> list:
    tables = data.get(key, [])
    if not isinstance(tables, list):
        raise TokendynError(f"{origin}: '{key}' must be an array of tables; write each as [[{key}]]")
    if required and not tables:
        raise TokendynError(f"{origin}: no [[{key}]] tables; add at least one")
    return tables


def _absolute(base: Path, entry: str) -> Path:
    return Path(os.path.abspath(base / Path(entry).expanduser()))


def _parse_set(t: _Table, base: Path, name: str | None, default_seq_len: int | None) -> EvalSet:
    if name is None:
        name = t.get("name", str)
        if not _SET_NAME_RE.fullmatch(name) or not name.strip("."):
            t.fail("name", f"'{name}' may use only letters, digits, '_', '.', '-' (not dots only); rename the set")
    kind = t.choice("kind", KINDS)
    files = _parse_files(t, base)
    if kind == "pairs" and any(f.suffix != ".jsonl" for f in files):
        t.fail("files", 'kind = "pairs" reads JSONL lines {"true": ..., "false": ...}; give .jsonl files')
    corrupt = t.get("corrupt", float, None)
    if corrupt is not None and not 0 < corrupt <= 1:
        t.fail("corrupt", f"{corrupt} must be a fraction in (0, 1]; fix its value")
    if corrupt is not None and kind != "text":
        t.fail("corrupt", 'applies to kind = "text" sets only; remove it')
    seq_len = t.positive("seq_len", int, default_seq_len if default_seq_len is not None else _REQUIRED)
    if seq_len < 2:
        t.fail("seq_len", f"{seq_len} leaves no token to predict; use at least 2")
    max_sequences, seed, protocol = (
        t.positive("max_sequences", int, None),
        t.non_negative("seed", int, 0),
        _protocol(t, kind),
    )
    _warn_unused(t, kind, files, protocol)
    try:
        return EvalSet(
            name=name,
            files=files,
            seq_len=seq_len,
            max_sequences=max_sequences,
            kind=kind,
            corrupt=corrupt,
            seed=seed,
            **protocol,
        )
    except TokendynError as err:  # EvalSet's own checks name the set, not the table
        raise TokendynError(f"{t.where}: {err}") from None


def _warn_unused(t: _Table, kind: str, files: tuple[Path, ...], protocol: dict) -> None:
    """Warn about protocol keys this set's context or files never read (a warning, so that suites
    written before keep loading)."""
    context = protocol["context"]
    unused = {
        "max_tokens": context != "truncate" and 'only context = "truncate" reads it',
        "stride": context in ("truncate", "packed") and f'context = "{context}" scores one window per document',
        "split": (kind == "pairs" or all(f.suffix == ".jsonl" for f in files)) and "it splits .txt files only",
        "text_field": (kind == "pairs" or all(f.suffix != ".jsonl" for f in files))
        and "it names the text field of .jsonl files only",
    }
    for key, why in unused.items():
        if key in t.data and why:
            warnings.warn(f"{t.where} key '{key}' is ignored: {why}; remove it or change the set", stacklevel=4)


def _protocol(t: _Table, kind: str) -> dict:
    """The scoring-protocol keys, with the format-1 keys `packing` and `bos` mapped onto them.

    packing = "document" -> context = "rolling" (contexts never cross documents; a long document
    now keeps its context across windows instead of restarting); packing = "concat" -> context =
    "concat". bos = true -> prefix = "auto"; bos = false -> prefix = "none".
    """
    for old, new in (("packing", "context"), ("bos", "prefix")):
        if old in t.data and new in t.data:
            t.fail(old, f"is the old name of '{new}'; keep only '{new}'")
    if "packing" in t.data:
        context = {"document": "rolling", "concat": "concat"}[t.choice("packing", PACKINGS)]
    else:
        context = t.choice("context", CONTEXTS) if "context" in t.data else ("packed" if kind == "pairs" else "rolling")
    if "bos" in t.data:
        prefix = "auto" if t.get("bos", bool) else "none"
    else:
        prefix = t.data.get("prefix", "auto")
        if isinstance(prefix, bool) or not isinstance(prefix, (str, int)):
            t.fail("prefix", 'is "auto", "none", a token string or a token id; fix its value')
    return {
        "context": context,
        "prefix": prefix,
        "stride": t.positive("stride", int, None),
        "max_tokens": t.positive("max_tokens", int, None),
        "split": t.choice("split", SPLITS),
        "text_field": t.get("text_field", str, "text"),
    }


def _parse_files(t: _Table, base: Path) -> tuple[Path, ...]:
    value = t.get("files", object)
    entries = [value] if isinstance(value, str) else value
    if not isinstance(entries, list):
        t.fail("files", f'{value!r} is not a list of paths; write files = ["data/valid.txt"]')
    if not entries:
        t.fail("files", "is empty; list at least one .txt or .jsonl file")
    files: list[Path] = []
    for entry in entries:
        if not isinstance(entry, str):
            t.fail("files", f"entry {entry!r} is not a path string; fix it")
        pattern = _absolute(base, entry)
        if any(char in entry for char in "*?["):
            matches = sorted(Path(p) for p in glob.glob(str(pattern)))
            if not matches:
                t.fail("files", f"pattern '{entry}' matches no file (relative to {base}); fix the pattern")
        elif not pattern.is_file():
            t.fail("files", f"file {pattern} does not exist; fix the path (relative paths start at {base})")
        else:
            matches = [pattern]
        for match in matches:
            if match.suffix not in CORPUS_SUFFIXES:
                t.fail("files", f"{match} is neither .txt nor .jsonl; convert it to one of them")
        files += matches
    return tuple(files)


def _parse_tokenizer(t: _Table, base: Path) -> str | None:
    """A local directory (relative to the TOML's folder) or a hub id."""
    value = t.get("tokenizer", str, None)
    if value is None:
        return None
    local = _absolute(base, value)
    if local.exists():
        return str(local)
    if value.startswith((".", "/", "~")):
        t.fail("tokenizer", f"directory {local} does not exist; fix the path or give a hub id like org/name")
    return value


def _parse_model(data: Any, where: str, base: Path) -> ModelSpec:
    keys = (
        PRESET_MODEL_KEYS
        if isinstance(data, dict) and "preset" in data
        else HUB_MODEL_KEYS
        if isinstance(data, dict) and "revisions" in data
        else LOCAL_MODEL_KEYS
    )
    t = _Table(data, where, keys)
    if "preset" in t.data:
        return _parse_preset(t)
    name = t.get("name", str)
    t.where = f"{where} ({name!r})"  # repr: a control character in a name stays visible
    hub_id = t.get("hub_id", str, None)
    tokens_per_step = t.positive("tokens_per_step", float, None)
    if "revisions" in t.data:
        if hub_id is None:
            t.fail("revisions", 'needs the model\'s hub_id; add hub_id = "org/name"')
        revisions = t.get("revisions", object)
        if isinstance(revisions, str):
            revisions = discover_revisions(hub_id, revisions)
        if not isinstance(revisions, list) or not revisions or not all(isinstance(r, str) for r in revisions):
            t.fail(
                "revisions",
                'must be a non-empty list of revision names like ["step1000"], a pattern like '
                '"step*", or "all"; fix it',
            )
        checkpoints = []
        for revision in revisions:
            if _STEP_RE.search(revision) is None:
                t.fail(
                    "revisions",
                    f"'{revision}' has no step number (like step1000 or stage1-step1000-tokens4B); "
                    f'list it as checkpoints = [{{ step = N, revision = "{revision}" }}]',
                )
            step = parse_step(revision)
            checkpoints.append(
                Checkpoint(name, step, None, hub_id, revision, _tokens_seen(step, tokens_per_step, revision))
            )
        return _model(t, "revisions", name, checkpoints)
    if "checkpoints" not in t.data:
        t.fail(
            "checkpoints",
            'is missing; give checkpoints = [{ step = N, path = "dir" }], '
            'hub_id with revisions = [...], or preset = "pythia"',
        )
    entries = t.get("checkpoints", object)
    if isinstance(entries, dict):
        checkpoints = _discovered(_Table(entries, f"{t.where} checkpoints", DISCOVER_KEYS), name, tokens_per_step, base)
        return _model(t, "checkpoints", name, checkpoints)
    if not isinstance(entries, list):
        t.fail(
            "checkpoints",
            'must be a list like [{ step = N, path = "dir" }] or a table like { glob = "run/checkpoint-*" }',
        )
    if not entries:
        t.fail("checkpoints", "is empty; list at least one checkpoint")
    checkpoints = [
        _parse_checkpoint(
            _Table(entry, f"{t.where} checkpoints[{i}]", CHECKPOINT_KEYS), name, hub_id, tokens_per_step, base
        )
        for i, entry in enumerate(entries)
    ]
    return _model(t, "checkpoints", name, checkpoints)


def _discovered(t: _Table, model: str, tokens_per_step: float | None, base: Path) -> list[Checkpoint]:
    """Checkpoints from `{ glob = "...", steps = ... }`: every matching folder, optionally a selection of steps."""
    folders = discover_folders(t.get("glob", str), base)
    for previous, current in zip(folders, folders[1:]):
        if previous.step == current.step:
            t.fail("glob", f"step {current.step} is both {previous.path} and {current.path}; narrow the pattern")
    found = {f.step: f for f in folders}
    steps = sorted(found)
    if "steps" in t.data:
        try:
            steps = select_steps(steps, t.data["steps"])
        except TokendynError as err:
            t.fail("steps", str(err))
    checkpoints = []
    for step in steps:
        tokens = found[step].tokens_seen
        if tokens_per_step is not None:
            tokens = step * tokens_per_step
        checkpoints.append(Checkpoint(model, step, found[step].path, None, None, tokens))
    return checkpoints


def _parse_checkpoint(
    t: _Table, model: str, hub_id: str | None, tokens_per_step: float | None, base: Path
) -> Checkpoint:
    step = t.get("step", int)
    if step < 0:
        t.fail("step", f"{step} is negative; fix it")
    path, revision = t.get("path", str, None), t.get("revision", str, None)
    if (path is None) == (revision is None):
        t.fail("path", "give exactly one of path (a local directory) or revision (with the model's hub_id)")
    if revision is not None and hub_id is None:
        t.fail("revision", 'needs the model\'s hub_id; add hub_id = "org/name" to the model')
    directory = None
    if path is not None:
        directory = _absolute(base, path)
        if not directory.is_dir():
            t.fail(
                "path",
                f"checkpoint directory {directory} does not exist; fix the path "
                "(relative paths start at the TOML's folder)",
            )
    tokens_seen = t.non_negative("tokens_seen", float, None)
    if tokens_seen is None:
        tokens_seen = _tokens_seen(step, tokens_per_step, revision)
    # A local checkpoint has no hub source (revision is None there: exactly one of path and revision is given).
    return Checkpoint(model, step, directory, hub_id if directory is None else None, revision, tokens_seen)


def _tokens_seen(step: int, tokens_per_step: float | None, revision: str | None) -> float | None:
    """An explicit tokens_per_step wins over the (rounded) count in a revision name."""
    if tokens_per_step is not None:
        return step * tokens_per_step
    return parse_tokens(revision) if revision is not None else None


def _parse_preset(t: _Table) -> ModelSpec:
    preset = t.get("preset", str)
    if preset != "pythia":
        t.fail("preset", f"unknown preset '{preset}'; use preset = \"pythia\" or list the checkpoints")
    size, hub_id = t.get("size", str, None), t.get("hub_id", str, None)
    deduped = t.get("deduped", bool, False)
    if hub_id is None:
        if size not in PYTHIA_SIZES:
            problem = "is missing" if size is None else f"'{size}' is not a Pythia size"
            t.fail("size", f"{problem}; use one of {', '.join(PYTHIA_SIZES)} (or hub_id for a fork)")
        hub_id = f"EleutherAI/pythia-{size}" + ("-deduped" if deduped else "")
    elif size is not None or deduped:
        t.fail("hub_id", "replaces size and deduped; give either size (and deduped) or hub_id")
    name = t.get("name", str, hub_id.split("/")[-1])
    t.where = f"{t.where} ({name!r})"
    try:
        steps = select_steps(PYTHIA_STEPS, t.data.get("steps"))
    except TokendynError as err:
        t.fail("steps", str(err))
    tokens_per_step = t.positive("tokens_per_step", float, float(PYTHIA_TOKENS_PER_STEP))
    checkpoints = [Checkpoint(name, step, None, hub_id, f"step{step}", step * tokens_per_step) for step in steps]
    return _model(t, "steps", name, checkpoints)


def _model(t: _Table, key: str, name: str, checkpoints: list[Checkpoint]) -> ModelSpec:
    hidden = sorted({f"U+{ord(c):04X}" for c in name if unicodedata.category(c) in ("Cc", "Cf", "Cs")})
    if hidden or not name.strip():
        # Names reach tables, figures (SVG cannot hold control characters) and the report, where a
        # bidirectional override would reorder the text after it.
        problem = f"holds the control or format characters {', '.join(hidden)}" if hidden else "is blank"
        t.fail("name", f"model name {name!r} {problem}; give it a printable name")
    checkpoints = sorted(checkpoints, key=lambda c: c.step)
    for previous, current in zip(checkpoints, checkpoints[1:]):
        if previous.step == current.step:
            t.fail(
                key,
                f"step {current.step} appears twice ({previous.source} and {current.source}); "
                "keep one checkpoint per step, or split them into two models",
            )
    return ModelSpec(name=name, checkpoints=tuple(checkpoints))

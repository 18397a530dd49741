"""PassUntil on the checkpoints of a suite (methods.md §4): sample completions per instance and
checkpoint until `passes` of them pass or `max_samples` are drawn, and keep the runs in the store.

A generation task is a JSONL of instances {"prompt": ..., "answer": ...} (other keys are kept as
per-instance fields). A completion is sampled with `tokendyn.models.generate.decode` (KV-cached; temperature
1, i.e. nucleus mass 1, unless `top_p` is given) for `new_tokens` tokens — by default as many as
the answer takes after the prompt — stops at EOS, is decoded to text and cut at the first stop
string. It passes when the checker says so: by default exact match (`exact_match`: the completion
and the answer are equal once surrounding whitespace is stripped), or any callable
`checker(completion, instance) -> bool` named as `package.module:function`, where `instance` is the
JSONL record. The prompt's trailing whitespace is removed (tokenizers attach a space to the next
word); BOS is prepended when the suite's main set uses it.

Runs are drawn by `tokendyn.analysis.passuntil.pass_until`, with the random numbers of (model, checkpoint,
instance) seeded by `numpy.random.default_rng([seed, model, ckpt, instance])`: a rerun or a resumed
run gives the same results. The store keeps them in the group `passuntil/<task>` (layout: `tokendyn.store.passuntil`).

`every = k` runs only at every k-th checkpoint of each model and at its last (`tokendyn.models.extract.scored_at`,
the rule extraction's `every` uses). It is not one of the group's parameters: the runs do not depend on it
(their seeds are per checkpoint), so a later run with every = 1 fills in the remaining checkpoints and keeps
the ones done. The analyses read the checkpoints not run as missing.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from tokendyn.analysis.passuntil import pass_until
from tokendyn.config.suite import Suite, load_suite
from tokendyn.data.corpus import PAD, json_lines, prefix_ids
from tokendyn.data.tasks import DEFAULT_STOP, clean_name
from tokendyn.errors import TokendynError
from tokendyn.models import checkpoints, hardware
from tokendyn.models.extract import extract, scored_at
from tokendyn.models.generate import decode
from tokendyn.models.tasks import suite_context
from tokendyn.store.lock import writer_lock
from tokendyn.store.passuntil import COUNTS, RESERVED, prepare_task

if TYPE_CHECKING:
    import zarr
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class GenerationTask:
    """Instances of a free-generation task: their JSONL records, each with a prompt and an answer."""

    name: str
    records: tuple[dict, ...]

    @property
    def prompts(self) -> list[str]:
        return [r["prompt"] for r in self.records]

    @property
    def answers(self) -> list[str]:
        return [r["answer"] for r in self.records]

    @property
    def fields(self) -> dict[str, list]:
        """Per-instance fields (keys other than prompt and answer; lists joined by "|", None where absent)."""
        keys = sorted({k for r in self.records for k in r} - {"prompt", "answer"})
        return {k: [_scalar(r.get(k)) for r in self.records] for k in keys}

    @property
    def fingerprint(self) -> str:
        payload = json.dumps(self.records, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def read_generation_task(path: str | Path, name: str | None = None) -> GenerationTask:
    """A JSONL of {"prompt": ..., "answer": ...} lines; name defaults to the file name without extension."""
    path = Path(path)
    records = []
    for number, record in json_lines(path):
        if (
            not isinstance(record.get("prompt"), str)
            or not isinstance(record.get("answer"), str)
            or not record["answer"].strip()
        ):
            raise TokendynError(f'{path}:{number}: needs string fields "prompt" and "answer" (non-empty)')
        for key in record:
            if key in RESERVED:
                raise TokendynError(f"{path}:{number}: field '{key}' is a name tokendyn uses; rename it")
        records.append(record)
    if not records:
        raise TokendynError(f"{path} has no instances; add prompt/answer lines")
    return GenerationTask(name=clean_name(name or path.stem), records=tuple(records))


def _scalar(value):
    return "|".join(map(str, value)) if isinstance(value, list) else None if isinstance(value, dict) else value


def exact_match(completion: str, instance: dict) -> bool:
    """The default checker: completion and answer are equal after stripping surrounding whitespace."""
    return completion.strip() == instance["answer"].strip()


def load_checker(spec: str | None) -> Callable[[str, dict], bool]:
    """`package.module:function` -> that function; None -> `exact_match`."""
    if spec is None or spec == "exact":
        return exact_match
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise TokendynError(f"checker '{spec}' is not of the form package.module:function")
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise TokendynError(
            f"cannot import checker '{spec}' ({err}); make the module importable "
            "(e.g. on PYTHONPATH) and check the function name"
        ) from None
    if not callable(function):
        raise TokendynError(f"checker '{spec}' is not callable; name a function(completion, instance) -> bool")
    try:
        inspect.signature(function).bind("completion", {"prompt": "", "answer": ""})
    except TypeError:
        raise TokendynError(
            f"checker '{spec}' cannot be called as function(completion, instance); give it exactly those two parameters"
        ) from None
    except ValueError:  # builtins without a signature: checked when first called
        pass
    return function


def _judge(check: Callable[[str, dict], bool], completion: str, instance: dict) -> bool:
    """The checker's verdict; its failure becomes a one-line error naming it."""
    try:
        return bool(check(completion, instance))
    except Exception as err:  # user code: any exception is the checker's
        name = getattr(check, "__qualname__", repr(check))
        raise TokendynError(
            f"checker {name} failed on {completion!r}: {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}; fix the checker"
        ) from err


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    ends = [text.find(s) for s in stop if s and s in text]
    return text[: min(ends)] if ends else text


class Sampler:
    """`sample(n, rng)` for one model and one prompt: n completions as text (see the module docstring)."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        prompt_ids: list[int],
        new_tokens: int,
        top_p: float | None,
        stop: Sequence[str],
    ) -> None:
        self.model, self.tokenizer, self.stop = model, tokenizer, tuple(stop)
        self.prompt = torch.tensor(prompt_ids, dtype=torch.long)[None]
        self.new_tokens = new_tokens
        self.top_p = 1.0 if top_p is None else top_p  # nucleus of mass 1 = the full distribution

    def __call__(self, n: int, rng: np.random.Generator) -> list[str]:
        uniforms = torch.from_numpy(rng.random((n, self.new_tokens)))
        tokens = decode(
            [self.model],
            [1.0],
            self.prompt.expand(n, -1),
            self.new_tokens,
            vocab_size=len(self.tokenizer),
            top_p=self.top_p,
            uniforms=uniforms,
            eos_token_id=self.tokenizer.eos_token_id,
        ).numpy()
        texts = self.tokenizer.batch_decode([row[row != PAD].tolist() for row in tokens])
        return [cut_at_stop(t, self.stop) for t in texts]


def prompt_ids(
    task: GenerationTask, tokenizer: PreTrainedTokenizerBase, prefix: list[int], new_tokens: int | None
) -> tuple[list[list[int]], list[int]]:
    """Token ids of every prompt (the main set's prefix tokens first, `corpus.prefix_ids`) and the
    tokens to generate per instance: `new_tokens`, or as many as the answer takes after the prompt (at least 1)."""
    first = list(prefix)
    prompts = [p.rstrip() for p in task.prompts]
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    if new_tokens is None:
        full = tokenizer([p + " " + a.strip() for p, a in zip(prompts, task.answers)], add_special_tokens=False)
        lengths = [max(1, len(f) - len(i)) for f, i in zip(full["input_ids"], ids)]
    elif new_tokens < 1:
        raise TokendynError(f"new_tokens = {new_tokens} must be at least 1")
    else:
        lengths = [new_tokens] * len(ids)
    if not all(ids):
        raise TokendynError(f"task '{task.name}': an instance has an empty prompt; give every instance a prompt")
    return [first + list(row) for row in ids], lengths


def run_pass_until(
    suite: Suite | str | Path,
    out: str | Path,
    task: GenerationTask | str | Path,
    *,
    passes: int = 2,
    max_samples: int = 100_000,
    batch_size: int = 256,
    top_p: float | None = None,
    new_tokens: int | None = None,
    stop: Sequence[str] = DEFAULT_STOP,
    checker: str | None = None,
    seed: int = 0,
    force: bool = False,
    every: int = 1,
    device: str = "auto",
    dtype: str = "auto",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> Path:
    """PassUntil for every instance of `task` under every checkpoint of the suite (or every `every`-th),
    into the store at `out`.

    Parameters
    ----------
    task : a GenerationTask or the path of its JSONL.
    passes : the target r (>= 2); max_samples : the cap K_max; batch_size : completions per batch.
    top_p : nucleus mass in (0, 1]; None samples at temperature 1 from the full distribution.
    new_tokens : tokens per completion (default: the answer's length in tokens, per instance).
    stop : completions are cut at the first of these strings. checker : `package.module:function`
        called as function(completion, instance) -> bool (default: exact match).
    seed : seeds every run (see the module docstring). force : redo a task already in the store.
    every : run only at every `every`-th checkpoint of each model and at its last (`extract.scored_at`);
        the others stay not done (missing in the analyses) until a run with every=1 fills them in. Not
        part of the group's parameters, so runs with different `every` add to the same group.

    The main set (and the suite's own sets) are extracted first where not done, which creates the
    store or checks that it belongs to this suite, and gives every checkpoint its validation loss.
    """
    suite = suite if isinstance(suite, Suite) else load_suite(suite)
    task = task if isinstance(task, GenerationTask) else read_generation_task(task)
    if top_p is not None and not 0 < top_p <= 1:
        raise TokendynError(f"top_p = {top_p} must be in (0, 1]; or leave it out for temperature-1 sampling")
    if passes < 2 or max_samples < passes or batch_size < 1:
        raise TokendynError("PassUntil needs passes >= 2, max_samples >= passes and batch_size >= 1")
    _check_every(every)
    check = load_checker(checker)
    out = Path(out)
    # The prompts and lengths are checked before the main extraction, which may take long.
    tokenizer = checkpoints.load_tokenizer(suite, trust_remote_code)
    ids, lengths = prompt_ids(task, tokenizer, prefix_ids(suite.eval.prefix, tokenizer), new_tokens)
    context = suite_context(suite, trust_remote_code)
    longest = max(len(i) + n for i, n in zip(ids, lengths))
    if context is not None and longest > context:
        raise TokendynError(
            f"task '{task.name}': prompt + completion ({longest} tokens) exceed the models' "
            f"context ({context}); shorten the prompts or lower new_tokens"
        )
    params = {
        "task": task.fingerprint,
        "passes": passes,
        "max_samples": max_samples,
        "batch_size": batch_size,
        "top_p": top_p,
        "new_tokens": new_tokens,
        "stop": list(stop),
        "checker": checker or "exact",
        "seed": seed,
    }
    with writer_lock(out):
        extract(
            suite,
            out,
            device=device,
            dtype=dtype,
            allow_pickle=allow_pickle,
            trust_remote_code=trust_remote_code,
            progress=progress,
        )
        group = prepare_task(out, task, lengths, params, force)
        _run_all(
            suite,
            group,
            task,
            tokenizer,
            ids,
            lengths,
            check,
            passes=passes,
            max_samples=max_samples,
            batch_size=batch_size,
            top_p=top_p,
            stop=stop,
            seed=seed,
            every=every,
            device=device,
            dtype=dtype,
            allow_pickle=allow_pickle,
            trust_remote_code=trust_remote_code,
            progress=progress,
        )
    return out


def _check_every(every: int) -> None:
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise TokendynError(
            f"--every {every!r} is not a whole number of checkpoints >= 1; give e.g. 2 (every second), or 1 (all)"
        )


def _run_all(
    suite: Suite,
    group: zarr.Group,
    task: GenerationTask,
    tokenizer: PreTrainedTokenizerBase,
    ids: list[list[int]],
    lengths: list[int],
    check: Callable[[str, dict], bool],
    *,
    passes: int,
    max_samples: int,
    batch_size: int,
    top_p: float | None,
    stop: Sequence[str],
    seed: int,
    every: int,
    device: str,
    dtype: str,
    allow_pickle: bool,
    trust_remote_code: bool,
    progress: bool,
) -> None:
    """Every (checkpoint, instance) of the task not yet done at the checkpoints `every` selects, written
    into its group as it completes."""
    device, torch_dtype = hardware.choose(device, dtype)
    hf_logging.disable_progress_bar()
    done = np.asarray(group["done"])
    todo = [
        (m, c)
        for m, spec in enumerate(suite.models)
        for c in range(len(spec.checkpoints))
        if not done[m, c] and scored_at(c, len(spec.checkpoints), every)
    ]
    n = len(task.prompts)
    with tqdm(total=len(todo) * n, unit="instance", disable=not progress, dynamic_ncols=True) as bar:
        for m, c in todo:
            ckpt = suite.models[m].checkpoints[c]
            bar.set_description(f"passuntil {task.name}: {ckpt.model} step {ckpt.step}")
            committed = _committed(group, m, c)
            bar.update(int(committed.sum()))
            if not committed.all():
                model = checkpoints.load_model(
                    ckpt,
                    device=device,
                    dtype=torch_dtype,
                    allow_pickle=allow_pickle,
                    trust_remote_code=trust_remote_code,
                )
                for i in np.flatnonzero(~committed):
                    started = time.perf_counter()
                    sampler = Sampler(model, tokenizer, ids[i], lengths[i], top_p, stop)
                    instance = task.records[i]
                    run = pass_until(
                        sampler,
                        lambda text: _judge(check, text, instance),
                        passes,
                        max_samples,
                        batch_size,
                        np.random.default_rng([seed, m, c, int(i)]),
                    )
                    group["seconds"][m, c, i] = time.perf_counter() - started
                    for name in COUNTS:
                        group[name][m, c, i] = getattr(run, name)
                    bar.update()
                    bar.set_postfix(drawn=run.drawn, passes=run.passes, refresh=False)
                del model
            group["done"][m, c] = True


def _committed(group: zarr.Group, m: int, c: int) -> np.ndarray:
    """Which instances of checkpoint (m, c) hold their results (`samples` is written last).

    A checkpoint with a chunk that no longer decodes (the writer's repair, run by the main set's
    extraction, cleared its `done` flag) is reset to "not yet run" and redone whole, since its
    instances' other counts cannot be trusted and a partial write would have to decode the chunk.
    """
    try:
        for name in (*COUNTS, "seconds"):
            group[name][m, c]
    except Exception:  # noqa: BLE001  (codecs raise assorted types for a damaged file)
        for name in COUNTS:
            group[name][m, c] = -1
        group["seconds"][m, c] = np.nan
    return np.asarray(group["samples"][m, c]) > 0

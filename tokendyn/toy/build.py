"""Build the built-in suite: world, tokenizer, evaluation sets, and a few OPT sizes trained on it.

`build()` writes a suite directory that `tokendyn extract` reads:

    suite.toml                  [eval] (validation set), [[sets]] (filler, facts), [[models]]
    data/valid.jsonl            held-out template combinations of every entity's facts
    data/filler.jsonl           filler and mention sentences (natural text without facts)
    data/pairs.jsonl            true/false statement pairs (kind "pairs")
    data/world.json             the entities and their facts
    ckpts/<size>/step<N>/       Hugging Face checkpoints (safetensors) with the tokenizer
    toy-build.json              the parameters, their key and the build's timings (written last)

A build is keyed by all of its parameters; `build()` reuses a finished build with the same key
and rebuilds when any parameter changes. It is written to a temporary folder of its own process
(`tokendyn.atomic`) and renamed into place at the end, so an interrupted build never looks finished.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import os
import queue
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import OPTForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from tokendyn.atomic import create_atomically, replace_atomically
from tokendyn.errors import TokendynError
from tokendyn.toy import world as toy_world
from tokendyn.toy.tokenizer import train_tokenizer
from tokendyn.toy.train import ModelSize, TrainConfig, opt_config, pinned_threads, train

BUILD_VERSION = 1  # bump when the builder's output changes for the same parameters
MANIFEST = "toy-build.json"
# Sizes train in parallel processes only when the whole training is estimated to take longer than
# this (seconds): starting a process (importing torch and transformers) costs a few seconds.
PARALLEL_MIN_SECONDS = 60.0
REPORT_EVERY = 10  # training steps between progress messages


@dataclasses.dataclass(frozen=True)
class Preset:
    """Everything a build depends on besides the seed: world, training, sequence length, sizes."""

    world: toy_world.WorldConfig
    train: TrainConfig
    seq_len: int
    sizes: dict[str, ModelSize]


PRESETS = {
    # 120 entities x 5 Zipf(1.2) attributes, 150 exposures per fact (1.4M training tokens) in batches
    # of 12 sequences: 918 steps, the step schedule of the earlier 300-entity build. The smallest model
    # (14k non-embedding parameters) cannot memorise the facts, toy-M (59k) a few, the largest (793k)
    # all; see docs/toy.md for what the suite shows. Training in parallel, toy-S and toy-M finish on
    # one core at about 40% of toy-L's steps; toy-L then takes both.
    "default": Preset(
        world=toy_world.WorldConfig(n_entities=120, exposures=150),
        train=TrainConfig(batch_size=12),
        seq_len=128,
        sizes={
            "S": ModelSize(hidden=24, layers=2, heads=2, lr=3e-3),
            "M": ModelSize(hidden=40, layers=3, heads=2, lr=2e-3),
            "L": ModelSize(hidden=128, layers=4, heads=2, lr=2e-3, more_threads_from=0.4),
        },
    ),
    # Seconds to build: what the tests use.
    "quick": Preset(
        world=toy_world.WorldConfig(
            n_entities=24, n_values=8, exposures=6, filler_rate=1.0, mention_rate=1.0, n_filler_docs=8
        ),
        train=TrainConfig(batch_size=4, warmup_steps=4, log_checkpoints=3, linear_checkpoints=3, switch_fraction=0.25),
        seq_len=128,
        sizes={
            "S": ModelSize(hidden=8, layers=1, heads=1, lr=1e-2),
            "M": ModelSize(hidden=16, layers=1, heads=2, lr=1e-2),
            "L": ModelSize(hidden=32, layers=2, heads=2, lr=1e-2),
        },
    ),
}


def cache_dir() -> Path:
    """Where tokendyn caches builds: `$TOKENDYN_CACHE`, else `cache/` in the working directory."""
    return Path(os.environ.get("TOKENDYN_CACHE", "cache"))


def build_parameters(
    preset: str = "default", sizes: Sequence[str] | None = None, seed: int = 0, threads: int = 1
) -> dict:
    """The resolved parameters of a build (what its cache key covers)."""
    if preset not in PRESETS:
        raise TokendynError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    chosen = PRESETS[preset]
    names = list(chosen.sizes) if sizes is None else list(sizes)
    unknown = [n for n in names if n not in chosen.sizes]
    if unknown or not names:
        raise TokendynError(f"unknown or no sizes {unknown or names}; preset {preset!r} has {', '.join(chosen.sizes)}")
    return {
        "version": BUILD_VERSION,
        "preset": preset,
        "seed": seed,
        "threads": threads,
        "seq_len": chosen.seq_len,
        "world": dataclasses.asdict(chosen.world),
        "train": dataclasses.asdict(chosen.train),
        "sizes": {n: dataclasses.asdict(chosen.sizes[n]) for n in names},
    }


def build_key(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]


def cached(preset: str = "default", sizes: Sequence[str] | None = None, seed: int = 0, threads: int = 1) -> Path | None:
    """The suite.toml of a finished build with these parameters in the cache directory, else None."""
    params = build_parameters(preset, sizes, seed, threads)
    key = build_key(params)
    out = cache_dir() / "suites" / f"{preset}-{key}"
    return out / "suite.toml" if _manifest_key(out) == key else None


def build(
    out: str | Path | None = None,
    preset: str = "default",
    sizes: Sequence[str] | None = None,
    seed: int = 0,
    progress: bool = True,
    threads: int = 1,
) -> Path:
    """Build the suite (or reuse a finished build with the same parameters); return its suite.toml.

    out: the suite directory; default `<cache>/suites/<preset>-<key>`. An existing directory is
        replaced only if it holds an earlier toy build.
    preset: "default" or "quick" (see PRESETS).
    sizes: names of the preset's model sizes to train (default: all).
    seed: seeds the world, the text, the evaluation sets and the initial weights.
    threads: torch's CPU thread count during training (pinned: results depend on it).
    """
    params = build_parameters(preset, sizes, seed, threads)
    key = build_key(params)
    out = Path(out) if out is not None else cache_dir() / "suites" / f"{preset}-{key}"
    if _manifest_key(out) == key:
        return out / "suite.toml"
    if out.exists() and any(out.iterdir()) and _manifest_key(out) is None:
        raise TokendynError(f"{out} exists and is not a toy suite; choose an empty or new --out directory")

    def write(folder: Path) -> None:
        with pinned_threads(threads), _quiet_transformers():
            timings = _write_suite(folder, params, key, progress)
        manifest = {"key": key, "parameters": params, "seconds": timings}
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")

    # built aside under a name of this process and swapped in whole; only dead builds' leftovers are removed
    if out.exists() and any(out.iterdir()):
        replace_atomically(out, write)
    elif not create_atomically(out, write) and _manifest_key(out) != key:
        raise TokendynError(f"another process wrote {out} meanwhile; rerun to use or replace it")
    return out / "suite.toml"


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' per-checkpoint "Writing model shards" bars under our own bar."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _manifest_key(out: Path) -> str | None:
    try:
        return json.loads((out / MANIFEST).read_text())["key"]
    except (OSError, ValueError, KeyError):
        return None


def _write_suite(root: Path, params: dict, key: str, progress: bool) -> dict[str, float]:
    seed, seq_len = params["seed"], params["seq_len"]
    world_cfg = toy_world.WorldConfig(**params["world"])
    train_cfg = TrainConfig(**params["train"])
    started = time.perf_counter()
    world = toy_world.make_world(world_cfg, seed=f"{seed}:world")
    docs = toy_world.training_documents(world, seed=f"{seed}:train")
    tokenizer = train_tokenizer((d["text"] for d in docs), max_length=seq_len)
    tokens = token_stream([d["text"] for d in docs], tokenizer, seq_len)
    valid = toy_world.validation_documents(world, seed=f"{seed}:valid")
    filler = toy_world.filler_documents(world, seed=f"{seed}:filler")
    pairs = toy_world.fact_pairs(world, seed=f"{seed}:pairs")
    eval_sets = {  # name -> (file, rows, texts)
        "main": ("valid.jsonl", valid, [d["text"] for d in valid]),
        "filler": ("filler.jsonl", filler, [d["text"] for d in filler]),
        "facts": ("pairs.jsonl", pairs, [p[k] for p in pairs for k in ("true", "false")]),
    }
    (root / "data").mkdir(parents=True)
    set_lengths = {}
    for name, (file, rows, texts) in eval_sets.items():
        _check_seen_in_training(tokenizer, texts)
        _write_jsonl(root / "data" / file, rows)
        set_lengths[name] = _fitting_length(tokenizer, texts, seq_len)
    (root / "data" / "world.json").write_text(json.dumps(_describe(world), indent=1) + "\n")
    timings = {"data": time.perf_counter() - started}

    saved, seconds = train_sizes(
        params["sizes"], tokens, tokenizer, train_cfg, root / "ckpts", seed, params["threads"], progress
    )
    timings.update(seconds)
    _write_toml(root / "suite.toml", params, key, saved, set_lengths, tokens_per_step=train_cfg.batch_size * seq_len)
    return timings


def step_seconds(
    size: ModelSize, tokens: torch.Tensor, tokenizer: PreTrainedTokenizerFast, cfg: TrainConfig, repeats: int = 2
) -> float:
    """Measured seconds of one training step of `size` (forward, backward, AdamW): the sizes' relative costs."""
    model = OPTForCausalLM(opt_config(size, tokenizer, tokens.shape[1]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=size.lr)
    batch = tokens[: cfg.batch_size]
    best = float("inf")
    for _ in range(repeats + 1):  # the first step warms up allocations
        started = time.perf_counter()
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        best = min(best, time.perf_counter() - started)
    return best


def train_sizes(
    sizes: dict[str, dict],
    tokens: torch.Tensor,
    tokenizer: PreTrainedTokenizerFast,
    cfg: TrainConfig,
    out: Path,
    seed: int,
    threads: int,
    progress: bool,
) -> tuple[dict[str, list[int]], dict[str, float]]:
    """Train every size (saved under out/<name>); returns (saved steps, seconds) per size.

    Sizes train in parallel processes, one per core (each with `threads` torch threads, so the
    weights equal a sequential build's), when the training is long enough to pay for starting
    them (PARALLEL_MIN_SECONDS). The progress bar counts each size's steps weighted by its
    measured step cost, so its ETA holds although the sizes' steps cost very different times.
    """
    steps = len(tokens) // cfg.batch_size
    cost = {name: step_seconds(ModelSize(**size), tokens, tokenizer, cfg) for name, size in sizes.items()}
    workers = min(len(sizes), os.cpu_count() or 1)
    parallel = workers > 1 and steps * sum(cost.values()) > PARALLEL_MIN_SECONDS
    # whole milliseconds per step, so the updates add up to the total exactly (float seconds overshot
    # or fell short of a rounded total, and tqdm warned or stopped short of 100%)
    weight = {name: max(1, round(1000 * seconds)) for name, seconds in cost.items()}
    with tqdm(
        total=steps * sum(weight.values()),
        disable=not progress,
        unit="ms",
        smoothing=0,  # rate since the start: the two processes' reports arrive in bursts
        bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}] {postfix}",
        desc=f"training toy suite ({workers if parallel else 1} process{'es' if parallel else ''})",
    ) as bar:

        def report(name: str, n_steps: int, loss: float) -> None:
            bar.update(n_steps * weight[name])
            bar.set_postfix(model=name, loss=f"{loss:.3f}", refresh=False)

        if not parallel:
            results = {
                name: _train_one(name, size, tokens, tokenizer, cfg, out / name, seed, threads, report)
                for name, size in sizes.items()
            }
        else:
            results = _train_parallel(sizes, cost, workers, tokens, tokenizer, cfg, out, seed, threads, report)
    return {name: r[0] for name, r in results.items()}, {name: r[1] for name, r in results.items()}


def _train_one(
    name: str, size: dict, tokens: torch.Tensor, tokenizer, cfg: TrainConfig, out: Path, seed: int, threads: int, report
) -> tuple[list[int], float]:
    """Train one size with `threads` torch threads; report(name, steps, loss) every REPORT_EVERY steps."""
    hf_logging.disable_progress_bar()
    started, count, last = time.perf_counter(), 0, float("nan")

    def on_step(loss: float) -> None:
        nonlocal count, last
        count, last = count + 1, loss
        if count == REPORT_EVERY:
            report(name, count, loss)
            count = 0

    saved = train(ModelSize(**size), tokens, tokenizer, cfg, out, seed=seed, on_step=on_step, threads=threads)
    if count:
        report(name, count, last)
    return saved, time.perf_counter() - started


def _train_parallel(
    sizes: dict[str, dict],
    cost: dict[str, float],
    workers: int,
    tokens: torch.Tensor,
    tokenizer,
    cfg: TrainConfig,
    out: Path,
    seed: int,
    threads: int,
    report,
) -> dict[str, tuple[list[int], float]]:
    """`_train_one` for every size in a pool of spawned processes, the costliest first (balances the cores)."""
    context = multiprocessing.get_context("spawn")  # fork after torch has started threads can deadlock
    messages = context.Queue()
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_set_messages, initargs=(messages,)) as pool:
        futures = {
            name: pool.submit(_train_worker, name, sizes[name], tokens, tokenizer, cfg, out / name, seed, threads)
            for name in sorted(sizes, key=cost.get, reverse=True)
        }
        while not all(f.done() for f in futures.values()) or not messages.empty():
            with contextlib.suppress(queue.Empty):
                report(*messages.get(timeout=0.2))
        return {name: futures[name].result() for name in sizes}


_messages = None  # a worker process's queue of progress messages to the parent


def _set_messages(messages) -> None:
    global _messages
    _messages = messages


def _train_worker(
    name: str, size: dict, tokens: torch.Tensor, tokenizer, cfg: TrainConfig, out: Path, seed: int, threads: int
) -> tuple[list[int], float]:
    return _train_one(name, size, tokens, tokenizer, cfg, out, seed, threads, lambda *message: _messages.put(message))


def token_stream(texts: list[str], tokenizer: PreTrainedTokenizerFast, seq_len: int) -> torch.Tensor:
    """All documents as one stream, each preceded by BOS, cut into (n_sequences, seq_len)."""
    ids = [[tokenizer.bos_token_id, *e.ids] for e in tokenizer.backend_tokenizer.encode_batch(texts)]
    stream = torch.tensor([i for doc in ids for i in doc], dtype=torch.long)
    n = len(stream) // seq_len
    return stream[: n * seq_len].view(n, seq_len)


def _check_seen_in_training(tokenizer, texts: list[str]) -> None:
    """Evaluation text may only use words of the training text (whose words are the vocabulary)."""
    unseen = {
        text[start:end]
        for text, e in zip(texts, tokenizer.backend_tokenizer.encode_batch(texts))
        for token_id, (start, end) in zip(e.ids, e.offsets)
        if token_id == tokenizer.unk_token_id
    }
    if unseen:
        raise ValueError(
            f"evaluation words never seen in training: {sorted(unseen)}; "
            "render more training text (exposures, filler_rate)"
        )


def _fitting_length(tokenizer, texts: list[str], seq_len: int) -> int:
    """The shortest multiple of 8 that holds every text with its BOS (at most `seq_len`): less padding."""
    longest = 1 + max(len(e.ids) for e in tokenizer.backend_tokenizer.encode_batch(texts))
    return min(seq_len, -(-longest // 8) * 8)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _describe(world: toy_world.World) -> dict:
    return {
        "values": world.values,
        "entities": [
            {"name": n, **{a: world.values[a][v] for a, v in f.items()}} for n, f in zip(world.names, world.facts)
        ],
    }


def _write_toml(
    path: Path, params: dict, key: str, saved: dict[str, list[int]], set_lengths: dict[str, int], tokens_per_step: int
) -> None:
    lines = [
        f"# Built by `tokendyn toy build --preset {params['preset']} --seed {params['seed']}` "
        f"(key {key}; parameters in {MANIFEST}).",
        "[eval]",
        'files = ["data/valid.jsonl"]',
        f"seq_len = {set_lengths['main']}",
        "",
        "[[sets]]",
        'name = "filler"',
        'files = ["data/filler.jsonl"]',
        f"seq_len = {set_lengths['filler']}",
        "",
        "[[sets]]",
        'name = "facts"',
        'files = ["data/pairs.jsonl"]',
        'kind = "pairs"',
        f"seq_len = {set_lengths['facts']}",
    ]
    for name, steps in saved.items():
        lines += ["", "[[models]]", f'name = "toy-{name}"', f"tokens_per_step = {tokens_per_step}", "checkpoints = ["]
        lines += [f'  {{ step = {s}, path = "ckpts/{name}/step{s}" }},' for s in steps]
        lines.append("]")
    path.write_text("\n".join(lines) + "\n")

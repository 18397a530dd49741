"""`tokendyn demo`: the whole job on the built-in suite, from nothing to findings, in one call.

build (or reuse) the toy suite -> generate the contrastive sets -> extract every evaluation set ->
score the world's multiple-choice tasks and run PassUntil on its recall questions -> analyze -> report ->
findings. Every phase is skipped when its output is up to date: the build is cached by its
parameters, generated text is kept next to the store, and a ledger next to the store
(`<store>.demo.json`) records for every later phase a hash of its inputs (its parameters, tokendyn's
version, the suite's key and, for the phases after extraction, the store's metadata). A phase whose
recorded inputs match is not run at all; one that runs resumes what an interrupted run left.

Progress names the current phase and an ETA from per-phase cost estimates (`estimate_costs`): model
FLOPs x tokens for training, scoring and sampling (the sizes train in parallel processes, so the
training's wall time is its longest process), plus a fixed cost per model step and per checkpoint
load. Once a phase has run, the ETA scales the remaining estimates by the measured rate.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from tokendyn import __version__, store
from tokendyn.config.suite import EvalSet, load_suite
from tokendyn.data.tasks import read_task
from tokendyn.models import extract, generate, sampling, tasks
from tokendyn.pipelines import analyze, report
from tokendyn.toy import build, findings
from tokendyn.toy import tasks as toy_tasks
from tokendyn.toy.train import checkpoint_steps
from tokendyn.toy.world import ATTRIBUTES

CORRUPT_RATES = (0.2, 0.4, 0.8)
# The corrupted sets only show that perplexity rises with the corruption rate and falls with size:
# a quarter of the main set's documents (at least CORRUPT_MIN) shows it at a quarter of the cost.
CORRUPT_SHARE = 0.25
CORRUPT_MIN = 16
GENERATE_PROMPTS = 50
GENERATE_TOKENS = 50
GENERATE_MIXTURES = len(generate.MIXTURES)
# PassUntil samples under every checkpoint of every model: a few recall questions with a small cap
# keep the demo to minutes (the estimator reports capped runs as censored bounds).
RECALL_INSTANCES = 8
RECALL_CAP = 100
RECALL_TOKENS = 4  # a value is one or two words
# Extraction runs on a local dask cluster of one process per core when estimated to take longer than
# this (reference seconds): starting the cluster costs seconds.
PARALLEL_EXTRACT_MIN = 60.0
PHASES = ("build", "generate", "extract", "tasks", "passuntil", "analyze", "report", "findings")

# The cost model, in seconds of one reference core (AVX2, float32). The rate is what tiny models
# reach (far below the GEMM peak); the overheads are per model call and per checkpoint load.
FLOPS_PER_SECOND = 4e10
STEP_OVERHEAD = 0.004  # seconds per layer per training step (Python, small kernels)
FORWARD_OVERHEAD = 0.001  # seconds per layer per forward call (scoring batches, sampling steps)
LOAD_SECONDS = 0.2  # loading and fingerprinting one checkpoint
SET_SECONDS = 0.05  # per set and checkpoint: packing, writing and committing the scores
TOKENS_PER_SENTENCE = 11.7  # training tokens per rendered sentence (measured on the default world)
ANALYZE_PER_VALUE = 2e-6  # analyze, per (token, checkpoint, model) of the main set
ANALYZE_FIXED = 35.0  # analyze: importing and fitting regardless of size (measured on the quick preset)
REPORT_FIXED = 50.0  # report: drawing every figure (measured on the quick preset)
SUMMARY_FIXED = 3.0


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What the cost model needs of one size: parameters by part, layers, checkpoints."""

    hidden: int
    layers: int
    vocab: int
    seq_len: int
    checkpoints: int

    @property
    def params(self) -> int:
        """Weights a token passes through: the blocks (12 h^2 per layer) and the output head."""
        return 12 * self.hidden**2 * self.layers + self.vocab * self.hidden

    def forward_flops(self, tokens: float) -> float:
        """Forward FLOPs of `tokens` in windows of seq_len: 2 per weight, plus attention."""
        return tokens * (2 * self.params + 4 * self.layers * self.seq_len * self.hidden)


def preset_shapes(preset: str) -> tuple[dict[str, ModelShape], int]:
    """The model shapes of a preset and its training steps, estimated from the world's size."""
    chosen = build.PRESETS[preset]
    world, cfg = chosen.world, chosen.train
    sentences = world.n_entities * len(ATTRIBUTES) * world.exposures * (1 + world.filler_rate + world.mention_rate)
    steps = max(1, int(sentences * TOKENS_PER_SENTENCE / (chosen.seq_len * cfg.batch_size)))
    vocab = 2 * world.n_entities + len(ATTRIBUTES) * world.n_values + 200
    n_ckpt = len(checkpoint_steps(steps, cfg.log_checkpoints, cfg.linear_checkpoints, cfg.switch_fraction))
    shapes = {
        name: ModelShape(size.hidden, size.layers, vocab, chosen.seq_len, n_ckpt) for name, size in chosen.sizes.items()
    }
    return shapes, steps


def training_seconds(shape: ModelShape, steps: int, batch_tokens: int) -> float:
    """Reference seconds to train one size: forward + backward (3x forward) + a per-layer overhead."""
    return steps * (3 * shape.forward_flops(batch_tokens) / FLOPS_PER_SECOND + STEP_OVERHEAD * shape.layers)


def makespan(costs: list[float], workers: int) -> float:
    """Wall time of independent jobs on `workers` processes, the longest first (as build.train_sizes runs them)."""
    loads = [0.0] * max(1, workers)
    for cost in sorted(costs, reverse=True):
        loads[loads.index(min(loads))] += cost
    return max(loads)


def scoring_seconds(shapes: dict[str, ModelShape], tokens: float, n_sets: int, calls: float = 1.0) -> float:
    """Reference seconds to score `tokens` in `n_sets` sets under every checkpoint of every size (forward only)."""
    per_checkpoint = {
        name: s.forward_flops(tokens) / FLOPS_PER_SECOND
        + LOAD_SECONDS
        + SET_SECONDS * n_sets
        + FORWARD_OVERHEAD * s.layers * calls
        for name, s in shapes.items()
    }
    return sum(s.checkpoints * per_checkpoint[name] for name, s in shapes.items())


def estimate_costs(preset: str, workers: int = 1) -> dict[str, float]:
    """Estimated wall seconds of every phase of a fresh demo on `workers` idle reference cores."""
    chosen = build.PRESETS[preset]
    shapes, steps = preset_shapes(preset)
    world = chosen.world
    batch_tokens = chosen.train.batch_size * chosen.seq_len
    train = [training_seconds(s, steps, batch_tokens) for s in shapes.values()]
    fact_tokens = 8  # a held-out fact sentence
    main_tokens = world.n_entities * len(ATTRIBUTES) * fact_tokens
    filler_tokens = world.n_filler_docs * 4 * TOKENS_PER_SENTENCE
    pairs_tokens = 2 * world.n_entities * len(ATTRIBUTES) * fact_tokens
    generated_tokens = GENERATE_PROMPTS * GENERATE_MIXTURES * (GENERATE_TOKENS + 6)
    corrupted_tokens = len(CORRUPT_RATES) * max(CORRUPT_MIN * 40, CORRUPT_SHARE * main_tokens)
    extract_tokens = main_tokens + filler_tokens + pairs_tokens + generated_tokens + corrupted_tokens
    extract_sets = 4 + len(CORRUPT_RATES)  # main, filler, facts, hallucinated, corrupted
    extract_seconds = scoring_seconds(shapes, extract_tokens, extract_sets)
    extract_workers = workers if extract_seconds > PARALLEL_EXTRACT_MIN else 1
    largest = max(shapes.values(), key=lambda s: s.params)
    smallest = min(shapes.values(), key=lambda s: s.params)
    # Choice tasks: a group of 4 options per item, with 2 demonstrations, for every attribute and composition.
    task_items = min(world.n_entities, inspect.signature(toy_tasks.write_tasks).parameters["n_items"].default)
    task_tokens = task_items * (len(ATTRIBUTES) + 2) * 4 * 3 * fact_tokens
    recall_samples = RECALL_INSTANCES * RECALL_CAP
    analyze_values = main_tokens * sum(s.checkpoints for s in shapes.values())
    return {
        "build": makespan(train, min(workers, len(train))),
        "generate": GENERATE_MIXTURES
        * GENERATE_PROMPTS
        * GENERATE_TOKENS
        * (largest.forward_flops(GENERATE_TOKENS) + smallest.forward_flops(GENERATE_TOKENS))
        / FLOPS_PER_SECOND
        / 32,  # batches of 32 prompts, each step re-reading the sequence so far
        "extract": extract_seconds / extract_workers,
        "tasks": scoring_seconds(shapes, task_tokens, len(ATTRIBUTES) + 2),
        "passuntil": scoring_seconds(shapes, recall_samples * RECALL_TOKENS * 3 * fact_tokens, 1, RECALL_TOKENS),
        "analyze": ANALYZE_FIXED + ANALYZE_PER_VALUE * analyze_values,
        "report": REPORT_FIXED,
        "findings": SUMMARY_FIXED,
    }


class Progress:
    """Prints each phase as it starts (or is skipped) with the ETA of the whole demo.

    The ETA is the sum of the remaining phases' estimates, scaled by how long the phases run so
    far took against their estimates (so a slow or busy machine gets a longer ETA).
    """

    def __init__(self, costs: dict[str, float], show: bool = True, clock: Callable[[], float] = time.perf_counter):
        self.costs = dict(costs)
        self.show = show
        self.clock = clock
        self.estimated_done = 0.0
        self.measured_done = 0.0
        self.status: dict[str, str] = {}
        self.seconds: dict[str, tuple[float, float]] = {}  # phase -> (wall, CPU incl. child processes)
        self._started: tuple[str, float, float] | None = None

    def rate(self) -> float:
        """Measured seconds per estimated second (1 until a phase with a real cost has run)."""
        return self.measured_done / self.estimated_done if self.estimated_done > 1.0 else 1.0

    def eta(self) -> float:
        """Seconds left: the phases not finished, at the measured rate."""
        left = sum(cost for name, cost in self.costs.items() if name not in self.status)
        return left * self.rate()

    def start(self, name: str) -> None:
        self._started = (name, self.clock(), cpu_seconds())
        self._say(name, f"{name} (ETA of the demo {_minutes(self.eta())})")

    def skip(self, name: str) -> None:
        self.status[name] = "skipped"
        self._say(name, f"{name}: up to date, skipped")

    def finish(self, name: str) -> None:
        started_name, started_at, started_cpu = self._started or (None, 0.0, 0.0)
        if started_name != name:
            raise RuntimeError(f"phase {name} finished without starting")
        self.seconds[name] = (self.clock() - started_at, cpu_seconds() - started_cpu)
        self.measured_done += self.seconds[name][0]
        self.estimated_done += self.costs[name]
        self.status[name] = "ran"
        self._started = None

    def _say(self, name: str, text: str) -> None:
        if self.show:
            number = list(self.costs).index(name) + 1
            tqdm.write(f"[demo {number}/{len(self.costs)}] {text}")


def cpu_seconds() -> float:
    """CPU seconds of this process and of its finished child processes (parallel training, dask workers)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def stores_dir() -> Path:
    return build.cache_dir() / "stores"


def run_demo(preset: str = "default", seed: int = 0, progress: bool = True) -> dict:
    """Run every phase (skipping those up to date); return the paths written, the summary lines and
    `phases` ({phase: "ran" or "skipped"}) and `seconds` ({phase that ran: (wall, CPU seconds)})."""
    workers = min(2, os.cpu_count() or 1)
    steps = Progress(estimate_costs(preset, workers), show=progress)
    suite_path = build.cached(preset=preset, seed=seed)
    if suite_path is not None:
        steps.skip("build")
    else:
        steps.start("build")
        suite_path = build.build(preset=preset, seed=seed, progress=progress)
        steps.finish("build")
    suite = load_suite(suite_path)
    out = stores_dir() / f"toy-{suite_path.parent.name}.zarr"
    out.parent.mkdir(parents=True, exist_ok=True)
    stem = out.name.removesuffix(".zarr")
    ledger = Ledger(out.with_name(stem + ".demo.json"))
    suite_key = suite_path.parent.name

    generated = out.with_name(stem + ".generated.jsonl")
    if generated.is_file():
        steps.skip("generate")
    else:
        steps.start("generate")
        records = generate.generate(
            suite, prompts=GENERATE_PROMPTS, new_tokens=GENERATE_TOKENS, seed=seed, progress=progress
        )
        partial = generate.write_jsonl(records, generated.with_name(generated.name + ".partial"))
        partial.rename(generated)
        steps.finish("generate")

    n_main = sum(len(Path(f).read_text().splitlines()) for f in suite.eval.files)  # a window per document
    cap = max(CORRUPT_MIN, int(CORRUPT_SHARE * n_main))
    extra = [EvalSet(name="hallucinated", files=(generated,), seq_len=suite.eval.seq_len)]
    extra += [
        EvalSet(
            name=f"corrupted-{rate}",
            files=suite.eval.files,
            seq_len=suite.eval.seq_len,
            corrupt=rate,
            seed=seed,
            max_sequences=cap,
        )
        for rate in CORRUPT_RATES
    ]
    extract_workers = workers if steps.costs["extract"] * workers > PARALLEL_EXTRACT_MIN and workers > 1 else None

    def run_extract() -> None:
        extract.extract(suite, out, extra_sets=extra, progress=progress, workers=extract_workers)

    ledger.run(steps, "extract", [suite_key, [dataclasses.asdict(s) for s in extra]], run_extract, out)

    task_dir = out.with_name(stem + ".toy-tasks")

    def task_files() -> dict:
        return toy_tasks.write_tasks(suite_path.parent, task_dir, n_recall=RECALL_INSTANCES, seed=seed)

    def run_tasks() -> None:
        choice = [read_task(t["path"]) for t in task_files().values() if t["kind"] == "choice"]
        tasks.score_tasks(suite, out, choice, shots=2, seed=seed, progress=progress)

    ledger.run(steps, "tasks", [suite_key, seed, RECALL_INSTANCES], run_tasks, out)

    def run_pass_until() -> None:
        for task in (t for t in task_files().values() if t["kind"] == "generation"):
            sampling.run_pass_until(
                suite,
                out,
                task["path"],
                passes=2,
                max_samples=RECALL_CAP,
                batch_size=RECALL_CAP,
                seed=seed,
                progress=progress,
            )

    ledger.run(steps, "passuntil", [suite_key, seed, RECALL_INSTANCES, RECALL_CAP], run_pass_until, out)

    stamp = _stamp(out)
    folder = analyze.default_folder(out)
    summary_file = folder / "summary.txt"

    def run_analyze() -> None:
        lines = analyze.analyze(store.open_store(out), folder, progress=progress)
        summary_file.write_text("\n".join(lines) + "\n")

    ledger.run(steps, "analyze", [stamp], run_analyze, store_out=None, outputs=[summary_file])
    report_dir = out.with_name(stem + ".report")
    index = report_dir / "index.html"
    ledger.run(steps, "report", [stamp], lambda: report.write_report(out, report_dir, progress=progress), None, [index])
    findings_file = out.with_name(stem + ".findings.txt")
    ledger.run(
        steps,
        "findings",
        [stamp],
        lambda: findings_file.write_text("\n".join(findings.summary(out)) + "\n"),
        None,
        [findings_file],
    )
    return {
        "suite": suite_path,
        "store": out,
        "analysis": folder,
        "analysis_lines": summary_file.read_text().splitlines(),
        "findings": findings_file.read_text().splitlines(),
        "report": index,
        "phases": steps.status,
        "seconds": steps.seconds,
    }


class Ledger:
    """The inputs each phase last completed with, in a JSON file next to the store.

    A phase is skipped when its inputs (hashed with tokendyn's version) equal the recorded ones,
    its output files exist and, for the phases that write to the store, the store's metadata is
    still what the last of them left (so a store changed or repaired since reruns them; they then
    resume and recompute only what is missing).
    """

    def __init__(self, path: Path):
        self.path = path
        try:
            self.entries = json.loads(path.read_text())
        except (OSError, ValueError):
            self.entries = {}

    def run(
        self,
        steps: Progress,
        phase: str,
        inputs: list,
        work: Callable[[], object],
        store_out: Path | None,
        outputs: list[Path] = (),
    ) -> None:
        key = hashlib.sha256(json.dumps([__version__, inputs], sort_keys=True, default=str).encode()).hexdigest()
        current = (
            self.entries.get(phase) == key
            and all(p.is_file() for p in outputs)
            and (store_out is None or self.entries.get("store") == _stamp(store_out))
        )
        if current:
            steps.skip(phase)
            return
        steps.start(phase)
        work()
        self.entries[phase] = key
        if store_out is not None:
            self.entries["store"] = _stamp(store_out)
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps(self.entries, indent=1) + "\n")
        partial.replace(self.path)
        steps.finish(phase)


def _stamp(out: Path) -> str:
    """Changes whenever the store gains results or sets (their metadata is rewritten), or tokendyn changes."""
    digest = hashlib.sha256(__version__.encode())
    for meta in sorted(out.glob("**/zarr.json")):
        digest.update(meta.read_bytes())
    return digest.hexdigest()

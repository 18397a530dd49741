"""`tokendyn demo`: the whole job on the built-in suite, from nothing to findings, in one call.

build (or reuse) the toy suite -> generate the contrastive sets -> extract every evaluation set and
the world's multiple-choice tasks (each checkpoint loaded once for all of them) -> run PassUntil on its
recall questions -> analyze, writing the analysis folder and the report from one run of the studies ->
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

from tokendyn import __version__
from tokendyn.atomic import write_atomically
from tokendyn.config.suite import EvalSet, load_suite
from tokendyn.data.tasks import read_task
from tokendyn.models import extract, generate, sampling, tasks
from tokendyn.pipelines import analyze, report
from tokendyn.store import TASK_SET_PREFIX
from tokendyn.studies import STUDIES
from tokendyn.toy import build, findings
from tokendyn.toy import tasks as toy_tasks
from tokendyn.toy.train import ModelSize, checkpoint_steps
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
# Extraction runs in this process, torch's threads over the cores: on an idle 2-core machine that scored
# 38.6k tokens/s (1.65 cores busy) where 2 dask workers of one thread each reached 21k.
THREADED_SPEEDUP = 1.65
# The named sets and the tasks are read for the shape of their curves over training (where a set's
# perplexity turns, the loss at which a task leaves chance, pair preference first/best/last): scored
# at every second checkpoint of each model (and its last) every finding they support still shows on
# the default suite, at half the cost. The main set, whose per-token trajectories most studies read,
# keeps every checkpoint.
SPARSE_EVERY = 2

# The cost model, in seconds of one reference core (AVX2, float32), each constant measured on the
# default preset (benchmarks/demo.py prints the estimates beside the measurements).
FLOPS_PER_SECOND = 4e10  # training: batches of 4096 tokens
STEP_OVERHEAD = 0.004  # seconds per layer per training step (Python, small kernels)
# toy-L's training step on 2 torch threads against 1, measured at batch 32 (idle 2-core AVX2 machine); at the
# default's batch 12 the gain is smaller, and so is the FLOP rate: the build's estimate came within 4% (169.5
# against 175.6 s measured, 2026-12-01).
TRAIN_THREADS_SPEEDUP = 1.8
# Scoring, fitted to the default preset's extraction with the tasks inside it (222 CPU s on an idle
# machine, 2026-12-01): forward FLOPs per second, and seconds per token and vocabulary entry
# (log-softmax, metrics, writing).
SCORING_FLOPS_PER_SECOND = 5.5e10
LOGIT_SECONDS = 5.4e-9
FORWARD_OVERHEAD = 0.001  # seconds per layer per forward call (sampling steps)
LOAD_SECONDS = 0.3  # loading and fingerprinting one checkpoint
# Per set and checkpoint: packing, writing, checking; refitted to the default demo's extraction once a
# checkpoint's sets were committed together (85-88 s measured against 112 estimated at 0.12, 2026-12-01).
SET_SECONDS = 0.065
FILLER_DOCUMENT_TOKENS = 26.7  # tokens of a filler document
SENTENCE_TOKENS = 13.1  # tokens of a fact sentence with its BOS (main set, each side of a pair)
TASK_DOCUMENT_TOKENS = 31.0  # tokens of one option of a 2-shot one-fact task (k-fact compositions: k times)
PASSUNTIL_FIXED = 5.0  # PassUntil: checking that the main set is done, preparing the task's group
TOKENS_PER_SENTENCE = 11.7  # training tokens per rendered sentence (measured on the default world)
# Analyze, measured 2026-12-01 with the analysis kernels compiled (scripts/setup compiles them): per
# (token, checkpoint, model) of the main set (`tokendyn analyze` on 1M tokens x 50 checkpoints x 3
# models: 24.4 s), the studies' fixed cost (the default preset's sets, tasks and PassUntil runs: the
# phase took 30.6-31.6 s in idle runs, its figures drawn beside in a child process), and drawing and
# saving one figure (PNG, SVG), which adds to the studies' time only on a single core.
ANALYZE_PER_VALUE = 1.6e-7
ANALYZE_FIXED = 33.0
FIGURE_SECONDS = 1.1
SUMMARY_FIXED = 3.5  # the toy findings: reading the pairs and attribute-value tokens (2.8-3.2 s measured)


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


def build_seconds(costs: dict[str, float], sizes: dict[str, ModelSize], workers: int) -> float:
    """Wall seconds of training sizes costing `costs` (reference seconds) on `workers` processes.

    The longest job starts first and the others share the remaining processes. A longest size with
    `more_threads_from` runs the rest of its steps on two threads (TRAIN_THREADS_SPEEDUP faster) once
    it reaches that share of its steps and the others are done.
    """
    longest = max(costs, key=costs.__getitem__)
    share = sizes[longest].more_threads_from
    if workers < 2 or share is None:
        return makespan(list(costs.values()), workers)
    others = makespan([cost for name, cost in costs.items() if name != longest], workers - 1)
    return max(others, share * costs[longest]) + (1 - share) * costs[longest] / TRAIN_THREADS_SPEEDUP


def makespan(costs: list[float], workers: int) -> float:
    """Wall time of independent jobs on `workers` processes, the longest first (as build.train_sizes runs them)."""
    loads = [0.0] * max(1, workers)
    for cost in sorted(costs, reverse=True):
        loads[loads.index(min(loads))] += cost
    return max(loads)


def scored_checkpoints(n: int, every: int) -> int:
    """How many of a model's n checkpoints a set scored at every `every`-th is scored at (`extract.scored_at`)."""
    return sum(extract.scored_at(c, n, every) for c in range(n))


def token_seconds(shape: ModelShape) -> float:
    """Reference seconds to score one token: its forward FLOPs and the log-softmax over the vocabulary."""
    return shape.forward_flops(1) / SCORING_FLOPS_PER_SECOND + shape.vocab * LOGIT_SECONDS


def scoring_seconds(shapes: dict[str, ModelShape], sets: dict[str, tuple[float, int]]) -> float:
    """Reference seconds to score `sets` ({name: (tokens, every)}) with every size: per scored checkpoint
    and set the forward FLOPs and the per-token log-softmax over the vocabulary, plus a fixed cost per
    set, and one load per checkpoint."""
    total = 0.0
    for shape in shapes.values():
        per_token = token_seconds(shape)
        for tokens, every in sets.values():
            total += scored_checkpoints(shape.checkpoints, every) * (tokens * per_token + SET_SECONDS)
        total += shape.checkpoints * LOAD_SECONDS
    return total


def demo_sets(preset: str) -> dict[str, tuple[float, int]]:
    """The sets the demo's extract phase scores, {name: (tokens, every)}, estimated from the world's size."""
    world = build.PRESETS[preset].world
    facts = world.n_entities * len(ATTRIBUTES)
    defaults = {name: p.default for name, p in inspect.signature(toy_tasks.write_tasks).parameters.items()}
    n_items, options = min(world.n_entities, defaults["n_items"]), defaults["n_options"]
    task_sets = {f"task.toy_{a}": 1 for a in ATTRIBUTES} | {f"task.toy_compose{k}": k for k in defaults["ks"]}
    sets = {
        "main": (facts * SENTENCE_TOKENS, 1),
        "filler": (world.n_filler_docs * FILLER_DOCUMENT_TOKENS, SPARSE_EVERY),
        "facts": (2 * facts * SENTENCE_TOKENS, SPARSE_EVERY),
        "hallucinated": (GENERATE_PROMPTS * GENERATE_MIXTURES * GENERATE_TOKENS, SPARSE_EVERY),
    }
    n_main = max(1, facts // len(ATTRIBUTES))  # one document per entity
    corrupted = max(CORRUPT_MIN, int(CORRUPT_SHARE * n_main)) / n_main * sets["main"][0]
    sets |= {f"corrupted-{rate}": (corrupted, SPARSE_EVERY) for rate in CORRUPT_RATES}
    sets |= {name: (n_items * options * k * TASK_DOCUMENT_TOKENS, SPARSE_EVERY) for name, k in task_sets.items()}
    return sets


def estimate_costs(preset: str, workers: int = 1) -> dict[str, float]:
    """Estimated wall seconds of every phase of a fresh demo on `workers` idle reference cores.

    Its keys are the demo's phases, in the order `run_demo` runs them (`Progress` numbers them so).
    """
    chosen = build.PRESETS[preset]
    shapes, steps = preset_shapes(preset)
    batch_tokens = chosen.train.batch_size * chosen.seq_len
    train = {name: training_seconds(s, steps, batch_tokens) for name, s in shapes.items()}
    extract_seconds = scoring_seconds(shapes, demo_sets(preset))
    largest = max(shapes.values(), key=lambda s: s.params)
    smallest = min(shapes.values(), key=lambda s: s.params)
    # PassUntil: per checkpoint it runs at (every SPARSE_EVERY-th) and recall question, one batch of
    # RECALL_CAP completions (the toy models rarely pass twice in fewer; the default suite drew 100 for
    # each): a KV-cached call per new token and one for the prompt, each over the batch's last positions.
    calls = RECALL_INSTANCES * (RECALL_TOKENS + 1)
    passuntil = PASSUNTIL_FIXED + sum(
        scored_checkpoints(s.checkpoints, SPARSE_EVERY)
        * (LOAD_SECONDS + calls * (FORWARD_OVERHEAD * s.layers + RECALL_CAP * token_seconds(s)))
        for s in shapes.values()
    )
    main_tokens = demo_sets(preset)["main"][0]
    analyze_values = main_tokens * sum(s.checkpoints for s in shapes.values())
    return {
        "build": build_seconds(train, chosen.sizes, min(workers, len(train))),
        "generate": GENERATE_MIXTURES
        * GENERATE_PROMPTS
        * GENERATE_TOKENS
        * (largest.forward_flops(GENERATE_TOKENS) + smallest.forward_flops(GENERATE_TOKENS))
        / FLOPS_PER_SECOND
        / 32,  # batches of 32 prompts, each step re-reading the sequence so far
        "extract": extract_seconds / (THREADED_SPEEDUP if workers > 1 else 1.0),
        "passuntil": passuntil,
        "analyze": analyze_seconds(ANALYZE_FIXED + ANALYZE_PER_VALUE * analyze_values, len(STUDIES), workers),
        "findings": SUMMARY_FIXED,
    }


def analyze_seconds(studies: float, n_figures: int, workers: int) -> float:
    """The analyze phase: the studies' seconds and their figures', drawn beside them in a child process
    when there is a second core (`tokendyn.pipelines.draw`), else after each study in turn."""
    figures = FIGURE_SECONDS * n_figures
    return max(studies, figures) if workers > 1 else studies + figures


RATED_SECONDS = 10.0  # phases estimated shorter than this do not set the ETA's rate (see Progress)


class Progress:
    """Prints each phase as it starts (or is skipped) with the ETA of the whole demo.

    The ETA is the sum of the remaining phases' estimates, scaled by how long the phases run so
    far took against their estimates (so a slow or busy machine gets a longer ETA). Only phases
    estimated at RATED_SECONDS or more set that rate: a phase of a second or two is mostly fixed
    costs (the first import of torch), and 40 s against an estimate of 1 s once put the ETA at
    114 minutes for an 8-minute run.
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
        return self.measured_done / self.estimated_done if self.estimated_done else 1.0

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
        if self.costs[name] >= RATED_SECONDS:
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
    `phases` ({phase: "ran" or "skipped"}) and `seconds` ({phase that ran: (wall, CPU seconds)}).
    progress: the progress bars; the phase lines with the ETA are printed either way (a log without
    them would show nothing for minutes)."""
    workers = min(2, os.cpu_count() or 1)
    steps = Progress(estimate_costs(preset, workers))
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
        generate.write_jsonl(records, generated)
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
    task_dir = out.with_name(stem + ".toy-tasks")

    def task_files() -> dict:
        return toy_tasks.write_tasks(suite_path.parent, task_dir, n_recall=RECALL_INSTANCES, seed=seed)

    def run_extract() -> None:
        choice = [read_task(t["path"]) for t in task_files().values() if t["kind"] == "choice"]
        named = [s.name for s in (*suite.sets, *extra)] + [TASK_SET_PREFIX + t.name for t in choice]
        tasks.score_tasks(
            suite,
            out,
            choice,
            seed=seed,
            extra_sets=extra,
            every={name: SPARSE_EVERY for name in named},
            progress=progress,
        )

    inputs = [suite_key, [dataclasses.asdict(s) for s in extra], seed, RECALL_INSTANCES, SPARSE_EVERY]
    ledger.run(steps, "extract", inputs, run_extract, out)

    def run_pass_until() -> None:
        # Without the named sets: PassUntil's own extraction then only checks that the main set is done
        # (it would otherwise score the sets at the checkpoints the extract phase left out).
        main_only = dataclasses.replace(suite, sets=())
        for task in (t for t in task_files().values() if t["kind"] == "generation"):
            sampling.run_pass_until(
                main_only,
                out,
                task["path"],
                passes=2,
                max_samples=RECALL_CAP,
                batch_size=RECALL_CAP,
                seed=seed,
                every=SPARSE_EVERY,
                progress=progress,
            )

    ledger.run(steps, "passuntil", [suite_key, seed, RECALL_INSTANCES, RECALL_CAP, SPARSE_EVERY], run_pass_until, out)

    stamp = _stamp(out)
    folder = analyze.default_folder(out)
    index = report.default_folder(out) / report.INDEX

    def run_analyze() -> None:
        report.write_report(out, index.parent, progress=progress, analysis=folder)

    # The analyses' code is an input too: the version stays the same between commits of tokendyn.
    code = _code_stamp("analysis", "studies", "pipelines", "toy")
    ledger.run(steps, "analyze", [stamp, code], run_analyze, store_out=None, outputs=[folder / analyze.FINDINGS, index])
    findings_file = out.with_name(stem + ".findings.txt")
    ledger.run(
        steps,
        "findings",
        [stamp, code],
        lambda: findings_file.write_text("\n".join(findings.summary(out)) + "\n"),
        None,
        [findings_file],
    )
    return {
        "suite": suite_path,
        "store": out,
        "analysis": folder,
        "analysis_lines": (folder / analyze.FINDINGS).read_text().splitlines(),
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
        write_atomically(self.path, json.dumps(self.entries, indent=1) + "\n")
        steps.finish(phase)


def _code_stamp(*packages: str) -> str:
    """A digest of the source files of tokendyn's named subpackages."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for package in packages:
        for file in sorted((root / package).rglob("*.py")):
            digest.update(file.read_bytes())
    return digest.hexdigest()


def _stamp(out: Path) -> str:
    """Changes whenever the store gains results or sets (their metadata is rewritten), or tokendyn changes."""
    digest = hashlib.sha256(__version__.encode())
    for meta in sorted(out.glob("**/zarr.json")):
        digest.update(meta.read_bytes())
    return digest.hexdigest()

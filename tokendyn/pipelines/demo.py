"""`tokendyn demo`: the whole job on the built-in suite, from nothing to findings, in one call.

build (or reuse) the toy suite -> generate the contrastive sets -> extract every evaluation set ->
score the world's multiple-choice tasks and run PassUntil on its recall questions -> analyze -> report ->
print the findings and where the files are. Every stage reuses what an earlier run left: the build is
cached by its parameters, generated text is kept next to the store, extraction resumes, and the
analyses and the report are redone only when the store changed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from tokendyn import __version__, store
from tokendyn.config.suite import EvalSet, load_suite
from tokendyn.data.tasks import read_task
from tokendyn.models import extract, generate, sampling, tasks
from tokendyn.pipelines import analyze, report
from tokendyn.toy import build, findings
from tokendyn.toy import tasks as toy_tasks

CORRUPT_RATES = (0.2, 0.4, 0.8)
# PassUntil samples under every checkpoint of every model: a few recall questions with a small cap
# keep the demo to minutes (the estimator reports capped runs as censored bounds).
RECALL_INSTANCES = 8
RECALL_CAP = 100


def stores_dir() -> Path:
    return build.cache_dir() / "stores"


def run_demo(preset: str = "default", seed: int = 0, progress: bool = True) -> dict:
    """Run every stage; return the paths written and the summary lines."""
    suite_path = build.build(preset=preset, seed=seed, progress=progress)
    suite = load_suite(suite_path)
    out = stores_dir() / f"toy-{suite_path.parent.name}.zarr"
    out.parent.mkdir(parents=True, exist_ok=True)

    generated = out.with_name(out.name.removesuffix(".zarr") + ".generated.jsonl")
    if not generated.is_file():
        records = generate.generate(suite, prompts=50, new_tokens=50, seed=seed, progress=progress)
        generate.write_jsonl(records, generated)
    extra = [EvalSet(name="hallucinated", files=(generated,), seq_len=suite.eval.seq_len)]
    extra += [
        EvalSet(name=f"corrupted-{rate}", files=suite.eval.files, seq_len=suite.eval.seq_len, corrupt=rate, seed=seed)
        for rate in CORRUPT_RATES
    ]
    extract.extract(suite, out, extra_sets=extra, progress=progress)

    task_files = toy_tasks.write_tasks(
        suite_path.parent,
        out.with_name(out.name.removesuffix(".zarr") + ".toy-tasks"),
        n_recall=RECALL_INSTANCES,
        seed=seed,
    )
    choice = [read_task(t["path"]) for t in task_files.values() if t["kind"] == "choice"]
    tasks.score_tasks(suite, out, choice, shots=2, seed=seed, progress=progress)
    for task in (t for t in task_files.values() if t["kind"] == "generation"):
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

    folder = analyze.default_folder(out)
    report_dir = out.with_name(out.name.removesuffix(".zarr") + ".report")
    stamp = _stamp(out)
    summary_file = folder / "summary.txt"
    if _stamp_file(folder).is_file() and _stamp_file(folder).read_text() == stamp:
        lines = summary_file.read_text().splitlines()
    else:
        lines = analyze.analyze(store.open_store(out), folder, progress=progress)
        summary_file.write_text("\n".join(lines) + "\n")
        _stamp_file(folder).write_text(stamp)
    index = report_dir / "index.html"
    if not (index.is_file() and _stamp_file(report_dir).is_file() and _stamp_file(report_dir).read_text() == stamp):
        index = report.write_report(out, report_dir, progress=progress)
        _stamp_file(report_dir).write_text(stamp)
    return {
        "suite": suite_path,
        "store": out,
        "analysis": folder,
        "analysis_lines": lines,
        "findings": findings.summary(out),
        "report": index,
    }


def _stamp(out: Path) -> str:
    """Changes whenever the store gains results or sets (their metadata is rewritten), or tokendyn changes."""
    digest = hashlib.sha256(__version__.encode())
    for meta in sorted(out.glob("**/zarr.json")):
        digest.update(meta.read_bytes())
    return digest.hexdigest()


def _stamp_file(folder: Path) -> Path:
    return folder / ".demo-stamp"

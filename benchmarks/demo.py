"""`tokendyn demo` phase by phase: wall and CPU seconds, from an empty cache and then cached.

    python benchmarks/demo.py [--preset default] [--cache DIR] [--keep]

Runs `run_demo` twice in a fresh cache directory (default: a temporary one, deleted afterwards
unless --keep) and prints, per phase (toy build, generation, extraction, tasks, PassUntil,
analyze, report, findings), wall seconds and CPU seconds (this process plus its child processes,
e.g. the parallel training). CPU seconds stay meaningful on a shared machine where wall times are
inflated; their sum over the wall time shows how well the cores were used. The second run
measures the cached path (target <= 20 s). Target for the first: <= 6 minutes on an idle 2-core machine.
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch

PHASES = [
    ("toy build", "tokendyn.toy.build", "build"),
    ("contrastive generation", "tokendyn.models.generate", "generate"),
    ("extraction (all sets)", "tokendyn.models.extract", "extract"),
    ("multiple-choice tasks", "tokendyn.models.tasks", "score_tasks"),
    ("PassUntil", "tokendyn.models.sampling", "run_pass_until"),
    ("analyze", "tokendyn.pipelines.analyze", "analyze"),
    ("report", "tokendyn.pipelines.report", "write_report"),
    ("findings", "tokendyn.toy.findings", "summary"),
]


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def instrument(times: dict[str, list[float]]) -> None:
    """Wrap each phase's function where `tokendyn.pipelines.demo` calls it, adding its wall and CPU time."""
    import importlib

    import tokendyn.pipelines.demo as demo

    for label, module_name, function in PHASES:
        module = importlib.import_module(module_name)
        original = getattr(module, function)

        @functools.wraps(original)
        def timed(*args, _original=original, _label=label, **kwargs):
            wall, cpu = time.perf_counter(), cpu_seconds()
            try:
                return _original(*args, **kwargs)
            finally:
                entry = times.setdefault(_label, [0.0, 0.0])
                entry[0] += time.perf_counter() - wall
                entry[1] += cpu_seconds() - cpu

        setattr(module, function, timed)
        for name in dir(demo):  # the demo imports some functions by name
            if getattr(demo, name) is original:
                setattr(demo, name, timed)


def run(preset: str) -> tuple[dict[str, list[float]], float, float]:
    from tokendyn.pipelines.demo import run_demo

    times: dict[str, list[float]] = {}
    instrument(times)
    wall, cpu = time.perf_counter(), cpu_seconds()
    run_demo(preset=preset, progress=False)
    return times, time.perf_counter() - wall, cpu_seconds() - cpu


def show(title: str, times: dict[str, list[float]], wall: float, cpu: float) -> None:
    print(f"\n{title}: {wall:.1f} s wall, {cpu:.1f} s cpu ({cpu / max(wall, 1e-9):.2f} cores busy on average)")
    for label, _, _ in PHASES:
        if label in times:
            w, c = times[label]
            print(f"  {label:<26} {w:8.1f} s wall {c:8.1f} s cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--cache", type=Path, default=None, help="cache directory (must not exist; default: temporary)")
    parser.add_argument("--keep", action="store_true", help="keep the cache directory")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    cache = args.cache or Path(tempfile.mkdtemp(prefix="tokendyn-demo-bench-"))
    if args.cache is not None and args.cache.exists():
        parser.error(f"{args.cache} exists; the benchmark starts from an empty cache")
    os.environ["TOKENDYN_CACHE"] = str(cache)
    print(
        f"{os.cpu_count()} cores, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"load average before {os.getloadavg()[0]:.1f}; cache {cache}"
    )
    try:
        show("first run (empty cache)", *run(args.preset))
        show("second run (cached)", *run(args.preset))
    finally:
        if not args.keep:
            shutil.rmtree(cache, ignore_errors=True)
    print(f"load average after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

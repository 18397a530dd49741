"""`tokendyn demo` phase by phase: wall and CPU seconds, from an empty cache and then cached.

    python benchmarks/demo.py [--preset default] [--cache DIR] [--keep]

Runs `run_demo` twice in a fresh cache directory (default: a temporary one, deleted afterwards
unless --keep) and prints, per phase (build, generate, extract, passuntil, analyze, findings),
whether it ran or was skipped, its wall seconds and CPU seconds (this process plus its
finished child processes: the parallel training, the dask workers of a parallel extraction). CPU
seconds stay meaningful on a shared machine where wall times are inflated; their sum over the wall
time shows how well the cores were used. Targets: the first run <= 6 minutes on an idle 2-core
machine, the second (everything cached) <= 20 s. The demo's own a-priori estimate of each phase
(its ETA cost model) is printed beside the measurement.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch

TARGETS = {"first run (empty cache)": 360.0, "second run (cached)": 20.0}


def run(preset: str) -> tuple[dict, float, float]:
    from tokendyn.pipelines.demo import cpu_seconds, run_demo

    wall, cpu = time.perf_counter(), cpu_seconds()
    result = run_demo(preset=preset, progress=False)
    return result, time.perf_counter() - wall, cpu_seconds() - cpu


def show(title: str, result: dict, wall: float, cpu: float, estimates: dict[str, float]) -> None:
    target = TARGETS[title]
    verdict = "met" if wall <= target else "NOT met"
    print(
        f"\n{title}: {wall:.1f} s wall, {cpu:.1f} s cpu ({cpu / max(wall, 1e-9):.2f} cores busy on average); "
        f"target <= {target:.0f} s wall on an idle 2-core machine: {verdict} here"
    )
    print(f"  {'phase':<10} {'status':<8} {'wall s':>8} {'cpu s':>8} {'estimate s':>11}")
    for phase, status in result["phases"].items():
        w, c = result["seconds"].get(phase, (0.0, 0.0))
        print(f"  {phase:<10} {status:<8} {w:8.1f} {c:8.1f} {estimates[phase]:11.1f}")
    in_phases = sum(c for _, c in result["seconds"].values())
    print(f"  outside the phases (imports, loading the suite, stamps): {cpu - in_phases:.1f} s cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default", choices=("default", "quick"))
    parser.add_argument("--cache", type=Path, default=None, help="cache directory (must not exist; default: temporary)")
    parser.add_argument("--keep", action="store_true", help="keep the cache directory")
    args = parser.parse_args()
    if args.cache is not None and args.cache.exists():
        parser.error(f"{args.cache} exists; the benchmark starts from an empty cache")
    warnings.simplefilter("ignore")
    cache = args.cache or Path(tempfile.mkdtemp(prefix="tokendyn-demo-bench-"))
    os.environ["TOKENDYN_CACHE"] = str(cache)  # before importing tokendyn: the demo's cache is chosen from it
    from tokendyn.pipelines.demo import estimate_costs

    workers = min(2, os.cpu_count() or 1)
    estimates = estimate_costs(args.preset, workers)
    print(
        f"{os.cpu_count()} cores, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"load average before {os.getloadavg()[0]:.1f}; preset {args.preset}; cache {cache}; "
        f"a-priori estimate of a fresh run on {workers} idle cores {sum(estimates.values()):.0f} s"
    )
    try:
        show("first run (empty cache)", *run(args.preset), estimates)
        show("second run (cached)", *run(args.preset), estimates)
    finally:
        if not args.keep:
            shutil.rmtree(cache, ignore_errors=True)
    print(f"load average after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

"""The store's bookkeeping in the demo's extraction: CPU seconds of each store call against the whole phase.

    python benchmarks/extract_store.py --cache DIR [--keep]

DIR is a tokendyn cache (TOKENDYN_CACHE) holding a built demo suite (`DIR/suites/`, made by `tokendyn
demo`); only its `suites/` folder and the generated text are copied, into a fresh temporary cache, so
the extraction starts from an empty store (582 set-checkpoint pairs on the default preset) and DIR is
left as it is. `run_demo` runs up to the end of the extract phase under cProfile timed by the
process's CPU time (every thread: zarr's I/O thread, torch's), and the script prints the CPU seconds of
the phase, of the model forwards (`token_scores`) and of the store calls (the commit per checkpoint,
clearing flags, reading them, consolidating, writing blocks, creating the store), with their share of
the phase. cProfile inflates Python-heavy code, so the shares are upper bounds.
Measured before and after the commit per checkpoint: docs/benchmarks.md, "Extraction's store bookkeeping".
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch

STORE_CALLS = (
    "commit_checkpoint",
    "clear_done",
    "is_done",
    "consolidate",
    "write_block",
    "write_checkpoint_coords",
    "prepare",
)


class _Done(Exception):
    """Raised when the demo reaches the phase after extract."""


def profile_extract(cache: Path) -> tuple[pstats.Stats, float]:
    """Run the demo up to the end of its extract phase in `cache`; (profile of the phase, its CPU seconds)."""
    os.environ["TOKENDYN_CACHE"] = str(cache)
    from tokendyn.pipelines import demo

    profile, spent = cProfile.Profile(time.process_time), {}
    run = demo.Ledger.run

    def only_extract(self, steps, phase, *args, **kwargs):
        if phase == "passuntil":
            raise _Done
        if phase != "extract":
            return run(self, steps, phase, *args, **kwargs)
        start = time.process_time()
        profile.enable()
        try:
            return run(self, steps, phase, *args, **kwargs)
        finally:
            profile.disable()
            spent["cpu"] = time.process_time() - start

    demo.Ledger.run = only_extract
    try:
        demo.run_demo(progress=False)
    except _Done:
        pass
    finally:
        demo.Ledger.run = run
    return pstats.Stats(profile), spent["cpu"]


def cumulative(stats: pstats.Stats, name: str) -> tuple[int, float]:
    """(calls, cumulative CPU seconds) of tokendyn's function `name`."""
    for (file, _, function), (_, calls, _, total, _) in stats.stats.items():
        if function == name and "tokendyn" in file:
            return calls, total
    return 0, 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, required=True, help="a tokendyn cache holding a built demo suite")
    parser.add_argument("--keep", action="store_true", help="keep the temporary cache (its store) afterwards")
    args = parser.parse_args()
    if not (args.cache / "suites").is_dir():
        parser.error(f"{args.cache} holds no suites/ folder; run `tokendyn demo` with TOKENDYN_CACHE={args.cache}")
    work = Path(tempfile.mkdtemp(prefix="tokendyn-extract-store-"))
    try:
        shutil.copytree(args.cache / "suites", work / "suites")
        (work / "stores").mkdir()
        for generated in (args.cache / "stores").glob("*.generated.jsonl"):
            shutil.copy2(generated, work / "stores" / generated.name)
        warnings.simplefilter("ignore")
        stats, phase = profile_extract(work)
    finally:
        if args.keep:
            print(f"cache kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"CPU capability: {torch.backends.cpu.get_cpu_capability()}; CPU seconds (process_time, all threads)")
    print(f"{'extract phase':<26}{'':>8}{phase:9.1f} s")
    calls, forwards = cumulative(stats, "token_scores")
    print(f"{'model forwards':<26}{calls:>8}{forwards:9.1f} s  {forwards / phase:6.1%}")
    store_total = 0.0
    for name in STORE_CALLS:
        calls, seconds = cumulative(stats, name)
        store_total += seconds
        print(f"{name:<26}{calls:>8}{seconds:9.2f} s  {seconds / phase:6.1%}")
    print(f"{'store calls in all':<26}{'':>8}{store_total:9.2f} s  {store_total / phase:6.1%}")


if __name__ == "__main__":
    main()

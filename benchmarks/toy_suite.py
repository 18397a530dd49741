"""The built-in suite: build time, and the science it must show (issue 3, item 5), in one run.

    python benchmarks/toy_suite.py [--preset default] [--fresh] [--tol 0.5] [--window 3]

Builds the suite (from scratch with --fresh, into a temporary directory; else reuses the cache),
extracts every checkpoint with `tokendyn extract`, and prints, per model:
  - build seconds, against the 15-minute budget (the machine may be shared: the load average is
    printed; quote it with the numbers);
  - the findings tables of `tokendyn.toy.findings` (true/false pair preference, the loss of false
    statements, double descent of rare and frequent attribute values) and its summary, which
    says whether each design target is met;
  - double descent per token group (template words, names, value-rank bands), and among tokens
    that fall then rise, the share that falls again.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import tokendyn
from tokendyn.analysis import trajectories
from tokendyn.models.extract import extract
from tokendyn.toy import findings
from tokendyn.toy.build import build

RANK_BANDS = [(1, 3), (4, 10), (11, 64)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--fresh", action="store_true", help="build from scratch in a temporary directory")
    parser.add_argument("--tol", type=float, default=0.5, help="double-descent tolerance (nats)")
    parser.add_argument("--window", type=int, default=3, help="double-descent smoothing window (checkpoints)")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="toy-suite-"))
    started = time.perf_counter()
    suite = build(workdir / "suite" if args.fresh else None, preset=args.preset)
    build_seconds = time.perf_counter() - started
    print(
        f"build: {build_seconds:.0f} s ({build_seconds / 900:.2f} of the 15-minute budget; "
        f"{'from scratch' if args.fresh else 'cache allowed'}), load average {os.getloadavg()[0]:.1f}"
    )
    phases = json.loads((suite.parent / "toy-build.json").read_text())["seconds"]
    print("  seconds per phase (build manifest):", {k: round(v) for k, v in phases.items()})

    store = workdir / "store.zarr"
    started = time.perf_counter()
    extract(suite, store, progress=False)
    print(f"extract: {time.perf_counter() - started:.0f} s -> {store}")

    main_set = tokendyn.open_store(store)
    print(
        "\nmodels:",
        {str(m): int(n) for m, n in zip(main_set.model.values, main_set.n_params_nonembed.values)},
        "(non-embedding parameters)",
    )

    print("\ntrue/false pairs: share where the true statement has the lower loss")
    print(findings.pair_preference_table(store).round(3).to_string(index=False))
    print("\nfalse statements: loss per token (nats)")
    print(findings.false_statement_table(store).round(3).to_string(index=False))
    print(f"\ndouble descent of attribute-value tokens (tol {args.tol}, window {args.window})")
    print(findings.double_descent_table(store, tol=args.tol, window=args.window).round(3).to_string(index=False))
    print(
        f"\ndouble descent by token group (tol {args.tol}, window {args.window}): share of the group; "
        "(double descents / fall-then-rise tokens); completed = their ratio"
    )
    dd = trajectories.double_descent(main_set, tol=args.tol, window=args.window).compute()
    rises = trajectories.double_descent(main_set, tol=args.tol, window=args.window, complete=False).compute()
    role, rank = main_set["role"].values, main_set["value_rank"].values
    groups = {"template": role == "template", "name": role == "name"}
    groups.update({f"value rank {lo}-{hi}": (role == "value") & (rank >= lo) & (rank <= hi) for lo, hi in RANK_BANDS})
    for m in dd.model.values:
        d, r = dd.sel(model=m).values, rises.sel(model=m).values
        cells = [
            f"{name} {d[mask].sum() / max(1, mask.sum()):.3f} ({d[mask].sum()}/{r[mask].sum()})"
            for name, mask in groups.items()
        ]
        print(f"  {m}: " + "; ".join(cells) + f"; completed {d.sum() / max(1, r.sum()):.2f}")
    print("\n" + "\n".join(findings.summary(store)))


if __name__ == "__main__":
    main()

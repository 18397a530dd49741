"""`tokendyn demo`: build (or reuse) the built-in suite, extract, analyze, and print what was found."""

from __future__ import annotations

import argparse

from tokendyn.cli.options import add_quiet, seed_value


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="the whole job on the built-in suite: build, extract, analyze, report",
        description="Build (or reuse from cache/) the built-in suite of tiny OPT models trained on a synthetic "
        "world, generate its contrastive text, extract every evaluation set, run the analyses and "
        "write the HTML report and print the findings with the paths of every file written. A second "
        "run reuses everything it can.",
    )
    p.add_argument(
        "--preset",
        default="default",
        choices=("default", "quick"),
        help="suite size: default (minutes to build once) or quick (seconds)",
    )
    p.add_argument(
        "--seed", type=seed_value, default=0, help="seed of the world, the weights and the sampling (default: 0)"
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars (the phase lines stay)")
    add_quiet(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    print("tokendyn demo: loading torch and transformers", flush=True)  # takes seconds; each phase then prints a line
    from tokendyn.pipelines.demo import run_demo

    result = run_demo(preset=args.preset, seed=args.seed, progress=not (args.no_progress or args.quiet))
    print(
        "\n".join(
            [
                "",
                "analyses:",
                *(f"  {line}" for line in result["analysis_lines"]),
                "",
                "what the built-in suite shows:",
                *(f"  {line}" for line in result["findings"]),
                "",
                f"suite     {result['suite']}",
                f"store     {result['store']}",
                f"analyses  {result['analysis']}",
                f"report    {result['report']}",
            ]
        )
    )

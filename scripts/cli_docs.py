"""Write the `--help` of every tokendyn command into docs/cli.md.

    .venv/bin/python scripts/cli_docs.py          # rewrite the help blocks in place
    .venv/bin/python scripts/cli_docs.py --check  # exit 1 if any block is out of date

docs/cli.md holds hand-written text around blocks marked
`<!-- help: tokendyn COMMAND -->` ... `<!-- /help -->`; only the text between the markers is
generated, and a command without a block gets a new section at the end (from the argparse parser,
at a fixed width of 100 columns so the output does not depend on the terminal).
tests/test_docs.py fails while a block is out of date.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
WIDTH = "100"
BLOCK = re.compile(r"(<!-- help: (?P<command>[^>]+?) -->\n)(?P<body>.*?)(<!-- /help -->)", re.S)


def command_helps() -> dict[str, str]:
    """`--help` text of the top-level parser and of every (sub)command, keyed by "tokendyn CMD ..."."""
    from tokendyn.cli import build_parser

    helps: dict[str, str] = {}

    def visit(parser: argparse.ArgumentParser) -> None:
        helps[parser.prog] = parser.format_help()
        for action in parser._actions:  # argparse offers no public way to list subparsers
            if isinstance(action, argparse._SubParsersAction):
                for sub in dict.fromkeys(action.choices.values()):
                    visit(sub)

    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH  # argparse wraps help to the terminal width
    try:
        visit(build_parser())
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns
    return helps


def render(text: str, helps: dict[str, str]) -> str:
    """`text` with every help block replaced by the current help of its command."""

    def block(match: re.Match) -> str:
        command = match["command"].strip()
        if command not in helps:
            raise SystemExit(f"docs/cli.md: no command {command!r}; known: {', '.join(sorted(helps))}")
        return f"{match[1]}```\n{helps[command].rstrip()}\n```\n{match[4]}"

    return BLOCK.sub(block, text)


def missing_blocks(text: str, helps: dict[str, str]) -> list[str]:
    """Commands that have no help block in `text`."""
    documented = {m["command"].strip() for m in BLOCK.finditer(text)}
    return sorted(set(helps) - documented)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if docs/cli.md is out of date")
    args = parser.parse_args(argv)
    helps = command_helps()
    text = DOC.read_text()
    new = render(text, helps)
    missing = missing_blocks(new, helps)
    if args.check:
        stale = new != text
        if stale or missing:
            print(
                "docs/cli.md is out of date"
                + (f" (no block for: {', '.join(missing)})" if missing else "")
                + ": run .venv/bin/python scripts/cli_docs.py",
                file=sys.stderr,
            )
            return 1
        return 0
    for command in missing:  # a new command gets a section at the end; move it and add prose by hand
        heading = command.removeprefix("tokendyn ")
        new = new.rstrip("\n") + f"\n\n## {heading}\n\n<!-- help: {command} -->\n<!-- /help -->\n"
    DOC.write_text(render(new, helps))
    if missing:
        print(f"docs/cli.md: added sections for {', '.join(missing)} at the end", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Command-line entry point: `tokendyn COMMAND ...`.

Each command lives in its own module under `tokendyn.cli` and exposes
`register(subparsers)`, which adds its parser and sets `func(args) -> int | None`.
"""

from __future__ import annotations

import argparse
import errno
import gc
import importlib
import sys
import traceback
import warnings
from typing import NoReturn

from tokendyn import __version__
from tokendyn.cli.options import add_quiet
from tokendyn.errors import TokendynError

COMMANDS = [
    "extract",
    "info",
    "verify",
    "toy",
    "analyze",
    "generate",
    "tasks",
    "passuntil",
    "report",
    "demo",
    "download",
]


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors: the problem, and where the help is (not the usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="tokendyn",
        description="Per-token loss dynamics of language-model checkpoint suites.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"tokendyn {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)  # each a Parser too
    for name in COMMANDS:
        importlib.import_module(f"tokendyn.cli.{name}").register(subparsers)
    for command in subparsers.choices.values():
        add_quiet(command)  # every command takes -q/--quiet (no progress bar)
        command.set_defaults(parser=command)  # for errors about the command's own arguments
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # argparse would blame the top-level parser; the command's --help is the one to read
        args.parser.error(f"unrecognized arguments: {' '.join(extra)}")
    shown = warnings.formatwarning
    if not args.debug:
        warnings.formatwarning = _one_line_warning
    try:
        return args.func(args) or 0
    except TokendynError as err:
        if args.debug:
            traceback.print_exc()
        print(f"tokendyn: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # zarr's async reads cut off by the interrupt are collected unawaited: say only what to do
        warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
        print("tokendyn: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except OSError as err:  # disk full, read-only folder, ...: what failed and what to do, on one line
        if args.debug:
            traceback.print_exc()
        print(f"tokendyn: error: {os_error_message(err)}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = shown


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as a command-line user reads it: one line, without Python's source line (--debug keeps it)."""
    return f"tokendyn: warning: {message}\n"


def entry() -> NoReturn:
    """The `tokendyn` console script: `main`, then `exit_quickly` with its exit code."""
    exit_quickly(main())


def exit_quickly(code: int) -> NoReturn:
    """Exit with `code`, sparing the interpreter its garbage collections at shutdown.

    At exit CPython's cycle collector walks every object still tracked, with torch and transformers
    loaded some 400k objects from imports: 1.3-1.5 s of each `tokendyn extract` run. One collection
    here (0.25 s) still finalizes whatever garbage the command left; the survivors are then frozen
    (`gc.freeze`) and shutdown skips them (0.2 s).
    """
    gc.collect()
    gc.freeze()
    sys.exit(code)


def os_error_message(err: OSError) -> str:
    """One line for an operating-system error: the file, the cause and the fix."""
    where = f" ({err.filename})" if err.filename else ""
    if err.errno == errno.ENOSPC:
        return (
            f"the disk is full{where}; free some space and rerun the same command: "
            "finished work is kept and the run resumes"
        )
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied{where} ({err.strerror}); choose a location you may write to, or fix its permissions"
    cause = err.strerror or (str(err).splitlines() or [type(err).__name__])[0]
    return f"{cause}{where}; check the file and rerun (--debug shows where it happened)"


if __name__ == "__main__":
    entry()

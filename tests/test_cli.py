"""The `tokendyn` console script: what its import loads, and its exit (the command's exit code, its
garbage finalized, the rest frozen)."""

from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from tokendyn.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_the_console_script_is_entry():
    assert 'tokendyn = "tokendyn.cli:entry"' in (REPO / "pyproject.toml").read_text()


def test_entry_exits_with_the_commands_code_after_finalizing_its_garbage(tmp_path):
    """Garbage in a reference cycle is only freed by the collector: `exit_quickly` collects it (its
    finalizer runs) before freezing what is left, whose count the atexit hook reports."""
    program = textwrap.dedent(
        f"""
        import atexit, gc
        import tokendyn.cli as cli

        class Cycle:
            def __del__(self):
                open({str(tmp_path / "finalized")!r}, "w").close()

        def command():
            node = Cycle()
            node.me = node
            return 3

        atexit.register(lambda: print("frozen", gc.get_freeze_count()))
        cli.main = command
        cli.entry()
        """
    )
    run = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert run.returncode == 3, run.stderr
    assert (tmp_path / "finalized").is_file()
    assert int(run.stdout.split()[-1]) > 1000  # the import-time objects, spared at shutdown


def test_import_and_help_load_neither_dask_nor_torch():
    """`import tokendyn` and the parser behind `tokendyn --help` stay light: dask, torch and
    transformers load only in the commands that use them (each costs seconds of start-up)."""
    program = "import sys; from tokendyn.cli import build_parser; build_parser(); " + (
        "print(*[m for m in ('dask', 'torch', 'transformers') if m in sys.modules])"
    )
    run = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == []


@pytest.mark.parametrize(
    "argv",
    [
        ["extract", "s.toml", "--out", "o.zarr", "--corrupt-seed", "-1"],
        ["generate", "s.toml", "--out", "o.jsonl", "--seed", "-1"],
        ["tasks", "s.toml", "--out", "o.zarr", "--task", "t", "--seed", "-2"],
        ["passuntil", "s.toml", "--out", "o.zarr", "--task", "t", "--seed", "x"],
        ["demo", "--seed", "-1"],
        ["toy", "build", "out", "--seed", "-1"],
        ["toy", "build", "out", "--threads", "0"],
        ["extract", "s.toml", "--out", "o.zarr", "--workers", "-2"],
        ["extract", "--model", "m", "--text", "t.txt", "--out", "o.zarr", "--seq-len", "1"],
        ["generate", "s.toml", "--out", "o.jsonl", "--new-tokens", "0"],
        ["generate", "s.toml", "--out", "o.jsonl", "--batch-size", "0"],
        ["passuntil", "s.toml", "--out", "o.zarr", "--task", "t", "--passes", "1"],
        ["passuntil", "s.toml", "--out", "o.zarr", "--task", "t", "--max-samples", "0"],
    ],
)
def test_counts_and_seeds_out_of_range_are_refused_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    assert "expected a whole number >=" in capsys.readouterr().err


def test_seq_len_without_model_is_refused_and_quiet_has_its_short_form(tmp_path, capsys):
    (tmp_path / "s.toml").write_text("")
    assert main(["extract", str(tmp_path / "s.toml"), "--out", str(tmp_path / "o.zarr"), "--seq-len", "64"]) == 2
    assert "--seq-len applies only with --model" in capsys.readouterr().err
    assert main(["extract", str(tmp_path / "s.toml"), "--out", str(tmp_path / "o.zarr"), "--tokenizer", "t"]) == 2
    assert "--tokenizer applies only with --model" in capsys.readouterr().err
    assert not (tmp_path / "o.zarr").exists()
    for command in ("analyze", "report"):
        assert main([command, str(tmp_path / "absent.zarr"), "-q"]) == 2  # -q parsed; the store is what is missing
        assert "absent.zarr" in capsys.readouterr().err


def test_usage_errors_are_one_line_and_point_at_the_help(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["extract", "s.toml", "--out", "o.zarr", "--store-dtype", "float64"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tokendyn extract: error: argument --store-dtype")
    assert err.endswith("(see tokendyn extract --help)\n")


def test_an_unknown_option_of_a_command_points_at_that_commands_help(capsys):
    with pytest.raises(SystemExit):
        main(["extract", "s.toml", "--out", "o.zarr", "--bogus"])
    assert (
        capsys.readouterr().err
        == "tokendyn extract: error: unrecognized arguments: --bogus (see tokendyn extract --help)\n"
    )


@pytest.mark.parametrize(
    "command, function, options",
    [
        ("passuntil", "sampling:run_pass_until", ("passes", "max_samples", "batch_size", "seed", "every", "stop")),
        ("generate", "generate:generate", ("prompts", "prompt_tokens", "new_tokens", "seed", "batch_size")),
        ("tasks", "tasks:score_tasks", ("shots", "seed", "delimiter")),
    ],
)
def test_command_defaults_are_the_functions_defaults(command, function, options):
    """These commands restate their functions' defaults (reading them would import torch for every
    command's --help); they must agree."""
    import importlib
    import inspect

    from tokendyn.cli import build_parser
    from tokendyn.cli.passuntil import stop_strings

    module, name = function.split(":")
    parameters = inspect.signature(getattr(importlib.import_module(f"tokendyn.models.{module}"), name)).parameters
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = subparsers.choices[command]
    for option in options:
        default = parser.get_default(option)
        if option == "stop":  # --stop appends to a list, so the parser leaves it None for the command to fill in
            default = stop_strings(default)
        assert default == parameters[option].default, option


def test_an_interrupt_says_how_to_resume_and_nothing_else(capsys, monkeypatch):
    """Ctrl-C: one line and exit status 130; reads cut off by it (zarr's coroutines, collected unawaited) add
    no warning (was: 'tokendyn: warning: coroutine ... was never awaited' after the line)."""
    import gc

    async def read():
        return None

    def interrupted(args):
        pending = read()  # never awaited, as a zarr read the interrupt cut off
        raise KeyboardInterrupt(pending)

    monkeypatch.setattr("tokendyn.cli.info.run", interrupted)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["info", "nowhere.zarr"]) == 130
        gc.collect()
    assert capsys.readouterr().err == "tokendyn: interrupted; rerun the same command to resume\n"
    assert not [w for w in caught if "never awaited" in str(w.message)]

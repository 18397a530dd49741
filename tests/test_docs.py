"""The README works as written and the CLI reference matches the commands.

- the README's test command is the one .ci/run runs, and the README stays a front door (<= 150 lines);
- "Your own checkpoints in five minutes": the README's suite TOML, its commands and its Python
  example run unchanged on a folder of tiny random Hugging Face checkpoints at the paths it names;
- docs/cli.md holds the current `--help` of every command (scripts/cli_docs.py writes it).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import SAMPLE_TEXT, build_tokenizer, save_checkpoint
from tokendyn.cli import main as cli_main

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
TEST_COMMAND = "bash scripts/setup && .venv/bin/python -m pytest"


def fenced(text: str, after: str, lang: str = "") -> str:
    """The first fenced block of language `lang` after the heading line `after`."""
    start = text.index(after)
    for match in re.finditer(r"^```(\w*)\n(.*?)^```$", text, re.S | re.M):
        if match.start() > start and match[1] == lang:
            return match[2]
    raise AssertionError(f"no ```{lang} block after {after!r}")


def test_readme_test_command_is_what_ci_runs():
    assert f"```\n{TEST_COMMAND}\n```" in README
    assert TEST_COMMAND in (ROOT / ".ci" / "run").read_text().splitlines()
    assert "```\nbash scripts/setup && .venv/bin/tokendyn demo\n```" in README


def test_readme_is_short_and_links_resolve():
    assert len(README.splitlines()) <= 150
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README):
        assert (ROOT / target).exists(), f"README links to a missing file: {target}"


def test_readme_own_checkpoints_in_five_minutes(tmp_path, monkeypatch, capsys):
    """The README's suite, commands and Python example, verbatim, on tiny random checkpoints."""
    section = "## Your own checkpoints in five minutes"
    (tmp_path / "my-suite.toml").write_text(fenced(README, section, "toml"))
    suite = tomllib.loads(fenced(README, section, "toml"))
    tokenizer = build_tokenizer()
    paths = [ckpt["path"] for model in suite["models"] for ckpt in model["checkpoints"]]
    for seed, path in enumerate(paths):
        save_checkpoint(tmp_path / path, "opt", tokenizer, seed=seed, max_positions=suite["eval"]["seq_len"] + 2)
    (tmp_path / suite["eval"]["files"][0]).write_text(SAMPLE_TEXT.replace("\n", "\n\n"))
    monkeypatch.chdir(tmp_path)

    commands = [shlex.split(line) for line in fenced(README, section).splitlines() if line.strip()]
    assert [c[1] for c in commands] == ["extract", "info", "analyze", "report"]
    for command in commands:
        assert command[0] == ".venv/bin/tokendyn"
        if command[1] == "report":
            continue  # the report's figures are tested in test_report.py; this checks the store feeds it
        assert cli_main(command[1:] + (["--no-progress"] if command[1] == "extract" else [])) == 0, command
    assert (tmp_path / "my.analysis").is_dir()

    # The store holds what the checkpoints give: the mean loss of the first one, by transformers itself.
    import tokendyn

    ds = tokendyn.open_store("my.zarr")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / paths[0]).eval()
    # the first rolling window: the prefix (EOS: this tokenizer adds nothing) and seq_len predictions
    n = min(suite["eval"]["seq_len"], ds.sizes["token"])
    ids = torch.tensor([[tokenizer.eos_token_id, *ds.token_id.values[:n]]], dtype=torch.long)
    labels = ids.clone()
    labels[0, 0] = -100
    with torch.inference_mode():
        expected = model(ids, labels=labels).loss.item()
    np.testing.assert_allclose(ds.loss.values[0, 0, :n].mean(), expected, rtol=1e-4)

    capsys.readouterr()
    exec(compile(fenced(README, "## In Python", "python"), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "my-model" in printed


def test_cli_reference_is_current(capsys):
    spec = importlib.util.spec_from_file_location("cli_docs", ROOT / "scripts" / "cli_docs.py")
    cli_docs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli_docs)
    assert cli_docs.main(["--check"]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("page", sorted((ROOT / "docs").glob("*.md")), ids=lambda p: p.name)
def test_docs_name_only_existing_code(page):
    """Every `tokendyn.x.y` the manual names exists (a module, or a name in one): the code moved once already."""
    for name in sorted(set(re.findall(r"`(tokendyn(?:\.[A-Za-z_]+)+)", page.read_text()))):
        parts = name.split(".")
        for n in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:n]))
                break
            except ModuleNotFoundError:
                continue
        for attr in parts[n:]:
            assert hasattr(obj, attr), f"{page.name} names {name}, which does not exist"
            obj = getattr(obj, attr)

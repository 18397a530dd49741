"""Checkpoints discovered, not listed: Trainer folders on disk and hub revision patterns from an offline cache."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
from huggingface_hub import constants as hub_constants

from test_checkpoints import make_hub_cache
from tokendyn.config.suite import load_suite
from tokendyn.errors import TokendynError


def fake_checkpoint(folder: Path, state: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    if state is not None:
        (folder / "trainer_state.json").write_text(json.dumps(state))
    return folder


def suite_file(tmp_path: Path, model: str) -> Path:
    (tmp_path / "valid.txt").write_text("some text\n")
    path = tmp_path / "suite.toml"
    path.write_text(f'[eval]\nfiles = ["valid.txt"]\nseq_len = 8\n\n[[models]]\nname = "run"\n{model}\n')
    return path


def test_trainer_folders(tmp_path):
    run = tmp_path / "run"
    fake_checkpoint(run / "checkpoint-500", {"global_step": 500, "num_input_tokens_seen": 64000})
    fake_checkpoint(run / "checkpoint-1000", {"global_step": 1000, "num_input_tokens_seen": 128000})
    fake_checkpoint(run / "checkpoint-50")  # no trainer_state.json: the step comes from the name
    fake_checkpoint(run / "checkpoint-9", {"global_step": 90, "num_input_tokens_seen": 0})  # state wins; 0 = unrecorded
    (run / "checkpoint-1500").mkdir()  # still being written: no config.json
    (run / "logs").mkdir()
    with pytest.warns(UserWarning, match="skipping .*checkpoint-1500: no config.json"):
        suite = load_suite(suite_file(tmp_path, 'checkpoints = { glob = "run/checkpoint-*" }'))
    got = [(c.step, c.path.name, c.tokens_seen) for c in suite.models[0].checkpoints]
    assert got == [
        (50, "checkpoint-50", None),
        (90, "checkpoint-9", None),
        (500, "checkpoint-500", 64000.0),
        (1000, "checkpoint-1000", 128000.0),
    ]


def test_step_and_global_step_folders_with_selection(tmp_path):
    for step in (0, 100, 200, 300, 400):
        fake_checkpoint(tmp_path / "ckpts" / f"global_step{step}")
    fake_checkpoint(tmp_path / "ckpts" / "step_600")
    suite = load_suite(
        suite_file(tmp_path, 'tokens_per_step = 10\ncheckpoints = { glob = "ckpts/*", steps = { every = 200 } }')
    )
    got = [(c.step, c.path.name, c.tokens_seen) for c in suite.models[0].checkpoints]
    assert got == [
        (0, "global_step0", 0.0),
        (200, "global_step200", 2000.0),
        (400, "global_step400", 4000.0),
        (600, "step_600", 6000.0),
    ]


@pytest.mark.parametrize(
    "model, message",
    [
        ('checkpoints = { glob = "nothing/*" }', "glob 'nothing/\\*' matches no checkpoint folder"),
        ('checkpoints = { glob = "odd/*" }', "cannot tell the step of .*odd/final"),
        ('checkpoints = { glob = "dup/*" }', "step 7 is both .*checkpoint-7 and .*step7; narrow the pattern"),
        ('checkpoints = { glob = "dup/*", every = 2 }', "unknown key 'every'"),
    ],
)
def test_discovery_errors(tmp_path, model, message):
    fake_checkpoint(tmp_path / "odd" / "final")
    fake_checkpoint(tmp_path / "dup" / "checkpoint-7")
    fake_checkpoint(tmp_path / "dup" / "step7")
    with pytest.raises(TokendynError, match=message):
        load_suite(suite_file(tmp_path, model))


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    source = fake_checkpoint(tmp_path / "weights")
    cache = tmp_path / "hf" / "hub"
    revisions = ["main", "step0", "step1000", "step512", "stage1-step2000-tokens4B", "step143000"]
    make_hub_cache(cache, "org/name", {r: source for r in revisions})
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.mark.parametrize(
    "pattern, steps",
    [
        ("step*", [0, 512, 1000, 143000]),
        ("all", [0, 512, 1000, 2000, 143000]),
        ("step1*", [1000, 143000]),
    ],
)
def test_hub_revision_patterns_offline(offline_cache, tmp_path, pattern, steps):
    suite = load_suite(suite_file(tmp_path, f'hub_id = "org/name"\nrevisions = "{pattern}"'))
    checkpoints = suite.models[0].checkpoints
    assert [c.step for c in checkpoints] == steps
    assert all(
        c.hub_id == "org/name" and c.revision.endswith(f"step{c.step}") or "step2000" in c.revision for c in checkpoints
    )
    if pattern == "all":
        assert checkpoints[3].tokens_seen == 4e9


def test_hub_revision_pattern_without_match(offline_cache, tmp_path):
    with pytest.raises(
        TokendynError,
        match="no revision of org/name matches 'ckpt-\\*' in the local Hugging Face "
        "cache .*it has: main, stage1-step2000-tokens4B, step0",
    ):
        load_suite(suite_file(tmp_path, 'hub_id = "org/name"\nrevisions = "ckpt-*"'))
    with pytest.raises(TokendynError, match="'main' has no step number"):
        load_suite(suite_file(tmp_path, 'hub_id = "org/name"\nrevisions = "ma*"'))


def unreachable_hub(monkeypatch) -> huggingface_hub.HfApi:
    """The hub API at a local port nothing listens on, online: every request fails to connect, as without network."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    return huggingface_hub.HfApi(endpoint=f"http://127.0.0.1:{port}")


def test_hub_revision_pattern_without_network(tmp_path, monkeypatch):
    """huggingface_hub 2 raises httpx2's ConnectError, neither an HfHubHTTPError nor an OSError (was: a traceback)."""
    monkeypatch.setattr(huggingface_hub, "list_repo_refs", unreachable_hub(monkeypatch).list_repo_refs)
    with pytest.raises(
        TokendynError,
        match=r"^cannot list the revisions of org/name \(.*Connection refused\); check the network, "
        "or set HF_HUB_OFFLINE=1 to use the revisions in the local cache$",
    ):
        load_suite(suite_file(tmp_path, 'hub_id = "org/name"\nrevisions = "step*"'))


def test_extract_one_model_without_a_toml(tmp_path, capsys):
    """`tokendyn extract --model DIR --text FILE`: the generated suite sits next to the store and reruns it."""
    import xarray as xr

    from conftest import SAMPLE_TEXT, build_tokenizer, save_checkpoint
    from tokendyn.cli import main
    from tokendyn.config.quick import HEADER

    tokenizer = build_tokenizer()
    for index, step in enumerate((10, 20)):
        save_checkpoint(tmp_path / "run" / f"checkpoint-{step}", "opt", tokenizer, seed=index)
    (tmp_path / "run" / "checkpoint-20" / "trainer_state.json").write_text(
        json.dumps({"global_step": 20, "num_input_tokens_seen": 5120})
    )
    (tmp_path / "valid.txt").write_text(SAMPLE_TEXT)
    out = tmp_path / "out" / "run.zarr"
    args = [
        "extract",
        "--model",
        str(tmp_path / "run"),
        "--text",
        str(tmp_path / "valid.txt"),
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 0
    generated = tmp_path / "out" / "run.suite.toml"
    assert generated.read_text().startswith(HEADER)
    assert f"suite written: {generated}" in capsys.readouterr().out
    ds = xr.open_zarr(out)
    # the model's context (64 positions) caps the default seq_len of 1024
    assert json.loads(ds.attrs["protocol"])["seq_len"] == 64 and int(ds.n_context.max()) <= 64
    assert ds.step.values.tolist() == [[10, 20]] and np.isnan(ds.tokens_seen.values[0, 0])
    assert ds.tokens_seen.values[0, 1] == 5120 and ds.done.values.all()
    reference = tmp_path / "ref.zarr"
    assert main(["extract", str(generated), "--out", str(reference), "--quiet"]) == 0
    assert capsys.readouterr().err == ""  # no progress bar
    assert main(["extract", str(generated), "--out", str(reference), "--quiet"]) == 0
    assert "store up to date, nothing to score: " in capsys.readouterr().out
    np.testing.assert_array_equal(ds.loss.values, xr.open_zarr(reference).loss.values)

    # A single checkpoint folder, a hub id that is not cached, and a suite file that tokendyn did not write.
    assert (
        main(
            [
                "extract",
                "--model",
                str(tmp_path / "run" / "checkpoint-10"),
                "--text",
                str(tmp_path / "valid.txt"),
                "--out",
                str(tmp_path / "one.zarr"),
                "--seq-len",
                "16",
                "-q",
            ]
        )
        == 0
    )
    assert xr.open_zarr(tmp_path / "one.zarr").step.values.tolist() == [[10]]
    (tmp_path / "mine.suite.toml").write_text("# my own\n")
    assert (
        main(
            [
                "extract",
                "--model",
                str(tmp_path / "run"),
                "--text",
                str(tmp_path / "valid.txt"),
                "--out",
                str(tmp_path / "mine.zarr"),
            ]
        )
        == 2
    )
    assert "mine.suite.toml exists and was not generated by tokendyn" in capsys.readouterr().err

    # The generated suite of run.zarr: a refused run puts it back, an edited one is never replaced.
    before = generated.read_text()
    other = ["extract", "--model", str(tmp_path / "run" / "checkpoint-10"), "--text", str(tmp_path / "valid.txt")]
    assert main([*other, "--seq-len", "16", "--out", str(out), "-q"]) == 2  # another suite for this store
    assert "write to a new --out" in capsys.readouterr().err and generated.read_text() == before
    edited = before.replace("seq_len = 64", "seq_len = 32")
    generated.write_text(edited)
    assert main(args) == 2
    assert "run.suite.toml was edited" in capsys.readouterr().err and generated.read_text() == edited
    assert not list(generated.parent.glob(".*partial*"))


def test_model_on_a_trainer_output_dir_says_its_checkpoints_are_not_scored(tmp_path, capsys):
    from conftest import build_tokenizer, save_checkpoint
    from tokendyn.config.quick import model_table

    tokenizer = build_tokenizer()
    save_checkpoint(tmp_path / "run", "opt", tokenizer, seed=0)  # the final model, at the root
    save_checkpoint(tmp_path / "run" / "checkpoint-10", "opt", tokenizer, seed=1)
    table = model_table(str(tmp_path / "run"), alone=True)
    assert table["checkpoints"] == [{"step": 0, "path": str(tmp_path / "run")}]
    assert f"pass --model '{tmp_path / 'run'}/*'" in capsys.readouterr().err


def test_the_hint_about_inner_checkpoints_is_printed_once(tmp_path, capsys):
    """(was: twice, the suite being made twice to learn the model's context)"""
    from conftest import SAMPLE_TEXT, build_tokenizer, save_checkpoint
    from tokendyn.cli import main

    tokenizer = build_tokenizer()
    save_checkpoint(tmp_path / "run", "opt", tokenizer, seed=0)
    save_checkpoint(tmp_path / "run" / "checkpoint-10", "opt", tokenizer, seed=1)
    (tmp_path / "valid.txt").write_text(SAMPLE_TEXT)
    capsys.readouterr()
    args = ["extract", "--model", str(tmp_path / "run"), "--text", str(tmp_path / "valid.txt")]
    assert main([*args, "--out", str(tmp_path / "run.zarr"), "-q"]) == 0
    assert capsys.readouterr().err.count(f"scoring the model in {tmp_path / 'run'} alone") == 1


def test_a_model_without_a_step_beside_another_model_is_refused(tmp_path, capsys):
    """A final model saved outside checkpoint-N (no number, no trainer_state.json) would pass for step 0,
    the untrained model, beside another --model; alone it is scored as step 0."""
    from conftest import SAMPLE_TEXT, build_tokenizer, save_checkpoint
    from tokendyn.cli import main
    from tokendyn.config.quick import model_table

    tokenizer = build_tokenizer()
    save_checkpoint(tmp_path / "final", "opt", tokenizer, seed=0)
    save_checkpoint(tmp_path / "run" / "checkpoint-10", "opt", tokenizer, seed=1)
    (tmp_path / "valid.txt").write_text(SAMPLE_TEXT)
    capsys.readouterr()
    final = str(tmp_path / "final")
    with pytest.raises(TokendynError, match=r"^--model .*final: cannot tell the step of .*rename it with its step"):
        model_table(final, alone=False)
    models = ["--model", final, "--model", str(tmp_path / "run" / "checkpoint-10")]
    out = tmp_path / "two.zarr"
    assert main(["extract", *models, "--text", str(tmp_path / "valid.txt"), "--out", str(out), "-q"]) == 2
    captured = capsys.readouterr()
    assert f"cannot tell the step of {final}" in captured.err and "{ step = N, path = ... }" in captured.err
    assert "suite written" not in captured.out and not (tmp_path / "two.suite.toml").exists()
    assert model_table(final, alone=True)["checkpoints"] == [{"step": 0, "path": final}]
    save_checkpoint(tmp_path / "final" / "checkpoint-5", "opt", tokenizer, seed=2)  # a Trainer output_dir
    with pytest.raises(
        TokendynError, match=f"to score its checkpoint folders \\(checkpoint-5, ...\\), pass --model '{final}/\\*'$"
    ):
        model_table(final, alone=False)


def trainer_run(root: Path, steps=(10, 20), tokenizer_in_run: bool = True, vocab_size: int = 300) -> Path:
    """A Trainer output_dir without processing_class: checkpoint-N folders without tokenizer files;
    the tokenizer saved in the output_dir itself (tokenizer_in_run), or nowhere."""
    from conftest import build_tokenizer, save_checkpoint
    from tokendyn.config.discover import TOKENIZER_FILES

    tokenizer = build_tokenizer(vocab_size=vocab_size)
    for index, step in enumerate(steps):
        folder = root / f"checkpoint-{step}"
        save_checkpoint(folder, "opt", tokenizer, seed=index)
        for name in TOKENIZER_FILES:
            (folder / name).unlink(missing_ok=True)
    if tokenizer_in_run:
        tokenizer.save_pretrained(root)
    return root


@pytest.mark.parametrize("spec", ["run", "run/checkpoint-*", "run/checkpoint-20"])
def test_model_takes_the_tokenizer_of_the_run_folder(tmp_path, capsys, spec):
    """(was: "suite written", then "no tokenizer files ...; set [eval] tokenizer in the suite TOML", the
    suite file removed again)"""
    import tomllib

    from conftest import SAMPLE_TEXT
    from tokendyn.cli import main

    run = trainer_run(tmp_path / "run")
    (tmp_path / "valid.txt").write_text(SAMPLE_TEXT)
    capsys.readouterr()
    args = ["extract", "--model", str(tmp_path / spec), "--text", str(tmp_path / "valid.txt")]
    assert main([*args, "--out", str(tmp_path / "s.zarr"), "-q"]) == 0
    assert f"suite written: {tmp_path / 's.suite.toml'} ([eval] tokenizer = {run}: " in capsys.readouterr().out
    assert tomllib.loads((tmp_path / "s.suite.toml").read_text())["eval"]["tokenizer"] == str(run)


def test_runs_with_other_tokenizers_in_their_run_folders_are_refused(tmp_path, capsys):
    """Two --model runs keep different tokenizers in their run folders: the second was scored with the first's
    (its larger vocabulary passed the size check), so its numbers were wrong without a word."""
    from conftest import SAMPLE_TEXT
    from tokendyn.cli import main

    trainer_run(tmp_path / "small", vocab_size=280)
    big = trainer_run(tmp_path / "big")
    (tmp_path / "valid.txt").write_text(SAMPLE_TEXT)
    args = ["extract", "--model", str(tmp_path / "small"), "--model", str(big), "--text", str(tmp_path / "valid.txt")]
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "s.zarr"), "-q"]) == 2
    assert f"the tokenizer of {big} (the run folder of " in capsys.readouterr().err
    assert not (tmp_path / "s.zarr").exists()


def test_model_without_any_tokenizer_names_the_tokenizer_option(tmp_path, capsys):
    import tomllib

    from conftest import SAMPLE_TEXT, build_tokenizer
    from tokendyn.cli import main

    trainer_run(tmp_path / "run", tokenizer_in_run=False)
    (tmp_path / "valid.txt").write_text(SAMPLE_TEXT)
    capsys.readouterr()
    args = ["extract", "--model", str(tmp_path / "run"), "--text", str(tmp_path / "valid.txt")]
    assert main([*args, "--out", str(tmp_path / "s.zarr"), "-q"]) == 2
    captured = capsys.readouterr()
    assert "no tokenizer files in" in captured.err and "pass --tokenizer PATH_OR_HUB_ID" in captured.err
    assert "suite written" not in captured.out and not (tmp_path / "s.suite.toml").exists()

    build_tokenizer().save_pretrained(tmp_path / "tok")
    assert main([*args, "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "s.zarr"), "-q"]) == 0
    assert capsys.readouterr().out.startswith(f"suite written: {tmp_path / 's.suite.toml'}\n")
    assert tomllib.loads((tmp_path / "s.suite.toml").read_text())["eval"]["tokenizer"] == str(tmp_path / "tok")
    assert main([*args, "--tokenizer", "./nowhere", "--out", str(tmp_path / "t.zarr"), "-q"]) == 2
    assert "--tokenizer ./nowhere: no such directory" in capsys.readouterr().err


def test_quick_suite_tables(tmp_path):
    from tokendyn.config.quick import model_table

    assert model_table("org/name", alone=True) == {
        "name": "name",
        "hub_id": "org/name",
        "checkpoints": [{"step": 0, "revision": "main"}],
    }
    assert model_table("org/name@step1000", alone=True)["revisions"] == ["step1000"]
    assert model_table("org/name@step*", alone=True)["revisions"] == "step*"
    assert model_table("org/name@all", alone=True)["revisions"] == "all"
    with pytest.raises(TokendynError, match="no such directory, and not a hub id"):
        model_table(str(tmp_path / "missing"), alone=True)

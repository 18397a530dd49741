"""Output folders of `analyze` and `report` never destroy what tokendyn did not write: a marker, a
refused foreign folder (the store itself, a folder with a user's file, a file), results swapped in only
when complete (SIGKILL mid-run leaves the previous results whole), no symlink followed out of --out,
and a store that is only read."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from planted_stores import write_store
from tokendyn.cli import main
from tokendyn.errors import TokendynError
from tokendyn.pipelines.analyze import main_one
from tokendyn.pipelines.output import MARKER, mark, output_folder


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under folder (symlinks as their target) -> its content's digest."""
    out = {}
    for path in sorted(folder.rglob("*")):
        key = path.relative_to(folder).as_posix()
        if path.is_symlink():
            out[key] = "-> " + os.readlink(path)
        elif path.is_file():
            out[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture
def small_store(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    steps = np.array([[100, 200, 300, 400, 500.0], [100, 200, 300, 400, 500.0]])
    write_store(tmp_path / "s.zarr", rng.uniform(1, 3, (2, 5, 4, 8)), steps)
    return tmp_path / "s.zarr"


def _one_line_error(capsys, *words: str) -> None:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err


@pytest.mark.parametrize("command", ["analyze", "report"])
def test_out_at_the_store_is_refused_and_the_store_is_kept(small_store, capsys, command):
    before = snapshot(small_store)
    assert main([command, str(small_store), "--out", str(small_store), "--quiet", "--studies", "perplexity"]) == 2
    _one_line_error(capsys, "not empty and was not written by tokendyn")
    assert snapshot(small_store) == before


@pytest.mark.parametrize("command", ["analyze", "report"])
def test_out_at_a_folder_with_a_users_file_is_refused(small_store, tmp_path, capsys, command):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    assert main([command, str(small_store), "--out", str(folder), "--quiet", "--studies", "perplexity"]) == 2
    _one_line_error(capsys, str(folder), "--out")
    assert snapshot(folder) == {"thesis.tex": hashlib.sha256(b"years of work").hexdigest()}


@pytest.mark.parametrize("command", ["analyze", "report"])
def test_out_at_a_file_is_a_one_line_error(small_store, tmp_path, capsys, command):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    assert main([command, str(small_store), "--out", str(target), "--quiet", "--studies", "perplexity"]) == 2
    _one_line_error(capsys, "is a file")
    assert target.read_text() == "keep me"


def test_a_rerun_replaces_its_own_folder_whole_and_leaves_nothing_beside_it(small_store, tmp_path):
    out = tmp_path / "out"
    assert main(["analyze", str(small_store), "--out", str(out), "--quiet", "--studies", "perplexity"]) == 0
    assert (out / MARKER).is_file() and (out / "checkpoints.csv").is_file()
    assert main(["analyze", str(small_store), "--out", str(out), "--quiet", "--studies", "trend_categories"]) == 0
    assert not (out / "checkpoints.csv").exists() and (out / "trend_shares.csv").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "s.zarr"]


@pytest.mark.parametrize("command", ["analyze", "report"])
def test_files_a_user_added_to_a_tokendyn_folder_are_refused_and_kept(small_store, tmp_path, capsys, command):
    out = tmp_path / "out"
    run = [command, str(small_store), "--out", str(out), "--quiet", "--studies", "perplexity"]
    assert main(run) == 0
    inner = next(p for p in out.iterdir() if p.is_dir())
    (inner / "my_figure.png").write_bytes(b"drawn by hand")
    (out / "notes").mkdir()
    (out / "notes" / "todo.md").write_text("mine")
    before = snapshot(out)
    assert main(run) == 2
    _one_line_error(capsys, "did not write", f"{inner.name}/my_figure.png", "notes", "--out")
    assert snapshot(out) == before
    (inner / "my_figure.png").unlink()
    shutil.rmtree(out / "notes")
    assert main(run) == 0


def test_a_folder_from_an_older_tokendyn_is_refused_not_replaced(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / MARKER).write_text("written by tokendyn; the whole folder is replaced by the next run\n")
    (out / "findings.txt").write_text("old")
    with pytest.raises(TokendynError, match="older tokendyn"), output_folder(out):
        pass
    assert (out / "findings.txt").read_text() == "old"


def test_a_study_folder_replaced_by_python_m_analyses_keeps_the_report_replaceable(small_store, tmp_path):
    report = tmp_path / "s.report"
    assert main(["report", str(small_store), "--quiet", "--studies", "perplexity,trend_categories"]) == 0
    assert main_one("trend_categories", [str(small_store)]) == 0
    assert main(["report", str(small_store), "--quiet", "--studies", "perplexity"]) == 0
    assert not (report / "trend_categories").exists()


def test_files_written_under_out_never_follow_a_symlink_out_of_it(small_store, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["analyze", str(small_store), "--out", str(out), "--quiet", "--studies", "perplexity"]) == 0
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "checkpoints.csv").write_text("precious")
    (victim / "group").mkdir()
    (victim / "group" / "zarr.json").write_text("precious too")
    before = snapshot(victim)
    (out / "checkpoints.csv").unlink()
    (out / "checkpoints.csv").symlink_to(victim / "checkpoints.csv")  # planted by someone else
    (out / "labels.zarr").rename(tmp_path / "moved")
    (out / "labels.zarr").symlink_to(victim)
    assert main(["analyze", str(small_store), "--out", str(out), "--quiet", "--studies", "perplexity"]) == 0
    assert snapshot(victim) == before
    assert not (out / "checkpoints.csv").is_symlink() and not (out / "labels.zarr").is_symlink()
    link = tmp_path / "link"
    link.symlink_to(victim)
    assert main(["analyze", str(small_store), "--out", str(link), "--quiet", "--studies", "perplexity"]) == 2
    _one_line_error(capsys, "symbolic link")
    assert snapshot(victim) == before


def test_a_failed_run_leaves_the_previous_results_and_a_run_killed_mid_swap_is_recovered(tmp_path):
    out = tmp_path / "out"
    with output_folder(out) as tmp:
        (tmp / "result.csv").write_text("first")
    with pytest.raises(RuntimeError), output_folder(out) as tmp:
        (tmp / "result.csv").write_text("half")
        raise RuntimeError("killed")
    assert (out / "result.csv").read_text() == "first" and len(list(tmp_path.iterdir())) == 1
    out.rename(tmp_path / f".out.old-{dead_pid()}")  # as a kill between the two renames of the swap leaves it
    with pytest.raises(RuntimeError), output_folder(out):
        raise RuntimeError("killed again")
    assert (out / "result.csv").read_text() == "first" and len(list(tmp_path.iterdir())) == 1


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_the_working_folder_of_a_run_still_going_is_left_alone(tmp_path):
    out = tmp_path / "out"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        theirs = tmp_path / f".out.tmp-{live.pid}"
        theirs.mkdir()
        mark(theirs)
        (theirs / "result.csv").write_text("in progress")
        dead = tmp_path / f".out.tmp-{dead_pid()}"
        dead.mkdir()
        mark(dead)
        with output_folder(out) as tmp:
            (tmp / "result.csv").write_text("ours")
        assert (theirs / "result.csv").read_text() == "in progress"
        assert not dead.exists() and (out / "result.csv").read_text() == "ours"
    finally:
        live.kill()
        live.wait()


def test_sigkill_of_analyze_mid_run_leaves_the_previous_results_whole(small_store, tmp_path):
    out = tmp_path / "out"
    assert main(["analyze", str(small_store), "--out", str(out), "--quiet"]) == 0
    before = snapshot(out)
    assert "labels.zarr/trends/zarr.json" in before
    command = "import sys; from tokendyn.cli import main; sys.exit(main(sys.argv[1:]))"
    process = subprocess.Popen(
        [sys.executable, "-c", command, "analyze", str(small_store), "--out", str(out), "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        # kill once the new results are being written beside the old ones
        while not list(tmp_path.glob(".out.tmp-*/checkpoints.csv")):
            assert process.poll() is None and time.monotonic() < deadline, "analyze ended before it could be killed"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert snapshot(out) == before
    assert main(["analyze", str(small_store), "--out", str(out), "--quiet", "--studies", "perplexity"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "s.zarr"]  # the killed run's folder is gone


def test_analyze_and_report_only_read_the_store(small_store, tmp_path):
    before = snapshot(small_store)
    mtimes = {p: p.stat().st_mtime_ns for p in small_store.rglob("*")}
    assert main(["analyze", str(small_store), "--out", str(tmp_path / "a"), "--quiet"]) == 0
    assert main(["report", str(small_store), "--out", str(tmp_path / "r"), "--quiet"]) == 0
    assert snapshot(small_store) == before
    assert {p: p.stat().st_mtime_ns for p in small_store.rglob("*")} == mtimes


@pytest.mark.parametrize("command", ["analyze", "report"])
def test_a_damaged_store_is_analysed_with_a_warning(small_store, tmp_path, capsys, command):
    assert main([command, str(small_store), "--quiet", "--studies", "perplexity"]) == 0
    assert "integrity problem" not in capsys.readouterr().err
    next(p for p in sorted((small_store / "loss" / "c").rglob("*")) if p.is_file()).unlink()
    assert main([command, str(small_store), "--quiet", "--studies", "perplexity"]) == 0
    err = capsys.readouterr().err
    assert f"tokendyn: warning: {small_store} has 1 integrity problem(s)" in err and "tokendyn verify" in err, err


def test_an_unreadable_chunk_is_a_one_line_error_naming_it(small_store, tmp_path, capsys):
    chunk = next(p for p in sorted((small_store / "loss" / "c").rglob("*")) if p.is_file())
    chunk.write_bytes(b"garbage")
    assert (
        main(["analyze", str(small_store), "--out", str(tmp_path / "out"), "--quiet", "--studies", "perplexity"]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert f"chunk file {chunk} is unreadable" in err[-1] and f"tokendyn verify {small_store}`" in err[-1], err
    assert "Traceback" not in "\n".join(err)

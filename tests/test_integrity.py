"""Fault injection: a store never lies and a command never destroys.

Every case kills, starves or breaks a real run on real Zarr stores and tiny real models, and asserts
a one-line error or a clean recovery, with nothing that existed before lost.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import dask
import numpy as np
import pytest
import torch
import zarr
from transformers import AutoModelForCausalLM

import tokendyn
from conftest import SAMPLE_TEXT, write_suite
from tokendyn.cli import main
from tokendyn.store import verify, writer_lock
from tokendyn.store.integrity import consolidate as reconsolidate
from tokendyn.store.passuntil import list_tasks
from tokendyn.store.read import _opened

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A suite of one model with two checkpoints, a complete store, and a text for a named set."""
    root = tmp_path_factory.mktemp("made")
    suite = write_suite(root, families=("opt",), steps=(0, 10))
    (root / "extra.txt").write_text(SAMPLE_TEXT.replace("\n", "\n\n")[:400])
    (root / "gen.jsonl").write_text(
        "".join(
            json.dumps({"prompt": p, "answer": a}) + "\n"
            for p, a in [("The quick brown", "fox"), ("A cat sat on the", "mat")]
        )
    )
    assert main(["extract", str(suite), "--out", str(root / "s.zarr"), "--no-progress"]) == 0
    return root


@pytest.fixture
def work(made, tmp_path):
    shutil.copytree(made, tmp_path, dirs_exist_ok=True)
    return tmp_path


def one_line_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tokendyn: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def extract(work: Path, *extra: str, out: str = "s.zarr") -> list[str]:
    return ["extract", str(work / "suite.toml"), "--out", str(work / out), "--no-progress", *extra]


def values(store: Path, name: str = "loss", set: str = "main") -> np.ndarray:
    return tokendyn.open_store(store, set=set)[name].values


def assert_recomputed(store: Path, name: str, before: np.ndarray) -> None:
    """The store's `name` equals what it held before the damage: rescored floats to rounding, others exactly."""
    if before.dtype.kind == "f":
        np.testing.assert_allclose(values(store, name), before, rtol=1e-6)
    else:
        np.testing.assert_array_equal(values(store, name), before)


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder` with its bytes and modification time."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def edit_weights(folder: Path, change) -> None:
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        change(model.model.decoder.final_layer_norm)
    model.save_pretrained(folder)


# --- verify and repair -------------------------------------------------------------------------------------


def test_sound_store_verifies_and_info_says_so(capsys, work):
    assert verify(work / "s.zarr", full=True) == []
    assert main(["verify", str(work / "s.zarr")]) == 0
    assert main(["info", str(work / "s.zarr")]) == 0
    assert "integrity every done checkpoint has its chunks" in capsys.readouterr().out


def test_deleted_chunk_is_found_and_recomputed(capsys, work):
    store = work / "s.zarr"
    before = values(store)
    chunk = store / "loss" / "c" / "0" / "1" / "0"
    chunk.unlink()
    assert np.isnan(values(store)[0, 1]).all()  # the store would serve NaN for a "done" checkpoint
    capsys.readouterr()
    assert main(["verify", str(store)]) == 1
    out = capsys.readouterr().out
    assert "lack chunks of 'loss'" in out and "model 0, ckpt 1" in out
    assert main(["info", str(store)]) == 0
    assert "integrity 1 problem(s)" in capsys.readouterr().out
    with pytest.warns(UserWarning, match="repaired"):
        assert main(extract(work)) == 0
    np.testing.assert_allclose(values(store), before, rtol=1e-6)
    assert verify(store, full=True) == []


def test_deleted_array_metadata_is_restored_not_dropped(capsys, work):
    store = work / "s.zarr"
    before = values(store)
    (store / "loss" / "zarr.json").unlink()
    problems = verify(store)
    assert [p.node for p in problems] == ["loss"] and "missing on disk" in problems[0].message
    with pytest.warns(UserWarning, match="repaired"):
        assert main(extract(work)) == 0
    assert (store / "loss" / "zarr.json").is_file()
    np.testing.assert_array_equal(values(store), before)
    assert verify(store, full=True) == []


def test_all_nan_done_checkpoint_is_recomputed(work):
    store = work / "s.zarr"
    before = values(store)
    with zarr.config.set({"array.write_empty_chunks": True}):  # NaN chunks on disk, as a NaN checkpoint wrote them
        zarr.open_array(store / "loss", mode="r+")[0, 0] = np.nan
    assert any("hold no value" in p.message for p in verify(store, full=True))
    with pytest.warns(UserWarning, match="repaired"):
        assert main(extract(work)) == 0
    np.testing.assert_allclose(values(store), before, rtol=1e-6)


def garble(file: Path, text: str = "garbage") -> None:
    file.write_text(text)


@pytest.mark.parametrize("damaged", ["loss/c/0/1/0", "done/c/0/1", "val_ppl/c/0/1", "weights_hash/c/0/1"])
def test_unreadable_chunk_of_a_done_checkpoint_is_found_and_recomputed(capsys, work, damaged):
    store = work / "s.zarr"
    before = {name: values(store, name) for name in ("loss", "val_ppl", "weights_hash")}
    garble(store / damaged)
    capsys.readouterr()
    assert main(["verify", str(store)]) == 1  # was: a zstd RuntimeError traceback
    out = capsys.readouterr().out
    assert f"{store}/{damaged}: " in out and "unreadable" in out and "rerun the extract command" in out
    if not damaged.startswith("loss"):  # info reads the per-checkpoint variables: one line naming the file
        _opened.cache_clear()  # as in a new process: the chunk changed, the metadata that keys the cache did not
        assert f"{store}/{damaged} is unreadable" in one_line_error(capsys, ["info", str(store)])
    with pytest.warns(UserWarning, match="repaired"):
        assert main(extract(work)) == 0  # was: the same traceback; now the checkpoint is recomputed
    for name, value in before.items():
        assert_recomputed(store, name, value)
    assert verify(store, full=True) == []


def passuntil(work: Path) -> list[str]:
    task = ["--task", str(work / "gen.jsonl"), "--max-samples", "4", "--batch-size", "4"]
    return ["passuntil", str(work / "suite.toml"), *task, "--out", str(work / "s.zarr"), "--no-progress"]


def test_unreadable_passuntil_chunk_is_redone_by_a_passuntil_rerun(work):
    store = work / "s.zarr"
    assert main(passuntil(work)) == 0
    runs = store / "passuntil" / "gen"
    before = {name: zarr.open_array(runs / name)[:] for name in ("passes", "samples", "drawn")}
    garble(runs / "passes" / "c" / "0" / "1" / "0")
    assert [p.checkpoints for p in verify(store, full=True)] == [[(0, 1)]]
    with pytest.warns(UserWarning, match="repaired"):
        assert main(passuntil(work)) == 0  # was: the flag set again over the unreadable chunk
    assert verify(store, full=True) == []
    for name, value in before.items():  # redone with the same seeds
        np.testing.assert_array_equal(zarr.open_array(runs / name)[:], value)


def test_unreadable_array_metadata_is_restored(capsys, work):
    store = work / "s.zarr"
    before = values(store)
    garble(store / "loss" / "zarr.json", '{"broken')
    problems = verify(store, full=True)  # was: a JSONDecodeError traceback
    assert [str(p) for p in problems] == ["loss: zarr.json is not readable JSON"]
    assert main(["info", str(store)]) == 0
    assert "loss: zarr.json is not readable JSON" in capsys.readouterr().out
    with pytest.warns(UserWarning, match="repaired"):
        assert main(extract(work)) == 0
    np.testing.assert_array_equal(values(store), before)
    assert verify(store, full=True) == []


def test_unreadable_root_metadata_is_one_line_everywhere(capsys, work):
    store = work / "s.zarr"
    garble(store / "zarr.json", '{"broken')
    before = snapshot(store)
    for argv in (
        ["info", str(store)],
        ["verify", str(store)],
        ["analyze", str(store), "--out", str(work / "results")],
        extract(work),
    ):
        assert f"{store / 'zarr.json'} is unreadable" in one_line_error(capsys, argv), argv
    assert snapshot(store) == before


def test_unreadable_coordinate_chunk_is_reported_and_refused(capsys, work):
    store = work / "s.zarr"
    garble(store / "token_id" / "c" / "0")  # an integer coordinate, written once: no rerun recomputes it
    problems = verify(store, full=True)
    assert [p.node for p in problems] == ["token_id/c/0"] and not problems[0].repairable
    before = snapshot(store)
    assert "token_id/c/0: chunk file is unreadable" in one_line_error(capsys, extract(work))
    assert snapshot(store) == before


def test_set_without_its_zarr_json_is_refused_not_rescored(capsys, work):
    store = work / "s.zarr"
    assert main(extract(work, "--set", f"extra={work / 'extra.txt'}")) == 0
    (store / "sets" / "extra" / "zarr.json").unlink()
    root = json.loads((store / "zarr.json").read_text())
    root["consolidated_metadata"] = None  # nothing to restore it from
    (store / "zarr.json").write_text(json.dumps(root))
    problems = verify(store)
    assert [p.node for p in problems] == ["sets/extra"] and not problems[0].repairable  # was: "sound"
    before = snapshot(store / "sets" / "extra")
    err = one_line_error(capsys, extract(work, "--set", f"extra={work / 'extra.txt'}"))
    assert "sets/extra: zarr.json is missing" in err and "done checkpoints" in err
    assert snapshot(store / "sets" / "extra") == before  # was: rebuilt, every done checkpoint rescored


@pytest.mark.parametrize("coordinate", ["val_ppl", "bits_per_byte", "word_ppl", "weights_hash"])
def test_lost_checkpoint_coordinate_is_found_and_recomputed(capsys, work, coordinate):
    store = work / "s.zarr"
    before = values(store, coordinate)
    (store / coordinate / "c" / "0" / "1").unlink()
    capsys.readouterr()
    assert main(["verify", str(store)]) == 1  # was: "sound", and info showed NaN for a done checkpoint
    assert f"lack chunks of '{coordinate}'" in capsys.readouterr().out
    with pytest.warns(UserWarning, match="repaired"):
        assert main(extract(work)) == 0
    assert_recomputed(store, coordinate, before)
    assert verify(store, full=True) == []


def test_shapes_disagreeing_with_consolidated_metadata_are_reported(capsys, work):
    store = work / "s.zarr"
    for name in ("done", "loss"):  # as a store grow killed after resizing these arrays leaves them
        array = zarr.open_array(store / name, mode="r+")
        array.resize((array.shape[0], 3, *array.shape[2:]))
    capsys.readouterr()
    assert main(["verify", str(store)]) == 1  # was: "metadata consistent"
    out = capsys.readouterr().out
    assert "done: own metadata disagrees with the consolidated metadata: shape (1, 3) on disk, (1, 2)" in out
    assert "a store grow was interrupted" in out and "rerun the extract command" in out


def test_writer_lock_is_taken_on_the_resolved_path(capsys, work):
    (work / "link.zarr").symlink_to(work / "s.zarr")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from tokendyn.store import writer_lock\n"
            "with writer_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)",
            str(work / "link.zarr"),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert f"process {holder.pid}" in one_line_error(capsys, extract(work, "--force"))  # was: both ran
    finally:
        holder.kill()
        holder.wait()


def test_out_that_is_a_file_is_refused(capsys, work):
    (work / "afile").write_text("mine")
    before = sorted(p.name for p in work.iterdir())
    assert "afile is a file, not a store folder" in one_line_error(capsys, extract(work, out="afile"))
    assert sorted(p.name for p in work.iterdir()) == before  # was: a .afile.lock left behind
    assert (work / "afile").read_text() == "mine"


# --- numbers checked before "done" -------------------------------------------------------------------------


def test_nan_checkpoint_is_refused_with_reason(capsys, work):
    store = work / "n.zarr"
    edit_weights(work / "ckpts/opt/step10", lambda norm: norm.weight.fill_(float("nan")))
    with pytest.warns(UserWarning):
        err = one_line_error(capsys, extract(work, out="n.zarr"))
    assert "model 'opt' step 10" in err and "NaN loss" in err and "--dtype float32" in err
    n_predicted = values(store, "token_id").size  # format 2: every stored token is predicted
    assert f"{n_predicted} of {n_predicted} tokens" in err
    ds = tokendyn.open_store(store)
    assert ds.done.values.tolist() == [[True, False]]
    assert "NaN loss" in ds.attrs["refused"]["0,1"]
    assert np.isnan(ds.val_ppl.values[0, 1]) and np.isfinite(ds.val_ppl.values[0, 0])
    good = values(store)[0, 0]
    with pytest.warns(UserWarning):  # a rerun tries again, says so again, and keeps what is done
        one_line_error(capsys, extract(work, out="n.zarr"))
    np.testing.assert_array_equal(values(store)[0, 0], good)
    assert main(["info", str(store)]) == 0
    assert "refused   model 'opt' step 10" in capsys.readouterr().out


def test_huge_losses_give_infinite_perplexity_not_a_crash(work):
    edit_weights(work / "ckpts/opt/step10", lambda norm: (norm.weight.mul_(1e4), norm.bias.mul_(1e4)))
    assert main(extract(work, out="h.zarr")) == 0
    ds = tokendyn.open_store(work / "h.zarr")
    assert ds.done.values.all()
    losses = ds.loss.values[0, 1]
    assert np.nanmean(losses) > 709 and np.isinf(ds.val_ppl.values[0, 1])  # exp(mean loss) overflows float64
    assert np.isinf(ds.word_ppl.values[0, 1])  # more tokens than words: overflows too, not capped at exp(700)


def test_float16_overflow_is_refused(capsys, work):
    edit_weights(work / "ckpts/opt/step10", lambda norm: (norm.weight.mul_(1e6), norm.bias.mul_(1e6)))
    with pytest.warns(UserWarning):
        err = one_line_error(capsys, extract(work, "--store-dtype", "float16", out="f.zarr"))
    assert "infinite loss, above 65504, the largest float16" in err and "--store-dtype float32" in err
    assert tokendyn.open_store(work / "f.zarr").done.values.tolist() == [[True, False]]


# --- one writer at a time ----------------------------------------------------------------------------------


def test_second_writer_is_refused_naming_the_holder(capsys, work):
    store = work / "s.zarr"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from tokendyn.store import writer_lock\n"
            "with writer_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)",
            str(store),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(store)
        err = one_line_error(capsys, extract(work, "--force"))
        assert f"process {holder.pid} on host {socket.gethostname()}" in err
        assert snapshot(store) == before
    finally:
        holder.kill()
        holder.wait()
    assert main(extract(work, "--force")) == 0  # a killed holder leaves no stale lock


def test_two_concurrent_extracts_leave_a_sound_store(work):
    command = [
        sys.executable,
        "-c",
        "from tokendyn.cli import entry; entry()",  # the console script's path, exit included
        *extract(work, out="c.zarr"),
    ]
    runs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO) for _ in range(2)
    ]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    assert all(code in (0, 2) for code, _ in results) and any(code == 0 for code, _ in results), results
    for code, err in results:
        if code == 2:  # one error line (the other stderr line is the device and dtype choice)
            errors = [line for line in err.splitlines() if line.startswith("tokendyn: error:")]
            assert len(errors) == 1 and "is being written by process" in errors[0], err
    assert tokendyn.open_store(work / "c.zarr").done.values.all()
    assert verify(work / "c.zarr", full=True) == []


def test_reentrant_within_a_process(work):
    with writer_lock(work / "s.zarr"), writer_lock(work / "s.zarr"):
        assert (work / ".s.zarr.lock.holder").is_file()
    assert not (work / ".s.zarr.lock.holder").exists()


# --- read-only stores ------------------------------------------------------------------------------------------


def test_readers_and_noop_extract_never_write(capsys, work):
    store = work / "s.zarr"
    for path in [store, *store.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)
    try:
        before, around = snapshot(store), sorted(p.name for p in work.iterdir())
        assert main(["info", str(store)]) == 0
        assert main(["verify", str(store)]) == 0
        assert main(extract(work)) == 0
        assert main(["analyze", str(store), "--out", str(work / "results")]) == 0
        assert tokendyn.open_store(store).loss.values.size
        assert snapshot(store) == before
        assert sorted(p.name for p in work.iterdir() if p.name != "results") == around
    finally:
        for path in [store, *store.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)


# --- disk full -------------------------------------------------------------------------------------------------


def test_disk_full_at_every_write_phase(capsys, work, monkeypatch):
    """ENOSPC at the n-th file written (store or set creation, chunks, done flags): one line, then a rerun
    completes the store, equal to an undisturbed run, and the complete main set that existed before is untouched."""
    import zarr.storage._local as local

    real_put = local._put
    calls = {"n": 0, "fail_at": None}

    def put(path, value, exclusive=False):
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_put(path, value, exclusive)

    monkeypatch.setattr(local, "_put", put)
    main_before = values(work / "s.zarr")
    for existing in (False, True):  # a new store; a new set in a complete store

        def fresh(name: str) -> list[str]:
            if existing:
                shutil.copytree(work / "s.zarr", work / name)
            return extract(work, "--set", f"extra={work / 'extra.txt'}", out=name)

        probe = work / f"probe-{existing}.zarr"
        calls.update(n=0, fail_at=None)
        assert main(fresh(probe.name)) == 0
        for fail_at in np.unique(np.linspace(1, calls["n"], 6).astype(int)):
            name = f"{existing}-{fail_at}.zarr"
            argv = fresh(name)
            calls.update(n=0, fail_at=fail_at)
            err = one_line_error(capsys, argv)
            assert "disk is full" in err and "rerun" in err
            calls.update(n=0, fail_at=None)
            assert main(argv) == 0, capsys.readouterr().err
            np.testing.assert_allclose(values(work / name, set="extra"), values(probe, set="extra"), rtol=1e-6)
            np.testing.assert_allclose(values(work / name), values(probe), rtol=1e-6)
            if existing:
                np.testing.assert_array_equal(values(work / name), main_before)
            assert verify(work / name, full=True) == []


# --- killed at creation ----------------------------------------------------------------------------------------


def kill_during(argv: list[str], target: Path, reset, deadline: float = 120.0) -> bool:
    """Run `main(argv)` in forked children, each killed after a delay, until one is killed while building
    `target` (its temporary folder is present); returns whether that happened before the deadline.

    A kill before the build leaves no `target`, one after it leaves `target` (then `reset()` removes it):
    the delay doubles until a kill comes too late, then bisects between too early and too late.
    """
    early, late, start = 0.0, None, time.monotonic()
    while time.monotonic() - start < deadline:
        delay = min(2 * early + 0.1, 20.0) if late is None else (early + late) / 2
        pid = os.fork()
        if pid == 0:  # the child runs the command and never returns into pytest
            code = 1
            try:
                dask.config.set(scheduler="synchronous")  # the parent's dask thread pool does not survive fork
                code = main(argv)
            finally:
                os._exit(code)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        if target.parent.is_dir() and any(
            p.name.startswith(f".{target.name}.partial-") for p in target.parent.iterdir()
        ):
            return True
        if target.exists():
            reset()
            late = delay
        else:
            early = delay
        if late is not None and late - early < 1e-4:  # converged without landing inside: retry the search
            early, late = 0.0, None
    return False


def remove_node(store: Path, node: Path):
    def reset():
        shutil.rmtree(node, ignore_errors=True)
        reconsolidate(store)

    return reset


@pytest.mark.slow
def test_sigkill_at_store_creation(work):
    argv = extract(work, out="k.zarr")
    assert kill_during(argv, work / "k.zarr", lambda: shutil.rmtree(work / "k.zarr")), "no kill in the window"
    assert main(argv) == 0
    assert not any(".partial-" in p.name for p in work.iterdir())
    np.testing.assert_allclose(values(work / "k.zarr"), values(work / "s.zarr"), rtol=1e-6)


@pytest.mark.slow
def test_sigkill_at_set_creation(work):
    store = work / "s.zarr"
    before = values(store)
    argv = extract(work, "--set", f"extra={work / 'extra.txt'}")
    target = store / "sets" / "extra"
    assert kill_during(argv, target, remove_node(store, target)), "no kill landed in the set creation window"
    assert main(argv) == 0
    np.testing.assert_array_equal(values(store), before)
    assert tokendyn.open_store(store, set="extra").done.values.all()
    assert verify(store, full=True) == []


@pytest.mark.slow
def test_sigkill_at_passuntil_group_creation(work):
    store = work / "s.zarr"
    argv = [
        "passuntil",
        str(work / "suite.toml"),
        "--task",
        str(work / "gen.jsonl"),
        "--out",
        str(store),
        "--max-samples",
        "4",
        "--batch-size",
        "4",
        "--no-progress",
    ]
    target = store / "passuntil" / "gen"
    assert kill_during(argv, target, remove_node(store, target)), "no kill landed in the group creation window"
    assert main(argv) == 0
    assert list_tasks(store) == ["gen"]
    assert verify(store, full=True) == []


# --- atomic files ------------------------------------------------------------------------------------------------

# Writes `size` bytes with write_atomically under a file size limit of 1000 bytes: the write fails halfway, as on a
# full disk (SIGXFSZ ignored, so the write returns EFBIG instead of killing the process).
LIMITED_WRITER = """
import resource, signal, sys
from pathlib import Path
from tokendyn.atomic import write_atomically
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
write_atomically(Path(sys.argv[1]), "x" * int(sys.argv[2]))
"""


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    from tokendyn import atomic

    target = tmp_path / "file.json"
    target.write_text("old")
    run = subprocess.run(
        [sys.executable, "-c", LIMITED_WRITER, str(target), "10000"], capture_output=True, text=True, cwd=REPO
    )
    assert run.returncode == 1 and "File too large" in run.stderr, run.stderr
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["file.json"]

    def interrupted(source, destination):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, "replace", interrupted)  # interrupted once the temporary file is complete
    with pytest.raises(KeyboardInterrupt):
        atomic.write_atomically(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["file.json"]


def test_a_concurrent_reader_sees_the_old_or_the_new_file_never_a_part(tmp_path):
    import threading

    from tokendyn.atomic import write_atomically

    target = tmp_path / "file"
    versions = [bytes([65 + i]) * 300_000 for i in range(2)]
    write_atomically(target, versions[0])
    seen, reads, done = set(), [0], threading.Event()

    def read():
        while not done.is_set():
            seen.add(target.read_bytes())
            reads[0] += 1

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(100):
            write_atomically(target, versions[i % 2])
    finally:
        done.set()
        reader.join()
    assert reads[0] > 10 and seen <= set(versions)


def test_an_atomic_write_removes_the_leftovers_of_dead_processes_only(tmp_path):
    from tokendyn.atomic import write_atomically

    host = socket.gethostname()
    target = tmp_path / "file.json"
    dead = tmp_path / f".file.json.partial-{host}-{2**22 + 1}"  # above Linux's largest pid: never running
    running = tmp_path / f".file.json.partial-{host}-1"  # init
    other_host = tmp_path / ".file.json.partial-elsewhere-99"
    for leftover in (dead, running, other_host):
        leftover.write_text("{")
    write_atomically(target, "{}")
    assert target.read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["file.json", running.name, other_host.name])


# --- half-made pieces left by older versions -------------------------------------------------------------------


def test_half_made_pieces_of_older_versions_are_redone(capsys, work):
    store = work / "s.zarr"
    before = values(store)
    # a set whose folder exists but is unlisted and incomplete (was: FileExistsError ... mode 'w-')
    (store / "sets" / "extra").mkdir(parents=True)
    (store / "sets" / "extra" / "zarr.json").write_text(
        json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}})
    )
    assert main(extract(work, "--set", f"extra={work / 'extra.txt'}")) == 0
    assert tokendyn.open_store(store, set="extra").done.values.all()
    # a PassUntil group without its parameters (was: KeyError 'params', breaking analyze for the whole store)
    (store / "passuntil" / "gen").mkdir(parents=True)
    (store / "passuntil" / "gen" / "zarr.json").write_text(
        json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {"task": "gen"}})
    )
    assert list_tasks(store) == []
    assert (
        main(
            [
                "passuntil",
                str(work / "suite.toml"),
                "--task",
                str(work / "gen.jsonl"),
                "--out",
                str(store),
                "--max-samples",
                "4",
                "--batch-size",
                "4",
                "--no-progress",
            ]
        )
        == 0
    )
    assert list_tasks(store) == ["gen"]
    np.testing.assert_array_equal(values(store), before)


def test_half_made_store_without_done_is_rebuilt(work):
    store = work / "s.zarr"
    reference = values(store)
    zarr.open_array(store / "done", mode="r+")[...] = False
    shutil.rmtree(store / "done")  # was: KeyError "'done' not found in consolidated metadata"
    root = json.loads((store / "zarr.json").read_text())
    del root["consolidated_metadata"]["metadata"]["done"]
    (store / "zarr.json").write_text(json.dumps(root))
    assert main(extract(work)) == 0
    np.testing.assert_allclose(values(store), reference, rtol=1e-6)
    assert not any(".partial-" in p.name for p in work.iterdir())


# --- one-line errors and checks before work ------------------------------------------------------------------


def test_bad_documents_are_one_line_errors(capsys, work):  # noqa: C901
    def jsonl(name: str, record: dict) -> str:
        (work / name).write_text(json.dumps(record) + "\n")
        return f"x={work / name}"

    cases = {
        jsonl("a.jsonl", {"text": "abc", "spans": {"start": 0}}): '"spans" must be a list',
        jsonl("b.jsonl", {"text": "abc", "spans": [{"start": "0", "end": 2}]}): 'integer "start"',
        jsonl("c.jsonl", {"text": "abc", "spans": [{"start": 0, "end": 99}]}): "ends after the text",
        jsonl("d.jsonl", {"text": "abc", "loss": 1}): "document field 'loss'",
        jsonl("e.jsonl", {"text": "abc", "spans": [{"start": 0, "end": 2, "done": 1}]}): "field 'done'",
        f".={work / 'extra.txt'}": "not dots only",
        f"..={work / 'extra.txt'}": "not dots only",
    }
    before = snapshot(work / "s.zarr")
    for option, message in cases.items():
        assert message in one_line_error(capsys, extract(work, "--set", option)), option
    assert "at least 1" in one_line_error(capsys, extract(work, "--batch-tokens", "0"))
    assert snapshot(work / "s.zarr") == before


@pytest.mark.parametrize(
    "example, message",
    [
        ({"input": "q", "target_scores": {"a": True, "b": False}}, "not booleans"),
        ({"input": "q", "target_scores": {"a": float("nan"), "b": 0}}, "not NaN"),
        ({"input": 3, "target_scores": {"a": 1, "b": 0}}, 'string "input"'),
    ],
)
def test_bad_bigbench_fields(capsys, work, example, message):
    (work / "task.json").write_text(json.dumps({"examples": [example, example]}))
    assert message in one_line_error(
        capsys,
        [
            "tasks",
            str(work / "suite.toml"),
            "--task",
            str(work / "task.json"),
            "--out",
            str(work / "s.zarr"),
            "--no-progress",
        ],
    )


def test_bigbench_prefix_of_wrong_type(capsys, work):
    example = {"input": "q", "target_scores": {"a": 1, "b": 0}}
    (work / "task.json").write_text(json.dumps({"examples": [example, example], "example_input_prefix": 5}))
    assert "must be a string" in one_line_error(
        capsys, ["tasks", str(work / "suite.toml"), "--task", str(work / "task.json"), "--out", str(work / "s.zarr")]
    )


def test_malicious_pickle_is_refused_in_one_line(capsys, work):
    folder = work / "ckpts/opt/step10"
    (folder / "model.safetensors").unlink()

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {work / 'pwned'}",))

    torch.save({"x": Payload()}, folder / "pytorch_model.bin")
    err = one_line_error(capsys, extract(work, "--allow-pickle", "--force", out="p.zarr"))
    assert "refusing the pickle weights" in err, err
    assert not (work / "pwned").exists()


def test_garbled_tokenizer_json_is_one_line(capsys, work):
    (work / "ckpts/opt/step0/tokenizer.json").write_text('{"version": "1.0", "model": 5}')
    assert "cannot load the tokenizer" in one_line_error(capsys, extract(work, out="t.zarr"))


def test_checker_with_wrong_signature(capsys, work, monkeypatch):
    (work / "badcheck.py").write_text("def judge(completion):\n    return True\n")
    monkeypatch.syspath_prepend(str(work))
    err = one_line_error(
        capsys,
        [
            "passuntil",
            str(work / "suite.toml"),
            "--task",
            str(work / "gen.jsonl"),
            "--out",
            str(work / "g.zarr"),
            "--checker",
            "badcheck:judge",
        ],
    )
    assert "function(completion, instance)" in err
    assert not (work / "g.zarr").exists()


def test_checks_before_work(capsys, work):
    suite = work / "suite.toml"
    suite.write_text(suite.read_text().replace("seq_len = 16", "seq_len = 1000000000"))
    started = time.monotonic()
    assert "exceeds the context" in one_line_error(capsys, extract(work, out="big.zarr"))
    assert time.monotonic() - started < 30 and not (work / "big.zarr").exists()
    suite.write_text(suite.read_text().replace("seq_len = 1000000000", "seq_len = 16"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:  # refused by the parser, before the main extraction
        main(
            [
                "passuntil",
                str(suite),
                "--task",
                str(work / "gen.jsonl"),
                "--out",
                str(work / "g.zarr"),
                "--new-tokens",
                "0",
            ]
        )
    err = capsys.readouterr().err
    assert (
        exit.value.code == 2 and err.count("\n") == 1 and "argument --new-tokens: expected a whole number >= 1" in err
    )
    assert not (work / "g.zarr").exists()


def test_unexpected_os_error_is_one_line(capsys, work, monkeypatch):
    import tokendyn.cli.info as info

    def broken(path):
        raise OSError(errno.EIO, "Input/output error", str(path))

    monkeypatch.setattr(info, "describe", broken)
    err = one_line_error(capsys, ["info", str(work / "s.zarr")])
    assert "Input/output error" in err


def test_generate_writes_atomically(work, monkeypatch):
    from tokendyn import atomic
    from tokendyn.models import generate

    out = work / "gen_out.jsonl"
    previous = json.dumps({"mixture": "1,0", "decoding": "greedy", "context_ids": [1], "token_ids": [2]}) + "\n"
    out.write_text(previous)

    def disk_full(source, destination):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", disk_full)
    with pytest.raises(tokendyn.errors.TokendynError, match="cannot write"):
        generate.write_jsonl([{"text": "a"}], out)
    assert out.read_text() == previous
    assert [p.name for p in work.glob(".gen_out*")] == []


def test_generate_refuses_to_replace_a_file_it_did_not_write(work, capsys):
    from tokendyn.models import generate

    notes = work / "notes.jsonl"
    notes.write_text('{"text": "my own data"}\n')
    err = one_line_error(capsys, ["generate", str(work / "suite.toml"), "--out", str(notes)])
    assert "exists and was not written by tokendyn generate" in err
    with pytest.raises(tokendyn.errors.TokendynError, match="not written by tokendyn generate"):
        generate.write_jsonl([{"text": "a"}], notes)
    assert notes.read_text() == '{"text": "my own data"}\n'
    empty = work / "empty.jsonl"
    empty.touch()
    assert generate.write_jsonl([{"text": "a"}], empty).read_text() == '{"text": "a"}\n'


def test_a_set_being_created_is_not_a_set(capsys, work):
    """A writer killed while it builds a named set leaves `sets/.NAME.partial-HOST-PID`; readers skip it
    (was: listed as a set, `info` crashed with a KeyError)."""
    store = work / "s.zarr"
    assert main(extract(work, "--set", f"extra={work / 'extra.txt'}")) == 0
    zarr.open_group(store / "sets" / ".other.partial-host-1", mode="w")
    root = json.loads((store / "zarr.json").read_text())  # a new store: the killed writer had not consolidated
    root.pop("consolidated_metadata")
    (store / "zarr.json").write_text(json.dumps(root))
    assert tokendyn.list_sets(store) == ["extra"]
    assert main(["info", str(store)]) == 0
    assert ".other" not in capsys.readouterr().out


def test_values_of_an_unfinished_checkpoint_read_as_nan(work):
    """The chunks a killed (or --force) run wrote for a checkpoint it did not finish are not data: `open_store`
    shows NaN there, as docs/store.md says (was: the finite values, with done false)."""
    store = work / "s.zarr"
    assert main(extract(work, "--set", f"extra={work / 'extra.txt'}")) == 0
    for group, set in ((store, "main"), (store / "sets" / "extra", "extra")):
        zarr.open_group(group, mode="r+")["done"][0, 1] = False
        loss = values(store, set=set)
        assert np.isnan(loss[0, 1]).all() and np.isfinite(loss[0, 0]).all()

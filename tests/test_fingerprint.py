"""The weights' sha256 begun ahead, while torch and transformers import: taken only for unchanged files."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import transformers.utils
import zarr

from conftest import build_tokenizer, save_checkpoint, write_suite
from tokendyn.cli import extract as extract_cli
from tokendyn.cli import main
from tokendyn.config.suite import load_suite
from tokendyn.models import fingerprint


def expected_digest(files: list[Path]) -> str:
    lines = "".join(f"{f.name}:{hashlib.sha256(f.read_bytes()).hexdigest()}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def weights_folder(path: Path, data: bytes = b"weights " * 1000) -> list[Path]:
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(data)
    return [path / "model.safetensors"]


def count_reads(monkeypatch) -> list[str]:
    """The threads `fingerprint._sha256` reads files in, one entry per file read."""
    threads: list[str] = []
    real = fingerprint._sha256
    monkeypatch.setattr(fingerprint, "_sha256", lambda f: threads.append(threading.current_thread().name) or real(f))
    return threads


def test_file_names_are_transformers_own():
    for name in ("SAFE_WEIGHTS_NAME", "SAFE_WEIGHTS_INDEX_NAME", "WEIGHTS_NAME", "WEIGHTS_INDEX_NAME"):
        assert getattr(fingerprint, name) == getattr(transformers.utils, name)


def test_hash_ahead_is_taken_and_read_once(tmp_path, monkeypatch):
    files = weights_folder(tmp_path / "ckpt")
    reads = count_reads(monkeypatch)
    fingerprint.hash_ahead(tmp_path / "ckpt")
    assert fingerprint.digest(files) == expected_digest(files)
    assert fingerprint.digest(files) == expected_digest(files)
    assert reads == ["tokendyn-hash-ahead"]  # read once, in the background


def test_changed_file_is_read_again(tmp_path, monkeypatch):
    """A rewrite after the hash began (same size, modification time set back) is not hidden by it."""
    files = weights_folder(tmp_path / "ckpt", b"a" * 5000)
    fingerprint.hash_ahead(tmp_path / "ckpt")
    before = fingerprint.digest(files)
    stat = files[0].stat()
    files[0].write_bytes(b"b" * 5000)
    os.utime(files[0], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    reads = count_reads(monkeypatch)
    assert fingerprint.digest(files) == expected_digest(files) != before
    assert reads == ["MainThread"]


def test_failed_hash_ahead_is_read_again(tmp_path, monkeypatch):
    """Any failure in the background thread, not only an OSError, ends the wait: `digest` then reads
    the files itself instead of waiting forever on a result that never comes."""
    files = weights_folder(tmp_path / "ckpt")
    real = fingerprint._sha256

    def fails_in_background(file: Path) -> str:
        if threading.current_thread().name == "tokendyn-hash-ahead":
            raise RuntimeError("not an OSError")
        return real(file)

    monkeypatch.setattr(fingerprint, "_sha256", fails_in_background)
    fingerprint.hash_ahead(tmp_path / "ckpt")
    result: list[str] = []
    waiting = threading.Thread(target=lambda: result.append(fingerprint.digest(files)), daemon=True)
    waiting.start()
    waiting.join(timeout=30)
    assert result == [expected_digest(files)]


def test_shards_in_index_order_and_folders_without_weights(tmp_path):
    folder = tmp_path / "sharded"
    folder.mkdir()
    index = {"weight_map": {"a": "model-00002-of-00002.safetensors", "b": "model-00001-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    for name in index["weight_map"].values():
        (folder / name).write_bytes(name.encode())
    fingerprint.hash_ahead(folder)
    shards = fingerprint.weight_files(folder)[0]
    assert [f.name for f in shards] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert fingerprint.digest(shards) == expected_digest(shards)

    (tmp_path / "garbled").mkdir()
    (tmp_path / "garbled" / "model.safetensors.index.json").write_text("{")
    (tmp_path / "nothing").mkdir()
    before = dict(fingerprint._ahead)
    for empty in (tmp_path / "nothing", tmp_path / "garbled", tmp_path / "missing"):
        fingerprint.hash_ahead(empty)  # no error here: the command reports it where it checks the checkpoint
    assert fingerprint._ahead == before


def test_extract_hashes_the_first_checkpoint_before_torch_is_imported(tmp_path):
    """`tokendyn extract --model` without --seq-len (its context is read from the config first)."""
    save_checkpoint(tmp_path / "ckpt", "llama", build_tokenizer(), seed=0)
    (tmp_path / "t.txt").write_text("Hello there, a short text to score. " * 20)
    script = (
        "import sys\n"
        "from tokendyn.models import fingerprint\n"
        "real = fingerprint.hash_ahead\n"
        "def spy(folder):\n"
        "    print('AHEAD', 'torch' in sys.modules, 'transformers' in sys.modules, folder, flush=True)\n"
        "    real(folder)\n"
        "fingerprint.hash_ahead = spy\n"
        "from tokendyn.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    args = ["extract", "--model", str(tmp_path / "ckpt"), "--text", str(tmp_path / "t.txt")]
    args += ["--out", str(tmp_path / "s.zarr"), "--no-progress"]
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"AHEAD False False {tmp_path / 'ckpt'}" in done.stdout.splitlines()


def test_extract_stores_the_hash_begun_ahead(tmp_path, monkeypatch):
    """A suite file: the first checkpoint is hashed once, in the background, and that hash is the one stored."""
    suite = write_suite(tmp_path, families=("gpt_neox",), steps=(0, 10))
    reads = []
    real = fingerprint._sha256
    monkeypatch.setattr(
        fingerprint,
        "_sha256",
        lambda f: (
            (f.suffix == ".safetensors" and reads.append((f.parent.name, threading.current_thread().name))) or real(f)
        ),
    )
    assert main(["extract", str(suite), "--out", str(tmp_path / "s.zarr"), "--no-progress"]) == 0
    assert reads[0] == ("step0", "tokendyn-hash-ahead")
    assert [step for step, _ in reads] == ["step0", "step10"]
    stored = zarr.open_group(tmp_path / "s.zarr", mode="r")["weights_hash"][0, 0]
    assert stored == expected_digest([tmp_path / "ckpts" / "gpt_neox" / "step0" / "model.safetensors"])


def test_hash_ahead_only_where_this_process_scores_first(tmp_path, monkeypatch):
    suite = load_suite(write_suite(tmp_path, families=("opt",), steps=(0,)))
    started = []
    monkeypatch.setattr(fingerprint, "hash_ahead", started.append)

    def ahead(**options) -> list:
        started.clear()
        defaults = {"out": tmp_path / "new.zarr", "scheduler": None, "workers": None}
        extract_cli._hash_ahead(suite, argparse.Namespace(**{**defaults, **options}))
        return list(started)

    assert ahead() == [suite.models[0].checkpoints[0].path]
    assert ahead(out=tmp_path) == []  # a store being resumed or grown: its first checkpoint is scored already
    assert ahead(workers=2) == ahead(scheduler="tcp://127.0.0.1:8786") == []  # workers hash what they score

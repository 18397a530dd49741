"""A checkpoint folder's weight files and their sha256, without torch or transformers.

A store records the sha256 of every checkpoint's weights (`checkpoints.weights_fingerprint`): reading
every byte costs about a second per GB. `hash_ahead` starts that reading for a local folder in a
background thread before the command imports torch and transformers, about 4 s spent on one core:
hashlib releases the GIL, so the hash runs mostly on the other core, and the file is in the page
cache when the model loads. Started later, beside the oneDNN packing or the scoring that use both
cores, it slowed them. The gain measured is small: the imports took about 0.2 s longer, against
0.35 s of hashing saved later (docs/benchmarks.md, "The weight hash during imports"). `digest`
takes the result of `hash_ahead` when the files have not changed since.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from concurrent.futures import Future
from pathlib import Path

from tokendyn.errors import TokendynError

# The weight files transformers' from_pretrained reads, per format: one file, or the shards its index lists
# (transformers.utils' SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME).
SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME = "model.safetensors", "model.safetensors.index.json"
WEIGHTS_NAME, WEIGHTS_INDEX_NAME = "pytorch_model.bin", "pytorch_model.bin.index.json"
SAFETENSORS_FORMAT = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME)
PICKLE_FORMAT = (WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
# What tells a file apart from its rewrite, copy or swap (a change always moves the change time).
IDENTITY_FIELDS = ("st_dev", "st_ino", "st_size", "st_mtime_ns", "st_ctime_ns")

_ahead: dict[tuple[str, ...], tuple[list, Future[str]]] = {}  # files -> (their identities, their digest)


def weight_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(safetensors files, pickle files) of a checkpoint directory that transformers' from_pretrained
    reads: model.safetensors, else the shards model.safetensors.index.json lists; pytorch_model.bin,
    else the shards pytorch_model.bin.index.json lists. Only those on disk, each sorted by name."""
    safetensors, pickled = (
        [folder / name for name in format_files(folder, *names) if (folder / name).is_file()]
        for names in (SAFETENSORS_FORMAT, PICKLE_FORMAT)
    )
    return safetensors, pickled


def format_files(folder: Path, single: str, index: str) -> list[str]:
    """The names from_pretrained reads for one format, present or not: `single` if the folder has it,
    else the shards `index` lists (as transformers' get_checkpoint_shard_files), else none."""
    if (folder / single).is_file():
        return [single]
    path = folder / index
    if not path.is_file():
        return []
    try:
        return sorted(set(json.loads(path.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as err:
        raise TokendynError(f"unreadable {path} ({err}); re-save or re-download the checkpoint") from err


def identities(files: list[Path]) -> list:
    """Each file's absolute path and `IDENTITY_FIELDS`."""
    return [(str(f.absolute()), *(getattr(f.stat(), name) for name in IDENTITY_FIELDS)) for f in files]


def digest(files: list[Path]) -> str:
    """sha256 over the files' names and bytes (in the order given); a `hash_ahead` of the same files is
    taken when none of them changed since it started."""
    ahead = _ahead.get(tuple(map(str, files)))
    if ahead is not None:
        before, future = ahead
        try:
            if identities(files) == before:
                return future.result()
        except Exception:  # noqa: BLE001 - a file went missing or unreadable: reading it again reports why
            pass
    return read_digest(files)


def read_digest(files: list[Path]) -> str:
    """`digest`, reading every byte now."""
    total = hashlib.sha256()
    for file in files:
        total.update(f"{file.name}:{_sha256(file)}\n".encode())
    return total.hexdigest()


def _sha256(file: Path) -> str:
    target = file.resolve()
    # The hub cache names each LFS blob by the sha256 of its content: no need to read gigabytes.
    if target.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", target.name):
        return target.name
    total = hashlib.sha256()
    with open(target, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            total.update(block)
    return total.hexdigest()


def hash_ahead(folder: Path) -> None:
    """Start hashing the weights of the checkpoint folder `folder` (safetensors, else pickle: read as
    bytes, never unpickled) in a daemon thread, for `digest` to take later. A folder without readable
    weights is left alone: the command reports it where it checks the checkpoint."""
    try:
        safetensors, pickled = weight_files(Path(folder))
        files = safetensors or pickled
        before = identities(files)
    except (OSError, TokendynError):
        return
    if not files:
        return
    future: Future[str] = Future()

    def run() -> None:
        try:
            future.set_result(read_digest(files))
        except BaseException as err:  # any failure ends the wait in `digest`, which then reads the files itself
            future.set_exception(err)

    _ahead[tuple(map(str, files))] = (before, future)
    threading.Thread(target=run, name="tokendyn-hash-ahead", daemon=True).start()  # daemon: exit need not wait

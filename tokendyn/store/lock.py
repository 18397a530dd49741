"""One writer at a time per store: an advisory file lock beside the store folder.

Every command that writes into a store (`extract`, `tasks`, `passuntil`, and the coordinator of a
distributed extraction) holds `writer_lock(store)` for as long as it writes. Readers never take it.
The lock is an operating-system lock (`filelock`, fcntl on Unix): a process killed by SIGKILL
releases it, so a stale lock never blocks a rerun. Its holder writes its host and pid beside it so
that a second writer can say who holds the store. The lock file lives beside the store
(`.NAME.lock` next to `NAME`, the store's path resolved: the same lock whatever symlink leads to the
store), so that it can be taken before the store exists and covers its creation.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import filelock
import zarr

from tokendyn.atomic import write_atomically
from tokendyn.errors import TokendynError

# Writers write every chunk, even one holding only fill values, so `tokendyn.store.integrity.verify` can
# require every chunk of a done checkpoint. Processes that write chunks without holding the lock (the
# workers of a distributed extraction) must set the same zarr option.
WRITE_EMPTY_CHUNKS = True

_HELD: set[tuple[int, Path]] = set()  # (pid, store) locks this process holds; the pid keeps forked children out


@contextmanager
def writer_lock(store: str | Path) -> Iterator[None]:
    """Hold the store's writer lock; a one-line error if another process holds it.

    While held, zarr writes every chunk, including chunks of fill values only (see WRITE_EMPTY_CHUNKS).
    Does not wait: a second writer fails at once, naming the holder, instead of queueing behind a run
    that may take days. Reentrant within a process (`passuntil` holds it while calling `extract`).
    """
    folder = Path(store).resolve()  # a store reached through a symlink has one lock, beside the real folder
    key = (os.getpid(), folder)
    if key in _HELD:
        yield
        return
    if folder.exists() and not folder.is_dir():
        raise TokendynError(f"{store} is a file, not a store folder; choose another --out")
    lock = filelock.FileLock(lock_path(folder), timeout=0)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except filelock.Timeout:
        raise TokendynError(
            f"store {store} is being written by {_holder(folder)}; wait for that run to finish (or stop it) and rerun"
        ) from None
    except OSError as err:
        if folder.is_dir():
            raise TokendynError(
                f"cannot write into store {store} ({err.strerror}); it is read-only or not yours: "
                "copy it somewhere writable to extend it"
            ) from None
        raise TokendynError(f"cannot write the store at {store} ({err.strerror}); choose a writable --out") from None
    _HELD.add(key)
    try:
        _write_holder(folder)
        with zarr.config.set({"array.write_empty_chunks": WRITE_EMPTY_CHUNKS}):
            yield
    finally:
        _HELD.discard(key)
        _holder_path(folder).unlink(missing_ok=True)
        lock.release()


def lock_path(store: Path) -> Path:
    """The lock file of a store: `.NAME.lock` beside it."""
    return store.with_name(f".{store.name}.lock")


def _holder_path(store: Path) -> Path:
    return store.with_name(f".{store.name}.lock.holder")  # host and pid of the holder, removed on release


def _write_holder(folder: Path) -> None:
    write_atomically(_holder_path(folder), json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))


def _holder(folder: Path) -> str:
    try:
        info = json.loads(_holder_path(folder).read_text())
        return f"process {info['pid']} on host {info['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (host and pid not yet recorded)"

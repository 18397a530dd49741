"""Atomic creation of files and folders: a store, a named set, a PassUntil group, a metadata or output file.

A piece is built under a temporary name in the folder that will hold it (`.NAME.partial-HOST-PID`)
and renamed into place once complete: a process killed or starved of disk at any moment leaves
either the whole piece or a temporary file or folder, never a half-made piece under its real name.
The temporary files and folders of dead processes on this host are removed by the next writer
(`remove_partials`); nothing else is ever removed.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

PARTIAL = ".partial-"


def write_atomically(target: Path, data: str | bytes) -> None:
    """Write `data` (text is encoded as UTF-8) to the file `target` in an existing folder.

    Readers see the old file or the new one, never a truncated one. Any failure removes the
    temporary file and re-raises, leaving the old file as it was.
    """
    remove_partials(target)
    temporary = _partial(target)
    try:
        with open(temporary, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def create_atomically(target: Path, build: Callable[[Path], None]) -> bool:
    """Build the folder `target` with `build(temporary_folder)` and rename it into place.

    Returns False (and discards the build) if `target` was created meanwhile by another process; an
    existing empty folder is replaced. Any failure removes the temporary folder and re-raises.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = _build_aside(target, build)
    try:
        os.rename(temporary, target)
    except OSError as err:
        shutil.rmtree(temporary, ignore_errors=True)
        if err.errno in (errno.ENOTEMPTY, errno.EEXIST):
            return False
        raise
    return True


def replace_atomically(target: Path, build: Callable[[Path], None]) -> None:
    """Rebuild a half-made folder `target` that tokendyn made: the new one is built aside, then swapped in.

    A kill between the two renames leaves no `target` (a rerun creates it) and the old one under a
    temporary name, which the next writer removes.
    """
    temporary = _build_aside(target, build)
    old = target.with_name(temporary.name + ".old")
    os.rename(target, old)
    os.rename(temporary, target)
    shutil.rmtree(old, ignore_errors=True)


def _build_aside(target: Path, build: Callable[[Path], None]) -> Path:
    """`build(folder)` under a temporary name beside `target`; the folder is removed again if it fails."""
    remove_partials(target)
    temporary = _partial(target)
    try:
        build(temporary)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return temporary


def remove_partials(target: Path) -> None:
    """Remove temporary files and folders of `target` left by dead processes of this host (or by this process)."""
    host = socket.gethostname()
    for leftover in target.parent.glob(f".{target.name}{PARTIAL}*"):
        owner_host, _, rest = leftover.name.removeprefix(f".{target.name}{PARTIAL}").rpartition("-")
        pid = rest.split(".")[0]
        if owner_host == host and pid.isdigit() and not process_alive(int(pid), own_ok=True):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def is_partial(name: str) -> bool:
    """Whether a file or folder name is a temporary one of this module (never a real set or task)."""
    return name.startswith(".") and PARTIAL in name


def _partial(target: Path) -> Path:
    return target.with_name(f".{target.name}{PARTIAL}{socket.gethostname()}-{os.getpid()}")


def process_alive(pid: int, own_ok: bool) -> bool:
    """Whether process `pid` of this host runs; this process counts as dead when own_ok (its leftovers may go)."""
    if pid == os.getpid():
        return not own_ok
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

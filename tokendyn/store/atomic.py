"""Atomic creation of folders in a store: a store, a named set, a PassUntil group.

A piece is built under a temporary name in the folder that will hold it (`.NAME.partial-HOST-PID`)
and renamed into place once complete: a process killed or starved of disk at any moment leaves
either the whole piece or a temporary folder, never a half-made piece under its real name. The
temporary folders of dead processes on this host are removed by the next writer (`remove_partials`);
nothing else is ever removed.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

PARTIAL = ".partial-"


def create_atomically(target: Path, build: Callable[[Path], None]) -> bool:
    """Build `target` with `build(temporary_folder)` and rename it into place.

    Returns False (and discards the build) if `target` was created meanwhile by another process; an
    existing empty folder is replaced. Any failure removes the temporary folder and re-raises.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_partials(target)
    temporary = _partial(target)
    try:
        build(temporary)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    try:
        os.rename(temporary, target)
    except OSError as err:
        shutil.rmtree(temporary, ignore_errors=True)
        if err.errno in (errno.ENOTEMPTY, errno.EEXIST):
            return False
        raise
    return True


def replace_atomically(target: Path, build: Callable[[Path], None]) -> None:
    """Rebuild a half-made `target` that tokendyn made: the new one is built aside, then swapped in.

    A kill between the two renames leaves no `target` (a rerun creates it) and the old one under a
    temporary name, which the next writer removes.
    """
    remove_partials(target)
    temporary = _partial(target)
    try:
        build(temporary)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    old = target.with_name(temporary.name + ".old")
    os.rename(target, old)
    os.rename(temporary, target)
    shutil.rmtree(old, ignore_errors=True)


def remove_partials(target: Path) -> None:
    """Remove temporary folders of `target` left by dead processes of this host (or by this process)."""
    host = socket.gethostname()
    for folder in target.parent.glob(f".{target.name}{PARTIAL}*"):
        owner_host, _, rest = folder.name.removeprefix(f".{target.name}{PARTIAL}").rpartition("-")
        pid = rest.split(".")[0]
        if owner_host == host and pid.isdigit() and not process_alive(int(pid), own_ok=True):
            shutil.rmtree(folder, ignore_errors=True)


def is_partial(name: str) -> bool:
    """Whether a folder name is a temporary one of `create_atomically` (never a real set or task)."""
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

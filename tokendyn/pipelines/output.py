"""Output folders that never destroy what tokendyn did not write (`analyze`, `report`, `python -m analyses.X`).

A folder written by tokendyn carries a marker file, `.tokendyn-output`, listing every file and
folder the run wrote. A run writes its results into a fresh temporary sibling (`.NAME.tmp-PID`)
and swaps it in only when complete:

1. the previous folder (if any) is renamed to `.NAME.old-PID`,
2. the temporary folder is renamed to NAME,
3. the previous folder is deleted.

So a killed run leaves the previous results whole (under NAME, or, killed between 1 and 2, under
`.NAME.old-PID`, which the next run puts back before anything else). Every file is created inside
the fresh temporary folder, which holds no symlinks, so nothing written follows a link out of it.
A non-empty folder without the marker (the store itself, a folder holding a user's files) is
refused, and so is a marked folder holding anything its marker does not list (a user's notes
added to a report), and a path that is a file. A marked sub-folder answers for itself by its own
marker (`python -m analyses.X` replaces one study's folder inside a report).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from tokendyn.atomic import process_alive
from tokendyn.errors import TokendynError

MARKER = ".tokendyn-output"
HEADER = "# written by tokendyn; the next run replaces the paths below and refuses a folder holding others\n"


def mark(folder: Path) -> None:
    """Put the marker into a folder tokendyn wrote, listing everything in it now."""
    listed = sorted(
        (Path(root) / name).relative_to(folder).as_posix()
        for root, dirs, files in os.walk(folder)
        for name in [*dirs, *files]
    )
    (folder / MARKER).write_text(HEADER + "".join(f"{path}\n" for path in listed if path != MARKER))


def _listed(folder: Path) -> set[str] | None:
    """The paths a folder's marker lists; None for an older tokendyn's marker, which listed nothing."""
    text = (folder / MARKER).read_text(encoding="utf-8", errors="replace")
    return set(text.splitlines()[1:]) if text.startswith(HEADER) else None


def _unlisted(folder: Path) -> list[str]:
    """Paths under a marked folder that tokendyn did not write there (all of them for an old marker)."""
    listed = _listed(folder) or set()
    found = []

    def walk(directory: Path) -> None:
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            path = Path(entry.path)
            rel = path.relative_to(folder).as_posix()
            inner = entry.is_dir(follow_symlinks=False)
            if rel == MARKER:
                continue
            if inner and (path / MARKER).is_file():  # a study's folder that `python -m analyses.X` may have replaced
                found.extend(f"{rel}/{sub}" for sub in _unlisted(path))
            elif rel not in listed:
                found.append(rel)
            elif inner:
                walk(path)

    walk(folder)
    return found


def _siblings(folder: Path, kind: str) -> list[Path]:
    """Leftovers `.NAME.<kind>-PID` of runs no longer alive that carry the marker (so tokendyn made
    them); a run still going on the same folder keeps its own."""
    prefix = f".{folder.name}.{kind}-"
    return [
        p
        for p in folder.parent.glob(f"{prefix}*")
        if p.is_dir()
        and not p.is_symlink()
        and (p / MARKER).is_file()
        and not (p.name[len(prefix) :].isdigit() and process_alive(int(p.name[len(prefix) :]), own_ok=True))
    ]


def check(folder: Path) -> None:
    """Raise a one-line TokendynError unless folder may be (re)written: absent, empty, or made by tokendyn."""
    if folder.is_symlink():
        raise TokendynError(f"output folder {folder} is a symbolic link; give the real folder with --out")
    if folder.exists() and not folder.is_dir():
        raise TokendynError(f"output path {folder} is a file, not a folder; choose another --out")
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    if not (folder / MARKER).is_file():
        raise TokendynError(
            f"output folder {folder} is not empty and was not written by tokendyn (no {MARKER}); "
            "choose an empty or new folder with --out"
        )
    if _listed(folder) is None:
        raise TokendynError(
            f"output folder {folder} was written by an older tokendyn, which did not record its files, so "
            "files added since cannot be told apart; move what you want to keep, delete the folder, and rerun"
        )
    unlisted = _unlisted(folder)
    if unlisted:
        shown = ", ".join(unlisted[:3]) + (f" and {len(unlisted) - 3} more" if len(unlisted) > 3 else "")
        raise TokendynError(
            f"output folder {folder} holds files tokendyn did not write ({shown}); "
            "move them out or choose another --out"
        )


def _recover(folder: Path) -> None:
    """Put back the previous results of a run killed mid-swap; delete the temporary folders of killed runs
    (those of live runs stay; of two runs that swap at the same moment, one fails with a one-line error)."""
    old = _siblings(folder, "old")
    if not folder.exists() and old:
        old[0].rename(folder)
    for leftover in [*_siblings(folder, "tmp"), *_siblings(folder, "old")]:
        shutil.rmtree(leftover)


@contextlib.contextmanager
def output_folder(folder: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `folder`; on success, swap it in as `folder`.

    Raises TokendynError (before any work) when `folder` is a file, a symlink, or a non-empty folder
    that tokendyn did not write. On an exception the temporary folder is removed and `folder` is untouched.
    """
    folder = Path(folder).absolute()
    _recover(folder)
    check(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    if tmp.exists() or tmp.is_symlink():
        raise TokendynError(f"{tmp} is in the way (not written by tokendyn); move it, then rerun")
    tmp.mkdir()
    mark(tmp)
    try:
        yield tmp
        mark(tmp)  # now listing what the run wrote
        check(folder)  # still ours: nobody put files there while we ran
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = folder.parent / f".{folder.name}.old-{os.getpid()}"
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    if old.exists():
        shutil.rmtree(old)

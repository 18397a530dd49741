"""Checking a store against what its flags and metadata claim, and repairing what a rerun can repair.

Works on the generic Zarr v3 structure only, so it holds for every layout version: groups with a
`done` array of dims (model, ckpt) and arrays whose first two dims are (model, ckpt). Checks:

- metadata: every node listed in the root's consolidated metadata has its own `zarr.json` on disk,
  readable, and every node on disk is listed (consolidated metadata is what readers see);
- chunks: every done checkpoint has every chunk of every per-token array of its group (dims model,
  ckpt and more) on disk (writers write chunks even when they hold only fill values);
- values (`full=True` reads every done checkpoint; `sample=True` only its first chunk): no done
  checkpoint of a floating-point array is NaN everywhere.

`repair` (run by every writer under the writer lock before it writes) restores a node's missing
or unreadable `zarr.json` from its consolidated copy, refreshes the consolidated metadata and clears
the `done` flag of every checkpoint with missing chunks or no values, so the run recomputes it.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr

from tokendyn.store.atomic import is_partial

CHECKPOINT_DIMS = ("model", "ckpt")


@dataclass
class Problem:
    """One inconsistency: where (a node path, "" for the root), what, and the checkpoints it concerns."""

    node: str
    message: str
    checkpoints: list[tuple[int, int]] = field(default_factory=list)
    repairable: bool = True

    def __str__(self) -> str:
        return f"{self.node or '/'}: {self.message}"


def verify(path: str | Path, *, full: bool = False, sample: bool = False) -> list[Problem]:
    """Every inconsistency of the store at `path` (see the module docstring); an empty list if none."""
    path = Path(path)
    consolidated = _consolidated(path)
    on_disk, unreadable = _nodes_on_disk(path)
    problems = [Problem(node, "zarr.json is not readable JSON") for node in unreadable]
    for node in sorted(set(consolidated) - set(on_disk) - set(unreadable)):
        problems.append(Problem(node, "zarr.json is missing on disk (only the consolidated metadata lists it)"))
    for node in sorted(set(on_disk) - set(consolidated)):
        if consolidated and node:
            problems.append(Problem(node, "not listed in the consolidated metadata"))
    metadata = {**consolidated, **on_disk}
    for group in _groups_with_done(metadata):
        problems += _check_group(path, group, metadata, full=full, sample=sample)
    return problems


def repair(path: str | Path, *, sample: bool = True) -> list[Problem]:
    """Repair what `verify` finds (metadata restored, damaged checkpoints' flags cleared); returns the problems.

    Call with the writer lock held. Problems that cannot be repaired are returned with
    `repairable=False` and left as they are.
    """
    path = Path(path)
    consolidated = _consolidated(path)
    problems = verify(path, sample=sample)
    restored = []
    for problem in problems:
        if problem.message.startswith("zarr.json") and problem.node in consolidated:
            document = {k: v for k, v in consolidated[problem.node].items() if k != "consolidated_metadata"}
            _write_json(path / problem.node / "zarr.json", document)
            restored.append(problem)
    if restored:  # the chunk checks ran against the consolidated copy; rerun them against the restored files
        problems = restored + verify(path, sample=sample)
    for problem in problems:
        if problem.message.startswith("zarr.json") and problem not in restored:
            problem.repairable = False  # unreadable and not in the consolidated metadata: nothing to restore from
        if problem.checkpoints:
            done = zarr.open_array(path / problem.node, mode="r+")
            for m, c in problem.checkpoints:
                done[m, c] = False
    if problems:
        consolidate(path)
    return problems


def summary(problems: list[Problem], most: int = 3) -> str:
    """The problems on one line."""
    shown = "; ".join(map(str, problems[:most]))
    return shown + (f"; ... ({len(problems)} problems in all)" if len(problems) > most else "")


def consolidate(path: str | Path) -> None:
    """Rewrite the root's consolidated metadata from the nodes on disk."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        zarr.consolidate_metadata(zarr.storage.LocalStore(path))


def _consolidated(path: Path) -> dict[str, dict]:
    try:
        root = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return {}
    listed = (root.get("consolidated_metadata") or {}).get("metadata") or {}
    return {"": {k: v for k, v in root.items() if k != "consolidated_metadata"}, **listed} if listed else {}


def _nodes_on_disk(path: Path) -> tuple[dict[str, dict], list[str]]:
    """Metadata of every node (folder with a zarr.json) by path, and the nodes whose zarr.json is unreadable."""
    nodes, unreadable = {}, []
    for folder, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not is_partial(d) and d != "c"]  # chunk folders hold no metadata
        if "zarr.json" not in files:
            continue
        node = Path(folder).relative_to(path).as_posix()
        node = "" if node == "." else node
        try:
            document = json.loads((Path(folder) / "zarr.json").read_text())
            document.pop("consolidated_metadata", None)
            nodes[node] = document
        except (OSError, ValueError):
            unreadable.append(node)
    return nodes, unreadable


def _groups_with_done(metadata: dict[str, dict]) -> list[str]:
    groups = []
    for node, meta in metadata.items():
        if (
            meta.get("node_type") == "array"
            and node.rsplit("/", 1)[-1] == "done"
            and tuple(meta.get("dimension_names") or ()) == CHECKPOINT_DIMS
        ):
            groups.append(node.rpartition("/")[0])
    return sorted(groups)


def _check_group(path: Path, group: str, metadata: dict, *, full: bool, sample: bool) -> list[Problem]:
    prefix = f"{group}/" if group else ""
    done_node = f"{prefix}done"
    if done_node not in _readable(path, metadata):
        return []
    done = np.argwhere(np.asarray(zarr.open_array(path / done_node, mode="r")[...], dtype=bool))
    if not len(done):
        return []
    arrays = [
        node
        for node, meta in metadata.items()
        if node.startswith(prefix)
        and "/" not in node[len(prefix) :]
        and node != done_node
        and meta.get("node_type") == "array"
        and tuple(meta.get("dimension_names") or ())[:2] == CHECKPOINT_DIMS
        and len(meta["shape"]) > 2
    ]
    problems = []
    for node in sorted(arrays):
        meta = metadata[node]
        missing = [(int(m), int(c)) for m, c in done if not _chunks_present(path / node, meta, m, c)]
        if missing:
            problems.append(
                Problem(
                    done_node,
                    f"{len(missing)} done checkpoint(s) lack chunks of '{node}' on disk "
                    f"(e.g. model {missing[0][0]}, ckpt {missing[0][1]})",
                    missing,
                )
            )
        elif (full or sample) and np.dtype(_dtype(meta)).kind == "f" and node in _readable(path, metadata):
            empty = _all_nan(path / node, meta, done, full)
            if empty:
                problems.append(
                    Problem(
                        done_node,
                        f"{len(empty)} done checkpoint(s) hold no value in '{node}' "
                        f"(e.g. model {empty[0][0]}, ckpt {empty[0][1]})",
                        empty,
                    )
                )
    return problems


def _readable(path: Path, metadata: dict) -> set[str]:
    return {node for node in metadata if (path / node / "zarr.json").is_file()}


def _dtype(meta: dict) -> str:
    dtype = meta.get("data_type")
    return dtype if isinstance(dtype, str) and dtype in np.sctypeDict else "O"


def _chunks_present(folder: Path, meta: dict, m: int, c: int) -> bool:
    """Whether every chunk of checkpoint (m, c) of an array exists as a file."""
    shape = meta["shape"]
    chunks = meta["chunk_grid"]["configuration"]["chunk_shape"]
    encoding = meta.get("chunk_key_encoding", {"name": "default"})
    separator = encoding.get("configuration", {}).get("separator", "/" if encoding["name"] == "default" else ".")
    grid = [range(math.ceil(n / k)) for n, k in zip(shape[2:], chunks[2:])]
    first = (m // chunks[0], c // chunks[1])
    for rest in np.ndindex(*[len(g) for g in grid]):
        key = separator.join(map(str, (*first, *rest)))
        key = f"c{separator}{key}" if encoding["name"] == "default" else key
        if not (folder / key).is_file():
            return False
    return True


def _all_nan(folder: Path, meta: dict, done: np.ndarray, full: bool) -> list[tuple[int, int]]:
    array = zarr.open_array(folder, mode="r")
    chunks = meta["chunk_grid"]["configuration"]["chunk_shape"]
    first = tuple(slice(0, k) for k in chunks[2:])
    empty = []
    for m, c in done:
        values = array[(int(m), int(c))] if full else array[(int(m), int(c), *first)]
        if np.isnan(values).all():
            empty.append((int(m), int(c)))
    return empty


def _write_json(file: Path, document: dict) -> None:
    temporary = file.with_name(f".{file.name}.{os.getpid()}")
    temporary.write_text(json.dumps(document, indent=2))
    os.replace(temporary, file)

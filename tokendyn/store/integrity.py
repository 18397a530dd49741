"""Checking a store against what its flags and metadata claim, and repairing what a rerun can repair.

Works on the generic Zarr v3 structure only, so it holds for every layout version: groups with a
`done` array of dims (model, ckpt) and arrays whose first two dims are (model, ckpt). Checks:

- metadata: every node listed in the root's consolidated metadata has its own `zarr.json` on disk,
  readable and equal to its consolidated copy (consolidated metadata is what readers see); every
  node on disk is listed; every folder holding nodes has its own `zarr.json`; the arrays of a group
  agree on the sizes of their dimensions;
- chunks: every done checkpoint has every chunk of every array it owns (dims model, ckpt first,
  chunked one checkpoint per chunk: the per-token arrays, `val_ppl`, `weights_hash`, ...) on disk
  (writers write chunks even when they hold only fill values);
- values (`full=True` reads every chunk of the store; `sample=True` only the first chunk of each done
  checkpoint): every chunk read decodes, the `done` flags included, and no done checkpoint of a
  floating-point array with more dims than (model, ckpt) is NaN everywhere.

`repair` (run by every writer under the writer lock before it writes) restores a node's missing
or unreadable `zarr.json` from its consolidated copy, refreshes the consolidated metadata and clears
the `done` flag of every checkpoint with missing or unreadable chunks or no values, so the run
recomputes it.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr

from tokendyn.atomic import is_partial, write_atomically
from tokendyn.errors import TokendynError

CHECKPOINT_DIMS = ("model", "ckpt")


@dataclass
class Problem:
    """One inconsistency: where (a node or file path, "" for the root), what, and the checkpoints it concerns.

    flags: the `done` array whose flags at `checkpoints` `repair` clears.
    """

    node: str
    message: str
    checkpoints: list[tuple[int, int]] = field(default_factory=list)
    repairable: bool = True
    flags: str = ""
    restore: bool = False  # the node's zarr.json is lost: `repair` writes its consolidated copy

    def __str__(self) -> str:
        return f"{self.node or '/'}: {self.message}"


def verify(path: str | Path, *, full: bool = False, sample: bool = False) -> list[Problem]:
    """Every inconsistency of the store at `path` (see the module docstring); an empty list if none.

    full: also read every chunk, those of every done checkpoint and those of the arrays no checkpoint
    owns (coordinates, ...), as `tokendyn verify` does. sample: also read the first chunk of each
    done checkpoint of every array a checkpoint owns (ignored with full). Neither: the metadata and
    the presence of chunk files only.
    """
    path = Path(path)
    root_document(path)  # an unreadable root: no store to check, a one-line error
    consolidated = _consolidated(path)
    on_disk, unreadable = _nodes_on_disk(path)
    problems = [
        Problem(node, "zarr.json is not readable JSON", repairable=node in consolidated, restore=node in consolidated)
        for node in unreadable
    ]
    for node in sorted(set(consolidated) - set(on_disk) - set(unreadable)):
        message = "zarr.json is missing on disk (only the consolidated metadata lists it)"
        problems.append(Problem(node, message, restore=True))
    problems += _unlisted_groups(path, consolidated, on_disk, unreadable)
    for node in sorted(set(on_disk) - set(consolidated)):
        if consolidated and node:
            problems.append(Problem(node, "not listed in the consolidated metadata"))
    problems += _stale_consolidated(consolidated, on_disk)
    metadata = {**consolidated, **on_disk}
    problems += _dimension_sizes(metadata)
    owned = set()
    for group in _groups_with_done(metadata):
        arrays, found = _check_group(path, group, metadata, set(on_disk), full=full, sample=sample)
        owned |= arrays
        problems += found
    if full:  # the arrays no checkpoint owns (coordinates, ...): written once, so a rerun cannot redo them
        for node in sorted(set(on_disk) - owned):
            if on_disk[node].get("node_type") == "array":
                for key, error in _unreadable_chunks(path / node, on_disk[node], _chunks(on_disk[node])):
                    problems.append(Problem(f"{node}/{key}", f"chunk file is unreadable ({error})", repairable=False))
    return problems


def repair(path: str | Path, *, full: bool = True) -> list[Problem]:
    """Repair what `verify` finds (metadata restored, damaged checkpoints' flags cleared); returns the problems.

    Call with the writer lock held. Problems that cannot be repaired are returned with
    `repairable=False` and left as they are. full: read every chunk (else the first of each done
    checkpoint), so that what `tokendyn verify` finds, a rerun repairs.
    """
    path = Path(path)
    consolidated = _consolidated(path)
    problems = verify(path, full=full, sample=True)
    restored = []
    for problem in problems:
        if problem.restore:
            document = {k: v for k, v in consolidated[problem.node].items() if k != "consolidated_metadata"}
            write_zarr_json(path / problem.node / "zarr.json", document)
            restored.append(problem)
    if restored:  # the chunk checks ran against the consolidated copy; rerun them against the restored files
        problems = restored + verify(path, full=full, sample=True)
    if any(not problem.repairable for problem in problems):
        return problems  # the writer refuses the store: leave it as it is
    for problem in problems:
        if problem.checkpoints and problem.flags:
            done = zarr.open_array(path / problem.flags, mode="r+")
            for m, c in problem.checkpoints:
                done[m, c] = False  # rewrites an unreadable flag's chunk too
    if problems:
        consolidate(path)
    return problems


def summary(problems: list[Problem], most: int = 3) -> str:
    """The problems on one line."""
    shown = "; ".join(map(str, problems[:most]))
    return shown + (f"; ... ({len(problems)} problems in all)" if len(problems) > most else "")


def consolidate(store: zarr.Group | str | Path, group: str = "") -> None:
    """Rewrite the root's consolidated metadata from the nodes on disk, so `xarray.open_zarr` opens the
    store in one read and without warning.

    store: its root group, or its path. group: the path of a group whose own consolidated metadata
    (of the nodes below it) is rewritten instead.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        zarr.consolidate_metadata(
            store.store if isinstance(store, zarr.Group) else zarr.storage.LocalStore(store), path=group
        )


def write_zarr_json(file: Path, document: dict, indent: int | None | str = "zarr") -> None:
    """Write a metadata file atomically, encoded as zarr encodes it (indent: zarr's own by default)."""
    indent = zarr.config.get("json_indent") if indent == "zarr" else indent
    write_atomically(file, json.dumps(document, indent=indent, allow_nan=True))


def scored_weights(path: Path) -> dict[tuple[str, float], str]:
    """{(model, step): weights hash} of every checkpoint the main set of the store at `path` has scored;
    empty without a readable store."""
    try:
        root = zarr.open_group(path, mode="r")
        done, step, model, hashes = (np.asarray(root[name][:]) for name in ("done", "step", "model", "weights_hash"))
    except Exception:  # noqa: BLE001  (no store, a half-made one, or damage the writer mends)
        return {}
    return {(str(model[m]), float(step[m, c])): str(hashes[m, c]) for m, c in zip(*np.nonzero(done))}


def root_document(path: Path) -> dict:
    """The store's root zarr.json ({} if there is none); a one-line error if it is unreadable, since
    nothing restores the root's attributes and consolidated metadata."""
    try:
        return json.loads((path / "zarr.json").read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise TokendynError(
            f"{path / 'zarr.json'} is unreadable ({_short(err)}); restore it from a backup or rescore "
            "with `tokendyn extract SUITE --out NEW.zarr`"
        ) from None


def unreadable_chunk(folder: Path) -> tuple[str, str] | None:
    """(file, error) of the first chunk of the array at `folder` that does not decode, None if every one does.

    For readers that hit an error, to name the damaged file.
    """
    try:
        meta = json.loads((folder / "zarr.json").read_text())
    except (OSError, ValueError) as err:
        return str(folder / "zarr.json"), _short(err)
    bad = _unreadable_chunks(folder, meta, _chunks(meta))
    return (str(folder / bad[0][0]), bad[0][1]) if bad else None


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


def _unlisted_groups(path: Path, consolidated: dict, on_disk: dict, unreadable: list[str]) -> list[Problem]:
    """Folders holding nodes but without a zarr.json of their own, listed nowhere (zarr does not see them).

    A group that holds checkpoints marked done has lost its attributes (fingerprint, protocol): it
    cannot be rebuilt without rescoring, so it is not repairable. Otherwise the writer rebuilds it.
    """
    known = set(on_disk) | set(unreadable) | set(consolidated)
    lost = sorted({parent for node in known if node for parent in _parents(node)} - known)
    problems = []
    for group in lost:
        done = f"{group}/done"
        finished = done in on_disk and _any_flag(path / done)
        problems.append(
            Problem(
                group,
                "zarr.json is missing on disk and from the consolidated metadata, but nodes under it are there"
                + ("; it holds done checkpoints whose attributes are lost" if finished else ""),
                repairable=not finished,
            )
        )
    return problems


def _parents(node: str) -> list[str]:
    parts = node.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _any_flag(folder: Path) -> bool:
    try:
        return bool(np.asarray(zarr.open_array(folder, mode="r")[...]).any())
    except Exception:  # unreadable flags: count them as set, so nothing that may be finished is rebuilt
        return True


def _stale_consolidated(consolidated: dict, on_disk: dict) -> list[Problem]:
    """Arrays whose own zarr.json differs from its consolidated copy (a store grow killed midway, ...)."""
    problems = []
    for node in sorted(set(consolidated) & set(on_disk)):
        own, listed = on_disk[node], consolidated[node]
        if own.get("node_type") != "array":
            continue  # group attributes may lag behind the flags after a kill (write.commit_checkpoint)
        differ = sorted(k for k in set(own) | set(listed) if k != "attributes" and own.get(k) != listed.get(k))
        if differ:
            detail = (
                f"shape {tuple(own.get('shape', ()))} on disk, {tuple(listed.get('shape', ()))} in the consolidated "
                "metadata"
                if "shape" in differ
                else f"{', '.join(differ)} differ from the consolidated metadata"
            )
            problems.append(Problem(node, f"own metadata disagrees with the consolidated metadata: {detail}"))
    return problems


def _dimension_sizes(metadata: dict) -> list[Problem]:
    """Arrays of one group that disagree on a dimension's size (a store grow killed midway): xarray cannot open it."""
    sizes: dict[tuple[str, str], dict[int, list[str]]] = {}
    for node, meta in sorted(metadata.items()):
        if meta.get("node_type") != "array":
            continue
        group = node.rpartition("/")[0]
        for dim, size in zip(meta.get("dimension_names") or (), meta.get("shape", ())):
            if dim is not None:
                sizes.setdefault((group, dim), {}).setdefault(int(size), []).append(node)
    problems = []
    for (_, dim), found in sorted(sizes.items()):
        if len(found) > 1:
            usual = max(found, key=lambda size: len(found[size]))  # the size most arrays have
            other = min(size for size in found if size != usual)
            problems.append(
                Problem(
                    found[other][0],
                    f"dimension '{dim}' is {other} long here and in {len(found[other])} array(s) of the group, "
                    f"{usual} in {len(found[usual])} (e.g. '{found[usual][0]}'): a store grow was interrupted",
                )
            )
    return problems


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


def _check_group(
    path: Path, group: str, metadata: dict, readable: set[str], *, full: bool, sample: bool
) -> tuple[set[str], list[Problem]]:
    """The arrays of `group` its checkpoints own (its `done` included), and their problems."""
    prefix = f"{group}/" if group else ""
    done_node = f"{prefix}done"
    arrays = {
        node
        for node, meta in metadata.items()
        if node.startswith(prefix)
        and "/" not in node[len(prefix) :]
        and node != done_node
        and meta.get("node_type") == "array"
        and tuple(meta.get("dimension_names") or ())[:2] == CHECKPOINT_DIMS
        and _chunk_shape(meta)[:2] == [1, 1]  # one checkpoint per chunk: written with its results
    }
    if done_node not in readable:  # its zarr.json is lost: reported, and restored by `repair`
        return {*arrays, done_node}, []
    flags, problems = _read_flags(path, done_node, metadata[done_node])
    done = [(int(m), int(c)) for m, c in np.argwhere(flags)]
    for node in sorted(arrays & readable) if done else ():
        meta = metadata[node]
        missing = [(m, c) for m, c in done if not _chunks_present(path / node, meta, m, c)]
        if missing:
            problems.append(
                Problem(
                    done_node,
                    f"{len(missing)} done checkpoint(s) lack chunks of '{node}' on disk "
                    f"(e.g. model {missing[0][0]}, ckpt {missing[0][1]})",
                    missing,
                    flags=done_node,
                )
            )
        if full or sample:
            present = [checkpoint for checkpoint in done if checkpoint not in missing]
            problems += _check_values(path, node, meta, present, done_node, full)
    return {*arrays, done_node}, problems


def _read_flags(path: Path, node: str, meta: dict) -> tuple[np.ndarray, list[Problem]]:
    """The `done` flags, those in unreadable chunks counted as not done, and a problem per such chunk."""
    array = zarr.open_array(path / node, mode="r")
    try:
        return np.asarray(array[...], dtype=bool), []
    except Exception:  # a damaged chunk: read chunk by chunk below to name it
        pass
    flags = np.zeros(array.shape, dtype=bool)
    problems = []
    for key, selection in _chunks(meta):
        try:
            flags[selection] = np.asarray(array[selection], dtype=bool)
        except Exception as err:  # codecs raise assorted exception types on corrupt data
            region = [(int(m), int(c)) for m, c in np.ndindex(*flags.shape) if _inside((m, c), selection)]
            problems.append(
                Problem(
                    f"{node}/{key}",
                    f"done flag file is unreadable ({_short(err)}); model {region[0][0]}, ckpt {region[0][1]} "
                    "counts as not done",
                    region,
                    flags=node,
                )
            )
    return flags, problems


def _check_values(
    path: Path, node: str, meta: dict, done: list[tuple[int, int]], done_node: str, full: bool
) -> list[Problem]:
    """Unreadable chunks of done checkpoints, and done checkpoints of a per-token float array that are NaN
    everywhere (sample: the first chunk of each checkpoint only)."""
    array = zarr.open_array(path / node, mode="r")
    per_token = len(meta["shape"]) > 2
    if not per_token:  # one small chunk per checkpoint: read all at once, chunk by chunk only if that fails
        try:
            array[...]
            return []
        except Exception:  # a damaged chunk: found below
            pass
    problems, empty = [], []
    for m, c in done:
        chunks = _chunks(meta, (m, c))
        try:
            values = array[(m, c) if full else chunks[0][1]]
        except Exception:  # a damaged chunk: read chunk by chunk to name it
            for key, error in _unreadable_chunks(path / node, meta, chunks if full else chunks[:1], array):
                problems.append(
                    Problem(
                        f"{node}/{key}",
                        f"chunk file of done checkpoint model {m}, ckpt {c} is unreadable ({error})",
                        [(m, c)],
                        flags=done_node,
                    )
                )
            continue
        if per_token and np.dtype(_dtype(meta)).kind == "f" and np.isnan(values).all():
            empty.append((m, c))
    if empty:
        problems.append(
            Problem(
                done_node,
                f"{len(empty)} done checkpoint(s) hold no value in '{node}' "
                f"(e.g. model {empty[0][0]}, ckpt {empty[0][1]})",
                empty,
                flags=done_node,
            )
        )
    return problems


def _unreadable_chunks(
    folder: Path, meta: dict, chunks: Iterable[tuple[str, tuple]], array: zarr.Array | None = None
) -> list[tuple[str, str]]:
    """(file key, error) of each of `chunks` that zarr cannot decode."""
    array = array if array is not None else zarr.open_array(folder, mode="r")
    bad = []
    for key, selection in chunks:
        try:
            array[selection]
        except Exception as err:  # codecs raise assorted exception types on corrupt data
            bad.append((key, _short(err)))
    return bad


def _chunks(meta: dict, checkpoint: tuple[int, int] | None = None) -> list[tuple[str, tuple]]:
    """(file key, selection) of every chunk of an array, or of the chunks holding `checkpoint` (m, c) of an
    array with dims (model, ckpt, ...), selected at that checkpoint."""
    shape = meta["shape"]
    chunks = _chunk_shape(meta)
    encoding = meta.get("chunk_key_encoding", {"name": "default"})
    separator = encoding.get("configuration", {}).get("separator", "/" if encoding["name"] == "default" else ".")
    grid: list[Iterable[int]] = [range(math.ceil(n / k)) for n, k in zip(shape, chunks)]
    if checkpoint is not None:
        grid[:2] = [[checkpoint[0] // chunks[0]], [checkpoint[1] // chunks[1]]]
    found = []
    for index in itertools.product(*grid):
        key = separator.join(map(str, index))
        key = "c" + "".join(f"{separator}{i}" for i in index) if encoding["name"] == "default" else key
        selection: tuple[int | slice, ...] = tuple(
            slice(i * k, min((i + 1) * k, n)) for i, k, n in zip(index, chunks, shape)
        )
        if checkpoint is not None:
            selection = (*checkpoint, *selection[2:])
        found.append((key, selection))
    return found


def _chunk_shape(meta: dict) -> list[int]:
    return list(meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape", meta.get("shape", [])))


def _inside(index: tuple[int, ...], selection: tuple) -> bool:
    return all(s.start <= i < s.stop for i, s in zip(index, selection))


def _short(err: BaseException) -> str:
    return ((str(err).splitlines() or [""])[0] or type(err).__name__)[:120]


def _dtype(meta: dict) -> str:
    dtype = meta.get("data_type")
    return dtype if isinstance(dtype, str) and dtype in np.sctypeDict else "O"


def _chunks_present(folder: Path, meta: dict, m: int, c: int) -> bool:
    """Whether every chunk of checkpoint (m, c) of an array exists as a file."""
    return all((folder / key).is_file() for key, _ in _chunks(meta, (m, c)))

"""Writing a store: creation, compatibility checks, per-checkpoint writes and the `done` commit flag.

The layout is written once through xarray (so `xarray.open_zarr` reads it natively), then every
checkpoint's results are written with plain zarr into chunks that checkpoint owns. A checkpoint
counts as complete only once its `done` flag is written, after all its data: zarr writes each
chunk file atomically (temporary file, then rename), so a process killed at any moment leaves
either a complete checkpoint or one whose flag is unset and which a rerun recomputes.
`val_ppl` is stored at the root only and attached to sets when opened.
A store grows by models or checkpoints added to its suite (`check_growth`, then `grow`): new ones start not done.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import xarray as xr
import zarr

from tokendyn.atomic import create_atomically, replace_atomically
from tokendyn.data.corpus import ScoredSet
from tokendyn.errors import TokendynError
from tokendyn.store.integrity import consolidate, verify, write_zarr_json
from tokendyn.store.layout import (
    FORMAT_VERSION,
    METRICS,
    PER_BYTE_COORDS,
    SET_NAMES,
    SETS_GROUP,
    Layout,
    set_path,
    token_chunk,
)
from tokendyn.store.read import list_sets, open_group


def prepare(
    path: Path,
    layout: Layout,
    sets: dict[str, ScoredSet],
    model_coords: dict,
    vocab_text: np.ndarray,
    version: str,
    summaries: dict[str, dict] | None = None,
) -> zarr.Group:
    """Create the store, or check that an existing one matches and add any new named sets.

    Call with the writer lock held (`tokendyn.store.writer_lock`). Every check runs before anything
    is written, so a refused store is left untouched. The store and each set are built under a
    temporary name and renamed into place (`tokendyn.atomic`); a half-made one left by an
    older version (no checkpoint done in it) is rebuilt.
    summaries: the protocol summary of each set (`ScoredSet.summary`), stored in its attributes.
    """
    summaries = summaries or {}
    for packed in sets.values():
        _check_field_names(packed, layout, model_coords, vocab_text)
    templates = {
        name: _set_template(name, packed, layout, model_coords, vocab_text, version, summaries.get(name))
        for name, packed in sets.items()
    }
    if (path / "zarr.json").is_file() and "tokendyn_version" in _attributes(path):
        open_group(path, mode="r")  # a store of another format: its one-line error
    if not (path / "zarr.json").is_file():
        _check_writable(path)
    elif not _missing_nodes(path, templates["main"]):
        root = open_group(path, mode="r+")
        _check_compatible(path, root, layout, sets)
        if checkpoint_grid(json.loads(root.attrs["suite"])) != checkpoint_grid(layout.suite):
            grow(root, layout.suite, model_coords)
    for name, packed in sets.items():
        folder = path / set_path(name)
        build = functools.partial(_write_template, template=templates[name], packed=packed, layout=layout)
        if name != "main" and not (path / SETS_GROUP / "zarr.json").is_file():
            zarr.open_group(path, mode="r+", use_consolidated=False).require_group(SETS_GROUP)
        if not folder.exists() or (name == "main" and not (folder / "zarr.json").is_file()):
            create_atomically(folder, build)
        elif _missing_nodes(folder, templates[name]):  # raises for a set holding done checkpoints
            replace_atomically(folder, build)
    root = zarr.open_group(path, mode="r+", use_consolidated=False)
    consolidate(root)
    return zarr.open_group(path, mode="r+")  # reopened, so that its consolidated metadata lists new sets


def _check_field_names(packed: ScoredSet, layout: Layout, model_coords: dict, vocab_text: np.ndarray) -> None:
    """A document or span field must not take the name of a variable, coordinate or dimension of the store."""
    bare = _template(dataclasses.replace(packed, token_fields={}), layout, model_coords, vocab_text)
    taken = {*map(str, bare.variables), *map(str, bare.dims), *METRICS}
    for field in packed.token_fields:
        if field in taken:
            raise TokendynError(
                f"set '{packed.name}' has a document field '{field}', which is a name the store "
                "uses; rename that field in its files"
            )


def _set_template(
    name: str,
    packed: ScoredSet,
    layout: Layout,
    model_coords: dict,
    vocab_text: np.ndarray,
    version: str,
    summary: dict | None = None,
) -> xr.Dataset:
    template = _template(packed, layout, model_coords, vocab_text if name == "main" else None)
    template.attrs.update(_set_attrs(packed, summary))
    if name == "main":
        template.attrs.update(_root_attrs(layout, version))
    return template


def _write_template(folder: Path, template: xr.Dataset, packed: ScoredSet, layout: Layout) -> None:
    template.to_zarr(
        folder,
        mode="w-",
        compute=False,
        consolidated=False,
        encoding=_encoding(template, packed, layout),
        zarr_format=3,
    )


def _missing_nodes(folder: Path, template: xr.Dataset) -> list[str]:
    """Arrays of `template` without metadata under `folder`: a half-made set (or store) if any.

    A set with missing arrays but done checkpoints is not half-made but damaged: refused with a
    one-line error, never rebuilt.
    """
    missing = [name for name in template.variables if not (folder / str(name) / "zarr.json").is_file()]
    if not (folder / "zarr.json").is_file():
        missing.append("its zarr.json (the set's attributes)")
    elif "corpus_fingerprint" not in _attributes(folder):
        missing.append("attributes")
    if (
        missing
        and (folder / "done" / "zarr.json").is_file()
        and np.asarray(zarr.open_array(folder / "done", mode="r")[...]).any()
    ):
        raise TokendynError(
            f"store {folder} has done checkpoints but lacks {', '.join(map(str, missing))}; "
            f"run `tokendyn verify` on it and write to a new --out"
        )
    return missing


def _attributes(folder: Path) -> dict:
    try:
        return json.loads((folder / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError):
        return {}


def up_to_date(path: Path, layout: Layout, sets: dict[str, ScoredSet]) -> bool:
    """Whether the store holds every set of `sets` with every checkpoint done and nothing to repair.

    Then a run has nothing to write. Never writes; raises the one-line error of `prepare` for a
    store made for other models, text or options.
    """
    if not (path / "zarr.json").is_file():
        return False
    root = open_group(path, mode="r")
    names = ["main", *list_sets(path)]
    if any(name not in names for name in sets):
        return False
    try:
        _check_compatible(path, root, layout, sets)
        if checkpoint_grid(json.loads(root.attrs["suite"])) != checkpoint_grid(layout.suite):
            return False  # the store grows
        present = np.isfinite(np.asarray(root["step"][...]))
        complete = all(
            np.asarray(root[set_path(name)]["done"][...] if name != "main" else root["done"][...])[present].all()
            for name in sets
        )
    except TokendynError:  # a store made for other models, text or options
        raise
    except Exception:  # a half-made store (KeyError) or a damaged chunk (codecs raise assorted types): repaired
        return False
    return complete and not verify(path, full=True)  # every chunk, as the writer's repair reads them


def _check_writable(path: Path) -> None:
    parent = path.parent if path.parent != Path("") else Path(".")
    if path.exists() and not path.is_dir():
        raise TokendynError(f"{path} is a file, not a store folder; choose another --out")
    if path.exists() and any(path.iterdir()):
        raise TokendynError(f"{path} exists and is not a tokendyn store; choose another --out")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = parent / f".{path.name}.probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise TokendynError(f"cannot write the store at {path} ({err.strerror}); choose a writable --out") from None


def _check_compatible(path: Path, root: zarr.Group, layout: Layout, sets: dict[str, ScoredSet]) -> None:
    attrs = root.attrs
    if attrs["tokenizer_fingerprint"] != layout.tokenizer_fingerprint:
        raise TokendynError(f"store {path} was made with a different tokenizer; write to a new --out")
    check_growth(path, json.loads(attrs["suite"]), layout.suite)
    if tuple(attrs["metrics"]) != layout.metrics:
        raise TokendynError(
            f"store {path} holds metrics {','.join(attrs['metrics'])}, not "
            f"{','.join(layout.metrics)}; pass the same --metrics or write to a new --out"
        )
    if attrs["store_dtype"] != layout.store_dtype:
        raise TokendynError(
            f"store {path} stores {attrs['store_dtype']}, not {layout.store_dtype}; "
            "pass the same --store-dtype or write to a new --out"
        )
    existing = ["main", *list_sets(path)]
    for name, packed in sets.items():
        if name not in existing:
            continue
        group = root[set_path(name)] if name != "main" else root
        stored = json.loads(group.attrs["protocol"])
        changed = [
            f"{key} {stored.get(key)!r} (store) vs {value!r} (now)"
            for key, value in packed.params.items()
            if stored.get(key) != value
        ]
        what = "evaluation corpus" if name == "main" else f"text for set '{name}'"
        if changed:
            raise TokendynError(
                f"store {path} was made from a different {what}: {'; '.join(changed)}; "
                "use the store's settings or write to a new --out"
            )
        if group.attrs["corpus_fingerprint"] != packed.fingerprint:
            raise TokendynError(f"store {path} was made from a different {what}; write to a new --out")
        stored_fields = set(group.array_keys()) - SET_NAMES
        if stored_fields != set(packed.token_fields):  # the text is the same, its document or span fields are not
            gained, lost = (
                sorted(set(packed.token_fields) - stored_fields),
                sorted(stored_fields - set(packed.token_fields)),
            )
            change = "; ".join(
                [f"gained field(s) {', '.join(gained)}"] * bool(gained)
                + [f"lost field(s) {', '.join(lost)}"] * bool(lost)
            )
            raise TokendynError(
                f"store {path} was made from the same {what} with other fields (the files {change}); "
                "write to a new --out to keep them, or restore the files' fields"
            )


def _root_attrs(layout: Layout, version: str) -> dict:
    return {
        "tokendyn_version": version,
        "format_version": FORMAT_VERSION,
        "suite": json.dumps(layout.suite),
        "tokenizer_fingerprint": layout.tokenizer_fingerprint,
        "metrics": list(layout.metrics),
        "store_dtype": layout.store_dtype,
        "complete": {},
    }


def _set_attrs(packed: ScoredSet, summary: dict | None) -> dict:
    """Per set: its fingerprint, its protocol parameters (`protocol`) and the protocol summary (`summary`)."""
    attrs = {"corpus_fingerprint": packed.fingerprint, "protocol": json.dumps(packed.params)}
    if summary is not None:
        attrs["summary"] = json.dumps(summary)
    return attrs


def _template(packed: ScoredSet, layout: Layout, model_coords: dict, vocab_text: np.ndarray | None) -> xr.Dataset:
    import dask.array as da  # here, not at the top: `import tokendyn` need not load dask (0.3 s)

    n_model, n_ckpt = model_coords["step"].shape
    shape = (n_model, n_ckpt, packed.n_tokens)
    chunks = (1, 1, token_chunk(packed.n_tokens))
    dims = ("model", "ckpt", "token")
    data = {m: (dims, da.full(shape, np.nan, dtype=layout.store_dtype, chunks=chunks)) for m in layout.metrics}
    data["done"] = (("model", "ckpt"), np.zeros((n_model, n_ckpt), dtype=bool))
    coords = {
        "model": ("model", model_coords["model"]),
        "ckpt": ("ckpt", np.arange(n_ckpt)),
        "step": (("model", "ckpt"), model_coords["step"]),
        "tokens_seen": (("model", "ckpt"), model_coords["tokens_seen"]),
        "source": (("model", "ckpt"), model_coords["source"]),
        "token_id": ("token", packed.token_id),
        "doc": ("token", packed.doc),
        "offset": ("token", packed.offset),
        "n_context": ("token", packed.n_context),
        **{k: ("token", v) for k, v in packed.token_fields.items()},
    }
    if vocab_text is not None:
        coords.update(
            {
                "val_ppl": (("model", "ckpt"), np.full((n_model, n_ckpt), np.nan)),
                **{k: (("model", "ckpt"), np.full((n_model, n_ckpt), np.nan)) for k in PER_BYTE_COORDS},
                "weights_hash": (("model", "ckpt"), np.full((n_model, n_ckpt), "", dtype=object)),
                "n_params": ("model", model_coords["n_params"]),
                "n_params_nonembed": ("model", model_coords["n_params_nonembed"]),
                "vocab_text": ("vocab", vocab_text),
            }
        )
    ds = xr.Dataset(data, coords=coords)
    ds["loss"].attrs.update(units="nats", long_name="negative log-likelihood of the token given its left context")
    ds["offset"].attrs.update(long_name="index of the token among its document's tokens")
    ds["n_context"].attrs.update(long_name="tokens the model read before predicting the token (inserted ones included)")
    if vocab_text is not None:
        ds["bits_per_byte"].attrs.update(long_name="total loss / (UTF-8 bytes of the scored text x ln 2), as lm-eval")
        ds["word_ppl"].attrs.update(long_name="exp(total loss / words of the scored text), as lm-eval")
    if "entropy" in ds:
        ds["entropy"].attrs.update(units="nats", long_name="entropy of the predictive distribution")
    if "rank" in ds:
        ds["rank"].attrs.update(long_name="rank of the true token among the vocabulary (0 = most likely)")
    return ds


def _encoding(ds: xr.Dataset, packed: ScoredSet, layout: Layout) -> dict:
    """Per-checkpoint variables get (1, 1) or (1, 1, token_chunk) chunks so each checkpoint owns its chunks."""
    chunk = token_chunk(packed.n_tokens)
    enc = {m: {"chunks": (1, 1, chunk)} for m in layout.metrics}
    enc.update({name: {"chunks": (chunk,)} for name, v in ds.coords.items() if v.dims == ("token",)})
    for name in ("done", "val_ppl", "weights_hash", *PER_BYTE_COORDS):
        if name in ds.variables:
            enc[name] = {"chunks": (1, 1)}
    return enc


def write_block(
    root: zarr.Group, set_name: str, model: int, ckpt: int, token_start: int, values: dict[str, np.ndarray]
) -> None:
    """Write one block of tokens (a whole number of chunks, or the tail) of one checkpoint."""
    group = root[set_path(set_name)] if set_name != "main" else root
    for metric, block in values.items():
        group[metric][model, ckpt, token_start : token_start + len(block)] = block


def is_done(root: zarr.Group, set_name: str, model: int, ckpt: int, rows: dict | None = None) -> bool:
    """Whether the checkpoint's `done` flag is set (rows: see `done_row`)."""
    return bool(done_row(root, set_name, model, rows)[ckpt])


def done_row(root: zarr.Group, set_name: str, model: int, rows: dict | None = None) -> np.ndarray:
    """The `done` flags of every checkpoint of one model in one set.

    rows: {(set name, model): flags} of a writer that holds the store's writer lock (so no one else
    writes flags meanwhile): each row is read once, then kept in step with that writer's own
    `clear_done` and `commit_checkpoint` (reading a row reads one chunk file per checkpoint).
    """
    if rows is not None and (set_name, model) in rows:
        return rows[set_name, model]
    row = np.asarray(_group(root, set_name)["done"][model], dtype=bool)
    if rows is not None:
        rows[set_name, model] = row
    return row


def clear_done(root: zarr.Group, set_name: str, model: int, ckpt: int, rows: dict | None = None) -> None:
    """Unset a checkpoint's flag before recomputing it (--force), so an interrupted redo stays incomplete.

    A flag that is not set is left as it is (no write). One that is set leaves the `complete`
    attribute (and the consolidated metadata) first, so they never claim more than the flags; then
    the root metadata file's time is renewed, so caches keyed by it (`read.metadata_stamp`) see the
    cleared flag. rows: see `done_row`.
    """
    row = done_row(root, set_name, model, rows)
    if not row[ckpt]:
        return
    row[ckpt] = False
    model_name = str(np.asarray(root["model"][model]))
    commit_checkpoint(root, model, ckpt, model_name, [], rows={(set_name, model): row}, recount=[set_name])
    _group(root, set_name)["done"][model, ckpt] = False
    os.utime(Path(root.store.root) / "zarr.json")


def commit_checkpoint(
    root: zarr.Group,
    model: int,
    ckpt: int,
    model_name: str,
    done: Sequence[str],
    refused: Mapping[str, str] | None = None,
    rows: dict | None = None,
    recount: Sequence[str] = (),
) -> None:
    """Commit one scored checkpoint of model `model` (named `model_name`): the sets `done` are marked
    done, the sets of `refused` keep why they are not ({set name: reason}, the `refused` attribute).

    The chunks of the `done` sets must all be written. In this order: the refused sets' reasons, the
    `done` flags (each set's commit point), the attributes (`complete`: model -> done checkpoints;
    the checkpoint's `refused` entry removed), then the consolidated metadata, refreshed for the
    changed groups only (`_refresh_consolidated`). So a
    process killed at any moment leaves attributes and consolidated metadata that claim at most
    what the flags do. rows: see `done_row` (without, each set's row of flags is read). recount: more
    sets whose `complete` is recounted from their flags (the refused sets' always is).
    """
    rows = {} if rows is None else rows
    key = f"{model},{ckpt}"
    changed: dict[str, dict] = {}  # set name -> its group's zarr.json, attributes updated

    def document(name: str) -> dict:
        if name not in changed:
            changed[name] = json.loads((_folder(root, name) / "zarr.json").read_text())
        return changed[name]

    for name, reason in (refused or {}).items():
        attrs = document(name)["attributes"]
        attrs["refused"] = {**attrs.get("refused", {}), key: reason}
    for name in done:
        _group(root, name)["done"][model, ckpt] = True
        done_row(root, name, model, rows)[ckpt] = True
    for name in dict.fromkeys([*done, *(refused or {}), *recount]):
        attrs = document(name)["attributes"]
        if name in done and key in attrs.get("refused", {}):
            attrs["refused"] = {k: v for k, v in attrs["refused"].items() if k != key}
        attrs["complete"] = {
            **attrs.get("complete", {}),
            model_name: [int(c) for c in np.flatnonzero(done_row(root, name, model, rows))],
        }
    for name, doc in changed.items():
        if name != "main":  # the root's attributes are written with its consolidated metadata
            write_zarr_json(_folder(root, name) / "zarr.json", doc)
    if changed:
        _refresh_consolidated(root, changed)


def write_checkpoint_coords(
    root: zarr.Group, model: int, ckpt: int, val_ppl: float, weights_hash: str, per_byte: dict[str, float] | None = None
) -> None:
    """The checkpoint's main-set perplexities (val_ppl and `PER_BYTE_COORDS`) and its weights' hash."""
    root["val_ppl"][model, ckpt] = val_ppl
    root["weights_hash"][model, ckpt] = weights_hash
    for name, value in (per_byte or {}).items():
        root[name][model, ckpt] = value


def _group(root: zarr.Group, set_name: str) -> zarr.Group:
    return root[set_path(set_name)] if set_name != "main" else root


def _folder(root: zarr.Group, set_name: str) -> Path:
    return Path(root.store.root) / set_path(set_name)


# Attributes are written as zarr writes them (the node's zarr.json with its `attributes` replaced, the
# same JSON encoding), from and to the files on disk: the zarr.Group objects of a writer hold the
# attributes and consolidated metadata as they were when opened, and do not see these writes.


def _refresh_consolidated(root: zarr.Group, changed: dict[str, dict]) -> None:
    """Write the attributes of the groups in `changed` ({set name: its zarr.json, the root's for "main"})
    into the root's consolidated metadata, in one write of the root zarr.json (with the main set's
    attributes, which are the root's).

    What `consolidate` writes when only these attributes changed since it last ran (the case during
    extraction, where nothing else changes metadata), without rereading every node of the store,
    but without zarr's indentation: json.dumps indents in Python, 5x slower than its compact C
    encoder (25 ms against 5 ms for the demo store's 0.3 MB). The run's final `consolidate`
    writes it as zarr does. Falls back to `consolidate` when the consolidated metadata does not
    list a changed group.
    """
    path = Path(root.store.root) / "zarr.json"
    document = changed.get("main") or json.loads(path.read_text())
    listing = (document.get("consolidated_metadata") or {}).get("metadata")
    if listing is None or any(set_path(name) not in listing for name in changed if name != "main"):
        write_zarr_json(path, document)
        consolidate(root)
        return
    for name, doc in changed.items():
        if name != "main":
            listing[set_path(name)]["attributes"] = doc["attributes"]
    write_zarr_json(path, document, indent=None)


# ---- Growth: more models or checkpoints on the model and ckpt axes ----------------------------------------------
#
# Only the two leading dimensions `model` and `ckpt` are touched, whatever the per-token dims are: every array
# of every group whose dimension names include them is resized, the new region holds the "not yet scored" value
# (NaN, False, -1 or ""), and the per-model / per-checkpoint coordinates are rewritten. The suite attribute (the
# grid the store claims) is written last, so a grow killed midway is redone by the rerun; new checkpoints
# are not `done`, and extraction scores exactly them.


def checkpoint_grid(suite: dict) -> list:
    """Model names and steps: what the store's layout depends on (folders may move)."""
    return [(m["name"], [c["step"] for c in m["checkpoints"]]) for m in suite["models"]]


def check_growth(path: Path, stored: dict, suite: dict) -> None:
    """Refuse a suite that does not extend the store's: stored models first, in order, each with its stored
    checkpoints first (new checkpoints come after the last stored step)."""
    old, new = checkpoint_grid(stored), checkpoint_grid(suite)
    new_names = [name for name, _ in new]
    for index, (name, steps) in enumerate(old):
        if index >= len(new) or new[index][0] != name:
            where = (
                "is missing from the suite"
                if name not in new_names
                else f"is model #{new_names.index(name) + 1} in the suite, #{index + 1} in the store"
            )
            raise TokendynError(
                f"store {path} holds model '{name}', which {where}; keep the stored models first "
                "and in order (a store grows by models added at the end), or write to a new --out"
            )
        now = new[index][1]
        if now[: len(steps)] != steps:
            lost = [step for step in steps if step not in now]
            problem = (
                f"lacks stored step {lost[0]}"
                if lost
                else f"has step {next(s for s in now if s not in steps)} before the last stored step {steps[-1]}"
            )
            raise TokendynError(
                f"store {path}: the suite's model '{name}' {problem}; a store grows only by "
                "checkpoints after its last stored step; write to a new --out"
            )


def grow(root: zarr.Group, suite: dict, model_coords: dict) -> None:
    """Resize the model and ckpt axes of every array in the store to `suite`'s grid (see above).

    model_coords: the coordinates of the whole new grid, as `prepare` takes them (model, step,
    tokens_seen, source, n_params, n_params_nonembed).
    """
    n_model, n_ckpt = model_coords["step"].shape
    sizes = {"model": n_model, "ckpt": n_ckpt}
    coords = {**model_coords, "ckpt": np.arange(n_ckpt)}
    groups = []
    for path, node in root.members(max_depth=None):
        if isinstance(node, zarr.Array):
            _grow_array(node, sizes, coords)
        else:
            groups.append(path)
    # Groups carry consolidated metadata of their own (listing the old shapes): refresh them deepest first.
    for path in sorted(groups, key=lambda p: -p.count("/")):
        consolidate(root, path)
    root.attrs["suite"] = json.dumps(suite)
    consolidate(root)


def _grow_array(array: zarr.Array, sizes: dict[str, int], coords: dict) -> None:
    dims = tuple(array.metadata.dimension_names or ())
    if not any(dim in sizes for dim in dims):
        return
    old = array.shape
    new = tuple(sizes.get(dim, length) for dim, length in zip(dims, old))
    name = array.basename
    if name in coords:
        array.resize(new)
        array[...] = np.asarray(coords[name], dtype=array.dtype if array.dtype.kind != "T" else object)
        return
    if new == old:
        return
    array.resize(new)
    empty = _empty_value(array.dtype)
    if not _same(array.fill_value, empty):
        for axis, (before, after) in enumerate(zip(old, new)):
            if after > before:
                region = tuple(slice(before, after) if i == axis else slice(None) for i in range(len(new)))
                array[region] = empty


def _empty_value(dtype: np.dtype):
    """What a not-yet-scored entry holds: NaN, False, -1 or ""."""
    kind = np.dtype(dtype).kind if not isinstance(dtype, str) else "U"
    return {"f": np.nan, "b": False, "i": -1, "u": 0}.get(kind, "")


def _same(fill, empty) -> bool:
    if isinstance(empty, float) and np.isnan(empty):
        return fill is not None and np.isnan(fill)
    return fill == empty

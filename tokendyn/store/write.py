"""Writing a store: creation, compatibility checks, per-checkpoint writes and the `done` commit flag.

The layout is written once through xarray (so `xarray.open_zarr` reads it natively), then every
checkpoint's results are written with plain zarr into chunks that checkpoint owns. A checkpoint
counts as complete only once its `done` flag is written, after all its data: zarr writes each
chunk file atomically (temporary file, then rename), so a process killed at any moment leaves
either a complete checkpoint or one whose flag is unset and which a rerun recomputes.
`val_ppl` is stored at the root only and attached to sets when opened.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import warnings
from pathlib import Path

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from tokendyn.data.corpus import PackedSet
from tokendyn.errors import TokendynError
from tokendyn.store.atomic import create_atomically, replace_atomically
from tokendyn.store.layout import METRICS, SETS_GROUP, Layout, seq_chunk, set_path
from tokendyn.store.read import list_sets, open_group
from tokendyn.store.integrity import verify


def prepare(path: Path, layout: Layout, sets: dict[str, PackedSet], model_coords: dict,
            vocab_text: np.ndarray, version: str) -> zarr.Group:
    """Create the store, or check that an existing one matches and add any new named sets.

    Call with the writer lock held (`tokendyn.store.writer_lock`). Every check runs before anything
    is written, so a refused store is left untouched. The store and each set are built under a
    temporary name and renamed into place (`tokendyn.store.atomic`); a half-made one left by an
    older version (no checkpoint done in it) is rebuilt.
    """
    for packed in sets.values():
        _check_field_names(packed, layout, model_coords, vocab_text)
    templates = {name: _set_template(name, packed, layout, model_coords, vocab_text, version)
                 for name, packed in sets.items()}
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
        elif not (folder / "zarr.json").is_file() or _missing_nodes(folder, templates[name]):
            replace_atomically(folder, build)
    root = zarr.open_group(path, mode="r+", use_consolidated=False)
    consolidate(root)
    return zarr.open_group(path, mode="r+")  # reopened, so that its consolidated metadata lists new sets


def _check_field_names(packed: PackedSet, layout: Layout, model_coords: dict, vocab_text: np.ndarray) -> None:
    """A document or span field must not take the name of a variable, coordinate or dimension of the store."""
    bare = _template(dataclasses.replace(packed, token_fields={}, doc_fields={}), layout, model_coords, vocab_text)
    taken = {*map(str, bare.variables), *map(str, bare.dims), *METRICS}
    for field in (*packed.token_fields, *packed.doc_fields):
        if field in taken:
            raise TokendynError(f"set '{packed.name}' has a document field '{field}', which is a name the store "
                                "uses; rename that field in its files")


def _set_template(name: str, packed: PackedSet, layout: Layout, model_coords: dict, vocab_text: np.ndarray,
                  version: str) -> xr.Dataset:
    template = _template(packed, layout, model_coords, vocab_text if name == "main" else None)
    template.attrs.update(_group_attrs(layout, packed, version) if name == "main" else
                          {"corpus_fingerprint": packed.fingerprint, "packing": json.dumps(packed.params)})
    return template


def _write_template(folder: Path, template: xr.Dataset, packed: PackedSet, layout: Layout) -> None:
    template.to_zarr(folder, mode="w-", compute=False, consolidated=False,
                     encoding=_encoding(template, packed, layout), zarr_format=3)


def _missing_nodes(folder: Path, template: xr.Dataset) -> list[str]:
    """Arrays of `template` without metadata under `folder`: a half-made set (or store) if any.

    A set with missing arrays but done checkpoints is not half-made but damaged: refused with a
    one-line error, never rebuilt.
    """
    missing = [name for name in template.variables if not (folder / str(name) / "zarr.json").is_file()]
    if (folder / "zarr.json").is_file() and "corpus_fingerprint" not in _attributes(folder):
        missing.append("attributes")
    if missing and (folder / "done" / "zarr.json").is_file() \
            and np.asarray(zarr.open_array(folder / "done", mode="r")[...]).any():
        raise TokendynError(f"store {folder} has done checkpoints but lacks {', '.join(missing)}; "
                            f"run `tokendyn verify` on it and write to a new --out")
    return missing


def _attributes(folder: Path) -> dict:
    try:
        return json.loads((folder / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError):
        return {}


def up_to_date(path: Path, layout: Layout, sets: dict[str, PackedSet]) -> bool:
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
        complete = all(np.asarray(root[set_path(name)]["done"][...] if name != "main" else root["done"][...])[present].all()
                       for name in sets)
    except KeyError:  # a half-made or damaged store: the writer repairs it
        return False
    return complete and not verify(path, sample=True)


def _check_writable(path: Path) -> None:
    parent = path.parent if path.parent != Path("") else Path(".")
    if path.exists() and any(path.iterdir()):
        raise TokendynError(f"{path} exists and is not a tokendyn store; choose another --out")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = parent / f".{path.name}.probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise TokendynError(f"cannot write the store at {path} ({err.strerror}); choose a writable --out") from None


def _check_compatible(path: Path, root: zarr.Group, layout: Layout, sets: dict[str, PackedSet]) -> None:
    attrs = root.attrs
    if attrs["tokenizer_fingerprint"] != layout.tokenizer_fingerprint:
        raise TokendynError(f"store {path} was made with a different tokenizer; write to a new --out")
    check_growth(path, json.loads(attrs["suite"]), layout.suite)
    if tuple(attrs["metrics"]) != layout.metrics:
        raise TokendynError(f"store {path} holds metrics {','.join(attrs['metrics'])}, not "
                            f"{','.join(layout.metrics)}; pass the same --metrics or write to a new --out")
    if attrs["store_dtype"] != layout.store_dtype:
        raise TokendynError(f"store {path} stores {attrs['store_dtype']}, not {layout.store_dtype}; "
                            "pass the same --store-dtype or write to a new --out")
    existing = ["main", *list_sets(path)]
    for name, packed in sets.items():
        if name not in existing:
            continue
        group = root[set_path(name)] if name != "main" else root
        stored = json.loads(group.attrs["packing"])
        changed = [f"{key} {stored.get(key)!r} (store) vs {value!r} (now)"
                   for key, value in packed.params.items() if stored.get(key) != value]
        what = "evaluation corpus" if name == "main" else f"text for set '{name}'"
        if changed:
            raise TokendynError(f"store {path} was made from a different {what}: {'; '.join(changed)}; "
                                "use the store's settings or write to a new --out")
        if group.attrs["corpus_fingerprint"] != packed.fingerprint:
            raise TokendynError(f"store {path} was made from a different {what}; write to a new --out")


def _group_attrs(layout: Layout, packed: PackedSet, version: str) -> dict:
    return {"tokendyn_version": version, "suite": json.dumps(layout.suite),
            "corpus_fingerprint": packed.fingerprint, "tokenizer_fingerprint": layout.tokenizer_fingerprint,
            "packing": json.dumps(packed.params), "metrics": list(layout.metrics),
            "store_dtype": layout.store_dtype, "complete": {}}


def _template(packed: PackedSet, layout: Layout, model_coords: dict, vocab_text: np.ndarray | None) -> xr.Dataset:
    n_model, n_ckpt = model_coords["step"].shape
    shape = (n_model, n_ckpt, packed.n_seq, packed.seq_len)
    chunks = (1, 1, seq_chunk(packed), packed.seq_len)
    dims4 = ("model", "ckpt", "seq", "pos")
    data = {m: (dims4, da.full(shape, np.nan, dtype=layout.store_dtype, chunks=chunks)) for m in layout.metrics}
    data["done"] = (("model", "ckpt"), np.zeros((n_model, n_ckpt), dtype=bool))
    coords = {
        "model": ("model", model_coords["model"]),
        "ckpt": ("ckpt", np.arange(n_ckpt)),
        "step": (("model", "ckpt"), model_coords["step"]),
        "tokens_seen": (("model", "ckpt"), model_coords["tokens_seen"]),
        "source": (("model", "ckpt"), model_coords["source"]),
        "token_id": (("seq", "pos"), packed.token_id),
        "token_doc": (("seq", "pos"), packed.token_doc),
        "doc": ("seq", packed.doc),
        **{k: (("seq", "pos"), v) for k, v in packed.token_fields.items()},
        **{k: ("seq", v) for k, v in packed.doc_fields.items()},
    }
    if vocab_text is not None:
        coords.update({
            "val_ppl": (("model", "ckpt"), np.full((n_model, n_ckpt), np.nan)),
            "weights_hash": (("model", "ckpt"), np.full((n_model, n_ckpt), "", dtype=object)),
            "n_params": ("model", model_coords["n_params"]),
            "n_params_nonembed": ("model", model_coords["n_params_nonembed"]),
            "vocab_text": ("vocab", vocab_text),
        })
    ds = xr.Dataset(data, coords=coords)
    ds["loss"].attrs.update(units="nats", long_name="negative log-likelihood of the token given its left context")
    if "entropy" in ds:
        ds["entropy"].attrs.update(units="nats", long_name="entropy of the predictive distribution")
    if "rank" in ds:
        ds["rank"].attrs.update(long_name="rank of the true token among the vocabulary (0 = most likely)")
    return ds


def _encoding(ds: xr.Dataset, packed: PackedSet, layout: Layout) -> dict:
    """Per-checkpoint variables get (1, 1) or (1, 1, seq_chunk, pos) chunks so each checkpoint owns its chunks."""
    enc = {m: {"chunks": (1, 1, seq_chunk(packed), packed.seq_len)} for m in layout.metrics}
    for name in ("done", "val_ppl", "weights_hash"):
        if name in ds.variables:
            enc[name] = {"chunks": (1, 1)}
    return enc


def write_block(root: zarr.Group, set_name: str, model: int, ckpt: int, seq_start: int,
                values: dict[str, np.ndarray]) -> None:
    """Write one block of sequences (a whole number of chunks, or the tail) of one checkpoint."""
    group = root[set_path(set_name)] if set_name != "main" else root
    for metric, block in values.items():
        group[metric][model, ckpt, seq_start: seq_start + len(block)] = block


def is_done(root: zarr.Group, set_name: str, model: int, ckpt: int) -> bool:
    group = root[set_path(set_name)] if set_name != "main" else root
    return bool(group["done"][model, ckpt])


def mark_done(root: zarr.Group, set_name: str, model: int, ckpt: int, model_name: str) -> None:
    """Set the checkpoint's `done` flag (the commit point), then record it in the `complete` attribute."""
    group = root[set_path(set_name)] if set_name != "main" else root
    group["done"][model, ckpt] = True
    refused = dict(group.attrs.get("refused", {}))
    if refused.pop(f"{model},{ckpt}", None) is not None:
        group.attrs["refused"] = refused
    done = np.asarray(group["done"][model])
    complete = dict(group.attrs.get("complete", {}))
    complete[model_name] = [int(c) for c in np.flatnonzero(done)]
    group.attrs["complete"] = complete
    consolidate(root)


def consolidate(root: zarr.Group) -> None:
    """Refresh the consolidated metadata, so `xarray.open_zarr` opens the store in one read and without warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        zarr.consolidate_metadata(root.store)


def write_checkpoint_coords(root: zarr.Group, model: int, ckpt: int, val_ppl: float, weights_hash: str) -> None:
    root["val_ppl"][model, ckpt] = val_ppl
    root["weights_hash"][model, ckpt] = weights_hash


def clear_done(root: zarr.Group, set_name: str, model: int, ckpt: int) -> None:
    """Unset a checkpoint's flag before recomputing it (--force), so an interrupted redo stays incomplete."""
    group = root[set_path(set_name)] if set_name != "main" else root
    group["done"][model, ckpt] = False


def refuse(root: zarr.Group, set_name: str, model: int, ckpt: int, reason: str) -> None:
    """Keep why a checkpoint's scores were not marked done, in the set's `refused` attribute ("model,ckpt": reason)."""
    group = root[set_path(set_name)] if set_name != "main" else root
    group.attrs["refused"] = {**group.attrs.get("refused", {}), f"{model},{ckpt}": reason}
    consolidate(root)


# ---- Growth: more models or checkpoints on the model and ckpt axes ----------------------------------------------
#
# Only the two leading dimensions `model` and `ckpt` are touched, whatever the per-token dims are: every array
# of every group whose dimension names include them is resized, the new region holds the "not yet scored" value
# (NaN, False, -1 or ""), and the per-model / per-checkpoint coordinates are rewritten. The suite attribute (the
# grid the store claims) is written last, so a grow killed midway is redone by the rerun; new checkpoints
# are not `done`, and extraction scores exactly them.

GROWN_DIMS = ("model", "ckpt")


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
            where = (f"is missing from the suite" if name not in new_names
                     else f"is model #{new_names.index(name) + 1} in the suite, #{index + 1} in the store")
            raise TokendynError(f"store {path} holds model '{name}', which {where}; keep the stored models first "
                                "and in order (a store grows by models added at the end), or write to a new --out")
        now = new[index][1]
        if now[: len(steps)] != steps:
            lost = [step for step in steps if step not in now]
            problem = (f"lacks stored step {lost[0]}" if lost else
                       f"has step {next(s for s in now if s not in steps)} before the last stored step {steps[-1]}")
            raise TokendynError(f"store {path}: the suite's model '{name}' {problem}; a store grows only by "
                                "checkpoints after its last stored step; write to a new --out")


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
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        for path in sorted(groups, key=lambda p: -p.count("/")):
            zarr.consolidate_metadata(root.store, path=path)
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

"""Writing a store: creation, compatibility checks, per-checkpoint writes and the `done` commit flag.

The layout is written once through xarray (so `xarray.open_zarr` reads it natively), then every
checkpoint's results are written with plain zarr into chunks that checkpoint owns. A checkpoint
counts as complete only once its `done` flag is written, after all its data: zarr writes each
chunk file atomically (temporary file, then rename), so a process killed at any moment leaves
either a complete checkpoint or one whose flag is unset and which a rerun recomputes.
`val_ppl` is stored at the root only and attached to sets when opened.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from tokendyn.data.corpus import ScoredSet
from tokendyn.errors import TokendynError
from tokendyn.store.layout import FORMAT_VERSION, PER_BYTE_COORDS, Layout, set_path, token_chunk
from tokendyn.store.read import open_group, list_sets


def prepare(path: Path, layout: Layout, sets: dict[str, ScoredSet], model_coords: dict,
            vocab_text: np.ndarray, version: str, summaries: dict[str, dict] | None = None) -> zarr.Group:
    """Create the store, or check that an existing one matches and add any new named sets.

    summaries: the protocol summary of each set (`ScoredSet.summary`), stored in its attributes.
    Every check runs before anything is written, so a refused store is left untouched.
    """
    summaries = summaries or {}
    if (path / "zarr.json").is_file():
        root = open_group(path, mode="r+")
        _check_compatible(path, root, layout, sets)
    else:
        _check_writable(path)
        root = None
    for name, packed in sets.items():
        if root is None or (name != "main" and name not in list_sets(path)):
            template = _template(packed, layout, model_coords, vocab_text if name == "main" else None)
            template.attrs.update(_set_attrs(packed, summaries.get(name)))
            if name == "main":
                template.attrs.update(_root_attrs(layout, version))
            template.to_zarr(path, group=set_path(name) or None, mode="w" if name == "main" else "w-",
                             compute=False, consolidated=False, encoding=_encoding(template, packed, layout),
                             zarr_format=3)
            root = zarr.open_group(path, mode="r+")
    consolidate(root)
    return zarr.open_group(path, mode="r+")  # reopened, so that its consolidated metadata lists new sets


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


def _check_compatible(path: Path, root: zarr.Group, layout: Layout, sets: dict[str, ScoredSet]) -> None:
    attrs = root.attrs
    if attrs["tokenizer_fingerprint"] != layout.tokenizer_fingerprint:
        raise TokendynError(f"store {path} was made with a different tokenizer; write to a new --out")
    if _checkpoint_grid(json.loads(attrs["suite"])) != _checkpoint_grid(layout.suite):
        raise TokendynError(f"store {path} was made for different models or checkpoints; write to a new --out")
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
        if group.attrs["corpus_fingerprint"] != packed.fingerprint:
            what = "evaluation corpus" if name == "main" else f"text for set '{name}'"
            raise TokendynError(f"store {path} was made from a different {what}; write to a new --out")


def _checkpoint_grid(suite: dict) -> list:
    """Model names and steps: what the store's layout depends on (folders may move)."""
    return [(m["name"], [c["step"] for c in m["checkpoints"]]) for m in suite["models"]]


def _root_attrs(layout: Layout, version: str) -> dict:
    return {"tokendyn_version": version, "format_version": FORMAT_VERSION, "suite": json.dumps(layout.suite),
            "tokenizer_fingerprint": layout.tokenizer_fingerprint, "metrics": list(layout.metrics),
            "store_dtype": layout.store_dtype, "complete": {}}


def _set_attrs(packed: ScoredSet, summary: dict | None) -> dict:
    """Per set: its fingerprint, its protocol parameters (`protocol`) and the protocol summary (`summary`)."""
    attrs = {"corpus_fingerprint": packed.fingerprint, "protocol": json.dumps(packed.params)}
    if summary is not None:
        attrs["summary"] = json.dumps(summary)
    return attrs


def _template(packed: ScoredSet, layout: Layout, model_coords: dict, vocab_text: np.ndarray | None) -> xr.Dataset:
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
        coords.update({
            "val_ppl": (("model", "ckpt"), np.full((n_model, n_ckpt), np.nan)),
            **{k: (("model", "ckpt"), np.full((n_model, n_ckpt), np.nan)) for k in PER_BYTE_COORDS},
            "weights_hash": (("model", "ckpt"), np.full((n_model, n_ckpt), "", dtype=object)),
            "n_params": ("model", model_coords["n_params"]),
            "n_params_nonembed": ("model", model_coords["n_params_nonembed"]),
            "vocab_text": ("vocab", vocab_text),
        })
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


def write_block(root: zarr.Group, set_name: str, model: int, ckpt: int, token_start: int,
                values: dict[str, np.ndarray]) -> None:
    """Write one block of tokens (a whole number of chunks, or the tail) of one checkpoint."""
    group = root[set_path(set_name)] if set_name != "main" else root
    for metric, block in values.items():
        group[metric][model, ckpt, token_start: token_start + len(block)] = block


def is_done(root: zarr.Group, set_name: str, model: int, ckpt: int) -> bool:
    group = root[set_path(set_name)] if set_name != "main" else root
    return bool(group["done"][model, ckpt])


def mark_done(root: zarr.Group, set_name: str, model: int, ckpt: int, model_name: str) -> None:
    """Set the checkpoint's `done` flag (the commit point), then record it in the `complete` attribute."""
    group = root[set_path(set_name)] if set_name != "main" else root
    group["done"][model, ckpt] = True
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


def write_checkpoint_coords(root: zarr.Group, model: int, ckpt: int, val_ppl: float, weights_hash: str,
                            per_byte: dict[str, float] | None = None) -> None:
    """The checkpoint's main-set perplexities (val_ppl and `PER_BYTE_COORDS`) and its weights' hash."""
    root["val_ppl"][model, ckpt] = val_ppl
    root["weights_hash"][model, ckpt] = weights_hash
    for name, value in (per_byte or {}).items():
        root[name][model, ckpt] = value


def clear_done(root: zarr.Group, set_name: str, model: int, ckpt: int) -> None:
    """Unset a checkpoint's flag before recomputing it (--force), so an interrupted redo stays incomplete."""
    group = root[set_path(set_name)] if set_name != "main" else root
    group["done"][model, ckpt] = False

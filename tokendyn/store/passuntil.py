"""PassUntil runs in a store (written by `tokendyn.models.sampling`, read by `tokendyn.analysis.downstream`).

The store keeps them in the group `passuntil/<task>`:

| name | dims | meaning |
|---|---|---|
| `passes`, `samples` | (model, ckpt, instance) | passes found (r) and samples up to the target or the cap (K) |
| `drawn`, `batches` | (model, ckpt, instance) | completions generated and batches (the cost) |
| `seconds` | (model, ckpt, instance) | wall-clock time of the run |
| `done` | (model, ckpt) | every instance of the checkpoint is done |
| `prompt`, `answer`, `new_tokens`, fields | (instance) | the instances |

Not yet run: -1 (NaN for seconds). An instance's results are written with `samples` last, so a run
killed at any moment resumes at the first instance without them; the checkpoint's `done` flag
follows its last instance. The group's `params` attribute (task fingerprint, passes, cap, batch
size, top_p, new_tokens, stop strings, checker, seed) must match on a rerun (or pass force=True);
`every` is not among them (`tokendyn.models.sampling`): a run at fewer checkpoints leaves the others not done.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import numpy as np
import xarray as xr
import zarr

from tokendyn.atomic import create_atomically, is_partial, replace_atomically
from tokendyn.errors import TokendynError
from tokendyn.store.read import open_store
from tokendyn.store.write import consolidate

GROUP = "passuntil"


COUNTS = ("passes", "drawn", "batches", "samples")  # `samples` last: it commits an instance


# Per (model, ckpt) and per model coordinates of the main set that `read_runs` attaches to the runs.
ATTACHED_COORDS = ("val_ppl", "tokens_seen", "n_params", "n_params_nonembed")


# Names in a task's group (and coordinates added when it is read) that an instance field must not shadow.
RESERVED = {"model", "ckpt", "step", "instance", "new_tokens", "seconds", "done", *ATTACHED_COORDS, *COUNTS}


class PassUntilTask(Protocol):
    """What the store reads of a PassUntil task (a `tokendyn.models.sampling.GenerationTask`)."""

    @property
    def name(self) -> str: ...
    @property
    def prompts(self) -> list[str]: ...
    @property
    def answers(self) -> list[str]: ...
    @property
    def fields(self) -> dict[str, list]: ...


def prepare_task(out: Path, task: PassUntilTask, lengths: list[int], params: dict, force: bool) -> zarr.Group:
    """Create the task's group, or check that the existing one was made with the same parameters.

    Call with the writer lock held. The group is built under a temporary name and renamed into
    place; a half-made one (left by an older version: no `params` or arrays) is rebuilt, and so is
    one redone with `force`.
    """
    folder = out / GROUP / task.name
    existing = _params(folder)
    if existing is not None and not force:
        if existing != params:
            changed = [f"{k} = {existing.get(k)!r} (now {v!r})" for k, v in params.items() if existing.get(k) != v]
            raise TokendynError(
                f"store {out} holds PassUntil runs of task '{task.name}' made with "
                f"{'; '.join(changed)}; rerun with the same options, store it under another "
                "name (--name), or redo it (--force)"
            )
        return zarr.open_group(out, path=f"{GROUP}/{task.name}", mode="r+", use_consolidated=False)
    template = _template(out, task, lengths, params)
    if not (out / GROUP / "zarr.json").is_file():
        zarr.open_group(out, mode="r+", use_consolidated=False).require_group(GROUP)
    if folder.exists():
        replace_atomically(folder, lambda tmp: _write(tmp, template))
    else:
        create_atomically(folder, lambda tmp: _write(tmp, template))
    root = zarr.open_group(out, mode="r+", use_consolidated=False)
    consolidate(root)
    return zarr.open_group(out, path=f"{GROUP}/{task.name}", mode="r+")


def _params(folder: Path) -> dict | None:
    """The parameters of a complete task group, None if there is none or it is half-made."""
    try:
        attrs = json.loads((folder / "zarr.json").read_text()).get("attributes", {})
        params = json.loads(attrs["params"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    complete = all((folder / name / "zarr.json").is_file() for name in (*COUNTS, "seconds", "done"))
    return params if complete else None


def _template(out: Path, task, lengths: list[int], params: dict) -> xr.Dataset:
    main = xr.open_zarr(out)
    shape = (main.sizes["model"], main.sizes["ckpt"], len(task.prompts))
    dims = ("model", "ckpt", "instance")
    data: dict[str, tuple[tuple[str, ...], np.ndarray]] = {
        name: (dims, np.full(shape, -1, dtype=np.int64)) for name in COUNTS
    }
    data["seconds"] = (dims, np.full(shape, np.nan))
    data["done"] = (("model", "ckpt"), np.zeros(shape[:2], dtype=bool))
    coords = {
        "model": main["model"].values,
        "ckpt": main["ckpt"].values,
        "step": (("model", "ckpt"), main["step"].values),
        "instance": np.arange(shape[2]),
        "prompt": ("instance", np.asarray(task.prompts, dtype=object)),
        "answer": ("instance", np.asarray(task.answers, dtype=object)),
        "new_tokens": ("instance", np.asarray(lengths, dtype=np.int64)),
        **{k: ("instance", _field_array(v)) for k, v in task.fields.items()},
    }
    return xr.Dataset(data, coords=coords, attrs={"task": task.name, "params": json.dumps(params)})


def _write(folder: Path, template: xr.Dataset) -> None:
    n_instance = template.sizes["instance"]
    encoding: dict[str, dict[str, tuple[int, ...]]] = {
        name: {"chunks": (1, 1, n_instance)} for name in (*COUNTS, "seconds")
    }
    encoding["done"] = {"chunks": (1, 1)}
    template.to_zarr(folder, mode="w-", consolidated=False, encoding=encoding, zarr_format=3)


def _field_array(values: list) -> np.ndarray:
    """Per-instance field values; missing ones become "" (text), -1 (integers) or NaN (numbers)."""
    present = [v for v in values if v is not None]
    if all(isinstance(v, (bool, int)) for v in present):
        return np.asarray([-1 if v is None else int(v) for v in values], dtype=np.int64)
    if all(isinstance(v, (int, float)) for v in present):
        return np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
    return np.asarray(["" if v is None else str(v) for v in values], dtype=object)


def list_tasks(path: str | Path) -> list[str]:
    """Names of the PassUntil tasks in a store."""
    folder = Path(path) / GROUP
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if not is_partial(p.name) and _params(p) is not None)


def read_runs(path: str | Path, task: str) -> xr.Dataset:
    """The PassUntil runs of one task (model, ckpt, instance), loaded, with the main set's checkpoint coordinates."""
    names = list_tasks(path)
    if task not in names:
        raise TokendynError(
            f"store {path} has no PassUntil task '{task}'; it has: {', '.join(names) or 'none'} "
            "(run tokendyn passuntil first)"
        )
    # Read whole without dask: a (1, 1, instance) chunk per checkpoint, which dask would read one by one.
    runs = xr.open_zarr(path, group=f"{GROUP}/{task}", consolidated=False, chunks=None).load()
    main = open_store(path)
    runs = runs.assign_coords({k: main[k].variable for k in ATTACHED_COORDS})
    runs.attrs["params"] = json.loads(runs.attrs["params"])
    return runs

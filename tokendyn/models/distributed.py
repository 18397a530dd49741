"""Extraction on a dask.distributed cluster: one task per (model, checkpoint).

`extract(..., scheduler=ADDRESS)` uses an existing cluster; `extract(..., workers=N)` starts a
`LocalCluster` of N single-threaded worker processes (with `device="cuda"`: dask-cuda's
`LocalCUDACluster` when installed, else one worker per GPU, each holding a "GPU" resource).

The client prepares the store and packs the text once (the packed sets are scattered to every
worker); each task loads its checkpoint once, scores every set, writes only the chunks that
checkpoint owns (so tasks never write the same file) and then marks it done. The done flags and
the store's metadata are committed under a cluster-wide `distributed.Lock`, so commits of
concurrent tasks do not overwrite each other. A worker that dies mid-task loses only that task:
the scheduler runs it again elsewhere, and the rerun rescores the checkpoint from its start,
so the final store equals a single-process run.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import zarr
from tqdm.auto import tqdm

from tokendyn import store
from tokendyn.config.suite import Suite
from tokendyn.data.corpus import ScoredSet
from tokendyn.errors import TokendynError

RESOURCE = "GPU"  # the worker resource a GPU task holds on a cluster without dask-cuda


class _TokenCounter:
    """Stands in for the progress bar inside a task: counts the tokens scored."""

    def __init__(self) -> None:
        self.n = 0

    def update(self, n: int) -> None:
        self.n += n

    def set_description(self, _: str) -> None:
        """Descriptions are for a local bar; the cluster's bar is drawn by the client."""


def lock_name(out: Path) -> str:
    return f"tokendyn-store:{Path(out).resolve()}"


def _commit(out: Path):
    """A `store.mark_done` that holds the store's cluster-wide lock and reads the latest metadata."""
    from distributed import Lock

    def commit(_root, name: str, m: int, c: int, model_name: str) -> None:
        with Lock(lock_name(out)):
            store.mark_done(zarr.open_group(out, mode="r+"), name, m, c, model_name)

    return commit


def score_task(
    suite: Suite, out: str, sets: dict[str, ScoredSet], names: list[str], m: int, c: int, options: dict
) -> dict:
    """Run on a worker: score checkpoint `c` of model `m` on the named sets; returns tokens, seconds, warnings."""
    from distributed import Lock, get_worker
    from transformers.utils import logging as hf_logging

    from tokendyn.models.extract import score_checkpoint
    from tokendyn.store.lock import WRITE_EMPTY_CHUNKS

    hf_logging.disable_progress_bar()  # the client draws the one bar

    out = Path(out)
    options = dict(options, device=_worker_device(options["device"], get_worker().name))
    with Lock(lock_name(out)):  # metadata is read while no other task rewrites it
        root = zarr.open_group(out, mode="r+")
    counter, start = _TokenCounter(), time.perf_counter()
    # Every chunk written, as under the coordinator's writer lock, so `tokendyn verify` finds them all.
    with (
        warnings.catch_warnings(record=True) as caught,
        zarr.config.set({"array.write_empty_chunks": WRITE_EMPTY_CHUNKS}),
    ):
        warnings.simplefilter("always")
        score_checkpoint(
            suite, root, {name: sets[name] for name in names}, m, c, bar=counter, commit=_commit(out), **options
        )
    return {
        "tokens": counter.n,
        "seconds": time.perf_counter() - start,
        "warnings": sorted({str(w.message) for w in caught}),
    }


def _worker_device(device: str, worker_name) -> str:
    """`cuda` on a worker that sees several GPUs (a LocalCluster without dask-cuda): one GPU per worker."""
    if device != "cuda":
        return device
    import torch

    count = torch.cuda.device_count()
    index = worker_name if isinstance(worker_name, int) else abs(hash(str(worker_name)))
    return f"cuda:{index % count}" if count > 1 else device


def start_client(scheduler: str | None, workers: int | None, device: str):
    """A client of the cluster at `scheduler`, or of a new local cluster of `workers` processes."""
    from distributed import Client, LocalCluster

    if scheduler is not None:
        try:
            return Client(scheduler, timeout="30s")
        except OSError as err:
            raise TokendynError(
                f"cannot reach the dask scheduler at {scheduler} ({err}); start it (dask scheduler) or fix --scheduler"
            ) from None
    if workers is not None and workers < 1:
        raise TokendynError(f"--workers {workers} must be at least 1")
    if device.startswith("cuda"):
        return Client(_gpu_cluster(workers))
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0")
    return Client(cluster)


def _gpu_cluster(workers: int | None):
    import torch
    from distributed import LocalCluster

    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        count = workers or torch.cuda.device_count()
        return LocalCluster(
            n_workers=count, threads_per_worker=1, processes=True, dashboard_address=":0", resources={RESOURCE: 1}
        )
    return LocalCUDACluster(n_workers=workers, threads_per_worker=1, dashboard_address=":0")


def run_on_cluster(
    suite: Suite,
    out: Path,
    sets: dict[str, ScoredSet],
    todo: list[tuple[int, int, list[str]]],
    options: dict,
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> None:
    """Score `todo` ((model, checkpoint, set names) triples) as one task each; one bar over checkpoints.

    options: the keyword arguments of `score_checkpoint` other than the bar (metrics, batch_tokens,
    device, dtype, allow_pickle, trust_remote_code).
    """
    from distributed import as_completed

    client = start_client(scheduler, workers, options["device"])
    try:
        if progress:
            tqdm.write(f"dask dashboard: {client.dashboard_link}")
        shared = client.scatter(sets, broadcast=True)
        resources = {RESOURCE: 1} if _has_gpu_resources(client) else None
        futures = [
            client.submit(
                score_task,
                suite,
                str(out),
                shared,
                names,
                m,
                c,
                options,
                pure=False,
                key=f"tokendyn-{m}-{c}-{time.time_ns()}",
                resources=resources,
            )
            for m, c, names in todo
        ]
        tokens, start, seen = 0, time.perf_counter(), set()
        with tqdm(total=len(futures), unit="ckpt", disable=not progress, dynamic_ncols=True) as bar:
            for future in as_completed(futures):
                result = future.result()  # a task's TokendynError stops the run here
                tokens += result["tokens"]
                for message in result["warnings"]:
                    if message not in seen:
                        seen.add(message)
                        warnings.warn(message, stacklevel=2)
                bar.set_postfix_str(f"{tokens / (time.perf_counter() - start):,.0f} tok/s")
                bar.update(1)
    finally:
        client.close()
        if scheduler is None and client.cluster is not None:
            client.cluster.close()


def _has_gpu_resources(client) -> bool:
    info = client.scheduler_info()["workers"].values()
    return any(RESOURCE in worker.get("resources", {}) for worker in info)

"""Extraction on a dask.distributed cluster: one task per (model, checkpoint).

`extract(..., scheduler=ADDRESS)` uses an existing cluster; `extract(..., workers=N)` starts a
`LocalCluster` of N worker processes (with `device="cuda"`: dask-cuda's `LocalCUDACluster` when
installed, else one worker per GPU). The workers tokendyn starts hold the resources `score=1` and
`fetch=1` (two threads): a worker scores one checkpoint at a time and downloads one at a time.

The client prepares the store and packs the text once (the packed sets are scattered to every
worker); each task loads its checkpoint once, scores every set, writes only the chunks that
checkpoint owns (so tasks never write the same file) and then commits it (`store.commit_checkpoint`:
done flags, attributes, consolidated metadata) under a cluster-wide `distributed.Lock`, so commits of
concurrent tasks do not overwrite each other. A worker that dies mid-task loses only that task:
the scheduler runs it again elsewhere, and the rerun rescores the checkpoint from its start,
so the final store equals a single-process run.

Hub checkpoints (a Hugging Face cache shared by the workers, e.g. HF_HOME on a shared file system):

- prefetch K: each scoring task depends on a download task (`fetch_task`, holding `fetch`), and the
  client keeps workers x (1 + K) checkpoints submitted, topping up as one completes: while
  a worker scores, the next downloads run on the workers' `fetch` threads. Without `fetch`
  resources on the cluster, each scoring task downloads its own checkpoint first.
- evict: the client records what the cache held before the run, before it reads any checkpoint;
  a scoring task deletes its revision after marking the checkpoint done, unless it was cached
  before. A commit used by several tasks (one revision listed twice, or two revision names such as
  `main` and `step143000` that point to one commit, `fetch.revision_key`) is deleted by the client
  once the last of them is done.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import zarr
from tqdm.auto import tqdm

from tokendyn import memory, store
from tokendyn.config.suite import Checkpoint, Suite
from tokendyn.data.corpus import ScoredSet
from tokendyn.errors import TokendynError
from tokendyn.models.fetch import evict, revision_key

if TYPE_CHECKING:
    from distributed import Client, LocalCluster

SCORE, FETCH = "score", "fetch"  # worker resources: scoring and downloading slots (one each per worker)
SLOTS = {SCORE: 1, FETCH: 1}
PRE_SPAWN = "distributed.nanny.pre-spawn-environ"  # the environment dask's nanny starts its workers with


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
    """A `store.commit_checkpoint` that holds the store's cluster-wide lock and reads the latest metadata."""
    from distributed import Lock

    def commit(_root, m: int, c: int, model_name: str, done: list[str], refused: dict[str, str]) -> None:
        with Lock(lock_name(out)):  # flags, attributes and consolidated metadata, read and written under the lock
            store.commit_checkpoint(zarr.open_group(out, mode="r+"), m, c, model_name, done, refused)

    return commit


def fetch_task(ckpt: Checkpoint, allow_pickle: bool) -> str:
    """Run on a worker: download a hub checkpoint into the Hugging Face cache; returns its folder."""
    from transformers.utils import logging as hf_logging

    from tokendyn.models import checkpoints

    hf_logging.disable_progress_bar()
    return str(checkpoints.resolve(ckpt, True, allow_pickle))


def score_task(
    suite: Suite,
    out: str,
    sets: dict[str, ScoredSet],
    names: list[str],
    m: int,
    c: int,
    options: dict,
    fetched: str | None = None,
    keep: set[tuple[str, str]] | None = None,
) -> dict:
    """Run on a worker: score checkpoint `c` of model `m` on the named sets; returns tokens, seconds, warnings.

    fetched: the result of the checkpoint's `fetch_task` (passed so that this task waits for it).
    keep: evict the checkpoint's hub revision once it is done, unless its commit is in `keep`.
    """
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
    ckpt = suite.models[m].checkpoints[c]
    freed = evict(ckpt.hub_id, ckpt.revision, keep) if keep is not None and ckpt.path is None else 0
    return {
        "freed": freed,
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


def start_client(scheduler: str | None, workers: int | None, device: str) -> Client:
    """A client of the cluster at `scheduler`, or of a new local cluster of `workers` processes."""
    from distributed import Client

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
    return Client(local_cluster(workers))


def local_cluster(workers: int | None) -> LocalCluster:
    """A LocalCluster of `workers` processes (default: one per core), each with a scoring and a download slot
    and glibc's scoring thresholds (`_scoring_workers`; measured on CPUs, so GPU workers keep dask's)."""
    from distributed import LocalCluster

    with _scoring_workers():
        return LocalCluster(
            n_workers=workers, threads_per_worker=2, processes=True, dashboard_address=":0", resources=SLOTS
        )


@contextmanager
def _scoring_workers() -> Iterator[None]:
    """Worker processes started in this block get glibc's `memory.SCORING` thresholds and one arena.

    dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which also fixes glibc's mmap
    threshold at 128 KiB: every activation of every batch would be mapped and zeroed afresh
    (`tokendyn.memory`). Tasks run in a worker thread, whose own arena maps every block over 64 MiB
    (a chunk of logits): MALLOC_ARENA_MAX=1 serves them from the heap too. Left alone: thresholds
    the user set (the environment this process started with, or dask's configuration), and a glibc
    that refuses them. The nanny writes its workers' settings into this process's `os.environ`; they
    are put back once the workers have started (a worker the nanny restarts writes them again).
    """
    import dask

    environ = dict(dask.config.get(PRE_SPAWN))
    malloc = {name: str(value) for name, value in environ.items() if name.startswith("MALLOC_")}
    if malloc not in ({}, _dask_default_malloc()) or memory.user_set() or not memory.accepted(memory.SCORING):
        yield
        return
    workers = environ | memory.SCORING.environment() | {"MALLOC_ARENA_MAX": "1"}
    # dask prefers a variable of os.environ to the configuration's. One of these this process did not
    # start with was left by an earlier cluster's nanny; one it started with (MALLOC_ARENA_MAX) still wins.
    before = {name: value for name, value in os.environ.items() if name.startswith("MALLOC_")}
    try:
        for name in (before.keys() - memory.start_environment().keys()) & workers.keys():
            del os.environ[name]
        with dask.config.set({PRE_SPAWN: workers}):
            yield
    finally:
        for name in [name for name in os.environ if name.startswith("MALLOC_")]:
            del os.environ[name]
        os.environ.update(before)


def _dask_default_malloc() -> dict[str, str]:
    """The MALLOC_ settings in the pre-spawn environment that distributed ships with."""
    import dask

    for defaults in dask.config.defaults:
        shipped = defaults.get("distributed", {}).get("nanny", {}).get("pre-spawn-environ")
        if shipped is not None:
            return {name: str(value) for name, value in shipped.items() if name.startswith("MALLOC_")}
    return {}


def _gpu_cluster(workers: int | None):
    import torch
    from distributed import LocalCluster

    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        count = workers or torch.cuda.device_count()
        return LocalCluster(
            n_workers=count, threads_per_worker=2, processes=True, dashboard_address=":0", resources=SLOTS
        )
    return LocalCUDACluster(n_workers=workers, threads_per_worker=2, dashboard_address=":0", resources=SLOTS)


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
    prefetch: int = 1,
    cached_before: set[tuple[str, str]] | None = None,
) -> None:
    """Score `todo` ((model, checkpoint, set names) triples) as one task each; one bar over checkpoints.

    options: the keyword arguments of `score_checkpoint` other than the bar (metrics, batch_tokens,
    device, dtype, allow_pickle, trust_remote_code). prefetch: hub checkpoints downloaded ahead per
    worker. cached_before: `cache_state()` before the run, given to evict what the run downloads.
    """
    from distributed import as_completed

    client = start_client(scheduler, workers, options["device"])
    try:
        if progress:
            tqdm.write(f"dask dashboard: {client.dashboard_link}")
        if not client.scheduler_info()["workers"]:
            if progress:
                tqdm.write("waiting for a dask worker to join the cluster")
            client.wait_for_workers(1)
        plan = _Plan(client, suite, out, todo, options, prefetch, cached_before, progress)
        shared = client.scatter(sets, broadcast=True)
        queue, futures = iter(todo), as_completed()
        for task in _take(queue, plan.window()):
            futures.add(plan.submit(shared, *task))
        tokens, start, seen = 0, time.perf_counter(), set()
        with tqdm(total=len(todo), unit="ckpt", disable=not progress, dynamic_ncols=True) as bar:
            for future in futures:
                result = future.result()  # a task's TokendynError stops the run here
                plan.done(future.key)
                for task in _take(queue, plan.window() - futures.count()):  # workers may have joined
                    futures.add(plan.submit(shared, *task))
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


def _take(queue, n: int) -> list:
    return [task for _, task in zip(range(n), queue)]


class _Plan:
    """How the tasks of a run are submitted: resources, downloads ahead, and who evicts what."""

    def __init__(
        self, client, suite: Suite, out: Path, todo, options: dict, prefetch: int, cached_before, progress: bool
    ) -> None:
        self.client, self.suite, self.out, self.options = client, suite, str(out), options
        self.n_tasks = len(todo)
        resources = self._resources()
        self.score_resources = {SCORE: 1} if any(SCORE in r for r in resources) else None
        hub = [suite.models[m].checkpoints[c] for m, c, _ in todo if suite.models[m].checkpoints[c].path is None]
        self.prefetch = prefetch if hub and any(FETCH in r for r in resources) else 0
        if prefetch and hub and not self.prefetch and progress:
            tqdm.write(
                f"no worker holds the resources {SCORE}=1 {FETCH}=1: each task downloads its checkpoint "
                "before scoring it, without prefetch (see docs/scale.md)"
            )
        self.keep = None if cached_before is None else set(cached_before)
        self.commit = {(c.hub_id, c.revision): revision_key(c) for c in hub}  # resolved once, before any eviction
        commits = [self.commit[c.hub_id, c.revision] for c in hub]
        self.users = {commit: commits.count(commit) for commit in commits}  # tasks per commit
        self.remaining = dict(self.users)
        self.keys: dict[str, tuple[tuple[str, str], tuple[str, str]] | None] = {}  # task -> (revision, commit)

    def _resources(self) -> list[set[str]]:
        return [set(w.get("resources", {})) for w in self.client.scheduler_info()["workers"].values()]

    def window(self) -> int:
        """Tasks to keep submitted: all without prefetch, else (1 + prefetch) per scoring slot of the cluster now."""
        if not self.prefetch:
            return self.n_tasks
        resources = self._resources()
        return max(1, sum(SCORE in r for r in resources) or len(resources)) * (1 + self.prefetch)

    def submit(self, shared, m: int, c: int, names: list[str]):
        ckpt = self.suite.models[m].checkpoints[c]
        revision = None if ckpt.path is not None else (ckpt.hub_id, ckpt.revision)
        fetched = None
        if self.prefetch and revision is not None:
            fetched = self.client.submit(
                fetch_task,
                ckpt,
                self.options["allow_pickle"],
                pure=False,
                key=f"tokendyn-fetch-{m}-{c}-{time.time_ns()}",
                resources={FETCH: 1},
            )
        commit = None if revision is None else self.commit[revision]
        alone = commit is not None and self.users[commit] == 1  # evicted by its task; else by the client
        future = self.client.submit(
            score_task,
            self.suite,
            self.out,
            shared,
            names,
            m,
            c,
            self.options,
            fetched,
            self.keep if alone else None,
            pure=False,
            key=f"tokendyn-{m}-{c}-{time.time_ns()}",
            resources=self.score_resources,
        )
        self.keys[future.key] = None if revision is None else (revision, commit)
        return future

    def done(self, key: str) -> None:
        """The task `key` completed: evict a commit shared by several tasks once the last of them is done."""
        entry = self.keys.pop(key)
        if entry is None or self.keep is None:
            return
        revision, commit = entry
        self.remaining[commit] -= 1
        if self.remaining[commit] == 0 and self.users[commit] > 1:
            evict(*revision, self.keep)

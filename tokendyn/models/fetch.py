"""Hub checkpoints without a terabyte cache: download ahead of scoring, evict what this run downloaded.

`Fetcher` downloads the next `prefetch` hub checkpoints in a background thread (with
`huggingface_hub.snapshot_download`, through `checkpoints.resolve`) while the current one is scored,
so loading overlaps compute. With `evict`, a revision is deleted from the Hugging Face cache with
huggingface_hub's cache API once its checkpoint is scored and marked done, and only if its commit
was not in the cache when the run started (`cache_state()`): files tokendyn did not download are
never touched. Revisions are counted by the commit they resolve to (`revision_key`): when two names
point to one commit (`main` and `step143000` of a finished run), the commit is evicted only after the
last checkpoint that uses it is scored, so it is neither deleted under a pending checkpoint nor
downloaded twice. Local checkpoints pass through untouched.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import filelock
import huggingface_hub
from huggingface_hub import constants as hub_constants

from tokendyn.config.suite import Checkpoint
from tokendyn.errors import TokendynError
from tokendyn.models import checkpoints

SCAN_ATTEMPTS = 5  # scans of a cache that other workers change meanwhile
EVICT_LOCK = ".locks/tokendyn-evict.lock"  # beside huggingface_hub's own lock files in the cache


def scan_cache() -> huggingface_hub.HFCacheInfo:
    """`huggingface_hub.scan_cache_dir` of the cache, tried again when a file it listed is gone before it
    was read: on a cluster, another worker evicts its revision or finishes a download meanwhile."""
    for attempt in range(SCAN_ATTEMPTS - 1):
        try:
            return huggingface_hub.scan_cache_dir(hub_constants.HF_HUB_CACHE)
        except FileNotFoundError:
            time.sleep(0.05 * 2**attempt)
    return huggingface_hub.scan_cache_dir(hub_constants.HF_HUB_CACHE)  # its error, if any, is the caller's


def cache_state() -> set[tuple[str, str]]:
    """(repo id, commit) of every model revision in the Hugging Face cache now."""
    if not Path(hub_constants.HF_HUB_CACHE).is_dir():
        return set()
    try:
        info = scan_cache()
    except huggingface_hub.CacheNotFound:
        return set()
    return {
        (repo.repo_id, revision.commit_hash)
        for repo in info.repos
        if repo.repo_type == "model"
        for revision in repo.revisions
    }


def cached_commit(hub_id: str, revision: str) -> str | None:
    """The commit a revision name points to in the local cache (refs/<revision>), or None."""
    ref = Path(hub_constants.HF_HUB_CACHE) / ("models--" + hub_id.replace("/", "--")) / "refs" / revision
    if ref.is_file():
        return ref.read_text().strip()
    return revision if len(revision) == 40 and all(ch in "0123456789abcdef" for ch in revision) else None


def revision_key(ckpt: Checkpoint) -> tuple[str, str]:
    """(hub id, commit) of a hub checkpoint, or (hub id, revision name) while its commit is unknown.

    The commit comes from the cache's refs, which every hub checkpoint has once its config was fetched
    (`extract` reads every checkpoint's config and tokenizer before scoring).
    """
    return ckpt.hub_id, cached_commit(ckpt.hub_id, ckpt.revision) or ckpt.revision


def evict(hub_id: str, revision: str, keep: set[tuple[str, str]]) -> int:
    """Delete `hub_id@revision` from the cache unless its commit is in `keep`; returns the bytes freed."""
    commit = cached_commit(hub_id, revision)
    if commit is None or (hub_id, commit) in keep:
        return 0
    # The workers of a cluster evict from one cache one at a time: two scans made before either deletion
    # would each keep a blob the other revision shares (tokenizer files), and neither would delete it.
    lock = Path(hub_constants.HF_HUB_CACHE) / EVICT_LOCK
    lock.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(lock):
        info = scan_cache()
        # Only this repo's copy: another repo (a mirror pushed from the same git history) may hold a
        # snapshot of the same commit, which `delete_revisions` could pick instead. Blobs are per repo.
        repos = frozenset(r for r in info.repos if r.repo_type == "model" and r.repo_id == hub_id)
        strategy = dataclasses.replace(info, repos=repos).delete_revisions(commit)
        strategy.execute()
    return strategy.expected_freed_size


class Fetcher:
    """Download hub checkpoints ahead of use, in the order they will be scored.

    ckpts: every checkpoint of the run, in scoring order; prefetch: how many to download ahead
    (0: each is downloaded when it is loaded); evict: delete a revision after `release` if the run
    downloaded it; before: `cache_state()` taken before the run touched the cache (required with evict).
    """

    def __init__(
        self,
        ckpts: list[Checkpoint],
        prefetch: int = 1,
        evict: bool = False,
        allow_pickle: bool = False,
        before: set[tuple[str, str]] | None = None,
    ) -> None:
        if prefetch < 0:
            raise TokendynError(f"--prefetch {prefetch} is negative; give 0 (no prefetch) or more")
        if evict and before is None:
            before = cache_state()
        self.order = [c for c in ckpts if c.path is None]
        self.keys = [revision_key(c) for c in self.order]  # checkpoints sharing a commit share a key
        self.prefetch, self.evict, self.allow_pickle, self.before = prefetch, evict, allow_pickle, before or set()
        self.freed = 0
        self._futures: dict[int, Future] = {}
        self._pool = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokendyn-prefetch")
            if prefetch > 0 and self.order
            else None
        )

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def wait(self, ckpt: Checkpoint) -> None:
        """Block until `ckpt` is downloaded (if it is a hub checkpoint), and start the next downloads."""
        if self._pool is None or ckpt.path is not None:
            return
        index = self._index(ckpt)
        for ahead in range(index, min(index + 1 + self.prefetch, len(self.order))):
            if ahead not in self._futures:
                self._futures[ahead] = self._pool.submit(
                    checkpoints.resolve, self.order[ahead], True, self.allow_pickle
                )
        self._futures.pop(index).result()  # re-raises a failed download's TokendynError here

    def release(self, ckpt: Checkpoint) -> None:
        """`ckpt` is scored and marked done: evict its revision unless a later checkpoint uses the same commit."""
        if not self.evict or ckpt.path is not None:
            return
        index = self._index(ckpt)
        if self.keys[index] not in self.keys[index + 1 :]:
            self.freed += evict(ckpt.hub_id, ckpt.revision, self.before)

    def _index(self, ckpt: Checkpoint) -> int:
        return next(i for i, c in enumerate(self.order) if c is ckpt or c == ckpt)

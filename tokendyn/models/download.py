"""`tokendyn download SUITE`: fetch every hub revision of a suite in advance (for compute nodes without internet).

The plan comes first: the hub's file metadata (`HfApi.model_info(..., files_metadata=True)`) gives every
file's size and, for LFS files, its sha256, so the total is known before a byte is fetched, files
already in the cache are counted as done (a rerun resumes), and revisions whose weight files have the
same hashes are reported as identical without reading them (the cache stores such files once: blobs
are named by their sha256). The weights fingerprint made from those hashes equals
`checkpoints.weights_fingerprint` of the downloaded revision.
"""

from __future__ import annotations

import fnmatch
import hashlib
from dataclasses import dataclass, field

import huggingface_hub
from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
from tqdm.auto import tqdm

from tokendyn.config.discover import hub_errors
from tokendyn.config.suite import Checkpoint, Suite
from tokendyn.errors import TokendynError
from tokendyn.models import checkpoints


@dataclass
class Revision:
    """One hub checkpoint to fetch: its files (name -> (size, sha256 or None)) and those already cached."""

    ckpt: Checkpoint
    files: dict[str, tuple[int, str | None]] = field(default_factory=dict)
    cached: set[str] = field(default_factory=set)

    @property
    def size(self) -> int:
        return sum(size for size, _ in self.files.values())

    @property
    def missing_bytes(self) -> int:
        return sum(size for name, (size, _) in self.files.items() if name not in self.cached)

    @property
    def weights_hash(self) -> str | None:
        """sha256 over weight-file names and their LFS sha256s (as `checkpoints.weights_fingerprint`)."""
        weights = sorted(name for name in self.files if _matches(name, checkpoints.SAFETENSORS_PATTERNS))
        if not weights or any(self.files[name][1] is None for name in weights):
            return None
        digest = hashlib.sha256()
        for name in weights:
            digest.update(f"{name}:{self.files[name][1]}\n".encode())
        return digest.hexdigest()


def patterns(allow_pickle: bool) -> list[str]:
    return (
        checkpoints.META_PATTERNS
        + checkpoints.SAFETENSORS_PATTERNS
        + (checkpoints.PICKLE_PATTERNS if allow_pickle else [])
    )


def plan(suite: Suite, allow_pickle: bool = False, api: huggingface_hub.HfApi | None = None) -> list[Revision]:
    """Every hub checkpoint of the suite with the files `extract` would fetch, their sizes and hashes."""
    api = api or huggingface_hub.HfApi()
    revisions = []
    for model in suite.models:
        for ckpt in model.checkpoints:
            if ckpt.path is not None:
                continue
            revision = Revision(ckpt)
            siblings = _siblings(api, ckpt)
            # as `checkpoints.resolve`: pickle weights only for a revision without safetensors
            safetensors = any(_matches(sibling.rfilename, checkpoints.SAFETENSORS_PATTERNS) for sibling in siblings)
            wanted = patterns(allow_pickle and not safetensors)
            for sibling in siblings:
                if _matches(sibling.rfilename, wanted):
                    sha = sibling.lfs.sha256 if sibling.lfs is not None else None
                    revision.files[sibling.rfilename] = (sibling.size or 0, sha)
                    cached = huggingface_hub.try_to_load_from_cache(
                        ckpt.hub_id, sibling.rfilename, revision=ckpt.revision
                    )
                    if isinstance(cached, str):  # not None, nor the sentinel of a file known to be absent
                        revision.cached.add(sibling.rfilename)
            revisions.append(revision)
    return revisions


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in patterns)


def _siblings(api, ckpt: Checkpoint) -> list:
    try:
        return api.model_info(ckpt.hub_id, revision=ckpt.revision, files_metadata=True).siblings or []
    except RevisionNotFoundError:
        raise TokendynError(
            f"revision '{ckpt.revision}' does not exist in hub repo {ckpt.hub_id}; fix the suite's revisions or steps"
        ) from None
    except RepositoryNotFoundError:
        raise TokendynError(
            f"hub repo {ckpt.hub_id} is not found or not accessible; fix hub_id, or log in (hf auth login)"
        ) from None
    except hub_errors() as err:  # an HTTP error, no connection, or HF_HUB_OFFLINE=1
        raise TokendynError(
            f"cannot read the file list of {ckpt.source} ({str(err).splitlines()[0]}); "
            "`tokendyn download` needs network access to the hub"
        ) from None


def identical(revisions: list[Revision]) -> list[tuple[Checkpoint, Checkpoint]]:
    """Pairs (earlier, later) of checkpoints of one model whose weight files have the same hashes."""
    first: dict[tuple[str, str], Checkpoint] = {}
    pairs = []
    for revision in revisions:
        key = (revision.ckpt.model, revision.weights_hash)
        if revision.weights_hash is None:
            continue
        if key in first:
            pairs.append((first[key], revision.ckpt))
        else:
            first[key] = revision.ckpt
    return pairs


def unique_bytes(revisions: list[Revision], missing_only: bool = False) -> list[int]:
    """Bytes each revision adds to the cache: an LFS file whose sha256 came with an earlier one is stored once."""
    seen, sizes = set(), []
    for revision in revisions:
        total = 0
        for name, (size, sha) in revision.files.items():
            key = sha or (revision.ckpt.hub_id, revision.ckpt.revision, name)
            if key not in seen and not (missing_only and name in revision.cached):
                total += size
            seen.add(key)
        sizes.append(total)
    return sizes


def download(revisions: list[Revision], allow_pickle: bool = False, progress: bool = True) -> None:
    """Fetch every revision not completely cached; the bar counts bytes and starts at what is cached."""
    total, missing = sum(unique_bytes(revisions)), unique_bytes(revisions, missing_only=True)
    with tqdm(
        total=total, initial=total - sum(missing), unit="B", unit_scale=True, disable=not progress, dynamic_ncols=True
    ) as bar:
        for revision, new_bytes in zip(revisions, missing):
            if revision.missing_bytes == 0:
                continue
            bar.set_description(revision.ckpt.source)
            checkpoints.resolve(revision.ckpt, weights=True, allow_pickle=allow_pickle)
            revision.cached = set(revision.files)
            bar.update(new_bytes)

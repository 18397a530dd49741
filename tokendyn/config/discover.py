"""Checkpoints found rather than listed: training-run folders on disk and revisions of a hub repository.

Local: `checkpoints = { glob = "run/checkpoint-*" }` matches Hugging Face Trainer folders
(`checkpoint-N`), and `step*` / `global_step*` folders. The step comes from the folder's
`trainer_state.json` (`global_step`), else from the folder name; `tokens_seen` from
`num_input_tokens_seen` when the Trainer recorded it. Folders without a `config.json` (a
checkpoint still being written, or not a model) are skipped with a warning.

Hub: `revisions = "step*"` (an fnmatch pattern) or `"all"` lists the repository's branches with
`huggingface_hub.list_repo_refs`, or, when HF_HUB_OFFLINE is set, the refs of the local Hugging Face
cache. Nothing here imports torch or downloads weights.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from tokendyn.errors import TokendynError

_FOLDER_STEP_RE = re.compile(r"(?:checkpoint|global_step|step)[-_]?(\d+)$")
STEP_IN_REVISION = re.compile(r"(?:^|[-_])step(\d+)(?=$|[-_])")
TRAINER_STATE = "trainer_state.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
)


@dataclass(frozen=True)
class Found:
    """A checkpoint folder found on disk."""

    step: int
    path: Path
    tokens_seen: float | None


def folder_step(folder: Path) -> int | None:
    """The step of a checkpoint folder: trainer_state.json's global_step, else the number in its name."""
    state = _trainer_state(folder)
    if isinstance(state.get("global_step"), int):
        return state["global_step"]
    return name_step(folder)


def name_step(folder: Path) -> int | None:
    """The step in a checkpoint folder's name (checkpoint-N, stepN, global_stepN), else None."""
    match = _FOLDER_STEP_RE.search(folder.name)
    return int(match.group(1)) if match else None


def has_tokenizer_files(folder: Path) -> bool:
    """Whether a folder holds any of the files a tokenizer is saved as."""
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def folder_tokens(folder: Path) -> float | None:
    """Tokens seen, from trainer_state.json's num_input_tokens_seen (0 after step 0 means not recorded)."""
    state = _trainer_state(folder)
    tokens, step = state.get("num_input_tokens_seen"), state.get("global_step")
    if not isinstance(tokens, (int, float)) or isinstance(tokens, bool):
        return None
    if tokens == 0 and step not in (0, None):
        return None
    return float(tokens)


def _trainer_state(folder: Path) -> dict:
    path = folder / TRAINER_STATE
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise TokendynError(
            f"unreadable {path} ({err}); fix or delete it, the step then comes from the folder name"
        ) from None
    return state if isinstance(state, dict) else {}


def discover_folders(pattern: str, base: Path) -> list[Found]:
    """Checkpoint folders matching `pattern` (relative to `base`), sorted by step.

    Raises a one-line error when nothing matches or a folder's step cannot be told.
    """
    full = os.path.abspath(base / Path(pattern).expanduser())
    folders = sorted(Path(p) for p in glob.glob(full) if Path(p).is_dir())
    found = []
    for folder in folders:
        if not (folder / "config.json").is_file():
            warnings.warn(f"skipping {folder}: no config.json (not a model, or still being written)", stacklevel=2)
            continue
        step = folder_step(folder)
        if step is None:
            raise TokendynError(
                f"cannot tell the step of {folder}: no {TRAINER_STATE} with global_step and no "
                "number in its name (checkpoint-N, stepN, global_stepN); rename it or list it "
                "as { step = N, path = ... }"
            )
        found.append(Found(step, folder, folder_tokens(folder)))
    if not found:
        raise TokendynError(
            f"checkpoints glob '{pattern}' matches no checkpoint folder (relative to {base}); fix the pattern"
        )
    return sorted(found, key=lambda f: f.step)


def discover_revisions(hub_id: str, pattern: str) -> list[str]:
    """Branches of `hub_id` matching `pattern` ("all": every branch named with a step), sorted by step.

    Online: `huggingface_hub.list_repo_refs`. With HF_HUB_OFFLINE: the refs in the local cache.
    """
    names = cached_revisions(hub_id) if _offline() else _hub_revisions(hub_id)
    if pattern == "all":
        chosen = [name for name in names if STEP_IN_REVISION.search(name)]
    else:
        chosen = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
    if not chosen:
        where = "in the local Hugging Face cache (HF_HUB_OFFLINE is set)" if _offline() else "on the hub"
        raise TokendynError(
            f"no revision of {hub_id} matches '{pattern}' {where}; it has: {_short(sorted(names)) or 'none'}"
        )
    return sorted(chosen, key=lambda name: (_step_or_none(name) is None, _step_or_none(name) or 0, name))


def _step_or_none(revision: str) -> int | None:
    match = STEP_IN_REVISION.search(revision)
    return int(match.group(1)) if match else None


def cached_revisions(hub_id: str) -> list[str]:
    """Revision names the local Hugging Face cache holds refs for (refs/<name>; pull requests excluded)."""
    from huggingface_hub import constants

    refs = Path(constants.HF_HUB_CACHE) / ("models--" + hub_id.replace("/", "--")) / "refs"
    if not refs.is_dir():
        return []
    names = (str(p.relative_to(refs)) for p in refs.rglob("*") if p.is_file())
    return sorted(name for name in names if not name.startswith("pr/"))


def hub_errors() -> tuple[type[Exception], ...]:
    """What a hub request raises for an HTTP error status or no connection. huggingface_hub >= 2
    speaks httpx2 (its HfHubHTTPError derives from httpx2.HTTPError, and OfflineModeIsEnabled is an
    OSError); older versions speak requests, whose errors are OSErrors."""
    try:
        from httpx2 import HTTPError
    except ImportError:
        return (OSError,)
    return (HTTPError, OSError)


def _hub_revisions(hub_id: str) -> list[str]:
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        refs = huggingface_hub.list_repo_refs(hub_id)
    except RepositoryNotFoundError:
        raise TokendynError(
            f"hub repo {hub_id} is not found or not accessible; fix hub_id, or log in "
            "(hf auth login) if it is private or gated"
        ) from None
    except hub_errors() as err:
        raise TokendynError(
            f"cannot list the revisions of {hub_id} ({str(err).splitlines()[0]}); check the network, "
            "or set HF_HUB_OFFLINE=1 to use the revisions in the local cache"
        ) from None
    return [branch.name for branch in refs.branches]


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _short(names: list[str], most: int = 6) -> str:
    return ", ".join(names[:most]) + (f", ... ({len(names)} in all)" if len(names) > most else "")

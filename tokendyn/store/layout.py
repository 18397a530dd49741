"""The store's layout: names of groups, variables, dimensions and coordinates, and the chunking rule.

Every module that reads or writes a store takes these names from here, so the layout is defined once.
Groups: the root holds the main evaluation set; each named set lives in `sets/<name>` with the
same per-token layout; PassUntil runs live in `passuntil/<task>` (see `tokendyn.store.passuntil`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tokendyn.data.corpus import PackedSet
# The fields of a task's option documents are named by the task reader; the store re-exports them.
from tokendyn.data.tasks import ITEM_FIELDS as ITEM_FIELDS
from tokendyn.data.tasks import OPTION_FIELD as OPTION_FIELD
from tokendyn.errors import TokendynError

SETS_GROUP = "sets"


TASK_SET_PREFIX = "task."  # named sets holding multiple-choice tasks (tokendyn.models.tasks), not evaluation text


CHUNK_VALUES = 2**18  # values per (1, 1, seq_chunk, pos) chunk: 1 MiB in float32


METRICS = ("loss", "entropy", "rank")


STORE_DTYPES = ("float32", "float16")

TOKEN_DIMS = ("seq", "pos")  # the per-token dimensions of a set
CHECKPOINT_COORDS = ("step", "tokens_seen", "val_ppl")  # per (model, ckpt) coordinates analyses carry along
MAIN_COORDS = ("val_ppl", "n_params", "n_params_nonembed", "vocab_text")  # stored at the root, attached to named sets
# Every variable and coordinate name of a set (named sets with MAIN_COORDS attached): a field must not take one.
SET_NAMES = frozenset({"model", "ckpt", "source", "weights_hash", "done", "token_id", "token_doc", "doc",
                       *TOKEN_DIMS, *CHECKPOINT_COORDS, *MAIN_COORDS, *METRICS})


@dataclass(frozen=True)
class Layout:
    """What a store holds, independent of results: compared with a store before writing to it."""

    suite: dict
    tokenizer_fingerprint: str
    metrics: tuple[str, ...]
    store_dtype: str


def check_field_names(names: Iterable[str], where: str) -> None:
    """Refuse document or span fields named like a variable or coordinate of the store (`SET_NAMES`)."""
    clash = sorted(set(names) & SET_NAMES)
    if clash:
        raise TokendynError(f"{where}: field {', '.join(map(repr, clash))} is a name the store uses; rename it")


def set_path(name: str) -> str:
    return "" if name == "main" else f"{SETS_GROUP}/{name}"


def seq_chunk(packed: PackedSet) -> int:
    return max(1, min(packed.n_seq, CHUNK_VALUES // packed.seq_len))

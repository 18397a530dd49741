"""The store's layout: names of groups, variables, dimensions and coordinates, and the chunking rule.

Every module that reads or writes a store takes these names from here, so the layout is defined once.
Groups: the root holds the main evaluation set; each named set lives in `sets/<name>` with the
same per-token layout; PassUntil runs live in `passuntil/<task>` (see `tokendyn.store.passuntil`).

Format 2 (this one): a set's per-token variables are (model, ckpt, token) over a flat `token`
dimension holding every scored token once (no padding), with coordinates `token_id`, `doc`,
`offset` (token index in its document), `n_context` and the span and document fields. Format 1
had (seq, pos) with padding; it is refused with a one-line error saying how to rescore.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# The fields of a task's option documents are named by the task reader; the store re-exports them.
from tokendyn.data.tasks import ITEM_FIELDS as ITEM_FIELDS
from tokendyn.data.tasks import OPTION_FIELD as OPTION_FIELD
from tokendyn.errors import TokendynError

SETS_GROUP = "sets"


TASK_SET_PREFIX = "task."  # named sets holding multiple-choice tasks (tokendyn.models.tasks), not evaluation text


FORMAT_VERSION = 2  # root attribute `format_version`; see the module docstring
CHUNK_VALUES = 2**18  # tokens per (1, 1, token_chunk) chunk: 1 MiB in float32


METRICS = ("loss", "entropy", "rank")


STORE_DTYPES = ("float32", "float16")

TOKEN_DIMS = ("token",)  # the per-token dimensions of a set
CHECKPOINT_COORDS = ("step", "tokens_seen", "val_ppl")  # per (model, ckpt) coordinates analyses carry along
PER_BYTE_COORDS = ("bits_per_byte", "word_ppl")  # lm-eval's normalised perplexities of the main set, (model, ckpt)
MAIN_COORDS = ("val_ppl", *PER_BYTE_COORDS, "n_params", "n_params_nonembed", "vocab_text")  # root, attached to sets
# Every variable and coordinate name of a set (named sets with MAIN_COORDS attached): a field must not take one.
SET_NAMES = frozenset(
    {
        "model",
        "ckpt",
        "source",
        "weights_hash",
        "done",
        "token_id",
        "token_doc",
        "doc",
        "offset",
        "n_context",
        *TOKEN_DIMS,
        *CHECKPOINT_COORDS,
        *MAIN_COORDS,
        *METRICS,
    }
)


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


def token_chunk(n_tokens: int) -> int:
    """Tokens per chunk of a set of n_tokens scored tokens."""
    return max(1, min(n_tokens, CHUNK_VALUES))

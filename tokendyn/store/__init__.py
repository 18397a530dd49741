"""The Zarr store: its layout (`layout`), reading (`read`), writing (`write`) and PassUntil runs (`passuntil`).

Only this package knows how a store is laid out on disk; everything else uses the names and
functions exported here.
"""

from tokendyn.store.integrity import repair, scored_weights, verify
from tokendyn.store.integrity import summary as verify_summary
from tokendyn.store.layout import (
    CHECKPOINT_COORDS,
    CHUNK_VALUES,
    FORMAT_VERSION,
    ITEM_FIELDS,
    MAIN_COORDS,
    METRICS,
    OPTION_FIELD,
    PER_BYTE_COORDS,
    SET_NAMES,
    SETS_GROUP,
    STORE_DTYPES,
    TASK_SET_PREFIX,
    TOKEN_DIMS,
    Layout,
    check_field_names,
    set_path,
    token_chunk,
)
from tokendyn.store.lock import writer_lock
from tokendyn.store.read import (
    list_sets,
    metadata_stamp,
    open_store,
    read_attrs,
    read_checkpoint,
    store_path,
    within_selection,
)
from tokendyn.store.write import (
    clear_done,
    commit_checkpoint,
    consolidate,
    done_row,
    is_done,
    prepare,
    up_to_date,
    write_block,
    write_checkpoint_coords,
)

__all__ = [
    "CHECKPOINT_COORDS",
    "CHUNK_VALUES",
    "FORMAT_VERSION",
    "ITEM_FIELDS",
    "MAIN_COORDS",
    "METRICS",
    "OPTION_FIELD",
    "PER_BYTE_COORDS",
    "SET_NAMES",
    "SETS_GROUP",
    "STORE_DTYPES",
    "TASK_SET_PREFIX",
    "TOKEN_DIMS",
    "Layout",
    "check_field_names",
    "clear_done",
    "commit_checkpoint",
    "consolidate",
    "done_row",
    "is_done",
    "list_sets",
    "metadata_stamp",
    "open_store",
    "prepare",
    "read_attrs",
    "read_checkpoint",
    "scored_weights",
    "repair",
    "set_path",
    "store_path",
    "token_chunk",
    "up_to_date",
    "verify",
    "verify_summary",
    "within_selection",
    "write_block",
    "write_checkpoint_coords",
    "writer_lock",
]

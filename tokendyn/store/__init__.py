"""The Zarr store: its layout (`layout`), reading (`read`), writing (`write`) and PassUntil runs (`passuntil`).

Only this package knows how a store is laid out on disk; everything else uses the names and
functions exported here.
"""

from tokendyn.store.layout import (CHECKPOINT_COORDS, CHUNK_VALUES, FORMAT_VERSION, ITEM_FIELDS, MAIN_COORDS, METRICS,
                                   OPTION_FIELD, PER_BYTE_COORDS, SETS_GROUP, STORE_DTYPES, TASK_SET_PREFIX,
                                   TOKEN_DIMS, Layout, set_path, token_chunk)
from tokendyn.store.read import list_sets, open_store, read_attrs, store_path
from tokendyn.store.write import (clear_done, consolidate, is_done, mark_done, prepare, write_block,
                                  write_checkpoint_coords)

__all__ = ["CHECKPOINT_COORDS", "CHUNK_VALUES", "FORMAT_VERSION", "ITEM_FIELDS", "PER_BYTE_COORDS", "MAIN_COORDS", "METRICS", "OPTION_FIELD", "SETS_GROUP",
           "STORE_DTYPES", "TASK_SET_PREFIX", "TOKEN_DIMS", "Layout", "clear_done", "consolidate", "is_done",
           "list_sets", "mark_done", "open_store", "prepare", "read_attrs", "set_path", "token_chunk", "store_path",
           "write_block", "write_checkpoint_coords"]

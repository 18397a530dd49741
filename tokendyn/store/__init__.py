"""The Zarr store: its layout (`layout`), reading (`read`), writing (`write`) and PassUntil runs (`passuntil`).

Only this package knows how a store is laid out on disk; everything else uses the names and
functions exported here.
"""

from tokendyn.store.layout import (CHECKPOINT_COORDS, CHUNK_VALUES, ITEM_FIELDS, MAIN_COORDS, METRICS, OPTION_FIELD,
                                   SET_NAMES, SETS_GROUP, STORE_DTYPES, TASK_SET_PREFIX, TOKEN_DIMS, Layout,
                                   check_field_names, seq_chunk, set_path)
from tokendyn.store.read import list_sets, open_store, read_attrs, store_path
from tokendyn.store.write import (clear_done, consolidate, is_done, mark_done, prepare, write_block,
                                  write_checkpoint_coords)

__all__ = ["CHECKPOINT_COORDS", "CHUNK_VALUES", "ITEM_FIELDS", "MAIN_COORDS", "METRICS", "OPTION_FIELD", "SET_NAMES", "SETS_GROUP",
           "STORE_DTYPES", "TASK_SET_PREFIX", "TOKEN_DIMS", "Layout", "check_field_names", "clear_done", "consolidate", "is_done",
           "list_sets", "mark_done", "open_store", "prepare", "read_attrs", "seq_chunk", "set_path", "store_path",
           "write_block", "write_checkpoint_coords"]

"""tokendyn: per-token loss dynamics of language-model checkpoint suites."""

__version__ = "0.1.0"

from tokendyn.analysis import accessor as _accessor  # noqa: E402,F401  (registers ds.tokendyn)
from tokendyn.errors import TokendynError  # noqa: E402
from tokendyn.store import list_sets, open_store  # noqa: E402

__all__ = ["TokendynError", "__version__", "list_sets", "open_store"]

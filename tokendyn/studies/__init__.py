"""Studies: one module per topic of the analyses and the report.

Each study is a function `run(source, ...) -> tokendyn.studies.study.Result`: it turns a store (a
path, or a dataset from `tokendyn.open_store`) into tidy tables (one schema per table name), one
matplotlib figure drawn from those tables, a few sentences of findings computed from them, and
per-token labels where it has any; it raises `tokendyn.studies.study.Skip("reason")` when the
store lacks its data. `tokendyn analyze` writes the results, `tokendyn report` renders them, and
`python -m analyses.NAME STORE` runs one.

`STUDIES` is the registry: every study, in the order the report shows them.
"""

from collections.abc import Callable

from tokendyn.studies import (
    agreement,
    clusters,
    curve_measures,
    double_descent,
    downstream,
    pair_preference,
    passuntil,
    perplexity,
    sequence_perplexity,
    skills,
    subset_curves,
    token_view,
    trend_categories,
)
from tokendyn.studies.study import Result

STUDIES: dict[str, Callable[..., Result]] = {
    "perplexity": perplexity.run,
    "trend_categories": trend_categories.run,
    "subset_curves": subset_curves.run,
    "double_descent": double_descent.run,
    "agreement": agreement.run,
    "clusters": clusters.run,
    "curve_measures": curve_measures.run,
    "sequence_perplexity": sequence_perplexity.run,
    "pair_preference": pair_preference.run,
    "downstream": downstream.run,
    "passuntil": passuntil.run,
    "skills": skills.run,
    "token_view": token_view.run,
}

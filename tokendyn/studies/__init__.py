"""Studies: one module per figure of the tokendyn report.

Each module holds one study: `run(source, **options) -> tokendyn.studies.study.Result` turns a store (a
path, or a dataset from `tokendyn.open_store`) into tidy tables, one matplotlib figure and a few
sentences of findings computed from the data; it raises `tokendyn.studies.study.Skip("reason")` when the
store lacks its data. Every module also runs alone:

    python -m tokendyn.studies.trend_categories STORE [--out DIR]

`tokendyn report` (tokendyn/report.py) runs the studies of `STUDIES`, in this order.
"""

STUDIES = (
    "perplexity",
    "trend_categories",
    "subset_curves",
    "double_descent",
    "agreement",
    "clusters",
    "curve_measures",
    "sequence_perplexity",
    "pair_preference",
    "downstream",
)

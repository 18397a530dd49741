"""Run the `trend_categories` study on a store: `python -m analyses.trend_categories STORE [--out DIR]` (see `tokendyn.studies.trend_categories`)."""

import sys

from tokendyn.studies.trend_categories import run
from tokendyn.studies.study import main

if __name__ == "__main__":
    sys.exit(main(run, "trend_categories"))

"""Run the `trend_categories` study on a store: `python -m analyses.trend_categories STORE [--out DIR]` (see `tokendyn.studies.trend_categories`)."""

import sys

from tokendyn.pipelines.analyze import main_one

if __name__ == "__main__":
    sys.exit(main_one("trend_categories"))

"""Run the `curve_measures` study on a store: `python -m analyses.curve_measures STORE [--out DIR]` (see `tokendyn.studies.curve_measures`)."""

import sys

from tokendyn.pipelines.analyze import main_one

if __name__ == "__main__":
    sys.exit(main_one("curve_measures"))

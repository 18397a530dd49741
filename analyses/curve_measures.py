"""Run the `curve_measures` study on a store: `python -m analyses.curve_measures STORE [--out DIR]` (see `tokendyn.studies.curve_measures`)."""

import sys

from tokendyn.studies.curve_measures import run
from tokendyn.studies.study import main

if __name__ == "__main__":
    sys.exit(main(run, "curve_measures"))

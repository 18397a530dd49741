"""Run the `pair_preference` study on a store: `python -m analyses.pair_preference STORE [--out DIR]` (see `tokendyn.studies.pair_preference`)."""

import sys

from tokendyn.studies.pair_preference import run
from tokendyn.studies.study import main

if __name__ == "__main__":
    sys.exit(main(run, "pair_preference"))

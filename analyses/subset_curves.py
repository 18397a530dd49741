"""Run the `subset_curves` study on a store: `python -m analyses.subset_curves STORE [--out DIR]` (see `tokendyn.studies.subset_curves`)."""

import sys

from tokendyn.studies.subset_curves import run
from tokendyn.studies.study import main

if __name__ == "__main__":
    sys.exit(main(run, "subset_curves"))

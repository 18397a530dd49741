"""Run the `clusters` study on a store: `python -m analyses.clusters STORE [--out DIR]` (see `tokendyn.studies.clusters`)."""

import sys

from tokendyn.studies.clusters import run
from tokendyn.studies.study import main

if __name__ == "__main__":
    sys.exit(main(run, "clusters"))

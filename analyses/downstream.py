"""Run the `downstream` study on a store: `python -m analyses.downstream STORE [--out DIR]` (see `tokendyn.studies.downstream`)."""

import sys

from tokendyn.studies.downstream import run
from tokendyn.studies.study import main

if __name__ == "__main__":
    sys.exit(main(run, "downstream"))

"""Run the `agreement` study on a store: `python -m analyses.agreement STORE [--out DIR]` (see `tokendyn.studies.agreement`)."""

import sys

from tokendyn.studies.agreement import run
from tokendyn.studies.study import main

if __name__ == "__main__":
    sys.exit(main(run, "agreement"))

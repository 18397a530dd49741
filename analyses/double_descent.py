"""Run the `double_descent` study on a store: `python -m analyses.double_descent STORE [--out DIR]` (see `tokendyn.studies.double_descent`)."""

import sys

from tokendyn.studies.double_descent import run
from tokendyn.studies.study import main

if __name__ == "__main__":
    sys.exit(main(run, "double_descent"))

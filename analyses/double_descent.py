"""Run the `double_descent` study on a store: `python -m analyses.double_descent STORE [--out DIR]` (see `tokendyn.studies.double_descent`)."""

import sys

from tokendyn.pipelines.analyze import main_one

if __name__ == "__main__":
    sys.exit(main_one("double_descent"))

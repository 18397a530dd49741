"""Run the `downstream` study on a store: `python -m analyses.downstream STORE [--out DIR]` (see `tokendyn.studies.downstream`)."""

import sys

from tokendyn.pipelines.analyze import main_one

if __name__ == "__main__":
    sys.exit(main_one("downstream"))

"""Run the `clusters` study on a store: `python -m analyses.clusters STORE [--out DIR]` (see `tokendyn.studies.clusters`)."""

import sys

from tokendyn.pipelines.analyze import main_one

if __name__ == "__main__":
    sys.exit(main_one("clusters"))

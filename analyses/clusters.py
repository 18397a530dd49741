"""Run the `clusters` study on a store: `python -m analyses.clusters STORE [--out DIR]`.

The study itself is `tokendyn.studies.clusters`."""

import sys

from tokendyn.pipelines.analyze import main_one

if __name__ == "__main__":
    sys.exit(main_one("clusters"))

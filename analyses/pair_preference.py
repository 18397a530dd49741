"""Run the `pair_preference` study on a store: `python -m analyses.pair_preference STORE [--out DIR]` (see `tokendyn.studies.pair_preference`)."""

import sys

from tokendyn.pipelines.analyze import main_one

if __name__ == "__main__":
    sys.exit(main_one("pair_preference"))

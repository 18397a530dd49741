"""Run the `subset_curves` study on a store: `python -m analyses.subset_curves STORE [--out DIR]` (see `tokendyn.studies.subset_curves`)."""

import sys

from tokendyn.pipelines.analyze import main_one

if __name__ == "__main__":
    sys.exit(main_one("subset_curves"))

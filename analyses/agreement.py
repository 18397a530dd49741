"""Run the `agreement` study on a store: `python -m analyses.agreement STORE [--out DIR]` (see `tokendyn.studies.agreement`)."""

import sys

from tokendyn.pipelines.analyze import main_one

if __name__ == "__main__":
    sys.exit(main_one("agreement"))

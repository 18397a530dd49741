"""Run the `passuntil` study on a store: `python -m analyses.passuntil STORE [--out DIR]` (see `tokendyn.studies.passuntil`)."""

import sys

from tokendyn.pipelines.analyze import main_one

if __name__ == "__main__":
    sys.exit(main_one("passuntil"))

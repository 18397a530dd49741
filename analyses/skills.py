"""Run the `skills` study on a store: `python -m analyses.skills STORE [--out DIR]` (see `tokendyn.studies.skills`)."""

import sys

from tokendyn.pipelines.analyze import main_one

if __name__ == "__main__":
    sys.exit(main_one("skills"))

"""Run the `perplexity` study on a store: `python -m analyses.perplexity STORE [--out DIR]` (see `tokendyn.studies.perplexity`)."""

import sys

from tokendyn.studies.perplexity import run
from tokendyn.studies.study import main

if __name__ == "__main__":
    sys.exit(main(run, "perplexity"))

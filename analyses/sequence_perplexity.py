"""Run the `sequence_perplexity` study on a store: `python -m analyses.sequence_perplexity STORE [--out DIR]` (see `tokendyn.studies.sequence_perplexity`)."""

import sys

from tokendyn.studies.sequence_perplexity import run
from tokendyn.studies.study import main

if __name__ == "__main__":
    sys.exit(main(run, "sequence_perplexity"))

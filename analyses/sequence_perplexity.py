"""Run the `sequence_perplexity` study on a store: `python -m analyses.sequence_perplexity STORE [--out DIR]` (see `tokendyn.studies.sequence_perplexity`)."""

import sys

from tokendyn.pipelines.analyze import main_one

if __name__ == "__main__":
    sys.exit(main_one("sequence_perplexity"))

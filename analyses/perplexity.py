"""Run the `perplexity` study on a store: `python -m analyses.perplexity STORE [--out DIR]` (see `tokendyn.studies.perplexity`)."""

import sys

from tokendyn.pipelines.analyze import main_one

if __name__ == "__main__":
    sys.exit(main_one("perplexity"))

"""Run the `token_view` study on a store: `python -m analyses.token_view STORE [--out DIR]`.

The study itself is `tokendyn.studies.token_view`."""

import sys

from tokendyn.pipelines.analyze import main_one

if __name__ == "__main__":
    sys.exit(main_one("token_view"))

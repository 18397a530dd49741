"""The studies, runnable one by one: `python -m analyses.NAME STORE`. Their code lives in `tokendyn.studies`."""

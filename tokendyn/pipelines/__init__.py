"""Pipelines: `tokendyn analyze`, `tokendyn report` and `tokendyn demo`, built from the layers below."""

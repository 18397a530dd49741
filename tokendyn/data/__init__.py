"""Data: evaluation documents, tokenisation and packing, task files."""

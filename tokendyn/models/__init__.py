"""Models: the only layer that imports torch: loading checkpoints, scoring into the store, generation, sampling."""

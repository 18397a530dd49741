"""Analysis steps of `tokendyn analyze`: every module here exposes `STEPS`, a list of step functions
`step(ds, out) -> list[str]` (see `tokendyn.pipelines.analyze`)."""

"""The core: the engine thread, jobs, per-request channels and streams, drivers."""

"""I/O-free helpers: SSE framing, problem+json, option checks, cache keys."""

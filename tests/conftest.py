"""Shared fixtures: a real redis-server for the session, the anyio backend, polling."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from support import (
    start_redis_server,  # re-exported: tests import it from either
)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real redis-server on 127.0.0.1, started for this test session.

    Never skipped: a missing binary fails loudly (see ``support.redis_server_binary``).
    """
    proc, url = start_redis_server()
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def anyio_backend() -> str:
    """Async tests run on asyncio (the engine wakes consumers with call_soon_threadsafe)."""
    return "asyncio"

"""Session fixtures: a real redis-server, thread and engine leak checks."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest

from support import free_port, wait_for_port


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real redis-server on 127.0.0.1, started for this test session.

    Never skipped: CI installs redis-server (``.ci/run``); a missing binary fails loudly.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: apt-get install redis-server")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, proc=proc)
        yield f"redis://127.0.0.1:{port}/0"
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


def wait_until(predicate: object, timeout: float = 10.0, interval: float = 0.005) -> bool:
    """Poll ``predicate()`` until true or ``timeout``; bounded, for state seen across threads."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(interval)
    return bool(predicate())  # type: ignore[operator]

"""What the shared-engine tests check at their end: nothing is left in the engine process.

"Left" means, read two ways that don't depend on each other:

* the engine process's own figures (``GET /llmbridge/v1/stats``, asked on a connection
  of its own that is closed at once): ``queued`` and ``in_flight`` jobs, ``requests``
  (HTTP requests it is serving) and ``connections`` (uvicorn's open client connections)
  on its HTTP socket, the stats request and its connection left out, and
  ``stream_connections`` (submits open on its stream socket, where workers submit);
* the kernel's: the connections the engine process accepted on either socket and still
  holds, counted from ``/proc/<pid>/fd`` against ``/proc/net/unix`` (a socket there in
  state connected whose address is one of the engine's socket paths: an accepted one;
  its listening sockets are not connected, and its event loops' socketpairs have no
  address; the stats connection is counted until the engine closed it, which the poll
  waits out).

Workers keep idle HTTP connections to the engine in their pools (the stats a worker's
``/metrics`` reads); the tests
run the engine process with ``LLMBRIDGE_ENGINE_KEEP_ALIVE=1``, so it closes those one
second after their last response, and "0 connections" then means every connection,
pooled ones included, not just the busy ones.
"""

from __future__ import annotations

import os
import time
from typing import Any

import httpx

from llmbridge._host.streams import stream_socket_path
from llmbridge._host.wire import STATS_PATH

#: The engine process's keep-alive in the tests (seconds): idle pooled connections close.
KEEP_ALIVE = "1"

_CONNECTED = "03"  # SS_CONNECTED in /proc/net/unix's "St" column


def engine_stats(socket_path: str, timeout: float = 5.0) -> dict[str, Any]:
    """The engine process's ``/llmbridge/v1/stats``, on a connection closed after it."""
    transport = httpx.HTTPTransport(uds=socket_path)
    with httpx.Client(transport=transport, base_url="http://engine", timeout=timeout) as client:
        response = client.get(STATS_PATH, headers={"Connection": "close"})
        response.raise_for_status()
        data: dict[str, Any] = response.json()
    return data


def unix_connections(pid: int, socket_path: str) -> int:
    """How many connections process ``pid`` accepted on ``socket_path`` (or on its stream
    socket beside it) and holds open."""
    paths = {socket_path, stream_socket_path(socket_path)}
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    with open("/proc/net/unix") as table:
        next(table)  # the header
        connected = {
            f[6]
            for f in (line.split() for line in table)
            if f[5] == _CONNECTED and len(f) > 7 and f[7] in paths
        }
    return len(inodes & connected)


def leftovers(socket_path: str, pid: int) -> dict[str, Any]:
    """What is still open in the engine process ``pid`` serving ``socket_path``."""
    stats = engine_stats(socket_path)
    return {
        "queued": stats["queued"],
        "in_flight": stats["in_flight"],
        "requests": stats["requests"],
        "connections": stats["connections"],
        "stream_connections": stats["stream_connections"],
        "accepted_sockets": unix_connections(pid, socket_path),
    }


def assert_drained(socket_path: str, pid: int, timeout: float = 20.0) -> None:
    """0 jobs and 0 connections left in the engine process (see the module docstring),
    within ``timeout`` seconds (keep-alive and a cancelled job's last step); every job
    it took ended. AssertionError naming what is left otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        left = leftovers(socket_path, pid)
        if not any(left.values()):
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"left in the engine process {pid} after {timeout} s: {left}")
        time.sleep(0.1)
    counters = engine_stats(socket_path)["stats"]
    ended = counters["completed"] + counters["failed"] + counters["cancelled"]
    assert counters["submitted"] == ended, counters

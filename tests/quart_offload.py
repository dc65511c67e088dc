"""Module-level functions offloaded by the Quart bridge in tests (workers import them)."""

from __future__ import annotations

import os
import threading

from llmbridge.quart import QuartBridge

bridge = QuartBridge()


@bridge.to_process(timeout=30)
def pid_square(x: int) -> tuple[int, int]:
    return os.getpid(), x * x


@bridge.to_thread()
def thread_name(tag: str) -> str:
    return f"{tag}:{threading.current_thread().name}"

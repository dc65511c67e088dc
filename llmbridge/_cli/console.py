"""What both modes of ``llmbridge demo`` share: the listening socket, the Ctrl-C
counter and the terminal preview."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import sys
import threading
import time
import urllib.parse
import urllib.request
from types import FrameType

from .main import CommandError

__all__ = ["PROMPTS", "Interrupts", "listen", "preview", "say"]

PROMPTS = ("Tell me about engines", "Why one owner thread?", "How do streams stay apart?")


class Interrupts:
    """Counts SIGINT/SIGTERM; the handler only sets events (safe at any point)."""

    def __init__(self) -> None:
        self.first = threading.Event()
        self.second = threading.Event()

    def handler(self, signum: int, frame: FrameType | None) -> None:
        (self.second if self.first.is_set() else self.first).set()

    def install(self) -> None:
        signal.signal(signal.SIGINT, self.handler)
        signal.signal(signal.SIGTERM, self.handler)


def preview(base: str, tokens: int) -> None:
    """Stream a few prompts at once through the server and print each one's text."""
    results: dict[str, str] = {}
    workers: dict[str, str] = {}

    def read(prompt: str) -> None:
        query = urllib.parse.urlencode({"prompt": prompt, "max_tokens": tokens})
        text: list[str] = []
        try:
            with urllib.request.urlopen(f"{base}/v1/stream?{query}", timeout=60) as reply:
                # Set by `--shared-engine` workers: which process served this stream.
                worker = reply.headers.get("X-Worker-Pid")
                if worker:
                    workers[prompt] = f" (worker {worker})"
                for raw in reply:
                    line = raw.decode().rstrip("\n")
                    if line.startswith("data: ") and '"text"' in line:
                        text.append(json.loads(line[6:]).get("text", ""))
        except OSError:
            return  # the demo is stopping
        results[prompt] = "".join(text)

    started = time.monotonic()
    threads = [threading.Thread(target=read, args=(p,), daemon=True) for p in PROMPTS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    elapsed = time.monotonic() - started
    print(f"{len(results)} concurrent streams in {elapsed:.2f} s, each with its own text:")
    for prompt in PROMPTS:
        answer = results.get(prompt, " (no answer)")
        print(f"  {prompt!r:32} ->{answer}{workers.get(prompt, '')}")
    sys.stdout.flush()


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, or one line saying why not (werkzeug's own message is three
    lines and an exit)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=128)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        hint = " (--port 0 picks a free one)" if exc.errno == errno.EADDRINUSE else ""
        raise CommandError(f"cannot listen on {host}:{port}: {reason}{hint}") from None


def say(text: str) -> None:
    print(f"llmbridge demo: {text}", flush=True)

"""A Flask app whose ``to_process`` calls do what real native clients do.

Run it as a script (``python tests/offload_app.py PORT``) and its classes live in
``__main__`` (a spawned worker has them as ``__mp_main__``); import it
(``offload_app:create_app()``) under ``flask`` or gunicorn and they live in
``offload_app``. ``OFFLOAD_APP_WARM=1`` makes one ``to_process`` call while the app is
created, so under ``gunicorn --preload`` the master starts worker processes before it
forks. ``BAML_UPSTREAM`` is the base URL of the OpenAI-compatible server the BAML
function calls.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import threading
import time
from typing import Any

from flask import Flask

from llmbridge.flask import FlaskBridge
from llmbridge.testing import simulated_engine


class ApiError(Exception):
    """Like many SDKs' errors: ``__init__`` wants more than ``args`` holds."""

    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


class Verdict:
    """A plain class that a worker returns."""

    def __init__(self, text: str) -> None:
        self.text = text


def noisy() -> str:
    """Write to fds 1 and 2 the ways native code and Python do."""
    os.write(1, b"noisy: os.write fd 1\n")
    os.write(2, b"noisy: os.write fd 2\n")
    libc = ctypes.CDLL(None)
    line = b"noisy: libc write fd 1\n"
    libc.write(1, line, len(line))
    print("noisy: print", flush=True)
    return "ok"


def api_error() -> None:
    raise ApiError("quota exhausted", 429)


def local_error() -> None:
    class LocalError(Exception):
        """Defined in a function: its class can't be pickled at all."""

    raise LocalError("postgres://admin:hunter2@db/prod refused")


def verdict(text: str) -> Verdict:
    return Verdict(text)


def die() -> None:
    os._exit(3)


def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


BAML_SOURCE = """
client<llm> Local {
  provider openai-generic
  options {
    base_url env.BAML_UPSTREAM
    api_key "sk-test"
    model "fake"
  }
}

function Greet(name: string) -> string {
  client Local
  prompt #"Say hello to {{ name }}"#
}
"""

_baml: Any = None


def baml_greet(name: str) -> str:
    """Call a BAML function with the real baml-py runtime at its default log level
    (which logs every call to fd 1 from Rust)."""
    global _baml
    from baml_py import BamlRuntime

    env = {"BAML_UPSTREAM": os.environ["BAML_UPSTREAM"]}
    if _baml is None:
        _baml = BamlRuntime.from_files("baml_src", {"baml_src/main.baml": BAML_SOURCE}, env)
    ctx = _baml.create_context_manager()
    result = _baml.call_function_sync("Greet", {"name": name}, ctx, None, None, [], env, None)
    if not result.is_ok():
        raise RuntimeError(str(result))
    return str(json.loads(result.unstable_internal_repr())["Success"]["content"])


def create_app() -> Flask:
    """The app; see the module docstring."""
    app = Flask(__name__)
    bridge = FlaskBridge(app, engine=simulated_engine(), max_processes=2)

    @app.get("/noisy")
    def noisy_view() -> dict[str, Any]:
        return {"result": bridge.to_process(noisy, timeout=60)}

    @app.get("/api-error")
    def api_error_view() -> dict[str, Any]:
        try:
            bridge.to_process(api_error, timeout=60)
        except ApiError as error:
            cause = error.__cause__
            return {
                "caught": f"{type(error).__module__}.{type(error).__qualname__}",
                "same_class": type(error) is ApiError,
                "status_code": error.status_code,
                "message": str(error),
                "remote_traceback": "in api_error" in str(cause),
            }
        return {"caught": None}

    @app.get("/local-error")
    def local_error_view() -> dict[str, Any]:
        return {"result": bridge.to_process(local_error, timeout=60)}

    @app.get("/verdict")
    def verdict_view() -> dict[str, Any]:
        result = bridge.to_process(verdict, "fine", timeout=60)
        return {
            "type": f"{type(result).__module__}.{type(result).__qualname__}",
            "same_class": type(result) is Verdict,
            "text": result.text,
        }

    @app.get("/die")
    def die_view() -> dict[str, Any]:
        return {"result": bridge.to_process(die, timeout=60)}

    @app.get("/slow")
    def slow_view() -> dict[str, Any]:
        return {"result": bridge.to_process(sleep, 30.0, timeout=0.5)}

    @app.get("/pid")
    def pid_view() -> dict[str, Any]:
        return {"server": os.getpid(), "worker": bridge.to_process(os.getpid, timeout=60)}

    @app.get("/thread")
    def thread_view() -> dict[str, Any]:
        names = [bridge.to_thread(lambda: threading.current_thread().name) for _ in range(5)]
        return {
            "ran_on": sorted(set(names)),
            "loop_threads": [t.name for t in threading.enumerate() if t.name == "llmbridge-loop"],
        }

    @app.get("/slow-thread")
    def slow_thread_view() -> dict[str, Any]:
        return {"result": bridge.to_thread(sleep, 2.0, timeout=0.2)}

    @app.get("/baml")
    def baml_view() -> dict[str, Any]:
        return {"text": bridge.to_process(baml_greet, "ada", timeout=60)}

    @app.get("/warm-pid")
    def warm_pid_view() -> dict[str, Any]:
        return {"warm": app.config.get("WARM_WORKER")}

    if os.environ.get("OFFLOAD_APP_WARM") == "1":
        app.config["WARM_WORKER"] = bridge.to_process(os.getpid, timeout=60)
    return app


if __name__ == "__main__":
    create_app().run(host="127.0.0.1", port=int(sys.argv[1]), threaded=True)

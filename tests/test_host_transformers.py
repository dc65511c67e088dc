"""One engine per host over the transformers backend: gunicorn gthread -w 4 sharing one
engine process that holds the tiny GPT-2 of tests/test_transformers_backend.py.

Needs torch and transformers (``.ci/run``'s torch step runs this file)."""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path

import httpx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not os.environ.get("CI"):
    pytest.importorskip("torch", reason='pip install torch==2.13.0 "llmbridge[hf]"')
    pytest.importorskip("transformers", reason='pip install "llmbridge[hf]"')

from host_checks import KEEP_ALIVE, assert_drained

from support import PYTHON, free_port, run_server

pytestmark = pytest.mark.timeout(240)

PROMPTS = ["hello", "the quick brown fox", "a", "batching, left padding!", "why?", "one"]


def test_one_model_copy_serves_every_gunicorn_worker() -> None:
    """gunicorn gthread -w 4: every stream's greedy text equals a local engine's over the
    same model, and exactly one process (the engine process) loaded the model."""
    from host_hf_apps import make_engine

    with tempfile.TemporaryDirectory(prefix="llmbridge-hf-") as tmp:
        record = Path(tmp) / "record.jsonl"
        env = {
            "LLMBRIDGE_ENGINE_SOCKET": str(Path(tmp) / "engine.sock"),
            "LLMBRIDGE_ENGINE_TARGET": "host_hf_apps:engine",
            "HOST_APPS_RECORD": str(record),
            "HF_HUB_OFFLINE": "1",
            "LLMBRIDGE_ENGINE_KEEP_ALIVE": KEEP_ALIVE,
        }
        args = [PYTHON, "-m", "gunicorn", "-c", "examples/gunicorn.conf.py", "-w", "4"]
        args += ["-k", "gthread", "--threads", "2", "--worker-connections", "2"]
        args += ["-b", "127.0.0.1:{port}", "host_hf_apps:flask_app"]
        texts: dict[str, str] = {}
        errors: list[BaseException] = []
        with run_server(args, port=free_port(), env=env, ready_timeout=120) as server:
            barrier = threading.Barrier(len(PROMPTS))

            def run(prompt: str) -> None:
                try:
                    with httpx.Client(base_url=server.url, timeout=120) as client:
                        barrier.wait(30)
                        r = client.get("/sse", params={"p": prompt, "n": 12})
                        assert r.status_code == 200
                        texts[prompt] = "".join(
                            json.loads(line[5:])["text"]
                            for line in r.text.splitlines()
                            if line.startswith("data:") and '"text"' in line
                        )
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=run, args=(p,)) for p in PROMPTS]
            for t in threads:
                t.start()
            for t in threads:
                t.join(180)
            loaded = [json.loads(line)["loaded"] for line in record.read_text().splitlines()]
            assert_drained(env["LLMBRIDGE_ENGINE_SOCKET"], loaded[-1])  # 0 jobs, 0 connections
            assert server.terminate(60) == 0
        assert not errors, errors
        loaded = [json.loads(line)["loaded"] for line in record.read_text().splitlines()]
        assert len(loaded) == 1  # one model copy on the host
    with make_engine() as local:  # no socket in this process: a local engine
        expected = {p: local.submit(p, max_new_tokens=12).result(60).text for p in PROMPTS}
    assert texts == expected

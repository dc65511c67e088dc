"""The llmbridge: metrics through real servers: a 4-worker gunicorn scraped once, the
/metrics route's path option under hypercorn, the route switched off."""

from __future__ import annotations

import concurrent.futures
import json
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from support import PYTHON, free_port, run_server, wait_until

pytestmark = [pytest.mark.slow]


def totals(text: str) -> dict[str, float]:
    """Each sample name (labels summed away), parsed with prometheus-client's parser."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name] = found.get(sample.name, 0.0) + sample.value
    return found


def by_label(text: str, name: str, label: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                key = sample.labels[label]
                found[key] = found.get(key, 0.0) + sample.value
    return found


@pytest.mark.timeout(120)
def test_gunicorn_four_workers_one_scrape_sums_every_worker(tmp_path: object) -> None:
    """Under gunicorn -w 4 with PROMETHEUS_MULTIPROC_DIR, one scrape of any worker counts
    every request sent, whichever worker served it: latency histogram counts, outcomes
    and generated tokens equal what was sent."""
    multiproc = tmp_path / "prom"  # type: ignore[operator]
    multiproc.mkdir()
    args = [
        PYTHON, "-m", "gunicorn", "-w", "4", "-k", "sync", "-c", "tests/observe_gunicorn.py",
        "-b", "127.0.0.1:{port}", "observe_apps:flask_app()",
    ]  # fmt: skip
    env = {"PROMETHEUS_MULTIPROC_DIR": str(multiproc)}
    sent_json, sent_sse = 32, 8
    with run_server(args, port=free_port(), env=env, ready_timeout=60) as server:

        def call(i: int) -> str:
            with httpx.Client(timeout=30) as client:
                path = "/sse" if i < sent_sse else "/generate"
                response = client.post(f"{server.url}{path}", json={"prompt": f"p{i}"})
                assert response.status_code == 200, response.text
                return response.headers["X-Worker-Pid"]

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            pids = set(pool.map(call, range(sent_json + sent_sse)))
        assert len(pids) >= 2, pids  # the load really was spread over workers
        with httpx.Client(timeout=30) as client:
            text = client.get(f"{server.url}/metrics").text
    sent = sent_json + sent_sse
    samples = totals(text)
    assert samples["llmbridge:e2e_request_latency_seconds_count"] == sent
    assert samples["llmbridge:time_to_first_token_seconds_count"] == sent
    assert samples["llmbridge:request_queue_time_seconds_count"] == sent
    assert samples["llmbridge:inter_token_latency_seconds_count"] == sent
    assert samples["llmbridge:generation_tokens_total"] == sent * 4  # max_new_tokens=4
    outcomes = by_label(text, "llmbridge:request_outcomes_total", "finish_reason")
    assert outcomes["length"] == sent
    assert sum(outcomes.values()) == sent
    # Every step served at least one request; all requests' tokens came from steps.
    assert samples["llmbridge:step_batch_size_sum"] == sent * 4
    assert samples["llmbridge:num_requests_running"] == 0
    assert samples["llmbridge:num_requests_waiting"] == 0


def quart_server(env: dict[str, str]) -> Any:
    args = [
        PYTHON, "-m", "hypercorn", "--bind", "127.0.0.1:{port}", "observe_apps:quart_app()",
    ]  # fmt: skip
    return run_server(args, port=free_port(), env=env)


@pytest.mark.timeout(60)
def test_metrics_path_is_configurable_under_hypercorn() -> None:
    """QuartBridge(metrics_path="/internal/metrics") serves the metrics there, not at
    /metrics, and they count the request just served."""
    server_env = {"OBS_METRICS_PATH": "/internal/metrics"}
    with quart_server(server_env) as server, httpx.Client(timeout=30) as client:
        response = client.post(f"{server.url}/generate", json={"prompt": "hi"})
        assert response.status_code == 200, response.text
        assert client.get(f"{server.url}/metrics").status_code == 404
        scraped = client.get(f"{server.url}/internal/metrics")
    assert scraped.status_code == 200
    assert scraped.headers["content-type"].startswith("text/plain")
    samples = totals(scraped.text)
    assert samples["llmbridge:e2e_request_latency_seconds_count"] == 1
    assert samples["llmbridge:generation_tokens_total"] == 4


@pytest.mark.timeout(60)
def test_metrics_route_is_off_with_one_option() -> None:
    """metrics_path=None: no route (404), and the engine is not instrumented."""
    with quart_server({"OBS_METRICS_PATH": ""}) as server, httpx.Client(timeout=30) as client:
        assert client.post(f"{server.url}/generate", json={}).status_code == 200
        assert client.get(f"{server.url}/metrics").status_code == 404


@pytest.mark.timeout(90)
def test_a_refused_request_is_a_503_line_and_a_rejected_outcome(tmp_path: Any) -> None:
    """One backend slot, one queue place: with both taken, the next request is refused at
    once with a 503 problem; its log line says 503 and the metrics count it rejected."""
    log = tmp_path / "requests.log"
    args = [
        PYTHON, "-m", "gunicorn", "-k", "gthread", "--threads", "8", "-w", "1",
        "-b", "127.0.0.1:{port}", "observe_apps:flask_app()",
    ]  # fmt: skip
    env = {"OBS_MAX_BATCH": "1", "OBS_MAX_QUEUED": "1", "OBS_LOG": str(log)}
    with (
        run_server(args, port=free_port(), env=env) as server,
        httpx.Client(timeout=30) as client,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        long = {"prompt": "long", "max_new_tokens": 1_000_000}
        with client.stream("POST", f"{server.url}/sse", json=long) as streaming:
            # Keep the iterator: a dropped one is finalised, which closes the response.
            chunks = streaming.iter_bytes()
            next(chunks)  # the one slot is taken
            waiting = pool.submit(
                httpx.post, f"{server.url}/generate", json={"prompt": "w"}, timeout=30
            )

            def queued() -> bool:
                text = client.get(f"{server.url}/metrics").text
                return totals(text).get("llmbridge:num_requests_waiting") == 1

            assert wait_until(queued)
            refused = client.post(f"{server.url}/generate", json={"prompt": "r"})
        assert waiting.result(timeout=30).status_code == 200
        text = client.get(f"{server.url}/metrics").text
        assert wait_until(lambda: len(log.read_text().splitlines()) >= 3)
    assert refused.status_code == 503
    assert refused.headers["content-type"] == "application/problem+json"
    assert "Retry-After" in refused.headers
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    (line,) = [line for line in lines if line["status"] == 503]
    assert line["request_id"] == refused.headers["X-Request-Id"] == refused.json()["request_id"]
    outcomes = by_label(text, "llmbridge:request_outcomes_total", "finish_reason")
    assert outcomes["rejected"] == 1

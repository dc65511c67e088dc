"""The demo page in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``) driven by Selenium, against ``llmbridge demo`` in a real process.

Nothing is downloaded: the browser and its driver are the system's, passed by path, so
Selenium Manager never runs. Without them (or without ``selenium``) these tests skip,
except in CI (``CI=true``), where ``.ci/run`` installs them and a missing one fails.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmbridge.testing import SimulatedGenerator

from support import PYTHON, ROOT, Server, free_port, run_server

pytestmark = pytest.mark.timeout(120)

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
GENERATOR = SimulatedGenerator()
ENDED = ("done", "cancelled", "error")


def _missing(reason: str) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason}: CI must run the browser test (.ci/run installs it)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium for the module, with a fresh profile."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing("selenium is not installed (pip install selenium)")
    for path in (CHROMIUM, CHROMEDRIVER):
        if not path.exists():
            _missing(f"{path} is missing (apt-get install chromium chromium-driver)")
    with tempfile.TemporaryDirectory(prefix="llmbridge-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for flag in FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={profile}")
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
        driver.set_page_load_timeout(30)
        driver.set_script_timeout(30)
        try:
            yield driver
        finally:
            driver.quit()


def demo(*extra: str) -> Any:
    """``llmbridge demo`` on a free port, 50 ms a token, no terminal preview."""
    args = [PYTHON, "-m", "llmbridge", "demo", "--port", "{port}", "--no-preview"]
    return run_server([*args, "--step-time", "0.05", *extra], port=free_port())


def cards(browser: Any) -> list[dict[str, Any]]:
    """What each card shows: its prompt, text, state and times (ms since Start)."""
    result: list[dict[str, Any]] = browser.execute_script(
        """return [...document.querySelectorAll('.card')].map((card) => ({
             prompt: card.dataset.prompt,
             text: card.querySelector('.text').textContent,
             state: card.dataset.state,
             first: card.dataset.firstMs === undefined ? null : Number(card.dataset.firstMs),
             end: card.dataset.endMs === undefined ? null : Number(card.dataset.endMs),
           }));"""
    )
    return result


def wait_for(browser: Any, condition: Any, timeout: float = 60) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout, poll_frequency=0.05).until(condition)


def run_page(browser: Any, server: Server, streams: int, tokens: int) -> list[dict[str, Any]]:
    """Open the page with ``streams`` cards of ``tokens`` tokens; wait for all to end."""
    browser.get(f"{server.url}/?streams={streams}&tokens={tokens}")
    wait_for(browser, lambda b: len(cards(b)) == streams)
    wait_for(browser, lambda b: all(c["state"] in ENDED for c in cards(b)))
    return cards(browser)


def streamed_concurrently(shown: list[dict[str, Any]]) -> bool:
    """Every card had its first token before any card ended."""
    return max(c["first"] for c in shown) < min(c["end"] for c in shown)


def stat(browser: Any, name: str) -> str:
    text: str = browser.find_element("id", f"stat-{name}").text
    return text


def test_cards_stream_concurrently_each_with_its_own_text(browser: Any) -> None:
    """Three cards: all first tokens arrive before the first card ends, and each card
    shows exactly the text of its own prompt; the page says the engine is simulated."""
    with demo() as server:
        shown = run_page(browser, server, streams=3, tokens=24)
        assert "simulated engine" in browser.find_element("id", "simulated").text
        assert "curl -N" in browser.find_element("id", "endpoints").text
        wait_for(browser, lambda b: stat(b, "completed") == "3", timeout=10)
    assert [c["state"] for c in shown] == ["done"] * 3, shown
    assert streamed_concurrently(shown), shown
    for card in shown:
        assert card["text"] == GENERATOR.expected_text(card["prompt"], 24), card
    assert len({c["text"] for c in shown}) == 3


def test_serialised_streams_fail_the_concurrency_check(browser: Any) -> None:
    """The check above can fail: with ``--no-threads`` the server answers one request
    at a time, the cards stream one after another, and the check says so."""
    with demo("--no-threads") as server:
        shown = run_page(browser, server, streams=3, tokens=12)
    assert [c["state"] for c in shown] == ["done"] * 3, shown
    assert not streamed_concurrently(shown), shown
    for card in shown:
        assert card["text"] == GENERATOR.expected_text(card["prompt"], 12), card


def test_leave_early_cancels_the_job_and_the_stats_show_it(browser: Any) -> None:
    """ "Leave early" closes the card's stream: the server cancels its job, and the stats
    panel counts it as cancelled, not completed."""
    with demo() as server:
        browser.get(f"{server.url}/?streams=2&tokens=400")
        wait_for(browser, lambda b: all(c["state"] == "streaming" for c in cards(b)))
        assert stat(browser, "cancelled") in ("0", "\N{EN DASH}")
        for button in browser.find_elements("css selector", ".card button.leave"):
            button.click()
        wait_for(browser, lambda b: stat(b, "cancelled") == "2", timeout=20)
        shown = cards(browser)
        assert stat(browser, "completed") == "0"
    assert [c["state"] for c in shown] == ["cancelled"] * 2, shown
    for card in shown:
        expected = GENERATOR.expected_text(card["prompt"], 400)
        assert card["text"], card
        assert expected.startswith(card["text"]), card
        assert len(card["text"]) < len(expected)


def test_ci_installs_chromium_after_the_readme_command_and_runs_this_file() -> None:
    """.ci/run gets Debian's chromium and chromium-driver and selenium only after the
    README's test command (a fresh clone needs no browser), then runs this file with
    CI=true, so a missing browser fails there instead of skipping."""
    script = (ROOT / ".ci" / "run").read_text()
    code = [line.strip() for line in script.splitlines() if not line.strip().startswith("#")]

    def first(fragment: str) -> int:
        found = [i for i, line in enumerate(code) if fragment in line]
        assert found, fragment
        return found[0]

    readme = first("python -m pytest")
    assert first("export CI=") < readme
    assert readme < first("apt_install chromium chromium-driver")
    assert readme < first('pip install -q "selenium')
    assert first('pip install -q "selenium') < first("tests/test_demo_browser.py")

"""The public surface: a complete, sorted __all__ and no optional imports."""

from __future__ import annotations

import subprocess
import sys
from typing import ParamSpec, TypeVar

import pytest

import llmbridge
import llmbridge.asgi
import llmbridge.backends
import llmbridge.flask
import llmbridge.gunicorn
import llmbridge.metrics
import llmbridge.openai
import llmbridge.policies
import llmbridge.quart
import llmbridge.testing

PUBLIC_MODULES = [
    llmbridge,
    llmbridge.asgi,
    llmbridge.backends,
    llmbridge.flask,
    llmbridge.gunicorn,
    llmbridge.metrics,
    llmbridge.openai,
    llmbridge.policies,
    llmbridge.quart,
    llmbridge.testing,
]

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("module", PUBLIC_MODULES, ids=lambda m: m.__name__)
def test_all_is_sorted_and_complete(module: object) -> None:
    """__all__ is sorted, every name in it exists, and every public name is in it."""
    names = module.__all__  # type: ignore[attr-defined]
    assert names == sorted(names)
    for exported in names:
        assert hasattr(module, exported), exported
    name = module.__name__  # type: ignore[attr-defined]

    def defined_here(value: object) -> bool:
        origin = getattr(value, "__module__", "") or ""
        # The package re-exports its private modules; a public module its own names.
        return origin == name or (name == "llmbridge" and origin.startswith("llmbridge._"))

    public = {
        n
        for n, v in vars(module).items()
        if not n.startswith("_")
        and not isinstance(v, (type(sys), TypeVar, ParamSpec))
        and defined_here(v)
    }
    assert public <= set(names), public - set(names)


def test_every_public_name_has_a_docstring() -> None:
    """Every exported class and function documents its contract."""
    for name in llmbridge.__all__:
        obj = getattr(llmbridge, name)
        if callable(obj):
            assert (obj.__doc__ or "").strip(), name


def test_exception_tree_is_rooted_and_maps_to_statuses() -> None:
    """Every error derives from LLMBridgeError and carries an HTTP status."""
    errors = [getattr(llmbridge, n) for n in llmbridge.__all__]
    errors = [e for e in errors if isinstance(e, type) and issubclass(e, BaseException)]
    assert len(errors) >= 8
    for error in errors:
        assert issubclass(error, llmbridge.LLMBridgeError)
        assert 400 <= error.status <= 599
    assert llmbridge.Overloaded.status == 503
    assert llmbridge.RateLimited.status == 429
    assert llmbridge.Timeout.status == 504
    assert llmbridge.BadRequest.status == 400


def test_import_llmbridge_imports_no_framework_or_heavy_dependency() -> None:
    """`import llmbridge` (and its core modules) pull in no flask, quart, redis, httpx, torch."""
    code = (
        "import sys, llmbridge, llmbridge.backends, llmbridge.testing;"
        "bad = sorted({m.split('.')[0] for m in sys.modules} & "
        "{'flask', 'quart', 'redis', 'httpx', 'torch', 'transformers', 'werkzeug', 'limits'});"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_reference_lists_every_public_name() -> None:
    """docs/reference.md has a row for every name every public module exports."""
    from pathlib import Path

    reference = (Path(__file__).parent.parent / "docs" / "reference.md").read_text()
    for module in PUBLIC_MODULES:
        assert f"## `{module.__name__}`" in reference
        for name in module.__all__:
            assert f"| `{name}` |" in reference, f"{module.__name__}.{name}"


# A meta-path finder that makes the optional heavy dependencies unimportable, so the
# check means the same on a machine where CI has installed torch (.ci/run's second step).
_WITHOUT_OPTIONAL = """
import importlib.abc, sys

BLOCKED = {"torch", "transformers", "aiohttp", "httpx", "exllamav2", "llama_cpp"}


class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, Absent())
"""


def run_without_optional(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter where torch, transformers, aiohttp, httpx, exllamav2
    and llama_cpp cannot be imported."""
    return subprocess.run(
        [sys.executable, "-c", _WITHOUT_OPTIONAL + code],
        capture_output=True,
        text=True,
        timeout=50,
    )


def test_backends_names_import_without_optional_dependencies() -> None:
    """Without torch (or aiohttp, httpx, exllamav2, llama_cpp) ``from llmbridge.backends import *``,
    ``hasattr`` and ``inspect.getmembers`` see every adapter name, and nothing heavy loads."""
    code = """
import inspect
import llmbridge.backends as backends
from llmbridge.backends import *

missing = [n for n in backends.__all__ if not hasattr(backends, n)]
assert not missing, missing
members = dict(inspect.getmembers(backends))
assert set(backends.__all__) <= set(members), set(backends.__all__) - set(members)
assert TransformersGenerator.__doc__ and OpenAIBackend.__doc__
heavy = sorted({m.split(".")[0] for m in sys.modules} & BLOCKED)
assert not heavy, heavy
print("ok")
"""
    result = run_without_optional(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"


@pytest.mark.parametrize(
    ("construct", "hint"),
    [
        ("TransformersGenerator(object(), object())", 'pip install torch "llmbridge[hf]"'),
        ("transformers_backend(object(), object())", 'pip install torch "llmbridge[hf]"'),
        ('OpenAIBackend("http://127.0.0.1:1/v1")', 'pip install "llmbridge[http]"'),
        (
            'exllamav2_job_factory(object())(Request("r1", "hi", {}))',
            "pip install exllamav2",
        ),
    ],
)
def test_using_an_adapter_without_its_dependency_names_the_install_command(
    construct: str, hint: str
) -> None:
    """Building an adapter whose dependency is missing raises ImportError with the
    install command, not a NameError or AttributeError from deep inside."""
    code = f"""
from llmbridge import Request
from llmbridge.backends import *

try:
    {construct}
except ImportError as exc:
    print(exc)
else:
    raise SystemExit("no ImportError")
"""
    result = run_without_optional(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert hint in result.stdout


_WITHOUT_METRICS = """
import importlib.abc, sys

BLOCKED = {"prometheus_client", "opentelemetry"}


class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, Absent())
"""


def test_import_llmbridge_loads_no_prometheus_client_or_opentelemetry() -> None:
    """``import llmbridge`` (and a bridge with metrics and tracing off) imports neither
    prometheus_client nor opentelemetry."""
    code = """
import sys
import llmbridge
from flask import Flask
from llmbridge.flask import FlaskBridge

FlaskBridge(Flask("x"), engine=llmbridge.Engine(lambda p: p), metrics_path=None)
loaded = sorted({m.split(".")[0] for m in sys.modules} & {"prometheus_client", "opentelemetry"})
assert not loaded, loaded
print("ok")
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=50
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"


def test_metrics_route_without_prometheus_client() -> None:
    """Without prometheus-client a bridge (metrics off by default) installs as before,
    and asking for the metrics route raises ImportError naming the extra."""
    code = """
import sys
import llmbridge
from flask import Flask
from llmbridge.flask import FlaskBridge

app = Flask("x")
FlaskBridge(app, engine=llmbridge.Engine(lambda p: p))
assert "llmbridge_metrics" not in app.view_functions
assert "prometheus_client" not in sys.modules
try:
    FlaskBridge(Flask("y"), metrics_path="/metrics")
except ImportError as exc:
    print(exc)
else:
    raise SystemExit("no ImportError")
"""
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_METRICS + code],
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'pip install "llmbridge[metrics]"' in result.stdout

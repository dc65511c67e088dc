#!/usr/bin/env bash
# Runs asgiref's and a2wsgi's own tests/test_wsgi.py (from the installed versions' sdists)
# with llmbridge's WSGIMiddleware substituted for their adapters, and checks the outcome
# against the known, documented differences (the llmbridge._web.asgi.adapter docstring
# and docs/howto/deploy.md). Any other failure, or a known difference that stopped
# failing, exits non-zero. Self-contained: installs what it needs (pytest-asyncio) into a
# directory on PYTHONPATH for these runs only, in a temp dir.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export PIP_DISABLE_PIP_VERSION_CHECK=1
version() { python -c "import importlib.metadata as m; print(m.version('$1'))"; }
asgiref_version="$(version asgiref)"
a2wsgi_version="$(version a2wsgi)"
python -m pip download -q --no-deps --no-binary :all: -d "$work" \
    "asgiref==$asgiref_version" "a2wsgi==$a2wsgi_version" 2>/dev/null
tar xzf "$work/asgiref-$asgiref_version.tar.gz" -C "$work"
tar xzf "$work/a2wsgi-$a2wsgi_version.tar.gz" -C "$work"
# Their suites use pytest-asyncio; ours uses anyio's plugin: keep it out of our Python
# (a directory on PYTHONPATH for these runs only).
python -m pip install -q --no-deps --target "$work/site" pytest-asyncio 2>/dev/null
mkdir "$work/plugin"
cat > "$work/plugin/llmbridge_substitute.py" <<'PY'
"""Put llmbridge's WSGIMiddleware where asgiref's and a2wsgi's tests import theirs."""

from typing import Any

import a2wsgi.wsgi
import asgiref.wsgi

from llmbridge._web.asgi import WSGIMiddleware, build_environ


class WsgiToAsgiInstance:
    """asgiref's per-request object, as far as its tests use it: build_environ."""

    def __init__(self, app: Any, duplicate_header_limit: int | None = 100) -> None:
        self.limit = duplicate_header_limit

    def build_environ(self, scope: Any, body: Any) -> dict[str, Any]:
        return build_environ(scope, body, duplicate_header_limit=self.limit)


asgiref.wsgi.WsgiToAsgi = WSGIMiddleware
asgiref.wsgi.WsgiToAsgiInstance = WsgiToAsgiInstance
a2wsgi.wsgi.WSGIMiddleware = WSGIMiddleware


def a2wsgi_build_environ(scope: Any, body: Any) -> dict[str, Any]:
    """The environ WSGIMiddleware builds: its script_name comes from $SCRIPT_NAME."""
    return build_environ(scope, body, script_name=WSGIMiddleware(lambda e, s: []).script_name)


a2wsgi.wsgi.build_environ = a2wsgi_build_environ
PY
outcome() {
    # One line per test id and outcome, sorted.
    (cd "$1" && PYTHONPATH="$work/plugin:$work/site:$root" python -m pytest \
        tests/test_wsgi.py -q -p no:cacheprovider -p llmbridge_substitute -p no:anyio \
        -o asyncio_mode=auto -W ignore -rA 2>&1 \
        | grep -E '^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) ' | sed 's/ - .*//' | sort) || true
}
status=0
check() {
    local name="$1" dir="$2" expected="$3"
    outcome "$dir" > "$work/$name.txt"
    grep -E '^(FAILED|ERROR) ' "$work/$name.txt" | sed -E 's/^(FAILED|ERROR) //' | sort \
        > "$work/$name.failed" || true
    { printf '%s\n' "$expected" | grep -v '^$' || true; } | sed 's/ *#.*//' | sort > "$work/$name.expected"
    local passed total
    passed="$(grep -c '^PASSED' "$work/$name.txt" || true)"
    total="$(wc -l < "$work/$name.txt")"
    echo "$name's own tests/test_wsgi.py with llmbridge's WSGIMiddleware: $passed of $total" \
         "passed, $(wc -l < "$work/$name.failed") known differences"
    if [ "$total" -eq 0 ] || ! diff -u "$work/$name.expected" "$work/$name.failed"; then
        echo "$name: the outcome differs from the documented differences above" >&2
        status=1
    fi
}
# Each line: a test id that fails with llmbridge, and why (documented differences).
check asgiref "$work/asgiref-$asgiref_version" "
tests/test_wsgi.py::test_wsgi_path_encoding  # an empty chunk is not sent as a message
tests/test_wsgi.py::test_wsgi_multiple_start_response  # a one-chunk body gets Content-Length
tests/test_wsgi.py::test_duplicate_header_limit  # 431 problem+json, not 400 text/plain
tests/test_wsgi.py::test_duplicate_header_limit_disabled  # one-chunk Content-Length
"
check a2wsgi "$work/a2wsgi-$a2wsgi_version" "
tests/test_wsgi.py::test_wsgi_exc_info  # start_response(exc_info) before any byte: sends the app's 500 (PEP 3333)
tests/test_wsgi.py::test_build_environ  # wsgi.errors is stderr; wsgi.input_terminated is set
tests/test_wsgi.py::test_build_environ_with_env  # the same two keys
"
exit "$status"

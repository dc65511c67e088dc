#!/usr/bin/env bash
# Runs Flask's own test suite (from the installed version's sdist) twice: plain, and with
# FlaskBridge installed on every app it creates. The two outcomes must be identical.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
version="$(python -c 'import importlib.metadata as m; print(m.version("flask"))')"
python -m pip download -q --no-deps --no-binary :all: -d "$work" "flask==$version" 2>/dev/null
tar xzf "$work/flask-$version.tar.gz" -C "$work"
cd "$work/flask-$version"
# Flask's tests use _pytest.monkeypatch.notset, which pytest 9 renamed NOTSET: without
# this, collection fails and both runs are an identical, empty list.
if ! python -c 'import _pytest.monkeypatch as m; m.notset' 2>/dev/null; then
    sed -i 's/import notset$/import NOTSET as notset/; s/monkeypatch\.notset/monkeypatch.NOTSET/g' \
        tests/conftest.py tests/test_cli.py
fi
outcome() {
    # One line per test id and outcome, sorted: comparable between the two runs (not the
    # captured log lines that also start with ERROR, nor failure messages).
    python -m pytest tests -q -p no:cacheprovider -W ignore -rA "$@" 2>&1 \
        | grep -E '^((PASSED|FAILED|ERROR|XFAIL|XPASS) tests/|SKIPPED \[)' | sed -E 's/ - .*//' | sort || true
}
outcome > "$work/plain.txt"
PYTHONPATH="$root:$root/tests" outcome -p flask_upstream_plugin > "$work/bridged.txt"
if ! grep -q '^PASSED' "$work/plain.txt"; then
    echo "Flask's test suite passed no test: nothing was compared" >&2
    exit 1
fi
# Known, documented differences: the bridge adds its health routes (/livez, /readyz; off
# with health=False) to every app, so the tests that print `flask routes` see two more.
# Each listed test must really differ (a list that no longer applies fails too).
known=(
    tests/test_cli.py::TestRoutes::test_no_routes
    tests/test_cli.py::TestRoutes::test_simple
    tests/test_cli.py::TestRoutes::test_sort
)
for test in "${known[@]}"; do
    if ! grep -qx "PASSED $test" "$work/plain.txt" || ! grep -qx "FAILED $test" "$work/bridged.txt"; then
        echo "known difference no longer applies (remove it from the list): $test" >&2
        exit 1
    fi
    sed -i "s|^FAILED $test\$|PASSED $test|" "$work/bridged.txt"
done
sort -o "$work/bridged.txt" "$work/bridged.txt"
if ! diff -u "$work/plain.txt" "$work/bridged.txt"; then
    echo "Flask's own tests behave differently with FlaskBridge installed" >&2
    exit 1
fi
echo "Flask $version's own test suite: $(grep -c '^PASSED' "$work/plain.txt") passed," \
     "$(grep -c -E '^(FAILED|ERROR)' "$work/plain.txt" || true) failed, identical with" \
     "FlaskBridge installed on every app but for ${#known[@]} known differences (its health routes)"

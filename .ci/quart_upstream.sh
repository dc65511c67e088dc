#!/usr/bin/env bash
# Runs Quart's own test suite twice: plain, and with QuartBridge installed on every app it
# creates. The two outcomes must be identical (some tests may fail in both runs: see the
# suite's README). No Quart sdist ships its tests, so a copy lives in the shared folder
# beside the repository (QUART_SUITE overrides where); it is read-only, so it is copied
# to a temporary folder first. Installs what the suite needs (into that folder only).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
suite="${QUART_SUITE:-$root/../shared/peer-suites/quart}"
if [ ! -f "$suite/test_basic.py" ]; then
    echo "Quart's test suite is not at $suite" >&2
    exit 1
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# What the suite needs beyond the dev extra, in a folder of its own: pytest-asyncio in
# the current Python would break the project's own suite (its config warning is an error
# under filterwarnings = error). hypothesis comes with the dev extra.
python -m pip install -q --no-deps --target "$work/deps" "pytest-asyncio>=0.23" python-dotenv
export PYTHONPATH="$work/deps${PYTHONPATH:+:$PYTHONPATH}"
cp -r "$suite" "$work/tests"
chmod -R u+w "$work/tests"
# Quart's own pytest settings (its pyproject.toml), so the suite runs as it does there.
cat > "$work/pytest.ini" <<'INI'
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = session
filterwarnings = error
INI
cd "$work"
outcome() {
    # One line per test id and outcome, sorted: comparable between the two runs (not the
    # captured log lines that also start with ERROR, nor failure messages).
    timeout 900 python -m pytest tests -q -p no:cacheprovider -rA "$@" 2>&1 \
        | grep -E '^((PASSED|FAILED|ERROR|XFAIL|XPASS) tests/|SKIPPED \[)' | sed -E 's/ - .*//' | sort || true
}
outcome > "$work/plain.txt"
PYTHONPATH="$root:$root/tests:$PYTHONPATH" outcome -p quart_upstream_plugin > "$work/bridged.txt"
if ! grep -q '^PASSED' "$work/plain.txt"; then
    echo "Quart's test suite passed no test: nothing was compared" >&2
    exit 1
fi
if ! diff -u "$work/plain.txt" "$work/bridged.txt"; then
    echo "Quart's own tests behave differently with QuartBridge installed" >&2
    exit 1
fi
quart_version="$(python -c 'import importlib.metadata as m; print(m.version("quart"))')"
echo "Quart $quart_version's own test suite: $(grep -c '^PASSED' "$work/plain.txt") passed," \
     "$(grep -c -E '^(FAILED|ERROR)' "$work/plain.txt" || true) failed, identical with QuartBridge" \
     "installed on every app"

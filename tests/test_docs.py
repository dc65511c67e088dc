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

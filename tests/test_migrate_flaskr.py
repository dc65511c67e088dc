"""The proof on code we didn't write: Flask's own tutorial app (flaskr, from the installed
Flask's sdist) and its tests, migrated by ``llmbridge migrate`` alone, pass under Quart.

The sdist is downloaded with pip at test time (CI reaches the registry to install the dev
extra anyway); no network is a failure, not a skip.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from support import PYTHON, ROOT

pytestmark = pytest.mark.timeout(300)


def run(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(cwd), str(ROOT)])}
    env.pop("PYTEST_ADDOPTS", None)
    return subprocess.run(
        [PYTHON, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def tutorial(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Flask's examples/tutorial for the installed Flask, unpacked from its sdist."""
    version = importlib.metadata.version("flask")
    download = tmp_path_factory.mktemp("sdist")
    got = run(
        *("-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:"),
        *("-d", str(download), f"flask=={version}"),
        cwd=download,
        timeout=180,
    )
    assert got.returncode == 0, f"pip download flask=={version} failed:\n{got.stderr}"
    (sdist,) = download.glob("flask-*.tar.gz")
    with tarfile.open(sdist) as archive:
        archive.extractall(download, filter="data")
    return download / f"flask-{version}" / "examples" / "tutorial"


def copy(tutorial: Path, to: Path) -> Path:
    shutil.copytree(tutorial, to, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return to


def passed(result: subprocess.CompletedProcess[str]) -> int:
    found = re.search(r"(\d+) passed", result.stdout)
    return int(found.group(1)) if found else 0


def test_flaskr_and_its_tests_pass_under_quart_after_migrate(
    tutorial: Path, tmp_path: Path
) -> None:
    """The original suite passes under Flask; the migrated app and suite import no Flask
    and pass under Quart, the same number of tests; the blocking sqlite3 driver is
    reported with its file and line; a second run changes nothing."""
    original = copy(tutorial, tmp_path / "original")
    before = run("-m", "pytest", "-q", "-p", "no:cacheprovider", "tests", cwd=original)
    assert before.returncode == 0, before.stdout + before.stderr
    assert passed(before) >= 20

    work = copy(tutorial, tmp_path / "migrated")
    done = run("-m", "llmbridge", "migrate", "--write", "flaskr", "tests", cwd=work)
    assert done.returncode == 0, done.stderr
    assert re.search(r"flaskr/db\.py:\d+: sqlite3\.connect\(\) a synchronous database", done.stderr)
    sources = [p.read_text() for p in [*work.glob("flaskr/*.py"), *work.glob("tests/*.py")]]
    assert not any(re.search(r"^\s*(from|import) flask\b", s, re.M) for s in sources)

    after = run("-m", "pytest", "-q", "-p", "no:cacheprovider", "tests", cwd=work)
    assert after.returncode == 0, after.stdout + after.stderr
    assert passed(after) == passed(before)

    again = run("-m", "llmbridge", "migrate", "flaskr", "tests", cwd=work)
    assert (again.returncode, again.stdout) == (0, "")

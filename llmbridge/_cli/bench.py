"""``llmbridge bench NAME [ARGS...]``: run ``benchmarks/NAME.py`` from a clone.

The benchmark runs in a child process (``ARGS`` go to it unchanged) while a progress
line counts its output; its table is printed as it comes, then drawn, one bar chart per
numeric column, into a PNG. The progress bar (tqdm) and the plot (matplotlib) come with
the ``bench`` extra; without it the table is still printed. Benchmarks are not part of
the wheel, so the command works from a clone and says so elsewhere.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import os
import queue
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .main import CommandError, checkout

__all__ = ["HELP", "Table", "add_arguments", "find_tables", "run"]

HELP = "run a benchmark from benchmarks/ (from a clone); table, progress and a PNG plot"

EXTRA = 'pip install -e ".[bench]"'


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's options; everything after ``NAME`` goes to the benchmark."""
    parser.add_argument(
        "name", nargs="?", metavar="NAME", help="a benchmark, e.g. batching (none: list them)"
    )
    parser.add_argument(
        "args", nargs=argparse.REMAINDER, metavar="ARGS", help="passed to the benchmark"
    )
    parser.add_argument(
        "--plot", type=Path, default=None, help="where to write the PNG (default bench-NAME.png)"
    )
    parser.add_argument("--no-plot", action="store_true", help="print the table only")


def benchmarks(root: Path) -> dict[str, str]:
    """Each benchmark's name and the first line of its docstring (read, not imported)."""
    found: dict[str, str] = {}
    for path in sorted((root / "benchmarks").glob("*.py")):
        if path.name.startswith("_"):
            continue
        try:
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        except SyntaxError:
            doc = ""
        if "def main" in path.read_text():
            found[path.stem] = doc.strip().splitlines()[0] if doc.strip() else ""
    return found


@dataclass
class Table:
    """A table found in a benchmark's output: the header cells and the data rows."""

    header: list[str]
    rows: list[list[str]]

    def numeric_columns(self) -> list[int]:
        """Indexes of the columns (after the first) whose every data cell is a number."""
        return [
            i
            for i in range(1, len(self.header))
            if all(_number(row[i]) is not None for row in self.rows)
        ]


_RULE = re.compile(r"^[\s\-=+|:]+$")
_NUMBER = re.compile(r"^[+-]?[0-9][0-9,]*(\.[0-9]+)?([eE][+-]?[0-9]+)?\s*[x%]?$")


def _number(cell: str) -> float | None:
    text = cell.strip()
    if not _NUMBER.match(text):
        return None
    return float(text.rstrip("x% ").replace(",", ""))


def _split_fixed(lines: list[str]) -> list[list[str]]:
    # Columns of fixed-width text: split where every line has a space at that position.
    width = max(len(line) for line in lines)
    padded = [line.ljust(width) for line in lines]
    filled = [any(line[i] != " " for line in padded) for i in range(width)]
    spans: list[tuple[int, int]] = []
    start: int | None = None
    for i, used in enumerate([*filled, False]):
        if used and start is None:
            start = i
        elif not used and start is not None:
            spans.append((start, i))
            start = None
    return [[line[a:b].strip() for a, b in spans] for line in padded]


def _table(block: list[str]) -> Table | None:
    lines = [line.rstrip() for line in block if not _RULE.match(line)]
    if len(lines) < 2:
        return None
    pipes = {line.count("|") for line in lines}
    if len(pipes) == 1 and pipes != {0}:
        cells = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines]
    else:
        # Aligned columns: cells are apart by two spaces or more ("p50 ms" is one cell),
        # else by a position where every line has a space.
        cells = [re.split(r"\s{2,}", line.strip()) for line in lines]
        if len({len(row) for row in cells}) != 1:
            cells = _split_fixed(lines)
    if len({len(row) for row in cells}) != 1 or len(cells[0]) < 2:
        return None
    table = Table(cells[0], cells[1:])
    if all(_number(cell) is not None for cell in table.header[1:]):
        return None  # no header: numbers all the way down
    return table if table.numeric_columns() else None


def find_tables(output: str) -> list[Table]:
    """The tables in ``output``: blocks of lines split into the same number of columns
    (by ``|`` or by aligned spaces) with a header and at least one numeric column."""
    tables: list[Table] = []
    block: list[str] = []
    for line in [*output.splitlines(), ""]:
        if line.strip():
            block.append(line)
            continue
        table = _table(block) if block else None
        if table is not None:
            tables.append(table)
        block = []
    return tables


def plot(tables: list[Table], title: str, path: Path) -> None:
    """One bar chart per numeric column of each table, in a PNG at ``path``.

    Raises ImportError (naming the extra) without matplotlib.
    """
    # Imported by name: optional (the bench extra), so neither mypy nor the other
    # commands depend on it being installed.
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        raise ImportError(f"no plot without matplotlib: {EXTRA}") from None
    matplotlib.use("Agg")  # files only: no display needed
    plt: Any = importlib.import_module("matplotlib.pyplot")

    charts = [(t, i) for t in tables for i in t.numeric_columns()]
    columns = min(3, len(charts))
    rows = -(-len(charts) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(charts) :]:
        ax.set_visible(False)
    for ax, (table, i) in zip(axes.flat, charts, strict=False):
        labels = [row[0] for row in table.rows]
        values = [_number(row[i]) or 0.0 for row in table.rows]
        ax.bar(range(len(values)), values, color="#4a7fd6")
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        title = table.header[i]
        if table.header.count(title) > 1:  # "p50 ms" twice: say which one
            title = f"{title} (next to {table.header[i - 1]})"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(table.header[0], fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _lines(proc: subprocess.Popen[str]) -> Iterator[str | None]:
    """The child's output lines; ``None`` every half second without one (to redraw)."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    while True:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            yield None
            continue
        if line is None:
            return
        yield line


class _Progress:
    """tqdm when the ``bench`` extra is installed, else plain printing."""

    def __init__(self, name: str) -> None:
        try:
            tqdm = importlib.import_module("tqdm").tqdm
        except ImportError:
            self.bar: Any = None
            print(f"llmbridge bench: running {name} ({EXTRA} for a progress bar)", flush=True)
            return
        self.bar = tqdm(desc=f"benchmark {name}", unit=" lines", file=sys.stderr, leave=False)

    def line(self, text: str) -> None:
        if self.bar is None:
            print(text, flush=True)
        else:
            self.bar.write(text, file=sys.stdout)
            self.bar.update(1)

    def tick(self) -> None:
        if self.bar is not None:
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; blocks until it ends. Returns its exit status."""
    root = checkout("benchmarks", what="benchmarks live in benchmarks/")
    known = benchmarks(root)
    if args.name is None:
        print("benchmarks (llmbridge bench NAME [ARGS...]; NAME --help for its options):")
        for name, summary in known.items():
            print(f"  {name:<22} {summary}")
        return 0
    if args.name not in known:
        raise CommandError(f"no benchmark {args.name!r}: choose from {', '.join(known)}")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    script = root / "benchmarks" / f"{args.name}.py"
    proc = subprocess.Popen(
        [sys.executable, str(script), *args.args],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    progress = _Progress(args.name)
    output: list[str] = []
    try:
        for line in _lines(proc):
            if line is None:
                progress.tick()
                continue
            output.append(line)
            progress.line(line)
        status = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(10)
        raise
    finally:
        progress.close()
    if status != 0:
        raise CommandError(f"benchmarks/{args.name}.py exited with status {status}")
    if args.no_plot or "--help" in args.args or "-h" in args.args:
        return 0
    tables = find_tables("\n".join(output))
    if not tables:
        print(f"llmbridge bench: no table in the output of {args.name}: no plot")
        return 0
    path: Path = args.plot or Path(f"bench-{args.name}.png")
    try:
        plot(tables, f"benchmarks/{args.name}.py {' '.join(args.args)}".strip(), path)
    except ImportError as exc:
        print(f"llmbridge bench: {exc}")
        return 0
    print(f"llmbridge bench: wrote {path}")
    return 0

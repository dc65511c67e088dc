"""CPU time and peak memory of a process and its descendants, from ``/proc`` (Linux)."""

from __future__ import annotations

import os
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> list[int]:
    """``pid`` and its live descendants."""
    found = [pid]
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return found
    for task in tasks:
        children = Path(f"/proc/{pid}/task/{task.name}/children")
        try:
            listed = children.read_text().split()
        except FileNotFoundError:
            continue
        for child in listed:
            found += tree(int(child))
    return found


def cpu_seconds(*pids: int) -> float:
    """utime + stime of each of ``pids`` and their live descendants, in seconds."""
    total = 0
    for root in pids:
        for p in tree(root):
            try:
                fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            except FileNotFoundError:
                continue
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


def peak_rss_mb(*pids: int) -> float:
    """The sum of ``VmHWM`` (peak resident set) over the process trees, in MB."""
    kb = 0
    for root in pids:
        for p in tree(root):
            try:
                for line in Path(f"/proc/{p}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        kb += int(line.split()[1])
            except FileNotFoundError:
                continue
    return kb / 1024

"""Where the CPU went during a run: CPU seconds per process group, read from /proc (Linux).

Groups are PostgreSQL's client backends (the statements), the rest of PostgreSQL (the
postmaster and its background processes: autovacuum, WAL writer, checkpointer), the daemons,
the fake provider and the harness itself. Each sample
remembers every process's CPU time so far; a process that exits between two samples loses at
most one sample interval of its CPU, and the daemons' backends live for the whole run.
The machine's own busy share comes from /proc/stat, so idle CPU (waits on locks, fsync,
the network) shows up too.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_ticks(pid: int) -> tuple[int, int] | None:
    """(parent pid, user + system ticks) of a process, None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()  # the name may hold spaces; it ends with ')'
    return int(fields[1]), int(fields[11]) + int(fields[12])


def machine_ticks() -> tuple[int, int]:
    """(busy, total) ticks of all CPUs since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values) - idle, sum(values)


def descendants(root: int) -> list[int]:
    """`root` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (ticks := process_ticks(int(entry.name))) is not None:
            children.setdefault(ticks[0], []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def is_client_backend(pid: int) -> bool:
    """A PostgreSQL server process serving a client connection (its title names the client's
    address), not autovacuum, the WAL writer, the checkpointer or the postmaster."""
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"127.0.0.1(" in title or b"[local]" in title


class CpuMeter:
    """CPU seconds per group since start(); `groups()` gives each group's pids, once a sample."""

    def __init__(self, groups: Callable[[], dict[str, list[int]]]) -> None:
        self.groups = groups
        self.start_ticks: dict[int, int] = {}
        self.last_ticks: dict[str, dict[int, int]] = {}
        self.machine_start = (0, 0)
        self.machine_end = (0, 0)

    def start(self) -> None:
        self.machine_start = machine_ticks()
        self.sample()
        self.start_ticks = {pid: t for ticks in self.last_ticks.values()
                            for pid, t in ticks.items()}

    def sample(self) -> None:
        for name, pids in self.groups().items():
            ticks = self.last_ticks.setdefault(name, {})
            for pid in pids:
                if (read := process_ticks(pid)) is not None:
                    ticks[pid] = read[1]
        self.machine_end = machine_ticks()

    def figures(self) -> dict[str, float]:
        """CPU seconds per group, and the machine's busy share of all its CPUs (0..1)."""
        seconds = {
            name: sum(t - self.start_ticks.get(pid, 0) for pid, t in ticks.items()) / TICK
            for name, ticks in self.last_ticks.items()
        }
        busy = self.machine_end[0] - self.machine_start[0]
        total = self.machine_end[1] - self.machine_start[1]
        return {**{f"{name}_s": round(s, 2) for name, s in seconds.items()},
                "machine_busy": round(busy / total, 3) if total else 0.0}

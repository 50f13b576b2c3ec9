"""The machine and its processes during a benchmark: what it is, what was measured, who used the CPU.

The machine is shared, so every run records the CPU other processes took (``CpuMeter``): a server is
counted whole (its session: the HTTP process and any engine process it started), this process and
its reaped children apart, and the rest is "other load".
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def machine() -> dict[str, Any]:
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    versions = {}
    for dist in ("torch", "transformers", "fastapi", "uvicorn", "httpx", "starlette", "pydantic"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[dist] = importlib.metadata.version(dist)
    return {
        "nproc": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
        "top_processes_at_start": _top_processes(),
    }


def source_state() -> dict[str, Any]:
    """The commit measured, and whether the server's files differ from it (uncommitted work)."""

    def git(*args: str) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=False).stdout.strip()
        return ""

    diff = git("diff", "HEAD", "--", "server")
    return {
        "commit": git("rev-parse", "HEAD"),
        "server_uncommitted": git("status", "--short", "server", "bench").splitlines(),
        "server_diff_sha256": hashlib.sha256(diff.encode()).hexdigest()[:16] if diff else None,
    }


def _top_processes(limit: int = 8) -> list[str]:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["ps", "-eo", "pcpu,comm", "--sort=-pcpu"], capture_output=True, text=True, timeout=10, check=False).stdout
        return [" ".join(line.split()) for line in out.splitlines()[1 : limit + 1]]
    return []


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    return total - idle, total


def _proc_ticks(session: int) -> int:
    """CPU ticks of every process in a server's session: the server and any processes it started.

    Servers start in a session of their own (`start_new_session`), so a server whose engine runs
    in a child process (ours by default) is counted whole; exited children count through their
    parent's cutime/cstime once reaped.
    """
    ticks = 0
    for stat_path in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = stat_path.read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[3]) == session:  # state ppid pgrp session ...
                ticks += sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
    return ticks


@dataclass
class CpuMeter:
    """CPU used during a window: by the machine, by the server process, by this process, by others."""

    server_pid: int | None
    start_wall: float = 0.0
    start_machine: tuple[int, int] = (0, 0)
    start_server: int = 0
    start_self: float = 0.0

    def __enter__(self) -> CpuMeter:
        self.start_wall = time.perf_counter()
        self.start_machine = _machine_ticks()
        self.start_server = _proc_ticks(self.server_pid) if self.server_pid else 0
        self.start_self = _self_cpu()
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def read(self) -> dict[str, float]:
        wall = max(time.perf_counter() - self.start_wall, 1e-9)
        busy, _ = _machine_ticks()
        machine_cores = (busy - self.start_machine[0]) / CLOCK_TICKS / wall
        server = ((_proc_ticks(self.server_pid) - self.start_server) / CLOCK_TICKS / wall) if self.server_pid else 0.0
        mine = (_self_cpu() - self.start_self) / wall
        return {
            "wall_s": wall,
            "machine_busy_cores": machine_cores,
            "server_cores": server,
            "bench_cores": mine,
            "other_cores": max(0.0, machine_cores - server - mine),
            "loadavg_1m": float(Path("/proc/loadavg").read_text().split()[0]),
        }


def _self_cpu() -> float:
    """This process and its reaped children (the in-process workers); running servers are counted by pid."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system

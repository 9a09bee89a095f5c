"""Snapshot what a test may leave behind: child processes, file descriptors, namespaces."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from flatnet.netns import list_namespaces


def descendants(pid: int | None = None) -> set[int]:
    """PIDs of all living descendants of *pid* (default: this process), zombies excluded."""
    root = os.getpid() if pid is None else pid
    parent_of: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        tail = stat.rsplit(")", 1)[1].split()
        if tail[0] == "Z":
            continue
        parent_of[int(entry)] = int(tail[1])
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {p for p, pp in parent_of.items() if pp in frontier and p not in found}
        found |= frontier
    return found


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def describe_fd(fd: int) -> str:
    try:
        return f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}"
    except OSError:
        return f"{fd} (closed)"


@dataclass
class Snapshot:
    processes: set[int]
    fds: set[int]
    namespaces: set[str]

    prefix: str = ""

    @classmethod
    def take(cls, ns_prefix: str = "") -> Snapshot:
        """*ns_prefix*: only namespaces whose names start with it count (others belong to others)."""
        nss = {n for n in list_namespaces() if n.startswith(ns_prefix)}
        return cls(descendants(), open_fds(), nss, ns_prefix)

    def leaks_since(self, before: Snapshot, grace: float = 2.0) -> list[str]:
        """What exists now and did not before; waits up to *grace* s for things to wind down."""
        deadline = time.monotonic() + grace
        while True:
            now = Snapshot.take(self.prefix)
            procs = now.processes - before.processes
            fds = now.fds - before.fds
            nss = now.namespaces - before.namespaces
            if not (procs or fds or nss) or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        problems = []
        for pid in sorted(procs):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                cmd = "?"
            problems.append(f"process {pid} still running: {cmd}")
        problems += [f"file descriptor leaked: {describe_fd(fd)}" for fd in sorted(fds)]
        problems += [f"network namespace left behind: {ns}" for ns in sorted(nss)]
        return problems

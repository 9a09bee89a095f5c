"""What a lab made, on disk, so ``lab status`` and ``lab down`` find it — also after a crash.

``/run/flatnet-lab/<prefix>/`` holds ``lab.json`` (the manifest: namespaces and processes, rewritten
after every step of ``lab up`` so a crash half-way leaves an accurate record), config files, the
admin token and ``logs/``. A process is recorded with its start time (``/proc/<pid>/stat`` field
22) so a recycled PID is never mistaken for ours.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_PREFIX = "fnlab"
STATE_ROOT = Path("/run/flatnet-lab")
MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)
MANIFEST = "lab.json"

# Processes this Python process started, so `lab down` in the same process reaps them (no zombies).
_CHILDREN: dict[int, subprocess.Popen] = {}


@dataclass
class ProcessRecord:
    name: str  # e.g. "gateway", "app:web"
    pid: int
    start_ticks: int
    host: str  # the lab host (namespace) it runs in
    argv: list[str]
    log: str

    def alive(self) -> bool:
        return process_start_ticks(self.pid) == self.start_ticks


@dataclass
class Manifest:
    prefix: str
    namespaces: list[str] = field(default_factory=list)
    processes: list[ProcessRecord] = field(default_factory=list)
    containers: list[dict] = field(default_factory=list)  # {"name", "host", "id", "address"}
    notes: list[str] = field(default_factory=list)  # what was not started, and why
    facts: dict = field(default_factory=dict)  # gateway mode, admin URL, services, URLs to try

    @classmethod
    def from_json(cls, data: dict) -> Manifest:
        procs = [ProcessRecord(**p) for p in data.get("processes", [])]
        return cls(
            prefix=data["prefix"],
            namespaces=list(data.get("namespaces", [])),
            processes=procs,
            containers=list(data.get("containers", [])),
            notes=list(data.get("notes", [])),
            facts=dict(data.get("facts", {})),
        )


class LabState:
    """The state directory of one lab (one prefix)."""

    def __init__(self, prefix: str, root: Path = STATE_ROOT) -> None:
        self.prefix = prefix
        self.dir = root / prefix
        self.logs = self.dir / "logs"

    @property
    def manifest_path(self) -> Path:
        return self.dir / MANIFEST

    def create(self) -> Manifest:
        self.logs.mkdir(parents=True, exist_ok=True)
        # Traversable (the gateway's workers, running as www-data, write routes.json below it); the
        # admin token itself is a 0600 file.
        os.chmod(self.dir, 0o711)
        manifest = Manifest(prefix=self.prefix)
        self.save(manifest)
        return manifest

    def load(self) -> Manifest | None:
        try:
            return Manifest.from_json(json.loads(self.manifest_path.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            return None  # a torn write during a crash: `down` falls back to scanning

    def save(self, manifest: Manifest) -> None:
        tmp = self.manifest_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(manifest), indent=2))
        os.replace(tmp, self.manifest_path)

    def remove(self) -> None:
        if not self.dir.exists():
            return
        # Podman leaves mounts (a container's /dev/shm) in its storage when it could not clean up.
        for mount_point in mounts_under(self.dir):
            _libc.umount2(mount_point.encode(), MNT_DETACH)
        for path in sorted(self.dir.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if path.is_dir() and not path.is_symlink():
                path.rmdir()
            else:
                path.unlink()
        self.dir.rmdir()


def process_start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat, or None if the process is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    tail = stat.rsplit(")", 1)[1].split()
    if tail[0] in ("Z", "X"):
        return None
    return int(tail[19])


def spawn(argv: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """Start a long-running lab process detached from the terminal, output to *log*."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C on `lab up` must not kill the site it built
            env=env,
        )
    _CHILDREN[proc.pid] = proc
    return proc


def terminate(pids: list[int], grace: float = 3.0) -> None:
    """SIGTERM, wait up to *grace* s, then SIGKILL what is left; reap our own children."""
    pids = [p for p in pids if process_start_ticks(p) is not None]
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap()
        if all(process_start_ticks(p) is None for p in pids):
            break
        time.sleep(0.05)
    for pid in pids:
        if process_start_ticks(pid) is not None:
            _signal(pid, signal.SIGKILL)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(process_start_ticks(p) is not None for p in pids):
        _reap()
        time.sleep(0.05)
    _reap()


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _reap() -> None:
    for pid, proc in list(_CHILDREN.items()):
        if proc.poll() is not None:
            del _CHILDREN[pid]


def pids_in_namespace(ns_path: str) -> list[int]:
    """Every process whose network namespace is the one bound at *ns_path* (by nsfs inode)."""
    try:
        st = os.stat(ns_path)
    except OSError:
        return []
    target = (st.st_dev, st.st_ino)
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            pst = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (pst.st_dev, pst.st_ino) == target and process_start_ticks(int(entry)) is not None:
            found.append(int(entry))
    return found


def with_descendants(pids: list[int]) -> list[int]:
    """*pids* and every living descendant of them, parents first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                tail = f.read().decode(errors="replace").rsplit(")", 1)[1].split()
        except OSError:
            continue
        if tail[0] not in ("Z", "X"):
            children.setdefault(int(tail[1]), []).append(int(entry))
    found: list[int] = []
    frontier = list(pids)
    while frontier:
        pid = frontier.pop(0)
        if pid in found:
            continue
        found.append(pid)
        frontier += children.get(pid, [])
    return found


def mounts_under(directory: Path) -> list[str]:
    """Mount points at or below *directory* in this mount namespace, deepest first."""
    root = str(directory.resolve())
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == root or point.startswith(root + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)

"""Start, reload and stop a Linux gateway: nginx in the foreground with its own prefix directory.

``GatewayProcess`` is what ``flatnet gateway run``, the lab and the tests use. nginx runs with
``daemon off`` so its master stays our child (no pid-file games, and the tests' leak check sees
it); *wrap* puts it elsewhere, e.g. ``Namespace.command`` to run it inside a network namespace.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from flatnet.errors import UserError
from flatnet.gateway.config import GatewayConfig
from flatnet.gateway.render import render, write_rendered

Wrap = Callable[[Sequence[str]], list[str]]


def ensure_token_file(path: Path) -> str:
    """Read the admin token, creating a random one (mode 0600) if the file does not exist."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        token = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        return token
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise UserError(f"{path}: admin token file must not be readable by others (mode {mode:o}; chmod 600 it)")
    token = path.read_text().strip()
    if len(token) < 16:
        raise UserError(f"{path}: admin token must be at least 16 characters")
    return token


def read_token_file(path: str | Path) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise UserError(f"{path}: cannot read the admin token: {exc.strerror}") from None
    if not token:
        raise UserError(f"{path}: the admin token file is empty")
    return token


def _die_with_parent() -> None:
    # prctl(PR_SET_PDEATHSIG, SIGTERM): survives exec (nsenter, nginx), so a killed
    # `flatnet gateway run` does not leave an orphaned nginx holding the ports.
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)


class GatewayProcess:
    """One nginx master (and its workers) running a rendered gateway config."""

    def __init__(self, config: GatewayConfig, wrap: Wrap | None = None, extra_http: str = "") -> None:
        self.config = config
        self.paths = config.paths("linux")
        self.wrap = wrap
        self.extra_http = extra_http
        self.proc: subprocess.Popen | None = None
        self._stderr = None

    # -- files --------------------------------------------------------------------------------

    def prepare(self) -> str:
        """Render the config into the prefix dir, create dirs and the token; returns the token."""
        paths = self.paths
        state_dir = Path(paths.state_dir)
        prefix = Path(paths.prefix_dir)
        for d in (state_dir, prefix, Path(paths.logs_dir), Path(paths.tmp_dir)):
            d.mkdir(parents=True, exist_ok=True)
        token = ensure_token_file(Path(paths.token_file))
        write_rendered(render(self.config, "linux", extra_http=self.extra_http), prefix)
        if os.geteuid() == 0:
            # Workers (running as config.user) write routes.json into the state dir.
            try:
                user = pwd.getpwnam(self.config.user)
            except KeyError:
                raise UserError(f"user {self.config.user!r} (gateway.toml key 'user') does not exist") from None
            for p in (state_dir, Path(paths.state_file)):
                if p.exists():
                    os.chown(p, user.pw_uid, user.pw_gid)
        return token

    def argv(self, *extra: str) -> list[str]:
        args = [self.config.nginx, "-p", f"{self.paths.prefix_dir}/", "-c", str(self.paths.conf_file), *extra]
        return self.wrap(args) if self.wrap else args

    def check(self) -> None:
        """``nginx -t`` on the rendered config; raises UserError with nginx's complaint."""
        result = subprocess.run(self.argv("-t", "-q"), capture_output=True, text=True)
        if result.returncode != 0:
            raise UserError(f"nginx rejects the rendered config:\n{result.stderr.strip()}")

    # -- process ------------------------------------------------------------------------------

    def start(self, timeout: float = 10.0, stderr=None, die_with_parent: bool = False) -> None:
        """Start nginx; *die_with_parent*: the kernel sends it SIGTERM if we die (``run``)."""
        self.prepare()
        self.check()
        pid_file = Path(self.paths.pid_file)
        pid_file.unlink(missing_ok=True)
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=stderr if stderr is not None else subprocess.DEVNULL,
                                     preexec_fn=_die_with_parent if die_with_parent else None)
        # The pid file appears after the listening sockets are bound: from then on connections queue.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise UserError(f"nginx exited with status {self.proc.returncode}; see {self.paths.logs_dir}/error.log")
            if self._read_pid() == self.proc.pid and self.worker_pids():
                return
            time.sleep(0.02)
        self.stop()
        raise UserError(f"nginx did not come up within {timeout} s; see {self.paths.logs_dir}/error.log")

    def _read_pid(self) -> int | None:
        try:
            return int(Path(self.paths.pid_file).read_text().strip())
        except (OSError, ValueError):
            return None

    @property
    def master_pid(self) -> int:
        assert self.proc is not None, "gateway not started"
        return self.proc.pid

    def worker_pids(self) -> set[int]:
        """PIDs of the master's worker processes (those still serving, not shutting down)."""
        if self.proc is None:
            return set()
        found = set()
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        except OSError:
            return set()
        for child in children:
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if b"worker process" in cmdline and b"shutting down" not in cmdline:
                found.add(int(child))
        return found

    def reload(self, timeout: float = 10.0) -> None:
        """``nginx -s reload`` (re-render first) and wait for a fresh set of workers."""
        self.prepare()
        self.check()
        old = self.worker_pids()
        subprocess.run(self.argv("-s", "reload"), check=True, capture_output=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = self.worker_pids()
            if now and not (now & old):
                return
            time.sleep(0.02)
        raise UserError("nginx did not replace its workers after reload")

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop (SIGQUIT), then SIGTERM, then SIGKILL. Idempotent."""
        if self.proc is None:
            return
        workers = self.worker_pids()
        proc, self.proc = self.proc, None
        for sig, wait in ((signal.SIGQUIT, timeout), (signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
            if proc.poll() is not None:
                break
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        proc.wait()
        for pid in workers:  # only if the master had to be killed outright
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def __enter__(self) -> GatewayProcess:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

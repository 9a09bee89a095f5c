"""`flatnet gateway run` and `flatnet gateway sync` as the lab and a person use them."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flatnet.gateway.runner import GatewayProcess
from flatnet.testing.leaks import descendants
from flatnet.testing.markers import needs_root, require_tools

from .conftest import (
    APP_A,
    APP_B,
    APP_PORT,
    GATEWAY_LAN,
    GATEWAY_WSL,
    assert_clean_error_log,
    gateway_config,
    request_in,
)

pytestmark = [pytest.mark.slow, needs_root, require_tools("nginx", "nsenter")]


def flatnet(*args: str) -> list[str]:
    return [sys.executable, "-m", "flatnet.cli", *args]


def _worker_pids() -> set[int]:
    """This test's nginx worker processes (also those still shutting down)."""
    pids = set()
    for pid in descendants():
        try:
            if b"nginx: worker process" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.add(pid)
        except OSError:
            pass
    return pids


def test_run_sync_routes_and_stop(hosts, gateway_dir):
    config = gateway_config(gateway_dir, workers=1)
    toml = gateway_dir / "gateway.toml"
    toml.write_text(
        'listen = "0.0.0.0:80"\n'
        f'admin_listen = ["127.0.0.1:8081", "{GATEWAY_WSL}:8081"]\n'
        'admin_allow = ["127.0.0.0/8", "172.20.0.0/24"]\n'
        f'state_dir = "{config.state_dir}"\n'
        "workers = 1\nhealth_interval = 0.5\n"
    )
    run = hosts.win.popen(flatnet("gateway", "run", "--config", str(toml)), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    try:
        token_file = Path(config.paths().token_file)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                if request_in(hosts.lan.name, GATEWAY_LAN, 80, "GET", "/")[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
        assert oct(token_file.stat().st_mode & 0o777) == "0o600"

        routes = gateway_dir / "routes.toml"
        routes.write_text(
            f'[[route]]\nname = "web"\nbackends = ["{APP_A}:{APP_PORT}"]\n\n'
            f'[[route]]\nname = "other"\nbackends = ["{APP_B}:{APP_PORT}"]\nmode = "pass"\n'
        )
        sync = hosts.wsl.run(flatnet("gateway", "sync", str(routes), "--admin", f"http://{GATEWAY_WSL}:8081",
                                     "--token-file", str(token_file)), check=False)
        assert sync.returncode == 0, sync.stderr
        assert "synced 2 route(s)" in sync.stdout
        status, _, body = request_in(hosts.lan.name, GATEWAY_LAN, 80, "GET", "/web/")
        assert status == 200 and b"app-a" in body

        listing = hosts.wsl.run(flatnet("gateway", "routes", "--admin", f"http://{GATEWAY_WSL}:8081",
                                        "--token-file", str(token_file)), check=False)
        assert listing.returncode == 0 and "other" in listing.stdout and "owner=manual" in listing.stdout

        # a broken route file: refused with file and key, nothing sent
        routes.write_text('[[route]]\nname = "web"\nbackends = ["10.87.1"]\n')
        bad = hosts.wsl.run(flatnet("gateway", "sync", str(routes), "--admin", f"http://{GATEWAY_WSL}:8081",
                                    "--token-file", str(token_file)), check=False)
        assert bad.returncode == 1 and f"{routes}: key 'route[0].backends[0]'" in bad.stderr
        assert request_in(hosts.lan.name, GATEWAY_LAN, 80, "GET", "/other/health")[0] == 404  # pass mode: app has no base
        assert request_in(hosts.lan.name, GATEWAY_LAN, 80, "GET", "/web/health")[0] == 200

        # token rotation: a new token in the file + SIGHUP; the old one stops working, routes stay
        old_token = token_file.read_text().strip()
        token_file.write_text("rotated-token-0123456789abcdef\n")
        old_workers = _worker_pids()
        assert old_workers
        run.send_signal(signal.SIGHUP)

        def status_with(token):
            return request_in(hosts.wsl.name, GATEWAY_WSL, 8081, "GET", "/api/v1/routes",
                              headers={"Authorization": f"Bearer {token}"})[0]

        # nginx starts the new workers before it tells the old ones to stop, so for a moment both
        # accept: the rotation has taken effect once every old worker is gone.
        deadline = time.monotonic() + 30
        while old_workers & _worker_pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not old_workers & _worker_pids(), "old nginx workers outlived the reload"
        assert status_with(old_token) == 401 and status_with("rotated-token-0123456789abcdef") == 200
        assert request_in(hosts.lan.name, GATEWAY_LAN, 80, "GET", "/web/health")[0] == 200
    finally:
        run.send_signal(signal.SIGTERM)
        _, err = run.communicate(timeout=20)
    assert run.returncode == 0, err
    nginx = [p for p in descendants() if b"nginx" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert not nginx, "nginx outlived `flatnet gateway run`"
    assert_clean_error_log(config)


def test_run_refuses_a_token_file_others_can_read(gateway_dir):
    config = gateway_config(gateway_dir)
    token = Path(config.paths().token_file)
    token.parent.mkdir(parents=True)
    token.write_text("x" * 32)
    token.chmod(0o644)
    with pytest.raises(Exception, match="chmod 600"):
        GatewayProcess(config).prepare()

"""Routes change under load without a reload; routes outlive reloads and restarts; the index page."""

from __future__ import annotations

import hashlib
import http.client
import re
import shutil
import subprocess
import tempfile
import threading
import time

import pytest

from flatnet.gateway.routes import Route
from flatnet.gateway.runner import GatewayProcess
from flatnet.lab.probe import in_namespace
from flatnet.testing.markers import needs_root, require_tools
from flatnet.testing.webapp import expected_download

from .conftest import APP_A, APP_B, APP_PORT, GATEWAY_LAN

pytestmark = [pytest.mark.slow, needs_root, require_tools("nginx", "nsenter")]

WEB = Route("web", (f"{APP_A}:{APP_PORT}",))


def test_route_changes_need_no_reload_and_keep_a_download_going(site):
    admin = site.admin()
    admin.upsert(WEB)
    master = site.gateway.master_pid
    workers = site.gateway.worker_pids()
    size = 8 * 1024 * 1024
    result: dict = {}

    def download():
        conn = http.client.HTTPConnection(GATEWAY_LAN, 80, timeout=30)
        try:
            # 128 chunks of 64 KiB, 30 ms apart: about 4 s on the wire.
            conn.request("GET", f"/web/download?size={size}&chunk=65536&delay=0.03")
            resp = conn.getresponse()
            digest = hashlib.sha256()
            received = 0
            result["status"] = resp.status
            while chunk := resp.read(65536):
                digest.update(chunk)
                received += len(chunk)
                result["progress"] = received
            result["received"], result["sha256"] = received, digest.hexdigest()
        finally:
            conn.close()

    thread = threading.Thread(target=lambda: in_namespace(site.lan.name, download))
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while result.get("progress", 0) < 256 * 1024 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert result.get("progress", 0) > 0, "download did not start"
        changes = 0
        for i in range(5):
            name = f"new{i}"
            admin.upsert(Route(name, (f"{APP_B}:{APP_PORT}",)))
            status, _, body = site.lan_request("GET", f"/{name}/whoami")  # serves at once
            assert status == 200 and b'"app-b"' in body
            admin.delete(name)
            status, _, _ = site.lan_request("GET", f"/{name}/whoami")
            assert status == 404
            changes += 2
        admin.sync("wsl-a", 1, [Route("synced", (f"{APP_B}:{APP_PORT}",))])
        assert site.lan_request("GET", "/synced/health")[0] == 200
        still_running = "received" not in result
    finally:
        thread.join(30)
    assert still_running, "the download finished before the route changes were done; make it longer"
    assert result["status"] == 200
    assert result["received"] == size
    assert result["sha256"] == hashlib.sha256(expected_download(size)).hexdigest()
    assert site.gateway.master_pid == master and site.gateway.proc.poll() is None
    assert site.gateway.worker_pids() == workers


def test_routes_survive_reload_and_restart(site):
    admin = site.admin()
    admin.upsert(WEB)
    admin.sync("wsl-a", 3, [Route("b", (f"{APP_B}:{APP_PORT}",), port=8001)])
    before = admin.list()

    # `nginx -s reload`, as a person would type it
    old_workers = site.gateway.worker_pids()
    subprocess.run(site.gateway.argv("-s", "reload"), check=True, capture_output=True)
    deadline = time.monotonic() + 10
    while (site.gateway.worker_pids() & old_workers or not site.gateway.worker_pids()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not site.gateway.worker_pids() & old_workers
    assert admin.list() == before
    assert site.lan_request("GET", "/web/health")[0] == 200

    # a full restart: the shared dict is gone, routes.json brings the table back
    site.gateway.stop()
    site.gateway = GatewayProcess(site.config, wrap=site.win.command)
    site.gateway.start()
    assert admin.list() == before
    assert site.lan_request("GET", "/web/health")[0] == 200
    assert site.lan_request("GET", "/health", port=8001)[0] == 200
    # and a stale pusher is still told it is stale
    with pytest.raises(Exception, match="older"):
        admin.sync("wsl-a", 2, [])


@require_tools("chromium")
def test_index_page_in_a_real_browser(site):
    admin = site.admin()
    admin.upsert(WEB)
    admin.upsert(Route("gone", (f"{APP_A}:9",)))
    admin.upsert(Route("pair", (f"{APP_B}:{APP_PORT}", f"{APP_B}:9"), port=8001))
    # wait for the health checker (every 0.5 s here) to have seen every backend
    deadline = time.monotonic() + 10
    while b'data-status="checking"' in site.lan_request("GET", "/")[2] and time.monotonic() < deadline:
        time.sleep(0.1)

    profile = tempfile.mkdtemp(prefix="flatnet-chromium-")
    try:
        argv = site.lan.command([
            "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--dump-dom", f"http://{GATEWAY_LAN}/",
        ])
        done = subprocess.run(argv, capture_output=True, text=True, timeout=90)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    dom = done.stdout
    assert "Flatnet services" in dom, done.stderr[-2000:]
    rows = dict(re.findall(r'<tr class="service" data-service="([a-z0-9-]+)" data-status="(\w+)"', dom))
    assert rows == {"gone": "down", "pair": "up", "web": "up"}
    assert '<a href="/web/">/web/</a>' in dom
    assert f'href="http://{GATEWAY_LAN}:8001/"' in dom
    assert 'href="http://web.flat.lan/"' in dom

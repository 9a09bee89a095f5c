"""`flatnet lab up|status|down` for real: namespaces, nginx, the demo app, a crash and the clean-up.

Each test uses its own prefix under the run's FLATNET_TEST_NS_PREFIX, so the leak check sees the
lab's namespaces and parallel runs do not collide.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from flatnet.cli import main
from flatnet.lab.demo_app import COOKIE_NAME, PAGE_MARKER
from flatnet.lab.gateway import flatnet_gateway_missing
from flatnet.lab.probe import http_get
from flatnet.lab.state import LabState, process_start_ticks, with_descendants
from flatnet.netns import list_namespaces
from flatnet.podman import INDEX_HTML
from flatnet.testing.markers import needs_root, require_tools

pytestmark = [pytest.mark.slow, needs_root, require_tools("nginx", "nft", "nsenter")]

LAN_ADDRESS = "192.168.77.1"


def lab_prefix(suffix: str) -> str:
    return f"{os.environ['FLATNET_TEST_NS_PREFIX']}-{suffix}"


def lab_namespaces(prefix: str) -> list[str]:
    return [n for n in list_namespaces() if n.startswith(prefix + "-")]


@pytest.fixture
def lab():
    """A lab prefix whose lab is taken down at teardown whatever the test did."""
    prefix = lab_prefix("lab")
    yield prefix
    main(["lab", "down", "--prefix", prefix])


def assert_gone(prefix: str, pids: list[tuple[int, int]]) -> None:
    assert lab_namespaces(prefix) == []
    assert not LabState(prefix).dir.exists()
    alive = [pid for pid, ticks in pids if process_start_ticks(pid) == ticks]
    assert alive == [], f"lab processes still running: {alive}"


def recorded_pids(prefix: str) -> list[tuple[int, int]]:
    manifest = LabState(prefix).load()
    assert manifest is not None
    return [(p.pid, p.start_ticks) for p in manifest.processes]


def services(prefix: str) -> dict[str, dict]:
    manifest = LabState(prefix).load()
    assert manifest is not None
    return {s["name"]: s for s in manifest.facts["services"]}


def assert_demo_app_redirect_and_cookie_work_from_the_lan(prefix: str, name: str) -> None:
    """The app's redirect to "/welcome" comes back under the service prefix, and its cookie works."""
    page = http_get(f"{prefix}-lan", LAN_ADDRESS, 80, f"/{name}/")
    assert page.status == 200
    assert f"{PAGE_MARKER}: {name}" in page.body
    login = http_get(f"{prefix}-lan", LAN_ADDRESS, 80, f"/{name}/login")
    assert login.status in (301, 302)
    assert login.header("location").endswith(f"/{name}/welcome")
    cookie = login.header("set-cookie").split(";")[0]
    assert cookie.startswith(f"{COOKIE_NAME}=")
    welcome = http_get(f"{prefix}-lan", LAN_ADDRESS, 80, f"/{name}/welcome", headers={"Cookie": cookie})
    assert "arrived" in welcome.body and f"hello-from-{name}" in welcome.body


def test_up_serves_the_apps_to_the_lan_through_the_gateway_and_down_leaves_nothing(lab, capfd):
    """The README's main command: whatever of Flatnet is available, /web/ answers on the LAN."""
    assert main(["lab", "up", "--prefix", lab]) == 0
    printed = capfd.readouterr().out
    assert f"nsenter --net=/run/netns/{lab}-lan curl http://{LAN_ADDRESS}/web/" in printed
    assert sorted(lab_namespaces(lab)) == sorted(f"{lab}-{h}" for h in ("lan", "win", "wsl1", "wsl2"))

    found = services(lab)
    web = http_get(f"{lab}-lan", LAN_ADDRESS, 80, "/web/")
    assert web.status == 200
    if found["web"]["kind"] == "podman-httpd":
        # A real container on --network flatnet in wsl1, its route pushed by wsl1's flatnet-node.
        assert INDEX_HTML.strip() in web.body
        assert found["web"]["backend"].startswith("10.87.1.")
        assert found["web"]["pushed_by"] == "node"
        assert_demo_app_redirect_and_cookie_work_from_the_lan(lab, "demo")
        capfd.readouterr()
        assert main(["lab", "exec", "--prefix", lab, "wsl1", "--", "podman", "ps", "--format", "{{.Names}}"]) == 0
        assert capfd.readouterr().out.split() == ["web"]  # wsl1's own Podman, reached through `lab exec`
    else:
        assert "Podman containers on --network flatnet: not started" in printed
        assert_demo_app_redirect_and_cookie_work_from_the_lan(lab, "web")

    # The LAN PC has no route into the Windows host's WSL side, and the apps are not on the LAN.
    with pytest.raises(OSError):
        http_get(f"{lab}-lan", found["web"]["backend"].split(":")[0], 80, "/", timeout=1)

    assert main(["lab", "status", "--prefix", lab]) == 0
    status = capfd.readouterr().out
    assert "alive" in status and "DEAD" not in status and "FAIL" not in status

    tunnel = LabState(lab).load().facts.get("tunnel", [])
    if tunnel == ["wsl1", "wsl2"]:  # the nodes got certificates: the printed ping must work
        assert "ping -c 3 10.87.2.1" in printed
        ping = subprocess.run(["nsenter", f"--net=/run/netns/{lab}-wsl1", "ping", "-c", "2", "-W", "2", "10.87.2.1"],
                              capture_output=True, text=True)
        assert ping.returncode == 0, ping.stdout + ping.stderr

    pids = recorded_pids(lab)
    assert main(["lab", "down", "--prefix", lab]) == 0
    assert_gone(lab, pids)
    assert main(["lab", "down", "--prefix", lab]) == 0  # idempotent
    assert main(["lab", "status", "--prefix", lab]) == 3


def test_static_stand_in_gateway_serves_the_demo_app(lab, capsys):
    assert main(["lab", "up", "--prefix", lab, "--gateway", "static", "--no-containers"]) == 0
    assert "plain nginx with static routes stands in" in capsys.readouterr().out
    assert_demo_app_redirect_and_cookie_work_from_the_lan(lab, "web")
    pids = recorded_pids(lab)
    assert main(["lab", "down", "--prefix", lab]) == 0
    assert_gone(lab, pids)


def test_wsl_traffic_to_the_lan_is_masqueraded_by_the_windows_host(lab, capsys):
    """Windows' NAT: a WSL2 VM reaching the LAN shows up with the Windows host's LAN address."""
    assert main(["lab", "up", "--prefix", lab, "--no-containers"]) == 0
    capsys.readouterr()
    server = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{lab}-lan", sys.executable, "-m", "flatnet.lab.demo_app",
         "--listen", "192.168.77.10", "--port", "8090", "--name", "pc"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                page = http_get(f"{lab}-wsl1", "192.168.77.10", 8090, "/", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        assert f"to {LAN_ADDRESS}." in page.body  # the PC saw the Windows host, not 172.24.1.2
    finally:
        server.terminate()
        server.wait()


def test_down_cleans_up_after_lab_up_was_killed_half_way(lab):
    """SIGKILL `lab up` once it has made namespaces and started a process; `down` removes it all."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "flatnet.cli", "lab", "up", "--prefix", lab],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    state = LabState(lab)
    deadline = time.monotonic() + 30
    while True:
        manifest = state.load()
        if manifest and manifest.processes:
            break
        assert proc.poll() is None, "lab up ended before it could be killed"
        assert time.monotonic() < deadline, "lab up never started a process"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    pids = recorded_pids(lab)
    assert lab_namespaces(lab)
    assert main(["lab", "down", "--prefix", lab]) == 0
    assert_gone(lab, pids)


def test_down_with_a_torn_manifest_removes_containers_and_orphans(lab, capsys):
    """A crash that tore the manifest and orphaned nginx (the gateway's supervising process killed,
    master and workers left running): containers are found through the Podman environments in the
    state dir, the orphans by scanning each namespace's processes."""
    assert main(["lab", "up", "--prefix", lab]) == 0
    capsys.readouterr()
    pids = recorded_pids(lab)
    gateway = next(p for p in LabState(lab).load().processes if p.name == "gateway")
    in_ns = _pids_in(f"{lab}-win")
    assert gateway.pid in in_ns and len(in_ns) >= 2  # the gateway, nginx master and worker(s)
    container_pids = [pid for host in ("wsl1", "wsl2") for pid in with_descendants(_pids_in(f"{lab}-{host}"))]
    os.kill(gateway.pid, signal.SIGKILL)
    LabState(lab).manifest_path.write_text("{ torn")
    orphans = [(pid, process_start_ticks(pid)) for pid in in_ns + container_pids if pid != gateway.pid]
    assert main(["lab", "down", "--prefix", lab]) == 0
    assert_gone(lab, pids + [o for o in orphans if o[1] is not None])


def test_down_after_the_state_dir_is_lost_kills_what_runs_in_the_namespaces(lab, capsys):
    assert main(["lab", "up", "--prefix", lab, "--no-containers"]) == 0
    capsys.readouterr()
    pids = recorded_pids(lab)
    inside = [(pid, process_start_ticks(pid)) for host in ("win", "wsl1") for pid in _pids_in(f"{lab}-{host}")]
    assert len(inside) >= 3  # the gateway (and its nginx) and the demo app
    LabState(lab).remove()
    assert main(["lab", "down", "--prefix", lab]) == 0
    assert_gone(lab, pids + [i for i in inside if i[1] is not None])


@pytest.mark.skipif(flatnet_gateway_missing() is not None, reason=f"{flatnet_gateway_missing()}")
def test_flatnet_gateway_with_routes_pushed_from_a_wsl_host(lab, capsys):
    assert main(["lab", "up", "--prefix", lab, "--gateway", "flatnet", "--no-containers"]) == 0
    printed = capsys.readouterr().out
    assert "gateway (flatnet)" in printed
    page = http_get(f"{lab}-lan", LAN_ADDRESS, 80, "/web/")
    assert page.status == 200 and PAGE_MARKER in page.body
    index = http_get(f"{lab}-lan", LAN_ADDRESS, 80, "/")
    assert "web" in index.body
    # The admin API is not reachable from the LAN.
    with pytest.raises(OSError):
        http_get(f"{lab}-lan", LAN_ADDRESS, 8081, "/", timeout=1)
    assert main(["lab", "status", "--prefix", lab]) == 0
    assert "/web/ -> 10.87.1.200:8080" in capsys.readouterr().out


@require_tools("chromium")
def test_up_with_browser_loads_the_app_in_headless_chromium(lab, capsys):
    assert main(["lab", "up", "--prefix", lab, "--browser", "--no-containers"]) == 0
    assert "Checked with headless Chromium in lan: ok" in capsys.readouterr().out


def _pids_in(ns_name: str) -> list[int]:
    from flatnet.lab.state import pids_in_namespace

    return pids_in_namespace(f"/run/netns/{ns_name}")


def test_up_degrades_honestly_when_parts_fail(lab, capsys, monkeypatch):
    """Flatnet's gateway exits at once and the container cannot start: the lab still serves /web/
    (static nginx, demo app) and says what stands in for what, and why."""
    from flatnet.lab import gateway as lab_gateway
    from flatnet.lab import site
    from flatnet.lab.wsl import stack_missing

    if flatnet_gateway_missing() is not None:
        pytest.skip("Flatnet's gateway is not there to fail")
    real_launch = lab_gateway.flatnet_launch

    def broken_launch(*args, **kwargs):
        launch = real_launch(*args, **kwargs)
        return lab_gateway.GatewayLaunch("flatnet", [sys.executable, "-c", "raise SystemExit('gateway broken')"],
                                         launch.admin_urls, launch.files)

    def broken_container(self, manifest, service):
        raise site.UserError("simulated: podman run failed")

    monkeypatch.setattr(lab_gateway, "flatnet_launch", broken_launch)
    monkeypatch.setattr(site.Lab, "_start_container", broken_container)
    assert main(["lab", "up", "--prefix", lab]) == 0
    printed = capsys.readouterr().out
    assert "Flatnet gateway: not started (the Flatnet gateway did not come up: the gateway exited" in printed
    assert "plain nginx with static routes stands in" in printed
    if stack_missing() is None:
        assert "container web on wsl1: failed (simulated: podman run failed); the demo app stands in" in printed
    assert_demo_app_redirect_and_cookie_work_from_the_lan(lab, "web")
    pids = recorded_pids(lab)
    assert main(["lab", "down", "--prefix", lab]) == 0
    assert_gone(lab, pids)

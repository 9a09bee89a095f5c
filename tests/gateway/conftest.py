"""A small site in namespaces for the gateway's end-to-end tests.

    lan  192.168.50.10 ──── 192.168.50.1  win (the gateway: public :80, dedicated :8001/:8002)
                            172.20.0.1    win (admin API here and on 127.0.0.1:8081)
                               │
                            172.20.0.2    wsl  (10.87.1.2-4 on lo: web apps on :8080, .4 under /based/)

"win" routes 10.87.0.0/16 via the WSL host, as the Windows host does in WSL2 NAT mode.
"""

from __future__ import annotations

import http.client
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from flatnet.config import from_dict
from flatnet.gateway.admin import AdminClient
from flatnet.gateway.config import GatewayConfig
from flatnet.gateway.runner import GatewayProcess
from flatnet.lab.probe import in_namespace
from flatnet.netns import Namespace, veth

GATEWAY_LAN = "192.168.50.1"
LAN_CLIENT = "192.168.50.10"
GATEWAY_WSL = "172.20.0.1"
WSL_HOST = "172.20.0.2"
APP_A = "10.87.1.2"
APP_B = "10.87.1.3"
APP_BASED = "10.87.1.4"  # serves under /based/ (for "pass" mode)
APP_PORT = 8080
DEDICATED_PORTS = [8001, 8002]
DOMAIN = "flat.lan"


@dataclass
class Site:
    lan: Namespace
    win: Namespace
    wsl: Namespace
    gateway: GatewayProcess
    config: GatewayConfig
    token: str
    tmp: Path

    def admin(self, token: str | None = None) -> NsAdmin:
        """An admin client that talks from the WSL host, as flatnet-node does."""
        return NsAdmin(self.wsl.name, f"http://{GATEWAY_WSL}:8081", token or self.token)

    def lan_request(self, method: str, path: str, *, port: int = 80, host: str | None = None,
                    headers: dict | None = None, body=None, timeout: float = 10.0):
        """(status, headers (lower-case, list values), body bytes) of one request from the LAN client."""
        return request_in(self.lan.name, GATEWAY_LAN, port, method, path, host=host, headers=headers,
                          body=body, timeout=timeout)


class NsAdmin:
    """AdminClient whose calls run inside a namespace."""

    def __init__(self, ns_name: str, url: str, token: str) -> None:
        self.ns_name = ns_name
        self.client = AdminClient(url, token)

    def __getattr__(self, name):
        method = getattr(self.client, name)
        return lambda *a, **kw: in_namespace(self.ns_name, lambda: method(*a, **kw))


def request_in(ns_name, address, port, method, path, *, host=None, headers=None, body=None, timeout=10.0):
    def go():
        conn = http.client.HTTPConnection(address, port, timeout=timeout)
        try:
            hdrs = dict(headers or {})
            if host:
                hdrs["Host"] = host
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            data = resp.read()
            merged: dict[str, list[str]] = {}
            for k, v in resp.getheaders():
                merged.setdefault(k.lower(), []).append(v)
            return resp.status, merged, data
        finally:
            conn.close()

    return in_namespace(ns_name, go)


def wait_listening(ns_name: str, address: str, port: int, timeout: float = 10.0) -> None:
    def probe() -> bool:
        try:
            socket.create_connection((address, port), timeout=0.5).close()
            return True
        except OSError:
            return False

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if in_namespace(ns_name, probe):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {address}:{port} in {ns_name}")


def build_site_namespaces(netns_factory):
    lan, win, wsl = netns_factory("lan"), netns_factory("win"), netns_factory("wsl")
    veth(lan, "eth0", win, "lan0")
    lan.add_address("eth0", f"{LAN_CLIENT}/24")
    win.add_address("lan0", f"{GATEWAY_LAN}/24")
    veth(win, "wsl0", wsl, "eth0")
    win.add_address("wsl0", f"{GATEWAY_WSL}/24")
    wsl.add_address("eth0", f"{WSL_HOST}/24")
    wsl.add_address("lo", f"{APP_A}/32")
    wsl.add_address("lo", f"{APP_B}/32")
    wsl.add_address("lo", f"{APP_BASED}/32")
    win.add_route("10.87.0.0/16", gateway=WSL_HOST)
    wsl.add_route("0.0.0.0/0", gateway=GATEWAY_WSL)
    return lan, win, wsl


def gateway_config(tmp: Path, **overrides) -> GatewayConfig:
    raw = {
        "listen": "0.0.0.0:80",
        "admin_listen": ["127.0.0.1:8081", f"{GATEWAY_WSL}:8081"],
        "admin_allow": ["127.0.0.0/8", "172.20.0.0/24"],
        "domain": DOMAIN,
        "state_dir": str(tmp / "state"),
        "dedicated_ports": DEDICATED_PORTS,
        "workers": 2,
        "health_interval": 0.5,
        "connect_timeout": 2.0,
    }
    raw.update(overrides)
    return from_dict(raw, GatewayConfig, source="<test gateway.toml>")


@pytest.fixture
def gateway_dir():
    """A directory nginx workers (www-data) can reach: pytest's tmp_path sits under a 0700 dir."""
    path = Path(tempfile.mkdtemp(prefix="flatnet-gw-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class Hosts:
    lan: Namespace
    win: Namespace
    wsl: Namespace


@pytest.fixture
def hosts(netns_factory):
    """The three namespaces with the web apps running in "wsl" (no gateway yet)."""
    lan, win, wsl = build_site_namespaces(netns_factory)
    apps = []
    try:
        for name, address, base in (("app-a", APP_A, ""), ("app-b", APP_B, ""), ("app-based", APP_BASED, "/based")):
            apps.append(wsl.popen([sys.executable, "-m", "flatnet.testing.webapp", "--listen",
                                   f"{address}:{APP_PORT}", "--name", name, "--base-path", base],
                                  stdout=subprocess.DEVNULL, stderr=None))
        for address in (APP_A, APP_B, APP_BASED):
            wait_listening(wsl.name, address, APP_PORT)
        yield Hosts(lan, win, wsl)
    finally:
        for app in apps:
            app.terminate()
        for app in apps:
            app.wait(10)


def assert_clean_error_log(config: GatewayConfig) -> None:
    log = Path(config.paths().logs_dir) / "error.log"
    bad = [line for line in log.read_text().splitlines()
           if "lua entry thread aborted" in line or "[alert]" in line or "[emerg]" in line]
    assert not bad, "nginx logged Lua/fatal errors:\n" + "\n".join(bad[:10])


@pytest.fixture
def site(hosts, gateway_dir):
    config = gateway_config(gateway_dir)
    site = Site(hosts.lan, hosts.win, hosts.wsl, GatewayProcess(config, wrap=hosts.win.command), config, "",
                gateway_dir)
    try:
        with open(gateway_dir / "nginx.stderr", "wb") as errlog:
            site.gateway.start(stderr=errlog)
        site.token = Path(config.paths().token_file).read_text().strip()
        yield site
    finally:
        site.gateway.stop()  # the test may have replaced it (restart)
    assert_clean_error_log(config)

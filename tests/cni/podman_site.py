"""An office in namespaces with real Podman: LAN client, Windows host (gateway), WSL2 host (node).

    lan  192.168.50.10 ── 192.168.50.1  win  nginx gateway (:80; admin API on 172.20.0.1:8081)
                          172.20.0.1    win  routes 10.87.0.0/16 via the WSL host (WSL2 NAT mode)
                             │
                          172.20.0.2    wsl  flatnet-node + Podman (CNI backend, flatnet plugin)
                                             containers 10.87.1.x on veths, default via 172.20.0.1

Used by the end-to-end tests and by ``bench/route_propagation``.
"""

from __future__ import annotations

import http.client
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flatnet.config import from_dict
from flatnet.gateway.admin import AdminClient
from flatnet.gateway.config import GatewayConfig
from flatnet.gateway.runner import GatewayProcess
from flatnet.lab.probe import in_namespace
from flatnet.netns import Namespace, veth
from flatnet.podman import PodmanEnv
from tests.cni.harness import CniHost

GATEWAY_LAN = "192.168.50.1"
LAN_CLIENT = "192.168.50.10"
GATEWAY_WSL = "172.20.0.1"
WSL_HOST = "172.20.0.2"


@dataclass
class PodmanSite:
    lan: Namespace
    win: Namespace
    wsl: Namespace
    host: CniHost
    podman: PodmanEnv
    gateway: GatewayProcess
    token: str
    token_file: Path
    tmp: Path

    def run(self, *args: str, check: bool = True):
        return self.podman.podman(list(args), netns=self.wsl.name, check=check)

    def admin_routes(self) -> dict:
        client = AdminClient(f"http://{GATEWAY_WSL}:8081", self.token)
        return {r.name: r for r in in_namespace(self.wsl.name, client.list).routes}

    def lan_get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        def go():
            conn = http.client.HTTPConnection(GATEWAY_LAN, 80, timeout=timeout)
            try:
                conn.request("GET", path)
                resp = conn.getresponse()
                return resp.status, resp.read()
            finally:
                conn.close()

        return in_namespace(self.lan.name, go)

    def wsl_get(self, address: str, port: int = 80, path: str = "/") -> tuple[int, bytes]:
        def go():
            conn = http.client.HTTPConnection(address, port, timeout=5)
            try:
                conn.request("GET", path)
                resp = conn.getresponse()
                return resp.status, resp.read()
            finally:
                conn.close()

        return in_namespace(self.wsl.name, go)

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.02)
        raise TimeoutError(f"timed out waiting for {what}")

    def lan_status(self, path: str) -> int:
        try:
            return self.lan_get(path, timeout=2)[0]
        except OSError:
            return 0


def build(make_ns: Callable[[str], Namespace], plugin_wrapper: Callable[[Path], None] | None = None):
    """Context-manager-like generator: yields a running site, tears everything down after."""
    tmp = Path(tempfile.mkdtemp(prefix="flatnet-cni-site-"))
    tmp.chmod(0o755)  # nginx workers (www-data) read the gateway's prefix dir
    lan, win, wsl = make_ns("lan"), make_ns("win"), make_ns("wsl")
    veth(lan, "eth0", win, "lan0")
    lan.add_address("eth0", f"{LAN_CLIENT}/24")
    win.add_address("lan0", f"{GATEWAY_LAN}/24")
    veth(win, "wsl0", wsl, "eth0")
    win.add_address("wsl0", f"{GATEWAY_WSL}/24")
    wsl.add_address("eth0", f"{WSL_HOST}/24")
    win.add_route("10.87.0.0/16", gateway=WSL_HOST)
    wsl.add_route("0.0.0.0/0", gateway=GATEWAY_WSL)
    wsl.set_sysctl("net/ipv4/ip_forward", "1")
    config = from_dict({
        "listen": "0.0.0.0:80",
        "admin_listen": ["127.0.0.1:8081", f"{GATEWAY_WSL}:8081"],
        "admin_allow": ["127.0.0.0/8", "172.20.0.0/24"],
        "state_dir": str(tmp / "gateway"),
        "workers": 1,
        "health_interval": 0.5,
        "connect_timeout": 2.0,
    }, GatewayConfig, source="<test gateway.toml>")
    gateway = GatewayProcess(config, wrap=win.command)
    errlog = open(tmp / "nginx.stderr", "wb")  # noqa: SIM115 - closed below
    host = CniHost.create(wsl, tmp / "cni")
    if plugin_wrapper is not None:
        plugin_wrapper(host.plugin)
    podman = PodmanEnv.create(tmp / "podman", [host.plugin.parent])
    shutil.copy(host.base / "net.d" / "flatnet.conflist", podman.network_config_dir / "flatnet.conflist")
    try:
        gateway.start(stderr=errlog)
        token = Path(config.paths().token_file).read_text().strip()
        podman.ensure_image()
        host.start_node(gateway_url=f"http://{GATEWAY_WSL}:8081", token_file=Path(config.paths().token_file))
        yield PodmanSite(lan, win, wsl, host, podman, gateway, token, Path(config.paths().token_file), tmp)
    finally:
        try:
            podman.podman(["rm", "--all", "--force", "--time", "0"], netns=wsl.name, check=False)
        finally:
            host.stop_node()
            gateway.stop()
            errlog.close()
            shutil.rmtree(tmp, ignore_errors=True)

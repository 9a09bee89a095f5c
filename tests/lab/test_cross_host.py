"""Acceptance: containers on two WSL2 hosts reach each other by Flatnet IP, for real.

The lab (``flatnet lab up``) gives two WSL2-host namespaces, each running ``flatnet-node`` with
the tunnel and a private Podman with the ``flatnet`` CNI network; the Windows host's gateway
reaches wsl2's containers through wsl1's tunnel (topology ``served_through``). Here: a busybox
container on each host; ping both ways; 100 MB over TCP with matching SHA-256 (busybox ``nc``,
the receiver's ``sha256sum`` answering on the same connection); a container on wsl2 published
through the gateway and fetched from the LAN, the gateway's packets entering wsl1.

The same scenario in memory: tests/node/test_cross_host.py.
"""

from __future__ import annotations

import os
import re
import time

import pytest

from flatnet.cli import main
from flatnet.lab import wsl
from flatnet.lab.probe import try_http_get
from flatnet.lab.state import LabState
from flatnet.lab.topology import OFFICE
from flatnet.podman import INDEX_HTML
from flatnet.testing.markers import needs_root, require_tools

pytestmark = [pytest.mark.slow, needs_root, require_tools("nginx", "nft", "nsenter", "podman")]

LAN_ADDRESS = "192.168.77.1"
TRANSFER_MB = 100


class Site:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.state = LabState(prefix)

    def ns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def stack(self, host: str) -> wsl.WslStack:
        return wsl.WslStack(self.state.dir, OFFICE, host)

    def podman(self, host: str, args: list[str], timeout: float = 120, check: bool = True):
        return self.stack(host).podman().podman(args, netns=self.ns(host), timeout=timeout, check=check)

    def run_container(self, host: str, name: str, command: list[str], labels: dict[str, str] | None = None) -> str:
        label_args = [a for k, v in (labels or {}).items() for a in ("--label", f"{k}={v}")]
        self.podman(host, ["run", "-d", "--network", "flatnet", "--name", name, *label_args,
                           "localhost/flatnet-busybox", *command])  # fmt: skip
        inspect = self.podman(host, ["inspect", name, "--format", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}"])
        return inspect.stdout.strip()

    def exec(self, host: str, container: str, script: str, timeout: float = 120, detach: bool = False):
        return self.podman(host, ["exec", *(["-d"] if detach else []), container, "busybox", "sh", "-c", script],
                           timeout=timeout, check=False)  # fmt: skip

    def peer(self, host: str, peer_ip: str) -> dict:
        found = [p for p in wsl.tunnel_peers(self.stack(host).control_socket) if p["ip"] == peer_ip]
        assert found, f"{host}'s node does not list {peer_ip}"
        return found[0]


@pytest.fixture(scope="module")
def site():
    prefix = f"{os.environ['FLATNET_TEST_NS_PREFIX']}-xh"
    try:
        assert main(["lab", "up", "--prefix", prefix]) == 0
        manifest = LabState(prefix).load()
        assert manifest is not None
        assert sorted(manifest.facts.get("tunnel", [])) == ["wsl1", "wsl2"], manifest.notes
        assert manifest.facts.get("served_through") == {"wsl2": "wsl1"}, manifest.notes
        s = Site(prefix)
        s.a_ip = s.run_container("wsl1", "xa", ["sleep", "3600"])
        s.b_ip = s.run_container("wsl2", "xb", ["sleep", "3600"])
        yield s
    finally:
        main(["lab", "down", "--prefix", prefix])


def _received(ping_output: str) -> int:
    match = re.search(r"(\d+) packets received", ping_output)
    return int(match.group(1)) if match else 0


def test_containers_on_two_hosts_ping_each_other_by_flatnet_ip(site):
    assert site.a_ip.startswith("10.87.1.") and site.b_ip.startswith("10.87.2.")
    there = site.exec("wsl1", "xa", f"busybox ping -c 3 -W 2 {site.b_ip}", timeout=30)
    back = site.exec("wsl2", "xb", f"busybox ping -c 3 -W 2 {site.a_ip}", timeout=30)
    assert there.returncode == 0 and _received(there.stdout) >= 2, there.stdout + there.stderr
    assert back.returncode == 0 and _received(back.stdout) >= 2, back.stdout + back.stderr
    # Two container hops and the tunnel: TTL 64 - 2 (wsl1 and wsl2 route it).
    assert "ttl=62" in there.stdout


def _transfer(site: Site, sender: tuple[str, str], receiver: tuple[str, str], receiver_ip: str, megabytes: int,
              port: int) -> tuple[str, str]:
    """*megabytes* of random data from container to container over TCP; (sent SHA-256, received SHA-256)."""
    made = site.exec(*sender, f"busybox dd if=/dev/urandom of=/tmp/blob bs=1048576 count={megabytes} 2>/dev/null "
                              "&& busybox sha256sum /tmp/blob")  # fmt: skip
    assert made.returncode == 0, made.stderr
    sent = made.stdout.split()[0]
    # The receiver hashes what arrives and writes the hash back on the same connection.
    listening = site.exec(*receiver, f"busybox nc -l -p {port} -e busybox sha256sum", detach=True)
    assert listening.returncode == 0, listening.stderr
    script = (f"for i in $(busybox seq 50); do busybox nc {receiver_ip} {port} < /tmp/blob && exit 0; "
              "busybox sleep 0.2; done; exit 1")  # fmt: skip
    started = time.monotonic()
    result = site.exec(*sender, script, timeout=300)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    received = result.stdout.split()[0] if result.stdout.split() else ""
    print(f"{megabytes} MB {sender[0]} -> {receiver[0]}: {elapsed:.1f} s ({megabytes * 8 / elapsed:.0f} Mbit/s)")
    return sent, received


def test_100_mb_over_tcp_between_containers_on_two_hosts_arrive_intact(site):
    before = site.peer("wsl1", "10.87.2.1")
    sent, received = _transfer(site, ("wsl1", "xa"), ("wsl2", "xb"), site.b_ip, TRANSFER_MB, 5001)
    assert re.fullmatch(r"[0-9a-f]{64}", sent)
    assert received == sent
    after = site.peer("wsl1", "10.87.2.1")
    assert after["tx_bytes"] - before["tx_bytes"] >= TRANSFER_MB * 1024 * 1024  # it went through the tunnel
    # And the other way, smaller.
    sent, received = _transfer(site, ("wsl2", "xb"), ("wsl1", "xa"), site.a_ip, 10, 5002)
    assert received == sent


def test_the_gateway_serves_a_container_on_host_b_through_host_a(site):
    far_ip = site.run_container("wsl2", "far", ["httpd", "-f", "-p", "80", "-h", "/www"], {"flatnet.port": "80"})
    assert far_ip.startswith("10.87.2.")
    before_a, before_b = site.peer("wsl1", "10.87.2.1"), site.peer("wsl2", "10.87.1.1")
    # wsl2's node pushes /far/ to the gateway; the LAN PC asks the gateway on the Windows host.
    deadline = time.monotonic() + 20
    while True:
        answer = try_http_get(site.ns("lan"), LAN_ADDRESS, 80, "/far/", 2.0)
        if not isinstance(answer, str) and answer.status == 200:
            break
        assert time.monotonic() < deadline, f"/far/ never answered through the gateway: {answer}"
        time.sleep(0.2)
    assert INDEX_HTML.strip() in answer.body
    # The Windows host has no route of its own to wsl2's containers but through wsl1 ...
    from pyroute2 import NetNS

    with NetNS(site.ns("win")) as ip:
        route = ip.route("get", dst=far_ip)[0]
    assert route.get_attr("RTA_GATEWAY") == site.stack("wsl1").underlay_address()
    # ... whose node carried the request to wsl2 and the page back (masqueraded to 10.87.1.1).
    after_a, after_b = site.peer("wsl1", "10.87.2.1"), site.peer("wsl2", "10.87.1.1")
    assert after_a["tx_bytes"] > before_a["tx_bytes"] and after_a["rx_bytes"] - before_a["rx_bytes"] > len(INDEX_HTML)
    assert after_b["rx_bytes"] > before_b["rx_bytes"]

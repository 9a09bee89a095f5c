"""Network namespaces, veth pairs, addresses and routes through netlink (pyroute2).

Used by the lab and by the tests to build simulated hosts on one machine. Processes run inside a
namespace through ``nsenter --net=/run/netns/<name>``: unlike ``ip netns exec`` it does not
remount /sys, which Podman's cgroup handling needs.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from pyroute2 import IPRoute, NetNS, netns

NETNS_DIR = "/run/netns"


def list_namespaces() -> list[str]:
    return sorted(netns.listnetns())


@dataclass(frozen=True)
class Namespace:
    """A named network namespace (``/run/netns/<name>``)."""

    name: str

    @property
    def path(self) -> str:
        return os.path.join(NETNS_DIR, self.name)

    @classmethod
    def create(cls, name: str) -> Namespace:
        if name in netns.listnetns():
            raise FileExistsError(f"network namespace {name} already exists")
        netns.create(name)
        ns = cls(name)
        ns.link_up("lo")
        return ns

    def remove(self) -> None:
        """Remove the namespace; its veths go with it. Idempotent."""
        if self.name in netns.listnetns():
            netns.remove(self.name)

    def exists(self) -> bool:
        return self.name in netns.listnetns()

    def ipr(self) -> NetNS:
        return NetNS(self.name)

    def command(self, argv: Sequence[str]) -> list[str]:
        """argv wrapped to run inside this namespace."""
        return ["nsenter", f"--net={self.path}", "--", *argv]

    def run(self, argv: Sequence[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.command(argv), check=check, **kwargs)

    def popen(self, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.command(argv), **kwargs)

    def link_up(self, ifname: str) -> None:
        with self.ipr() as ip:
            ip.link("set", index=_index(ip, ifname), state="up")

    def add_address(self, ifname: str, cidr: str) -> None:
        iface = ipaddress.ip_interface(cidr)
        with self.ipr() as ip:
            ip.addr("add", index=_index(ip, ifname), address=str(iface.ip), prefixlen=iface.network.prefixlen)

    def add_route(self, dst: str, gateway: str | None = None, ifname: str | None = None) -> None:
        spec: dict = {"dst": dst}
        if gateway:
            spec["gateway"] = gateway
        with self.ipr() as ip:
            if ifname:
                spec["oif"] = _index(ip, ifname)
            ip.route("replace", **spec)

    def set_sysctl(self, key: str, value: str) -> None:
        """Write /proc/sys/<key> inside the namespace (e.g. net/ipv4/ip_forward)."""
        self.run(["sh", "-c", f"echo {value} > /proc/sys/{key}"])


def _index(ip, ifname: str) -> int:
    found = ip.link_lookup(ifname=ifname)
    if not found:
        raise LookupError(f"no interface {ifname}")
    return found[0]


def veth(a: Namespace, a_if: str, b: Namespace, b_if: str, mtu: int | None = None) -> None:
    """A veth pair with end *a_if* in namespace *a* and *b_if* in *b*, both up."""
    with IPRoute() as ip:
        tmp = f"fnv{os.getpid() % 100000}{abs(hash(a_if)) % 1000}"[:15]
        ip.link("add", ifname=tmp, kind="veth", peer={"ifname": b_if, "net_ns_fd": b.name})
        idx = _index(ip, tmp)
        ip.link("set", index=idx, net_ns_fd=a.name)
    with a.ipr() as ip:
        idx = _index(ip, tmp)
        ip.link("set", index=idx, ifname=a_if)
        if mtu:
            ip.link("set", index=idx, mtu=mtu)
        ip.link("set", index=idx, state="up")
    with b.ipr() as ip:
        idx = _index(ip, b_if)
        if mtu:
            ip.link("set", index=idx, mtu=mtu)
        ip.link("set", index=idx, state="up")

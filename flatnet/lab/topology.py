"""The simulated site as data: hosts, links, routes, NAT rules and services, one row each.

The lab builds exactly what these tables say, so a later issue grows the site (an "internet"
namespace, a lighthouse, NAT routers in front of hosts) by adding rows, not code. The default site
is a small office::

    lan (colleague's PC)          win (Windows host)                     wsl1 / wsl2 (WSL2 VMs)
    eth0 192.168.77.10 ─── LAN ─── lan0 192.168.77.1   gateway :80
                                   weth1 172.24.1.1 ───── NAT vSwitch ───── eth0 172.24.1.2
                                   weth2 172.24.2.1 ───── NAT vSwitch ───── eth0 172.24.2.2
                                   10.87.1.0/24 via 172.24.1.2          containers 10.87.1.0/24
                                   10.87.2.0/24 via 172.24.2.2          containers 10.87.2.0/24

Each host becomes the network namespace ``<prefix>-<host>``. Interface names are those inside the
host's namespace (Linux limits them to 15 bytes).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Literal

FLATNET_RANGE = ipaddress.IPv4Network("10.87.0.0/16")


@dataclass(frozen=True)
class Host:
    """A simulated machine: one network namespace."""

    name: str
    description: str
    forwarding: bool = False  # routes packets between its interfaces (Windows host, WSL2 VMs)


@dataclass(frozen=True)
class Link:
    """A cable (veth pair) between two hosts, with an address at each end."""

    a: str
    a_if: str
    a_addr: str  # CIDR
    b: str
    b_if: str
    b_addr: str
    mtu: int | None = None

    def address_of(self, host: str) -> str | None:
        if host == self.a:
            return str(ipaddress.ip_interface(self.a_addr).ip)
        if host == self.b:
            return str(ipaddress.ip_interface(self.b_addr).ip)
        return None


@dataclass(frozen=True)
class LocalAddress:
    """An extra address a host answers for (a service address without a container).

    It sits on ``lo``: this kernel may lack the ``dummy`` link type, and a /32 on ``lo`` is
    reachable from other hosts once they route to it.
    """

    host: str
    addr: str  # CIDR, normally a /32
    ifname: str = "lo"


@dataclass(frozen=True)
class Route:
    host: str
    dst: str  # CIDR or "default"
    via: str


@dataclass(frozen=True)
class Masquerade:
    """Source NAT on *host* for packets from *source* leaving through *out_if* (Windows' WSL NAT).

    Linux keeps the source port when it can: endpoint-independent mapping, as most home routers.
    ``random_ports`` picks a fresh port per flow instead: an endpoint-dependent ("symmetric") NAT.
    """

    host: str
    source: str
    out_if: str
    random_ports: bool = False


@dataclass(frozen=True)
class BlockPort:
    """Drop packets to *port* (None: any port) on *host* arriving through *in_if*: the Windows firewall
    guarding the admin API; a network that blocks UDP (``protocol="udp", port=None, forwarded=True``)."""

    host: str
    in_if: str
    port: int | None
    protocol: Literal["tcp", "udp"] = "tcp"
    forwarded: bool = False  # also (only) packets routed through the host, not just those to it


@dataclass(frozen=True)
class Service:
    """A web app the lab runs on a WSL2 host and publishes through the gateway as ``/<name>/``.

    ``demo-app`` is Flatnet's small Python app (a page, a redirect, a cookie) on a dummy address;
    ``podman-httpd`` is a real Podman container on ``--network flatnet`` running busybox httpd.
    """

    name: str
    host: str
    kind: Literal["demo-app", "podman-httpd"]
    address: str = ""  # demo-app: the address it listens on; podman: assigned by the CNI plugin
    port: int = 8080


@dataclass(frozen=True)
class Topology:
    hosts: tuple[Host, ...]
    links: tuple[Link, ...]
    local_addresses: tuple[LocalAddress, ...] = ()
    routes: tuple[Route, ...] = ()
    masquerades: tuple[Masquerade, ...] = ()
    blocked_ports: tuple[BlockPort, ...] = ()
    # Which host plays which part.
    client: str = "lan"
    gateway_host: str = "win"
    gateway_lan_address: str = "192.168.77.1"
    wsl_hosts: tuple[str, ...] = ()
    # wsl host -> its container subnet
    container_subnets: dict[str, str] = field(default_factory=dict)
    # wsl host -> the wsl host whose tunnel the Windows host reaches it through, once every node
    # runs the tunnel: "one gateway serves every host's services" (docs/lab.md). Until then, and
    # without the tunnel, the route of ``routes`` (straight to the host's own VM) stays.
    served_through: dict[str, str] = field(default_factory=dict)

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    def addresses_of(self, host: str) -> list[str]:
        return [a for link in self.links if (a := link.address_of(host))]

    def link_between(self, a: str, b: str) -> Link:
        for link in self.links:
            if {link.a, link.b} == {a, b}:
                return link
        raise KeyError((a, b))

    def gateway_address_for(self, wsl_host: str) -> str:
        """The Windows host's address as a WSL2 VM sees it (where the VM reaches the admin API)."""
        address = self.link_between(self.gateway_host, wsl_host).address_of(self.gateway_host)
        assert address is not None
        return address


ADMIN_PORT = 8081  # the gateway's admin API, on loopback and the WSL-facing addresses of "win"

OFFICE = Topology(
    hosts=(
        Host("lan", "a colleague's PC on the office LAN"),
        Host("win", "the Windows host: Flatnet gateway, NAT for its WSL2 VMs", forwarding=True),
        Host("wsl1", "WSL2 VM #1 (NAT mode), containers 10.87.1.0/24", forwarding=True),
        Host("wsl2", "WSL2 VM #2 (NAT mode), containers 10.87.2.0/24", forwarding=True),
    ),
    links=(
        Link("lan", "eth0", "192.168.77.10/24", "win", "lan0", "192.168.77.1/24"),
        Link("win", "weth1", "172.24.1.1/24", "wsl1", "eth0", "172.24.1.2/24"),
        Link("win", "weth2", "172.24.2.1/24", "wsl2", "eth0", "172.24.2.2/24"),
    ),
    local_addresses=(
        LocalAddress("wsl1", "10.87.1.200/32"),
        LocalAddress("wsl2", "10.87.2.200/32"),
    ),
    routes=(
        Route("wsl1", "default", "172.24.1.1"),
        Route("wsl2", "default", "172.24.2.1"),
        # "A route to the Flatnet range via the WSL2 VM's address" (docs/gateway.md, NAT mode).
        Route("win", "10.87.1.0/24", "172.24.1.2"),
        Route("win", "10.87.2.0/24", "172.24.2.2"),
    ),
    masquerades=(Masquerade("win", "172.24.0.0/16", "lan0"),),
    blocked_ports=(BlockPort("win", "lan0", ADMIN_PORT),),
    wsl_hosts=("wsl1", "wsl2"),
    container_subnets={"wsl1": "10.87.1.0/24", "wsl2": "10.87.2.0/24"},
    served_through={"wsl2": "wsl1"},
)

# Services: "web" is the issue-2 job (an app in wsl1 reached from the LAN). With Podman and the CNI
# plugin available, "web" becomes a real container and the demo app moves to wsl2 as "demo".
DEMO_ONLY_SERVICES = (Service("web", "wsl1", "demo-app", "10.87.1.200", 8080),)
CONTAINER_SERVICES = (
    Service("web", "wsl1", "podman-httpd", "", 80),
    Service("demo", "wsl2", "demo-app", "10.87.2.200", 8080),
)


# The sites `flatnet lab up --site NAME` can build. Later issues add theirs here (e.g. an office
# behind NAT routers with a lighthouse on an "internet" host).
SITES: dict[str, Topology] = {"office": OFFICE}


def namespace_name(prefix: str, host: str) -> str:
    return f"{prefix}-{host}"

"""The TUN device: opened with offloads (ioctl), configured over netlink (pyroute2), removed on close.

``IFF_TUN | IFF_NO_PI | IFF_VNET_HDR`` plus ``TUNSETOFFLOAD`` with CSUM|TSO4|TSO6 lets the kernel
hand the node whole TCP super-packets (up to 64 KB, one virtio-net header each, the TCP checksum
left partial) and take them back the same way: the read/write count per byte drops ~40x, which is
what makes a Python data plane fast (see docs/dataplane.md). ``TUNSETVNETHDRSZ`` pins the header at
the 10-byte ``struct virtio_net_hdr`` (no mergeable-buffer count).

The device is not persistent: closing the fd removes it, and with it its addresses and routes.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import struct

from pyroute2 import IPRoute

from flatnet.node.packet import VNET_HDR_LEN

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04

READ_SIZE = VNET_HDR_LEN + 65535


class TunDevice:
    """A TUN interface with offloads; :meth:`read` returns a frame or None once it would block."""

    def __init__(self, name: str, offload: bool = True) -> None:
        self.name = name
        self.offload = offload
        self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            flags = IFF_TUN | IFF_NO_PI | IFF_VNET_HDR
            ifreq = struct.pack("16sH22x", name.encode(), flags)
            result = fcntl.ioctl(self.fd, TUNSETIFF, ifreq)
            self.name = result[:16].rstrip(b"\x00").decode()
            fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
            if offload:
                fcntl.ioctl(self.fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
        except OSError:
            os.close(self.fd)
            raise

    def fileno(self) -> int:
        return self.fd

    def read(self) -> bytes | None:
        try:
            return os.read(self.fd, READ_SIZE)
        except BlockingIOError:
            return None

    def write(self, frame) -> None:
        os.write(self.fd, frame)

    def configure(self, address: ipaddress.IPv4Address, routes: list, mtu: int) -> None:
        """MTU, this node's address (/32), up, and a route for each network in *routes* (netlink)."""
        # Flatnet routes IPv4 only: without this the kernel sends IPv6 router solicitations and MLD
        # reports into the TUN as the link comes up, counted as drops that are no one's fault.
        disable_ipv6 = f"/proc/sys/net/ipv6/conf/{self.name}/disable_ipv6"
        if os.path.exists(disable_ipv6):
            with open(disable_ipv6, "w") as f:
                f.write("1")
        with IPRoute() as ip:
            index = ip.link_lookup(ifname=self.name)[0]
            ip.link("set", index=index, mtu=mtu)
            ip.addr("replace", index=index, address=str(address), prefixlen=32)
            ip.link("set", index=index, state="up")
            for network in routes:
                network = ipaddress.ip_network(network)
                ip.route(
                    "replace", dst=str(network.network_address), dst_len=network.prefixlen, oif=index, prefsrc=str(address)
                )

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def interface_mtu(ifname: str | None = None) -> int:
    """MTU of *ifname*, or of the interface holding the default route (the underlay, WSL2's eth0)."""
    with IPRoute() as ip:
        if ifname is None:
            routes = ip.route("get", dst="1.1.1.1") if _has_default(ip) else []
            index = routes[0].get_attr("RTA_OIF") if routes else None
            if index is None:
                links = [link for link in ip.get_links() if link.get_attr("IFLA_IFNAME") != "lo"]
                return min((link.get_attr("IFLA_MTU") for link in links), default=1500)
        else:
            index = ip.link_lookup(ifname=ifname)[0]
        return ip.get_links(index)[0].get_attr("IFLA_MTU")


def _has_default(ip) -> bool:
    return any(r.get_attr("RTA_DST") is None for r in ip.get_routes(family=2, table=254))


FORWARDING = "/proc/sys/net/ipv4/ip_forward"


def enable_forwarding() -> str:
    """Turn IPv4 forwarding on; returns the previous value so shutdown can put it back."""
    with open(FORWARDING) as f:
        previous = f.read().strip()
    if previous != "1":
        with open(FORWARDING, "w") as f:
            f.write("1")
    return previous


def restore_forwarding(previous: str) -> None:
    if previous and previous != "1":
        with open(FORWARDING, "w") as f:
            f.write(previous)

"""The netlink work of ADD/DEL/CHECK: a veth pair, addresses and routes (pyroute2; never ``ip``).

Addressing follows the reference ``ptp`` plugin, so each container sits on a point-to-point link::

    container netns                          host netns (the WSL2 host)
    eth0  10.87.1.7/32                       fn<hash>  10.87.1.1/32 (the gateway, on every host veth)
      10.87.1.1 dev eth0 scope link            10.87.1.7/32 dev fn<hash> scope link
      10.87.0.0/16 via 10.87.1.1
      default via 10.87.1.1

The container reaches its gateway by ARP on its own veth; the host reaches the container through the
/32 route. No bridge, so containers on one host talk through the host's routing like everyone else.

The host-side name is derived from (container id, ifname) so DEL finds it without any state, even
after a crash half-way through ADD. Deleting the host side removes the pair and the /32 route.

ADD and DEL speak rtnetlink directly (:mod:`cni.rtnl`, a few batched requests); CHECK and the
listings use pyroute2, imported only when they run: importing it costs ~0.3 s, which the plugin's
fallback path (node down) must not pay on every container start.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import ipaddress
import os
import signal
import socket
import threading
from collections.abc import Iterator, Sequence

from cni import rtnl
from cni.spec import ERR_CHECK_FAILED, ERR_CONTAINER_UNKNOWN, CniError

# Fault injection for the crash tests: the plugin SIGKILLs itself at the named point
# ("after-lease", "after-veth"), as a crash or an impatient runtime would. Unset in production.
CRASH_POINT_ENV = "FLATNET_CNI_CRASH_POINT"
CLONE_NEWNET = 0x40000000
HOST_IFNAME_PREFIX = "fn"
_libc = ctypes.CDLL(None, use_errno=True)


def crash_point(name: str) -> None:
    if os.environ.get(CRASH_POINT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def host_ifname_for(container_id: str, ifname: str) -> str:
    """The host side of a container's veth: ``fn`` + 12 hex digits (kernel limit is 15 characters)."""
    return HOST_IFNAME_PREFIX + hashlib.sha256(f"{container_id}/{ifname}".encode()).hexdigest()[:12]


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def netlink_socket_in(netns_path: str, kind: int = socket.SOCK_DGRAM) -> socket.socket:
    """A rtnetlink socket bound to the namespace at *netns_path*.

    A socket belongs to the namespace its creator was in, so a short-lived thread enters the
    namespace and opens it (setns(2) changes only the calling thread; a throw-away thread means no
    worker of the node can ever be left in a container's namespace). pyroute2's own ``NetNS``
    forks a helper process per socket, which is slow and unwelcome inside the node.
    """
    try:
        target = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise CniError(ERR_CONTAINER_UNKNOWN, "container network namespace does not exist", netns_path) from None
    outcome: list = []

    def enter_and_open() -> None:
        try:
            _setns(target)
        except OSError as exc:
            outcome.append(CniError(ERR_CONTAINER_UNKNOWN, "cannot enter the container network namespace",
                                    f"{netns_path}: {exc}"))
            return
        try:
            outcome.append(socket.socket(socket.AF_NETLINK, kind | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE))
        except OSError as exc:
            outcome.append(exc)

    try:
        thread = threading.Thread(target=enter_and_open, name="flatnet-netns")
        thread.start()
        thread.join()
    finally:
        os.close(target)
    (result,) = outcome
    if isinstance(result, BaseException):
        raise result
    return result


@contextlib.contextmanager
def _ipr_in(netns_path: str) -> Iterator:
    from pyroute2 import IPRoute

    ipr = IPRoute(use_socket=netlink_socket_in(netns_path))
    try:
        yield ipr
    finally:
        ipr.close()


def _index(ipr, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return found[0] if found else None


def setup(netns_path: str, ifname: str, host_ifname: str, address: ipaddress.IPv4Address,
          gateway: ipaddress.IPv4Address, routes: Sequence[ipaddress.IPv4Network], mtu: int = 0,
          mac: str | None = None) -> tuple[str, str]:
    """Build the pair and its addresses and routes; returns (container MAC, host MAC).

    Starts from a clean slate: a host side left by an earlier ADD (a re-run, or a crash half-way)
    is deleted first, so the result is always exactly what this function builds. Six round trips.
    """
    try:
        target = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise CniError(ERR_CONTAINER_UNKNOWN, "container network namespace does not exist", netns_path) from None
    try:
        with rtnl.Rtnl() as host:
            host.delete_link(host_ifname)
            try:
                host.add_veth(host_ifname, ifname, target, mtu, mac)
            except OSError as exc:
                if exc.errno == errno.EEXIST:
                    raise CniError(ERR_CHECK_FAILED, "interface already exists in the container", ifname) from None
                raise
            crash_point("after-veth")
            host_index, host_mac = host.link_info(host_ifname)
            host.transact([
                rtnl.add_address(host_index, str(gateway), 32),
                rtnl.replace_route(str(address), 32, host_index, scope=rtnl.RT_SCOPE_LINK),
            ])
    finally:
        os.close(target)
    with rtnl.Rtnl(netlink_socket_in(netns_path, socket.SOCK_RAW)) as ctr:
        index, container_mac = ctr.link_info(ifname)
        ctr.transact([
            rtnl.add_address(index, str(address), 32),
            rtnl.set_up(index),
            rtnl.set_up(rtnl.LOOPBACK_INDEX),
            rtnl.replace_route(str(gateway), 32, index, scope=rtnl.RT_SCOPE_LINK),
            *(rtnl.replace_route(str(dst.network_address), dst.prefixlen, index, str(gateway)) for dst in routes),
        ])
    return container_mac, host_mac


def teardown(host_ifname: str) -> bool:
    """Delete the pair by its host side (the peer and the host route go with it). Idempotent."""
    with rtnl.Rtnl() as host:
        return host.delete_link(host_ifname)


def host_side_exists(host_ifname: str) -> bool:
    with rtnl.Rtnl() as host:
        try:
            host.link_info(host_ifname)
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                return False
            raise
        return True


def host_side_names() -> set[str]:
    """Host-side names of every Flatnet veth in this namespace (for GC and reconcile)."""
    from pyroute2 import IPRoute

    with IPRoute() as host:
        names = {link.get_attr("IFLA_IFNAME") for link in host.get_links()}
    return {n for n in names if n and n.startswith(HOST_IFNAME_PREFIX)}


def check(netns_path: str, ifname: str, host_ifname: str, address: ipaddress.IPv4Address,
          gateway: ipaddress.IPv4Address, routes: Sequence[ipaddress.IPv4Network]) -> None:
    """Raise :class:`CniError` unless the container still has what :func:`setup` gave it."""
    from pyroute2 import IPRoute

    with IPRoute() as host:
        host_index = _index(host, host_ifname)
        if host_index is None:
            raise CniError(ERR_CHECK_FAILED, "host side of the veth is missing", host_ifname)
        host_routes = {r.get_attr("RTA_DST") for r in host.get_routes(family=socket.AF_INET, oif=host_index)
                       if r["dst_len"] == 32}
        if str(address) not in host_routes:
            raise CniError(ERR_CHECK_FAILED, "host route to the container is missing", f"{address}/32 dev {host_ifname}")
    with _ipr_in(netns_path) as ctr:
        index = _index(ctr, ifname)
        if index is None:
            raise CniError(ERR_CHECK_FAILED, "container interface is missing", ifname)
        addrs = {a.get_attr("IFA_ADDRESS") for a in ctr.get_addr(family=socket.AF_INET, index=index)}
        if str(address) not in addrs:
            raise CniError(ERR_CHECK_FAILED, "container address is missing", f"{address} on {ifname}")
        have = {(r.get_attr("RTA_DST") or "0.0.0.0", r["dst_len"], r.get_attr("RTA_GATEWAY"))
                for r in ctr.get_routes(family=socket.AF_INET, oif=index)}
        for dst in routes:
            if (str(dst.network_address), dst.prefixlen, str(gateway)) not in have:
                raise CniError(ERR_CHECK_FAILED, "container route is missing", f"{dst} via {gateway}")

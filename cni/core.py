"""ADD, DEL, CHECK, GC and STATUS for the flatnet network: IPAM plus the netlink work, one place.

Both front ends share this core: the CNI executable's fallback path (node down) and the node's
control-socket handler (:mod:`flatnet.node.cni_service`), and the netavark front end
(:mod:`cni.netavark`). It never talks to the node or the gateway itself; the node adds
registration on top.

Order of work, chosen so a crash at any point is undone by DEL (see :mod:`cni.ipam`):
ADD leases the address, then builds the veth pair (whose host-side name is derived from the
container id); DEL deletes the veth pair, then frees the lease. A failure inside ADD undoes both
before the error is returned, so a failed ADD leaks nothing.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cni import links
from cni.ipam import AddressesExhausted, AddressPool, AddressTaken, Lease
from cni.spec import (
    ARG_POD_NAME,
    ERR_ADDRESS_TAKEN,
    ERR_ADDRESSES_EXHAUSTED,
    ERR_CHECK_FAILED,
    ERR_INTERNAL,
    ERR_INVALID_CONFIG,
    ERR_IO,
    ERR_PLUGIN_NOT_AVAILABLE,
    GC_VALID_ATTACHMENTS,
    CniError,
    CniRequest,
    add_result,
)

DEFAULT_DATA_DIR = "/var/lib/flatnet/cni"
DEFAULT_NODE_SOCKET = "/run/flatnet/node.sock"
FLATNET_RANGE = ipaddress.IPv4Network("10.87.0.0/16")
DEFAULT_ROUTE = ipaddress.IPv4Network("0.0.0.0/0")


@dataclass(frozen=True)
class PluginConfig:
    """The plugin's own keys in the conflist (written by ``flatnet cni install``)."""

    network: str
    subnet: ipaddress.IPv4Network
    data_dir: Path = Path(DEFAULT_DATA_DIR)
    flatnet_range: ipaddress.IPv4Network = FLATNET_RANGE
    node_socket: str = DEFAULT_NODE_SOCKET
    mtu: int = 0

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return next(self.subnet.hosts())

    @property
    def routes(self) -> tuple[ipaddress.IPv4Network, ...]:
        return (self.flatnet_range, DEFAULT_ROUTE)

    @classmethod
    def from_netconf(cls, conf: dict[str, Any]) -> PluginConfig:
        """Keys ``subnet`` (or ``ipam.subnet``), ``dataDir``, ``flatnetRange``, ``nodeSocket``, ``mtu``."""
        ipam = conf.get("ipam") if isinstance(conf.get("ipam"), dict) else {}
        try:
            subnet_text = conf.get("subnet") or ipam.get("subnet")
            if not subnet_text:
                raise ValueError("subnet is missing (plugin key 'subnet' or 'ipam.subnet')")
            subnet = ipaddress.IPv4Network(subnet_text)
            flatnet_range = ipaddress.IPv4Network(conf.get("flatnetRange", str(FLATNET_RANGE)))
            if not subnet.subnet_of(flatnet_range):
                raise ValueError(f"subnet {subnet} is not inside the Flatnet range {flatnet_range}")
            if subnet.num_addresses < 4:
                raise ValueError(f"subnet {subnet} is too small")
            mtu = conf.get("mtu", 0)
            if not isinstance(mtu, int) or isinstance(mtu, bool) or not (mtu == 0 or 576 <= mtu <= 65535):
                raise ValueError(f"mtu must be 0 or 576..65535, got {mtu!r}")
            data_dir = conf.get("dataDir") or ipam.get("dataDir") or DEFAULT_DATA_DIR
            return cls(network=str(conf["name"]), subnet=subnet, data_dir=Path(str(data_dir)),
                       flatnet_range=flatnet_range, node_socket=str(conf.get("nodeSocket", DEFAULT_NODE_SOCKET)),
                       mtu=mtu)
        except (ValueError, TypeError, KeyError) as exc:
            raise CniError(ERR_INVALID_CONFIG, "invalid network configuration", str(exc)) from None

    def pool(self) -> AddressPool:
        return AddressPool(self.data_dir, self.network, self.subnet, self.gateway)


def requested_address_and_mac(request: CniRequest) -> tuple[ipaddress.IPv4Address | None, str | None]:
    """The ``ips`` and ``mac`` capabilities (runtimeConfig; CNI CONVENTIONS.md).

    Podman sends them for ``--ip`` / ``--mac-address`` and, on ``podman network reload`` (a DEL
    then an ADD), the container's previous address and MAC so it keeps them.
    """
    rc = request.runtime_config
    requested = None
    for text in rc.get("ips") or []:
        try:
            candidate = ipaddress.ip_interface(str(text)).ip
        except ValueError:
            raise CniError(ERR_INVALID_CONFIG, "invalid runtimeConfig.ips entry", repr(text)) from None
        if candidate.version == 4:
            requested = candidate
            break
    mac = rc.get("mac")
    if mac is not None and (not isinstance(mac, str) or len(mac.split(":")) != 6):
        raise CniError(ERR_INVALID_CONFIG, "invalid runtimeConfig.mac", repr(mac))
    return requested, mac


@dataclass(frozen=True)
class Attachment:
    """What ADD gave a container: the facts every result version is built from."""

    container_ifname: str
    container_mac: str
    sandbox: str
    host_ifname: str
    host_mac: str
    address: ipaddress.IPv4Interface  # the container's address with the subnet's prefix length
    gateway: ipaddress.IPv4Address
    routes: tuple[ipaddress.IPv4Network, ...]  # each via the gateway

    def result(self, cni_version: str) -> dict[str, Any]:
        interfaces = [
            {"name": self.host_ifname, "mac": self.host_mac},
            {"name": self.container_ifname, "mac": self.container_mac, "sandbox": self.sandbox},
        ]
        ips = [{"address": str(self.address), "gateway": str(self.gateway), "interface": 1}]
        routes = [{"dst": str(dst), "gw": str(self.gateway)} for dst in self.routes]
        return add_result(cni_version, interfaces, ips, routes)


@dataclass(frozen=True)
class AddOutcome:
    attachment: Attachment
    lease: Lease


@contextlib.contextmanager
def guard(command: str) -> Iterator[None]:
    """Turn any failure into a :class:`CniError`, so the runtime always gets the spec's format."""
    try:
        yield
    except CniError:
        raise
    except OSError as exc:
        raise CniError(ERR_IO, f"{command} failed", str(exc)) from None
    except Exception as exc:  # a bug or a netlink surprise
        raise CniError(ERR_INTERNAL, f"{command} failed", f"{type(exc).__name__}: {exc}") from None


class CniCore:
    """The plugin's work for one request; raises :class:`CniError` with the spec's codes."""

    def handle(self, request: CniRequest) -> dict[str, Any] | None:
        """Run *request*; the JSON to print on stdout (None: print nothing)."""
        with guard(request.command):
            if request.command == "ADD":
                return self.add(request).attachment.result(request.cni_version)
            if request.command == "DEL":
                self.delete(request)
            elif request.command == "CHECK":
                self.check(request)
            elif request.command == "GC":
                self.gc(request)
            elif request.command == "STATUS":
                self.status(request)
            return None

    def add(self, request: CniRequest) -> AddOutcome:
        conf = PluginConfig.from_netconf(request.config)
        pool = conf.pool()
        host_ifname = links.host_ifname_for(request.container_id, request.ifname)
        lease = Lease(
            container_id=request.container_id,
            ifname=request.ifname,
            host_ifname=host_ifname,
            name=request.args.get(ARG_POD_NAME, ""),
            netns=request.netns,
            port_mappings=list(request.runtime_config.get("portMappings") or []),
            podman_env=dict(request.podman_env),
        )
        requested, mac = requested_address_and_mac(request)
        try:
            address = pool.allocate(lease, requested)
        except AddressesExhausted as exc:
            raise CniError(ERR_ADDRESSES_EXHAUSTED, "no free address", str(exc)) from None
        except AddressTaken as exc:
            raise CniError(ERR_ADDRESS_TAKEN, "requested address is taken", str(exc)) from None
        except ValueError as exc:
            raise CniError(ERR_INVALID_CONFIG, "invalid requested address", str(exc)) from None
        links.crash_point("after-lease")
        try:
            container_mac, host_mac = links.setup(request.netns, request.ifname, host_ifname, address,
                                                  conf.gateway, conf.routes, conf.mtu, mac)
        except BaseException:
            links.teardown(host_ifname)
            pool.release(request.container_id, request.ifname)
            raise
        attachment = Attachment(
            container_ifname=request.ifname,
            container_mac=container_mac,
            sandbox=request.netns,
            host_ifname=host_ifname,
            host_mac=host_mac,
            address=ipaddress.IPv4Interface(f"{address}/{conf.subnet.prefixlen}"),
            gateway=conf.gateway,
            routes=conf.routes,
        )
        return AddOutcome(attachment, lease)

    def delete(self, request: CniRequest) -> list[tuple[ipaddress.IPv4Address, Lease]]:
        """Undo ADD, whatever of it happened; freed leases (empty on a repeated DEL)."""
        conf = PluginConfig.from_netconf(request.config)
        links.teardown(links.host_ifname_for(request.container_id, request.ifname))
        return conf.pool().release(request.container_id, request.ifname)

    def check(self, request: CniRequest) -> None:
        conf = PluginConfig.from_netconf(request.config)
        found = conf.pool().find(request.container_id, request.ifname)
        if found is None:
            raise CniError(ERR_CHECK_FAILED, "no address is leased to this container", request.container_id)
        address, lease = found
        links.check(request.netns, request.ifname, lease.host_ifname, address, conf.gateway, conf.routes)

    def gc(self, request: CniRequest) -> list[tuple[ipaddress.IPv4Address, Lease]]:
        """Free every lease (and veth) whose (container, ifname) is not in the valid attachments."""
        conf = PluginConfig.from_netconf(request.config)
        valid_list = request.config.get(GC_VALID_ATTACHMENTS) or []
        if not isinstance(valid_list, list):
            raise CniError(ERR_INVALID_CONFIG, "invalid network configuration", f"{GC_VALID_ATTACHMENTS} must be a list")
        valid = {(str(a.get("containerID", "")), str(a.get("ifname", ""))) for a in valid_list if isinstance(a, dict)}
        pool = conf.pool()
        freed = []
        for address, lease in pool.leases().items():
            if (lease.container_id, lease.ifname) in valid:
                continue
            links.teardown(lease.host_ifname or links.host_ifname_for(lease.container_id, lease.ifname))
            if pool.release_address(address, lease.container_id):
                freed.append((address, lease))
        return freed

    def status(self, request: CniRequest) -> None:
        """Ready unless the store is unusable or every address is leased (SPEC.md STATUS)."""
        conf = PluginConfig.from_netconf(request.config)
        pool = conf.pool()
        try:
            leased = len(pool.leases())
        except OSError as exc:
            raise CniError(ERR_PLUGIN_NOT_AVAILABLE, "address store unusable", str(exc)) from None
        usable = conf.subnet.num_addresses - 3  # network, gateway, broadcast
        if leased >= usable:
            raise CniError(ERR_PLUGIN_NOT_AVAILABLE, "no free address", f"{leased} of {usable} leased")

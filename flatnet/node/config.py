"""flatnet-node's configuration: one typed object, loaded from TOML (``/etc/flatnet/node.toml``).

Sections are owned by the part that uses them; every field has its default beside it. Example::

    name = "wsl-alice"
    control_socket = "/run/flatnet/node.sock"

    [pki]
    ca = "/etc/flatnet/ca.crt"
    cert = "/etc/flatnet/host.crt"
    key = "/etc/flatnet/host.key"

    [tunnel]
    listen_port = 4242

    [[peers]]                      # static peers (the lighthouse issue adds discovery)
    ip = "10.87.2.1"
    endpoints = ["192.168.50.12:4242"]

    [cni]
    subnet = "10.87.1.0/24"        # this host's container subnet (must be in the cert)

    [firewall]                     # optional; default: allow everything within the CA
    inbound = [{ proto = "tcp", port = "80", groups = ["web"] }]

    [gateway]
    admin_url = "http://172.20.0.1:8081"
    token_file = "/etc/flatnet/gateway.token"

    [lighthouse]                   # discovery + Graceful Escalation (docs/escalation.md)
    hosts = [{ ip = "10.87.255.1", endpoints = ["203.0.113.50:4242"] }]

    [metrics]                      # Prometheus /metrics (docs/operations.md); "" disables
    listen = "127.0.0.1:9587"
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from flatnet import config
from flatnet.config import port_check, positive_check
from flatnet.firewall import FirewallConfig

DEFAULT_CONFIG_PATH = Path("/etc/flatnet/node.toml")
FLATNET_RANGE = ipaddress.IPv4Network("10.87.0.0/16")


@dataclass(frozen=True)
class PkiConfig:
    ca: Path = Path("/etc/flatnet/ca.crt")
    cert: Path = Path("/etc/flatnet/host.crt")
    key: Path = Path("/etc/flatnet/host.key")
    blocklist: list[str] = field(default_factory=list)  # certificate fingerprints, hex


@dataclass(frozen=True)
class TunnelConfig:
    listen_host: str = "0.0.0.0"
    listen_port: int = field(default=4242, metadata={"check": port_check})
    tun_name: str = "flatnet0"
    mtu: int = 0  # 0: derive from the underlay interface's MTU
    underlay_interface: str = ""  # "": the interface of the default route (WSL2: eth0)
    max_segments: int = 16  # TCP segments sealed in one DATA_BATCH message at most (docs/dataplane.md)
    adaptive_segments: bool = True  # halve the cap on loss, grow it back while clean
    parity: Literal["auto", "always", "never"] = "auto"  # a parity fragment per message (auto: while loss is seen)


@dataclass(frozen=True)
class StaticPeer:
    ip: ipaddress.IPv4Address  # the peer's Flatnet IP (as in its certificate)
    endpoints: list[str] = field(default_factory=list)  # "host:port" underlay addresses
    # Container subnets to route to this peer before its certificate is known (the certificate's
    # own subnets are added once learned; anti-spoofing always follows the certificate).
    subnets: list[ipaddress.IPv4Network] = field(default_factory=list)


@dataclass(frozen=True)
class CniConfig:
    data_dir: Path = Path("/var/lib/flatnet/cni")  # IPAM store, file-locked
    subnet: ipaddress.IPv4Network | None = None  # default: the certificate's first subnet
    network: str = "flatnet"  # the Podman network name (conflist "name")
    mtu: int = 0  # container veth MTU; 0: the kernel's default (1500)
    plugin_dir: Path = Path("/usr/local/lib/cni")  # where `flatnet cni install` puts the plugin
    conf_dir: Path = Path("/etc/cni/net.d")  # where `flatnet cni install` writes the conflist
    read_labels: bool = True  # after ADD, read flatnet.* labels with `podman container inspect`


@dataclass(frozen=True)
class GatewayPushConfig:
    admin_url: str | None = None  # e.g. http://127.0.0.1:8081 ; None: do not push routes
    token_file: Path | None = None
    resync_interval: float = field(default=30.0, metadata={"check": positive_check})  # full sync, seconds
    retry_interval: float = field(default=1.0, metadata={"check": positive_check})  # after a failed push
    # Follow the lighthouses' service catalogue: route every other host's services on this gateway
    # too, under owner "catalogue.<node name>" (docs/gateway.md "Following the catalogue").
    follow_catalogue: bool = False
    catalogue_interval: float = field(default=10.0, metadata={"check": positive_check})  # seconds between fetches


@dataclass(frozen=True)
class LighthouseHost:
    ip: ipaddress.IPv4Address  # the lighthouse's Flatnet IP (its certificate's)
    endpoints: list[str] = field(default_factory=list)  # "host:port" public underlay addresses


@dataclass(frozen=True)
class NodeLighthouseConfig:
    """Lighthouses to register with and query (all of them); with any, or with ``escalation``
    set, peers' traffic goes through Graceful Escalation (flatnet/escalation.py)."""

    hosts: list[LighthouseHost] = field(default_factory=list)
    advertise: list[str] = field(default_factory=list)  # "host:port" LAN endpoints; []: listen_host if set
    escalation: bool = False  # escalation for static peers even without lighthouses
    relays: bool = True  # ask the lighthouses for relay sessions


def metrics_listen_check(value: str) -> str | None:
    """``"HOST:PORT"`` (an IP address) or ``""`` (no exporter)."""
    return None if value == "" or parse_listen(value) is not None else f"expected HOST:PORT or \"\", got {value!r}"


def parse_listen(value: str) -> tuple[str, int] | None:
    """``"127.0.0.1:9587"`` -> ``("127.0.0.1", 9587)``; None if empty or malformed."""
    host, colon, port = value.rpartition(":")
    if not colon or not port.isdigit() or not 0 <= int(port) <= 65535:
        return None
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class MetricsConfig:
    """Where the Prometheus exporter listens. Loopback by default: metrics name peers and routes,
    so serving them beyond the host is an operator's explicit choice."""

    listen: str = field(default="127.0.0.1:9587", metadata={"check": metrics_listen_check})


@dataclass(frozen=True)
class NodeConfig:
    name: str
    control_socket: Path = Path("/run/flatnet/node.sock")
    flatnet_range: ipaddress.IPv4Network = FLATNET_RANGE
    pki: PkiConfig = field(default_factory=PkiConfig)
    tunnel: TunnelConfig = field(default_factory=TunnelConfig)
    peers: list[StaticPeer] = field(default_factory=list)
    cni: CniConfig = field(default_factory=CniConfig)
    gateway: GatewayPushConfig = field(default_factory=GatewayPushConfig)
    firewall: FirewallConfig = field(default_factory=FirewallConfig)  # flatnet/firewall.py
    lighthouse: NodeLighthouseConfig = field(default_factory=NodeLighthouseConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


def load_node_config(path: str | Path = DEFAULT_CONFIG_PATH) -> NodeConfig:
    return config.load(path, NodeConfig)

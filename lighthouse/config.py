"""flatnet-lighthouse's configuration: one typed object, loaded from TOML (via ``flatnet.config``).

Example ``lighthouse.toml``::

    name = "lighthouse-1"
    listen_host = "0.0.0.0"
    listen_port = 4242

    [pki]                          # the lighthouse's own host certificate from the team's CA
    ca = "/etc/flatnet/ca.crt"
    cert = "/etc/flatnet/lighthouse.crt"
    key = "/etc/flatnet/lighthouse.key"

    [limits]
    node_ttl = 120.0
    max_nodes = 20000
    rate = 20.0
    burst = 40.0

    [relay]                        # optional: relay sessions (docs/escalation.md)
    secret_file = "/etc/flatnet/relay.secret"   # shared by the lighthouses and the relays
    advertise = ["udp://203.0.113.50:3478", "tcp://203.0.113.50:443"]   # in RelayOffers
    serve = true                   # also run a relay in this process, on:
    listen_host = "0.0.0.0"
    udp_port = 3478
    tcp_port = 443

    [metrics]                      # Prometheus /metrics (docs/operations.md); "" disables
    listen = "127.0.0.1:9588"
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from flatnet import config
from flatnet.config import port_check, positive_check
from flatnet.node.config import PkiConfig, metrics_listen_check

DEFAULT_CONFIG_PATH = Path("/etc/flatnet/lighthouse.toml")


def _count_check(value: int) -> str | None:
    return None if value >= 1 else f"expected at least 1, got {value}"


@dataclass(frozen=True)
class LimitsConfig:
    """See lighthouse.core.LighthouseSettings (these are its fields)."""

    node_ttl: float = field(default=120.0, metadata={"check": positive_check})
    answer_ttl: int = field(default=60, metadata={"check": _count_check})
    max_nodes: int = field(default=20_000, metadata={"check": _count_check})
    max_strangers: int = field(default=4_096, metadata={"check": _count_check})
    rate: float = field(default=20.0, metadata={"check": positive_check})
    burst: float = field(default=40.0, metadata={"check": positive_check})


def _relay_endpoint_check(value: list[str]) -> str | None:
    for item in value:
        if parse_relay_url(item) is None:
            return f"expected udp://HOST:PORT or tcp://HOST:PORT, got {item!r}"
    return None


def parse_relay_url(text: str) -> tuple[str, tuple[str, int]] | None:
    """``"udp://203.0.113.50:3478"`` -> ``("udp", ("203.0.113.50", 3478))``; None if malformed."""
    from ipaddress import ip_address

    scheme, sep, rest = text.partition("://")
    host, colon, port = rest.rpartition(":")
    if scheme not in ("udp", "tcp") or not sep or not colon or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    try:
        ip_address(host.strip("[]"))
    except ValueError:
        return None
    return scheme, (host.strip("[]"), int(port))


@dataclass(frozen=True)
class RelayConfig:
    """Relay sessions: what this lighthouse grants, and (``serve``) a relay in this process."""

    secret_file: str = ""  # empty: no relay sessions are granted
    advertise: list[str] = field(default_factory=list, metadata={"check": _relay_endpoint_check})
    serve: bool = False
    listen_host: str = "0.0.0.0"
    udp_port: int = field(default=3478, metadata={"check": port_check})
    tcp_port: int = field(default=443, metadata={"check": port_check})
    max_sessions: int = field(default=10_000, metadata={"check": _count_check})
    idle_timeout: float = field(default=60.0, metadata={"check": positive_check})
    bytes_per_second: float = field(default=2_000_000.0, metadata={"check": positive_check})
    burst_bytes: float = field(default=256_000.0, metadata={"check": positive_check})


@dataclass(frozen=True)
class LighthouseMetricsConfig:
    listen: str = field(default="127.0.0.1:9588", metadata={"check": metrics_listen_check})  # "": off


@dataclass(frozen=True)
class LighthouseConfig:
    name: str = "lighthouse"
    listen_host: str = "0.0.0.0"
    listen_port: int = field(default=4242, metadata={"check": port_check})
    tick_interval: float = field(default=0.5, metadata={"check": positive_check})  # timers, expiry
    pki: PkiConfig = field(default_factory=PkiConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    metrics: LighthouseMetricsConfig = field(default_factory=LighthouseMetricsConfig)


def load_lighthouse_config(path: str | Path = DEFAULT_CONFIG_PATH) -> LighthouseConfig:
    return config.load(path, LighthouseConfig)

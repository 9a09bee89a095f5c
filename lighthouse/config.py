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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from flatnet import config
from flatnet.config import port_check, positive_check
from flatnet.node.config import PkiConfig

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


@dataclass(frozen=True)
class LighthouseConfig:
    name: str = "lighthouse"
    listen_host: str = "0.0.0.0"
    listen_port: int = field(default=4242, metadata={"check": port_check})
    tick_interval: float = field(default=0.5, metadata={"check": positive_check})  # timers, expiry
    pki: PkiConfig = field(default_factory=PkiConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)


def load_lighthouse_config(path: str | Path = DEFAULT_CONFIG_PATH) -> LighthouseConfig:
    return config.load(path, LighthouseConfig)

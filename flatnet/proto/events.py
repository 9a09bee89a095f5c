"""What the engine tells its caller, through `TunnelEngine.next_event()`: frozen dataclasses."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any


@dataclass(frozen=True)
class PacketReceived:
    """An authenticated DATA packet whose inner source the peer's certificate allows: write it to the TUN."""

    packet: bytes
    peer_ip: IPv4Address


@dataclass(frozen=True)
class BatchReceived:
    """An authenticated DATA_BATCH payload; its inner format (and the anti-spoof check of each packet
    in it, with `session.allows_source`) belongs to the data plane."""

    payload: bytes
    peer_ip: IPv4Address


@dataclass(frozen=True)
class ControlReceived:
    payload: bytes
    peer_ip: IPv4Address


@dataclass(frozen=True)
class RelayReceived:
    payload: bytes
    peer_ip: IPv4Address


@dataclass(frozen=True)
class PeerUp:
    """A session with the peer is established; sent again if its certificate changed (renewal)."""

    peer_ip: IPv4Address
    endpoint: Any
    certificate: Any  # flatnet.pki.cert.Certificate


@dataclass(frozen=True)
class Rekeyed:
    """A newer session replaced the current one with an already-up peer (same certificate)."""

    peer_ip: IPv4Address


@dataclass(frozen=True)
class PeerRoamed:
    """Authenticated traffic from the peer arrived from a new underlay address: replies go there now."""

    peer_ip: IPv4Address
    old: Any
    new: Any


@dataclass(frozen=True)
class PeerDown:
    peer_ip: IPv4Address
    reason: str  # "expired" | "handshake-failed" | "revoked"


@dataclass(frozen=True)
class HandshakeFailed:
    peer_ip: IPv4Address
    reason: str  # "timeout" (REKEY_ATTEMPT_TIME passed) | "no-endpoint"
    dropped_packets: int


Event = (
    PacketReceived | BatchReceived | ControlReceived | RelayReceived | PeerUp | Rekeyed | PeerRoamed | PeerDown
    | HandshakeFailed
)
